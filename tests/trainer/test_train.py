"""Training runs through the real DeepSpeed engine on tiny models."""

import importlib
import json
from dataclasses import replace

import pytest
import torch
from helpers import batches_of, rollout_of, update_inputs
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from grpo_ensemble import (
    Candidate,
    Generator,
    GroupEvaluator,
    RewardScorer,
    hookimpl,
    plugins,
    train,
)
from grpo_ensemble.engine.replay import replayable
from grpo_ensemble.models.loading import resolve_model
from grpo_ensemble.trainer.batching import filler_batch, left_out, plan_micro_batches
from grpo_ensemble.trainer.setup import build_run
from grpo_ensemble.trainer.step import grpo_step
from grpo_ensemble.trainer.update import (
    accumulate,
    batch_size_of,
    frozen_logprobs,
    optimizer_step,
    train_mode_is_eval_mode,
    update,
)


def _size(run, batches, left=None):
    return batch_size_of(batches, run.settings.update.max_new_tokens, left)


def _accumulate(run, batches, size, old, ref, keep=None, replay=None):
    u, s = update_inputs(run), run.settings.update
    return accumulate(u, s, batches, size, old, ref, keep, replay)


def _weights(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_micro_batch_split_gives_the_same_gradient(small_recipe, tmp_path, aggregation):
    # one step's candidates in one micro-batch, in micro-batches of 3, or cut by a token
    # budget: same gradient, same loss and metric sums
    recipe = small_recipe(loss__aggregation=aggregation, loss__beta=0.05, loss__mu=2)
    run = build_run(recipe, tmp_path)
    torch.manual_seed(0)
    rollout = rollout_of(run)
    assert rollout.advantages.abs().sum() > 0  # there is a learning signal to compare
    keep = rollout.keep.nonzero().flatten().tolist()
    tokens = sum(len(rollout.candidates[i].token_ids) for i in keep)
    grads, sums, counts = [], [], []
    for mb, budget in ((16, None), (3, None), (16, 40)):
        how = replace(run.settings.batching, micro_batch_size=mb, micro_batch_tokens=budget)
        batches = batches_of(run, rollout, how)
        counts.append(len(batches))
        for b in batches:
            assert len(b.index) <= mb
            if budget is not None and len(b.index) > 1:
                assert b.tokens.input_ids.numel() <= budget
        size = _size(run, batches)
        ref = frozen_logprobs(run.ref_model, batches, 1.0)
        old = [r - 0.1 for r in ref]  # a fixed "old policy" so that ratios are not all 1
        run.engine.module.zero_grad(set_to_none=True)
        sums.append(_accumulate(run, batches, size, old, ref))
        grads.append({n: p.grad.clone() for n, p in run.engine.module.named_parameters()})
    assert counts[:2] == [1, 6] and counts[2] > 1
    assert sums[0]["tokens"] == tokens  # every completion token, counted once
    for other in sums[1:]:
        assert other.keys() == sums[0].keys()
        for key, value in sums[0].items():
            assert other[key] == pytest.approx(value, abs=1e-6), key
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert torch.allclose(g, other[name], atol=1e-6, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_plan_micro_batches():
    # (prompt length, completion length) in the order given; positions: rows × (P + C)
    lengths = [(3, 1), (3, 2), (4, 2), (3, 5), (3, 5), (2, 9), (3, 0)]
    assert plan_micro_batches(lengths, size=8) == [[0, 1, 2, 3, 4, 5, 6]]
    assert plan_micro_batches(lengths, size=3) == [[0, 1, 2], [3, 4, 5], [6]]
    # 16 positions: [0,1] 2×5=10, +2: 3×6=18 > 16; [2,3] 2×9=18 > 16, so 2 alone (6);
    # [3,4] 2×8=16; [5] 1×11, +6: 2×(3+9)=24 > 16; [6] 1×(3+1)
    assert plan_micro_batches(lengths, size=8, tokens=16) == [[0, 1], [2], [3, 4], [5], [6]]
    # a budget below one candidate's length: each alone
    assert plan_micro_batches(lengths, size=8, tokens=1) == [[i] for i in range(7)]
    # both limits: the size cuts first where it is reached first
    assert plan_micro_batches(lengths[:2], size=1, tokens=100) == [[0], [1]]
    assert plan_micro_batches([], size=4, tokens=10) == []


def test_micro_batches_hold_similar_lengths(small_recipe, tmp_path):
    recipe = small_recipe(train__micro_batch_size=3, train__skip_zero_advantage=False)
    run = build_run(recipe, tmp_path)
    torch.manual_seed(0)
    rollout = rollout_of(run)
    keep = rollout.keep.nonzero().flatten().tolist()
    assert len(keep) >= 6
    for i, c in enumerate(rollout.candidates):  # completions of 1 to 5 tokens, interleaved
        c.token_ids = [5] * (1 + (i * 3) % 5)
    batches = batches_of(run, rollout)
    order = [i for b in batches for i in b.index]
    assert sorted(order) == keep  # every candidate that enters the loss, once
    lengths = [len(rollout.candidates[i].token_ids) for i in order]
    assert lengths == sorted(lengths)
    for b in batches:  # each micro-batch's completions are padded to its own longest
        want = max(len(rollout.candidates[i].token_ids) for i in b.index)
        assert b.tokens.completion_ids.shape[1] == want
    # completion columns computed: rows × longest, against micro-batches in candidate order
    in_order = [keep[k : k + 3] for k in range(0, len(keep), 3)]

    def columns(chunks):
        return sum(len(c) * max(len(rollout.candidates[i].token_ids) for i in c) for c in chunks)

    assert columns([b.index for b in batches]) < columns(in_order)


def test_training_changes_the_policy(small_recipe):
    result = train(small_recipe(train__lr=1e-3, eval__before=False, eval__after=False))
    trained = _weights(result.model_dir)
    base = _weights(resolve_model("builtin:tiny-arith-small", "policy.model"))
    assert any(not torch.equal(trained[k], base[k]) for k in trained)


def test_reference_model_only_with_beta(small_recipe, tmp_path):
    r0 = small_recipe()
    assert build_run(r0, tmp_path).ref_model is None
    r = small_recipe(loss__beta=0.1, loss__mu=2, train__lr=1e-3, eval__before=False)
    run = build_run(r, tmp_path)
    assert run.ref_model is not None
    assert not any(p.requires_grad for p in run.ref_model.parameters())
    result = train(r)
    # μ = 2: the second pass sees a policy that moved away from the reference
    assert result.metrics[0]["kl"] > 0
    assert result.after is not None and 0 <= result.after.accuracy <= 1


def test_metrics_and_run_directory(small_recipe):
    result = train(small_recipe(group__drop_equal_reward_groups=True))
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    m = result.metrics[0]
    for key in (
        "reward",
        "reward/exact_match",
        "member/policy/reward",
        "member/strong/reward",
        "kl",
        "clip_fraction",
        "completion_len",
        "time/step",
        "time/generate",
        "lr",
    ):
        assert key in m, key
    assert m["member/policy/candidates"] == 8 and m["member/strong/candidates"] == 8
    # dropped all-equal groups: 4 candidates per dropped group leave the loss
    assert m["trained_candidates"] == 16 - 4 * m["equal_reward_groups"]
    assert (result.run_dir / "recipe.yaml").is_file()
    assert result.before is not None and result.before.n == 16


class Oracle(Generator):
    """A text-only peer that always answers correctly."""

    name = "oracle"

    def generate(self, prompts, n, sampling):
        return [[Candidate(p.fields["answer"], [], "") for _ in range(n)] for p in prompts]


class LastDigit(RewardScorer):
    name = "last_digit"

    def __init__(self):
        self.calls = 0

    def score(self, samples):
        self.calls += 1
        return [float(s.completion[-1:] == s.row["answer"][-1:]) for s in samples]


class SignEvaluator(GroupEvaluator):
    name = "sign"

    def advantages(self, rewards, valid, stats):
        mean = (rewards * stats).sum(1, keepdim=True) / stats.sum(1, keepdim=True)
        return torch.where(valid, torch.sign(rewards - mean), torch.zeros_like(rewards))


def test_python_api_with_objects(small_recipe):
    recipe = small_recipe(peers=[{"name": "oracle", "n": 2}], eval__before=False, eval__after=False)
    scorer, evaluator = LastDigit(), SignEvaluator()
    result = train(
        recipe,
        generators={"oracle": Oracle()},
        reward_scorers=[(scorer, 1.0)],
        group_evaluator=evaluator,
    )
    assert scorer.calls == 4  # each step: the policy's candidates, then the peer's
    for m in result.metrics:
        assert m["member/oracle/reward"] == 1.0  # the oracle's text is always right
        assert m["reward/last_digit"] == m["reward"]
        assert (
            m["advantage_abs_mean"] in (0.0, 0.25, 0.5, 0.75, 1.0)
            or 0 < m["advantage_abs_mean"] <= 1
        )


class StepObserver:
    def __init__(self):
        self.seen = []

    @hookimpl
    def on_step_end(self, step, metrics):
        self.seen.append((step, metrics["reward"]))


def test_on_step_end_hook(small_recipe):
    observer = StepObserver()
    pm = plugins.get_plugin_manager()
    pm.register(observer, name="observer")
    try:
        result = train(small_recipe(eval__before=False, eval__after=False))
    finally:
        pm.unregister(name="observer")
    assert observer.seen == [(m["step"], m["reward"]) for m in result.metrics]


def test_zero_stages_agree_in_one_process(small_recipe, tmp_path):
    # one rank: ZeRO 0-3, and 2 and 3 with optimizer (and parameter) offload to CPU memory,
    # must give the same update (only reduction order may differ). AdamW's ε at 1e-5, as in
    # the multi-rank tests: at 1e-8 its first step moves an entry whose gradient is rounding
    # noise of that size by about ±lr, so another reduction order can move it by up to 2·lr
    # (on an Intel Xeon, ZeRO-3 against 0: 1.1e-5 in a q_proj entry at 1e-8, 1e-7 at 1e-5)
    variants = {
        0: {},
        1: {},
        2: {},
        3: {},
        "2+offload": {"train__offload_optimizer": True},
        "3+offload": {"train__offload_optimizer": True, "train__offload_params": True},
    }
    weights, losses = {}, {}
    for name, extra in variants.items():
        r = small_recipe(
            train__zero_stage=int(str(name)[0]),
            output_dir=str(tmp_path / f"z{name}"),
            train__lr=1e-3,
            train__adam_eps=1e-5,
            eval__before=False,
            eval__after=False,
            **extra,
        )
        result = train(r)
        weights[name] = _weights(result.model_dir)
        losses[name] = [m["loss"] for m in result.metrics]
    for stage in (1, 2, 3, "2+offload", "3+offload"):
        assert losses[stage] == pytest.approx(losses[0], abs=1e-6), stage
        for k, v in weights[0].items():
            assert torch.allclose(weights[stage][k], v, atol=1e-5), (stage, k)


def test_grad_norm_is_reported_at_every_zero_stage(small_recipe, tmp_path):
    # DeepSpeed reports no norm at stage 0 (its get_global_grad_norm stays 0): ours is the
    # norm of the whole gradient before clipping, as stages 1-3 report it
    norms = {}
    for stage in (0, 2):
        r = small_recipe(train__zero_stage=stage, train__max_grad_norm=0.5, peers=[])
        run = build_run(r, tmp_path / str(stage))
        torch.manual_seed(0)
        rollout = rollout_of(run)
        batches = batches_of(run, rollout)
        _accumulate(run, batches, _size(run, batches), None, None)
        grads = [p.grad for p in run.engine.module.parameters() if p.grad is not None]
        want = float(torch.cat([g.flatten().double() for g in grads]).norm()) if grads else None
        norms[stage] = (optimizer_step(run.engine), want)
    assert norms[0][0] == pytest.approx(norms[0][1], rel=1e-6)  # independently: float64
    assert norms[0][0] == pytest.approx(norms[2][0], rel=1e-5) and norms[0][0] > 0.5


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradient(
    small_recipe, tmp_path, monkeypatch
):
    run = build_run(small_recipe(train__gradient_checkpointing=True, loss__beta=0.05), tmp_path)
    module = run.engine.module
    assert module.training and module.is_activation_checkpointing
    torch.manual_seed(0)
    rollout = rollout_of(run)
    assert module.training  # sampling switched to eval mode and back
    batches = batches_of(run, rollout)
    size = _size(run, batches)
    ref = frozen_logprobs(run.ref_model, batches, 1.0)
    old = [r - 0.1 for r in ref]
    calls = []  # MLP forwards (the real one runs; module hooks do not see the recompute)
    mlp_forward = LlamaMLP.forward
    monkeypatch.setattr(
        LlamaMLP, "forward", lambda self, x: calls.append(1) or mlp_forward(self, x)
    )
    layers = len(module.model.layers)
    grads, losses, forwards = [], [], []
    for checkpointing in (True, False):
        if not checkpointing:
            module.activation_checkpointing_disable()
        calls.clear()
        module.zero_grad(set_to_none=True)
        losses.append(_accumulate(run, batches, size, old, ref)["loss"])
        forwards.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    # checkpointed: every layer runs again in the backward pass of each micro-batch
    assert forwards == [2 * layers * len(batches), layers * len(batches)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-7, rtol=1e-6), name


def test_gradient_checkpointing_trains_as_without(small_recipe, tmp_path):
    weights, losses = {}, {}
    for on in (False, True):
        r = small_recipe(
            train__gradient_checkpointing=on,
            output_dir=str(tmp_path / f"gc{on}"),
            train__lr=1e-3,
            eval__before=False,
            eval__after=False,
        )
        result = train(r)
        weights[on], losses[on] = _weights(result.model_dir), [m["loss"] for m in result.metrics]
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)
    for k, v in weights[False].items():
        assert torch.allclose(weights[True][k], v, atol=1e-6), k


def _update_once(run, rollout, reuse: bool):
    """One μ-pass update of `rollout` by a freshly built run; returns the metrics, the weights
    after it, and how many times the policy ran forward."""
    settings = replace(run.settings.update, train_is_eval=reuse)
    module = run.engine.module
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        metrics = update(update_inputs(run), settings, batches_of(run, rollout))
    finally:
        handle.remove()
    return metrics, {k: v.clone() for k, v in module.state_dict().items()}, len(calls)


def test_first_pass_keeps_the_old_logprobs(small_recipe, tmp_path):
    # μ = 2 without dropout: the first pass's log-probs serve as the old ones, with no extra
    # forward; they equal a separate no-grad pass, and the update is the same
    recipe = small_recipe(loss__mu=2, loss__beta=0.05, train__lr=1e-2, train__micro_batch_size=3)
    run = build_run(recipe, tmp_path)
    module = run.engine.module
    assert train_mode_is_eval_mode(module)  # the tiny Llama has no dropout
    torch.manual_seed(0)
    rollout = rollout_of(run)
    batches = batches_of(run, rollout)
    assert len(batches) > 1 and rollout.advantages.abs().sum() > 0
    separate = frozen_logprobs(module, batches, 1.0)
    kept: list = []
    _accumulate(run, batches, _size(run, batches), None, None, kept)
    module.zero_grad(set_to_none=True)
    assert len(kept) == len(batches)
    for a, b in zip(kept, separate, strict=True):
        assert not a.requires_grad
        assert torch.allclose(a, b, atol=1e-6, rtol=0)

    start = {k: v.clone() for k, v in module.state_dict().items()}
    m_sep, w_sep, n_sep = _update_once(run, rollout, reuse=False)
    again = build_run(recipe, tmp_path / "again")  # the same weights, a fresh optimizer
    m_reuse, w_reuse, n_reuse = _update_once(again, rollout, reuse=True)
    assert (n_sep, n_reuse) == (3 * len(batches), 2 * len(batches))
    assert m_reuse["loss"] == pytest.approx(m_sep["loss"], abs=1e-6)
    assert m_reuse["clip_fraction"] == m_sep["clip_fraction"]
    assert m_reuse["kl"] == pytest.approx(m_sep["kl"], abs=1e-6)
    moved = [k for k in w_sep if not torch.equal(w_sep[k], start[k])]
    assert moved  # the update did something to compare
    for k, v in w_sep.items():
        assert torch.allclose(w_reuse[k], v, atol=1e-6), k


@pytest.mark.parametrize("mu", [1, 2])
def test_zero_advantage_candidates_left_out_with_the_same_gradient(small_recipe, tmp_path, mu):
    # beta 0: a candidate of advantage 0 adds exactly 0 to the loss and its gradient; the
    # update leaves it out of its micro-batches and still counts it in the normaliser
    run = build_run(small_recipe(loss__mu=mu, train__micro_batch_size=5), tmp_path)
    torch.manual_seed(0)
    rollout = rollout_of(run)
    n = len(rollout.candidates)
    rollout.advantages = (torch.arange(n) - 7.5) * 0.1  # none 0 (the rewards may have some)
    rollout.advantages[:4] = 0.0  # the first group's: the policy's 2 and the peer's 2
    rollout.advantages[9] = 0.0  # one candidate of the third group
    kept = rollout.keep.nonzero().flatten().tolist()
    zero = [i for i in kept if rollout.advantages[i] == 0]
    assert zero == [0, 1, 2, 3, 9] and len(kept) == 16
    assert all(rollout.advantages[i] != 0 for i in kept if i not in zero)
    old = lambda bs: [torch.full(b.tokens.completion_ids.shape, -1.5) for b in bs]  # noqa: E731

    def gradient(skip: bool):
        how = replace(run.settings.batching, skip_zero_advantage=skip)
        batches = batches_of(run, rollout, how)
        left = left_out(rollout, how, ["policy", "strong"])
        size = _size(run, batches, left)
        run.engine.module.zero_grad(set_to_none=True)
        sums = _accumulate(run, batches, size, old(batches) if mu > 1 else None, None)
        grads = {n: p.grad.clone() for n, p in run.engine.module.named_parameters()}
        return batches, left, size, sums, grads

    b_on, left, size_on, sums_on, g_on = gradient(True)
    b_off, none, size_off, sums_off, g_off = gradient(False)
    assert sorted(i for b in b_on for i in b.index) == [i for i in kept if i not in zero]
    assert sorted(i for b in b_off for i in b.index) == kept
    tokens = {i: len(rollout.candidates[i].token_ids) for i in kept}
    assert (left.sequences, left.tokens) == (5, sum(tokens[i] for i in zero))
    assert left.by_member == {
        "policy": sum(tokens[i] for i in zero if rollout.candidates[i].source == "policy"),
        "strong": sum(tokens[i] for i in zero if rollout.candidates[i].source == "strong"),
    }
    assert (none.sequences, none.tokens) == (0, 0)
    assert size_on == size_off and size_off.tokens == sum(tokens.values())
    assert sums_on["loss"] == pytest.approx(sums_off["loss"], abs=1e-7)
    assert sums_on["tokens"] == sums_off["tokens"] - left.tokens  # computed tokens only
    assert any(g.abs().sum() > 0 for g in g_off.values())
    for name, g in g_off.items():
        assert torch.allclose(g_on[name], g, atol=1e-7, rtol=1e-5), name


def test_nothing_left_out_with_beta_or_when_turned_off(small_recipe, tmp_path):
    for changes in ({"loss__beta": 0.05}, {"train__skip_zero_advantage": False}):
        run = build_run(small_recipe(**changes), tmp_path / str(len(changes)))
        torch.manual_seed(0)
        rollout = rollout_of(run)
        rollout.advantages[:4] = 0.0
        assert left_out(rollout, run.settings.batching, ["policy", "strong"]).sequences == 0
        assert len([i for b in batches_of(run, rollout) for i in b.index]) == 16


def test_a_step_of_zero_advantages_still_steps_the_optimizer(small_recipe, tmp_path, monkeypatch):
    # step 2 has no learning signal at all: left out whole, it still takes an optimizer step
    # of a zero gradient, so Adam's moments move the weights exactly as when it is computed
    train_module = importlib.import_module("grpo_ensemble.trainer.step")
    evaluate = train_module.evaluate_groups
    weights, rows = {}, {}
    for skip in (True, False):
        # step 1 computed in full in both runs: the same weights and moments, bit for bit
        recipe = small_recipe(train__lr=1e-2, train__skip_zero_advantage=False)
        run = build_run(recipe, tmp_path / str(skip))
        monkeypatch.setattr(train_module, "evaluate_groups", evaluate)
        start = {k: v.clone() for k, v in run.engine.module.state_dict().items()}
        grpo_step(run, 1)
        after_one = {k: v.clone() for k, v in run.engine.module.state_dict().items()}
        assert any(not torch.equal(after_one[k], v) for k, v in start.items())
        run.settings = replace(
            run.settings, batching=replace(run.settings.batching, skip_zero_advantage=skip)
        )

        def no_signal(*args):
            rollout = evaluate(*args)
            rollout.advantages.zero_()
            return rollout

        monkeypatch.setattr(train_module, "evaluate_groups", no_signal)
        rows[skip] = grpo_step(run, 2)
        weights[skip] = run.engine.module.state_dict()
        assert any(not torch.equal(weights[skip][k], v) for k, v in after_one.items())
    assert rows[True]["zero_advantage_skipped_fraction"] == 1.0
    assert rows[False]["zero_advantage_skipped_fraction"] == 0.0
    assert rows[True]["loss"] == rows[False]["loss"] == 0.0
    assert rows[True]["grad_norm"] == rows[False]["grad_norm"]
    for k, v in weights[False].items():
        assert torch.equal(weights[True][k], v), k


def test_train_mode_is_eval_mode():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    shape.update(num_attention_heads=2, num_key_value_heads=2)
    assert train_mode_is_eval_mode(LlamaForCausalLM(LlamaConfig(**shape)))
    llama_drop = LlamaForCausalLM(LlamaConfig(**shape, attention_dropout=0.1))
    assert not train_mode_is_eval_mode(llama_drop)  # dropout inside attention
    gpt2 = dict(vocab_size=16, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    assert not train_mode_is_eval_mode(GPT2LMHeadModel(GPT2Config(**gpt2)))  # 0.1
    quiet = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # any dropout setting counts, even one of a head this model lacks: the rule errs on no
    assert not train_mode_is_eval_mode(GPT2LMHeadModel(GPT2Config(**gpt2, **quiet)))
    quiet["summary_first_dropout"] = 0.0
    assert train_mode_is_eval_mode(GPT2LMHeadModel(GPT2Config(**gpt2, **quiet)))
    assert not train_mode_is_eval_mode(torch.nn.Linear(2, 2))  # unknown: no reuse


@pytest.mark.parametrize("stage", [0, 3])
def test_shared_prompt_forward_trains_as_whole_rows(small_recipe, tmp_path, monkeypatch, stage):
    # each distinct prompt run once per micro-batch (forced on: the tiny models are below the
    # threshold where it pays) against whole rows: the same losses and weights, with the
    # reference and the policy, through the DeepSpeed engine at ZeRO 0 and 3
    logprobs_module = importlib.import_module("grpo_ensemble.models.logprobs")
    shared_calls = []
    real = logprobs_module._shared_prompt_logits

    def counted(*args):
        shared_calls.append(1)
        return real(*args)

    monkeypatch.setattr(logprobs_module, "_shared_prompt_logits", counted)
    weights, losses, kls = {}, {}, {}
    for share in (False, True):
        threshold = 0 if share else float("inf")
        monkeypatch.setattr(logprobs_module, "SHARE_MIN", {"cpu": threshold, "cuda": threshold})
        r = small_recipe(
            train__zero_stage=stage,
            output_dir=str(tmp_path / f"share{share}"),
            train__lr=1e-3,
            train__micro_batch_size=16,
            loss__beta=0.05,
            loss__mu=2,
            eval__before=False,
            eval__after=False,
        )
        result = train(r)
        weights[share] = _weights(result.model_dir)
        losses[share] = [m["loss"] for m in result.metrics]
        kls[share] = [m["kl"] for m in result.metrics]
        if not share:
            assert not shared_calls
    # 2 steps × (reference pass + 2 policy passes) × one micro-batch
    assert len(shared_calls) == 2 * 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)
    assert kls[True] == pytest.approx(kls[False], rel=1e-5)  # KL ~2: float noise ~1e-6
    for k, v in weights[False].items():
        assert torch.allclose(weights[True][k], v, atol=1e-5), k


def test_update_tensors_and_frozen_models_on_the_policys_device(small_recipe, tmp_path):
    # on a GPU DeepSpeed moves the policy; the reference, the peers and every micro-batch go
    # where it is (here the CPU: this guards the placement, a GPU run exercises it)
    run = build_run(small_recipe(loss__beta=0.05, train__micro_batch_size=3), tmp_path)
    device = run.engine.device
    assert next(run.engine.module.parameters()).device == device
    assert next(run.ref_model.parameters()).device == device
    peer = next(m.generator for m in run.ensemble.members if m.name != "policy")
    assert next(peer.model.parameters()).device == device
    torch.manual_seed(0)
    rollout = rollout_of(run)
    filler = filler_batch(run.tokenizer.pad_token_id).to(device)
    batches = batches_of(run, rollout) + [filler]
    for b in batches:
        tensors = [*vars(b.tokens).values(), b.advantages, b.modes]
        assert all(t.device == device for t in tensors)


@pytest.fixture
def replay_any_size(monkeypatch):
    """Record and replay whatever the size (see `recording.REPLAY_MIN`)."""
    monkeypatch.setattr(importlib.import_module("grpo_ensemble.engine.recording"), "REPLAY_MIN", 0)


@pytest.mark.usefixtures("replay_any_size")
def test_first_pass_reuses_sampling_products_with_the_same_gradient(small_recipe, tmp_path):
    # the policy alone, 4 prompts × 2 candidates in one micro-batch: the first pass takes its
    # forward's products from sampling (replay.py), through the DeepSpeed engine, and
    # accumulates the gradient the plain forward does; its traces are gone afterwards
    run = build_run(small_recipe(peers=[], loss__beta=0.05), tmp_path)
    module = run.engine.module
    policy = run.ensemble.members[0].generator
    assert run.replay is policy and not policy.record  # only while a step samples
    torch.manual_seed(0)
    with policy.recording():
        rollout = rollout_of(run)
    assert not policy.record
    batches = batches_of(run, rollout)
    assert len(batches) == 1 and batches[0].traces is not None
    # the micro-batch holds them: the generator has handed them over
    assert policy.take_traces(rollout.candidates) == [None] * len(rollout.candidates)
    assert batches[0].tokens.completion_ids.shape[1] > 2
    size = _size(run, batches)
    ref = frozen_logprobs(run.ref_model, batches, 1.0)
    grads, sums = [], []
    for _ in range(2):  # the second time the traces are gone: the plain forward
        module.zero_grad(set_to_none=True)
        sums.append(_accumulate(run, batches, size, None, ref, None, replay=policy))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    assert batches[0].traces is None
    assert sums[0]["reused"] == sums[0]["tokens"] > 0 and sums[1]["reused"] == 0
    # once the generator took the weights of an optimizer step, a recording of the weights
    # before it is not used
    with policy.recording():
        again = rollout_of(run)
    batches = batches_of(run, again)
    assert replayable(run.engine, batches[0].tokens, batches[0].traces)
    assert optimizer_step(run.engine) is not None
    policy.sync_weights(run.engine.module)
    assert not replayable(run.engine, batches[0].tokens, batches[0].traces)
    assert policy.replay_logprobs(run.engine, batches[0].tokens, batches[0].traces, 1.0) is None
    assert sums[0]["loss"] == pytest.approx(sums[1]["loss"], abs=1e-6)
    assert sums[0]["kl_sum"] == pytest.approx(sums[1]["kl_sum"], rel=1e-5)
    for name, g in grads[1].items():
        scale = g.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(grads[0][name] / scale, g / scale, rtol=0, atol=3e-6)


@pytest.mark.usefixtures("replay_any_size")
@pytest.mark.parametrize("mu", [1, 2])
def test_a_micro_batch_with_a_peers_rows_replays_the_policys(small_recipe, tmp_path, mu):
    # 4 prompts × (2 policy + 2 peer) candidates in one micro-batch: the policy's rows take
    # their products from sampling, the peer's are computed; the same log-probs, metrics and
    # gradient as computing every row, the old log-probs (μ = 2) in the micro-batch's order
    recipe = small_recipe(train__micro_batch_size=16, loss__mu=mu, train__skip_zero_advantage=False)
    run = build_run(recipe, tmp_path)
    module = run.engine.module
    policy = run.ensemble.members[0].generator
    assert run.replay is policy
    torch.manual_seed(0)
    with policy.recording():
        rollout = rollout_of(run)
    batches = batches_of(run, rollout)
    assert len(batches) == 1
    traces = batches[0].traces
    sources = [rollout.candidates[i].source for i in batches[0].index]
    assert [t is not None for t in traces] == [s == "policy" for s in sources]
    assert sources.count("policy") == 8 and sources.count("strong") == 8
    size = _size(run, batches)
    grads, sums, kept = [], [], []
    for reuse in (True, False):
        module.zero_grad(set_to_none=True)
        batches[0].traces = traces
        keep = [] if mu == 2 else None
        sums.append(_accumulate(run, batches, size, None, None, keep, policy if reuse else None))
        kept.append(keep)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    mask = batches[0].tokens.completion_mask
    policy_rows = torch.tensor([s == "policy" for s in sources])
    assert sums[0]["reused"] == mask[policy_rows].sum().item() > 0  # the policy's tokens only
    assert sums[0]["tokens"] == sums[1]["tokens"] == mask.sum().item()
    assert sums[1]["reused"] == 0
    assert sums[0]["loss"] == pytest.approx(sums[1]["loss"], abs=1e-6)
    if mu == 2:  # each row's own log-probs, in the micro-batch's row order
        torch.testing.assert_close(kept[0][0] * mask, kept[1][0] * mask, rtol=0, atol=1e-5)
    for name, g in grads[1].items():
        scale = g.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(grads[0][name] / scale, g / scale, rtol=0, atol=3e-6)


@pytest.mark.usefixtures("replay_any_size")
def test_training_with_reused_products_as_without(small_recipe, tmp_path):
    # two steps of μ = 2 with and without reuse: the same metrics, and the same weights but
    # where Adam's normalised step turns the rounding of a gradient entry near 0 into a
    # different step (a few entries, each within 2 × lr per optimizer step). AdamW's ε at
    # 1e-5, as in the multi-rank tests: at 1e-8 those entries moved the second step's loss by
    # 8e-4 (relative) on an Intel Xeon, beyond the 1e-4 asked of the metrics
    weights, metrics = {}, {}
    for reuse in (True, False):
        r = small_recipe(
            peers=[],
            output_dir=str(tmp_path / f"reuse{reuse}"),
            train__lr=1e-3,
            train__adam_eps=1e-5,
            train__reuse_sampling_forward=reuse,
            loss__beta=0.05,
            loss__mu=2,
            eval__before=False,
            eval__after=False,
        )
        result = train(r)
        weights[reuse], metrics[reuse] = _weights(result.model_dir), result.metrics
    assert [m["reused_sampling_fraction"] for m in metrics[True]] == [1.0, 1.0]
    assert [m["reused_sampling_fraction"] for m in metrics[False]] == [0.0, 0.0]
    for key in ("completion_len", "reward", "loss", "kl", "clip_fraction"):
        want = [m[key] for m in metrics[False]]  # step 2 from weights equal to rounding
        assert [m[key] for m in metrics[True]] == pytest.approx(want, rel=1e-4, abs=1e-6), key
    assert all(m["completion_len"] > 1.5 for m in metrics[True])  # replayed tokens exist
    apart = 0
    for k, v in weights[False].items():
        diff = (weights[True][k] - v).abs()
        assert diff.max() <= 2 * 1e-3 * 4, k
        apart += int((diff > 1e-5).sum())
    assert apart <= 1e-4 * sum(v.numel() for v in weights[False].values())


@pytest.mark.usefixtures("replay_any_size")
@pytest.mark.parametrize("mu", [1, 2])
def test_recording_buffers_kept_for_the_next_step_only_with_one_pass(small_recipe, tmp_path, mu):
    # μ = 1: the recording's buffers wait for the next step's sampling; μ = 2: freed before the
    # second pass, which computes its own forward
    run = build_run(small_recipe(peers=[], loss__mu=mu), tmp_path)
    pool = run.ensemble.members[0].generator.buffers
    row = grpo_step(run, 1)
    assert row["reused_sampling_fraction"] == 1.0
    kept = sum(len(v) for v in pool.free.values())
    assert kept == (2 if mu == 1 else 0)  # 2 layers' gate_up


@pytest.mark.parametrize(
    "changes, records",
    [
        ({"peers": []}, True),
        ({}, False),  # 4 × (2 + 2) candidates may not fit one micro-batch of 8
        ({"train__micro_batch_size": 16}, True),  # a peer in every group: its rows computed
        ({"group__inject": "on_failure", "train__micro_batch_size": 16}, True),
        ({"group__inject": "on_failure"}, False),  # 4 × (2 + 2) may not fit 8
        ({"peers": [], "train__micro_batch_size": 4}, False),  # 8 candidates: 2 micro-batches
        ({"peers": [], "train__micro_batch_tokens": 256}, False),
        ({"peers": [], "train__gradient_checkpointing": True}, False),
        ({"peers": [], "train__reuse_sampling_forward": False}, False),
    ],
)
def test_the_policy_records_only_where_the_update_can_reuse_it(
    small_recipe, tmp_path, changes, records
):
    # (where the model allows and the replay pays: decided per sampling call, see test_replay)
    run = build_run(small_recipe(**changes), tmp_path)
    assert (run.replay is not None) is records
