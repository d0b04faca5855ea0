"""Training runs through the real DeepSpeed engine on tiny models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo_ensemble import (
    Candidate,
    Generator,
    GroupEvaluator,
    RewardScorer,
    hookimpl,
    plugins,
    train,
)
from grpo_ensemble.train import build_run


def _weights(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_micro_batch_split_gives_the_same_update(small_recipe, tmp_path):
    # 16 candidates per step in one micro-batch, or in micro-batches of 3: same weights
    results = []
    for mb, agg in ((16, "token_mean"), (3, "token_mean"), (16, "seq_mean"), (5, "seq_mean")):
        r = small_recipe(
            train__micro_batch_size=mb,
            loss__aggregation=agg,
            output_dir=str(tmp_path / f"{mb}{agg}"),
            eval__before=False,
            eval__after=False,
            train__lr=1e-3,
        )
        results.append(train(r))
    for a, b in ((0, 1), (2, 3)):
        wa, wb = _weights(results[a].model_dir), _weights(results[b].model_dir)
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
        la = [m["loss"] for m in results[a].metrics]
        lb = [m["loss"] for m in results[b].metrics]
        assert la == pytest.approx(lb, abs=1e-6)
    # and the update did something
    w0 = _weights(results[0].model_dir)
    base = AutoModelForCausalLM.from_pretrained(
        str(
            __import__("grpo_ensemble.models").models.resolve_model("builtin:tiny-arith-small", "x")
        )
    ).state_dict()
    assert any(not torch.equal(w0[k], base[k]) for k in w0)


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
    assert scorer.calls == 2
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
