"""Tests that catch three mutations planted in the update (issue 24): the old log-probs of μ > 1
refreshed on every pass, a tis peer's behaviour log-probs shifted by one token, and the clip
metric counting rows that take no clipped surrogate. Each compares what the update computes
with a plain forward of the models, run here, or with the metric's definition applied here to
the loss's own inputs."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from helpers import batches_of, rollout_of, update_inputs
from transformers import AutoModelForCausalLM

from grpo_ensemble.models.loading import load_tokenizer, resolve_model
from grpo_ensemble.trainer.loss import MODES
from grpo_ensemble.trainer.setup import build_run
from grpo_ensemble.trainer.step import grpo_step
from grpo_ensemble.trainer.update import update

update_module = importlib.import_module("grpo_ensemble.trainer.update")

PEER_TEMPERATURE = 0.7


class LossCalls(list):
    """Every call of `grpo_loss` from the update, its arguments by name (tensors copied), in
    call order. `before(i)`, where set, runs before call i reaches the real loss."""

    before = None


@pytest.fixture
def loss_calls(monkeypatch) -> LossCalls:
    real = update_module.grpo_loss
    calls = LossCalls()
    names = ["logp", "old", "ref", "adv", "mask", "size", "settings", "modes", "behaviour"]

    def spy(*args, **kwargs):
        if calls.before is not None:
            calls.before(len(calls))
        seen = {**dict(zip(names, args, strict=False)), **kwargs}
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in seen.items()})
        return real(*args, **kwargs)

    monkeypatch.setattr(update_module, "grpo_loss", spy)
    return calls


def _model(name: str) -> torch.nn.Module:
    """A fresh copy of a built-in model as it is on disk, in eval mode, fp32."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name, "model"))
    return model.float().eval()


@torch.no_grad()
def _logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """(len(completion),) float64 log-probs of the completion's tokens under `model` after
    `prompt`, from one unpadded row: position t's logits (over temperature) predict token t+1."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].double() / temperature  # (P + C, V)
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # (C, V)
    return logp.gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


def _signed_advantages(rollout) -> None:
    """Advantages ±1, ±0.5 in turn: every candidate trains, with a nonzero signal."""
    n = len(rollout.candidates)
    rollout.advantages = torch.tensor([(1.0, -1.0, 0.5, -0.5)[i % 4] for i in range(n)])


def test_mu_2_keeps_the_initial_old_logprobs_and_clips(small_recipe, tmp_path, loss_calls):
    # μ = 2, the policy alone: the second pass's old log-probs are the policy's before the
    # step (a forward, run here, of the model as loaded), its log-probs those of the weights
    # after the first optimizer step (a forward of a copy of them). A large rate and a small
    # clip range make clipping act: the step's clip fraction is the count of tokens whose
    # clipped term is the smaller, from those forwards, over both passes' tokens
    recipe = small_recipe(
        peers=[],
        loss__mu=2,
        loss__clip_low=0.05,
        loss__clip_high=0.05,
        train__lr=3e-2,
        train__micro_batch_size=3,
    )
    run = build_run(recipe, tmp_path)
    module = run.engine.module
    initial = _model("builtin:tiny-arith-small")
    for k, v in initial.state_dict().items():  # the run starts from the model on disk
        assert torch.equal(module.state_dict()[k], v), k
    torch.manual_seed(0)
    rollout = rollout_of(run)
    _signed_advantages(rollout)
    batches = batches_of(run, rollout)
    n = len(batches)
    assert n > 1
    moved = copy.deepcopy(initial)  # the weights of the second pass, copied at its start

    def copy_weights(i):
        if i == n:
            moved.load_state_dict(module.state_dict())

    loss_calls.before = copy_weights
    metrics = update(update_inputs(run), run.settings.update, batches)
    assert len(loss_calls) == 2 * n
    clipped = tokens = 0
    lo, hi = 1 - 0.05, 1 + 0.05
    for j, b in enumerate(batches):
        second = loss_calls[n + j]
        for r, i in enumerate(b.index):
            c = rollout.candidates[i]
            prompt = run.prompt_ids(rollout.candidate_prompt[i])
            length = len(c.token_ids)
            old = _logprobs(initial, prompt, c.token_ids, 1.0)
            new = _logprobs(moved, prompt, c.token_ids, 1.0)
            # the first pass: ratio 1 against its own log-probs, which are the initial ones
            first = loss_calls[j]
            assert torch.equal(first["old"][r], first["logp"][r])
            torch.testing.assert_close(first["logp"][r, :length].double(), old, rtol=0, atol=1e-5)
            # the second: old = the initial policy's, not the log-probs of this pass
            torch.testing.assert_close(second["old"][r, :length].double(), old, rtol=0, atol=1e-5)
            torch.testing.assert_close(second["logp"][r, :length].double(), new, rtol=0, atol=1e-5)
            ratio = torch.exp(new - old)
            assert ((ratio - lo).abs() > 1e-4).all() and ((ratio - hi).abs() > 1e-4).all()
            a = float(b.advantages[r])
            clipped += int((ratio.clamp(lo, hi) * a < ratio * a).sum())
            tokens += 2 * length  # both passes' tokens
    assert max((c["logp"] - c["old"]).abs().max().item() for c in loss_calls[n:]) > 0.05
    assert clipped > 0
    assert metrics["clip_fraction"] == pytest.approx(clipped / tokens, rel=1e-12)


def test_tis_behaviour_logprobs_are_the_peers_own(small_recipe, tmp_path, loss_calls):
    # the behaviour log-probs reaching the loss for a tis peer's candidate are, token by token,
    # those of the candidate's tokens under the peer's model at the peer's temperature
    recipe = small_recipe(
        peers__0__mode="tis",
        peers__0__sampling__temperature=PEER_TEMPERATURE,
        train__micro_batch_size=5,
        train__skip_zero_advantage=False,
    )
    run = build_run(recipe, tmp_path)
    peer = _model("builtin:tiny-arith-base")
    peer_tokenizer = load_tokenizer(resolve_model("builtin:tiny-arith-base", "model"))
    torch.manual_seed(0)
    rollout = rollout_of(run)
    batches = batches_of(run, rollout)
    update(update_inputs(run), run.settings.update, batches)
    assert len(loss_calls) == len(batches)
    checked = 0
    for b, call in zip(batches, loss_calls, strict=True):
        for r, i in enumerate(b.index):
            c = rollout.candidates[i]
            if c.source != "strong":
                assert call["modes"][r] == MODES["on_policy"]
                continue
            assert call["modes"][r] == MODES["tis"]
            prompt = peer_tokenizer(rollout.candidate_prompt[i].text)["input_ids"]
            want = _logprobs(peer, prompt, c.token_ids, PEER_TEMPERATURE)
            got = call["behaviour"][r]
            length = len(c.token_ids)
            assert call["mask"][r].tolist() == [1.0] * length + [0.0] * (len(got) - length)
            torch.testing.assert_close(got[:length].double(), want, rtol=0, atol=1e-5)
            checked += length
    assert checked >= 8 * 2  # 8 candidates of the peer, most longer than one token


def test_clip_fraction_counts_only_clipped_surrogate_rows(small_recipe, tmp_path, loss_calls):
    # a whole step, μ = 2, with a tis and a shaped peer: the metrics row's clip fraction is the
    # count of clipped tokens of the rows that take the clipped surrogate (the policy's own and
    # on_policy peers'), by the formula over the loss's inputs here, over every token of both
    # passes; counting the tis and shaped rows too would give more
    base = {"model": "builtin:tiny-arith-base", "n": 2, "sampling": {"max_new_tokens": 5}}
    recipe = small_recipe(
        peers=[{**base, "name": "t", "mode": "tis"}, {**base, "name": "s", "mode": "shaped"}],
        loss__mu=2,
        loss__clip_low=0.02,
        loss__clip_high=0.02,
        train__lr=3e-2,
        train__micro_batch_size=24,
        train__skip_zero_advantage=False,
    )
    run = build_run(recipe, tmp_path)
    torch.manual_seed(0)
    row = grpo_step(run, 1)
    assert len(loss_calls) == 2  # one micro-batch, two passes
    lo, hi = 1 - 0.02, 1 + 0.02
    counted = every_row = tokens = 0
    for call in loss_calls:
        mask = call["mask"].bool()
        ratio = torch.exp(call["logp"].double() - call["old"].double())
        a = call["adv"].double().unsqueeze(1)
        hit = (ratio.clamp(lo, hi) * a < ratio * a) & mask
        near = (((ratio - lo).abs() < 1e-5) | ((ratio - hi).abs() < 1e-5)) & mask
        assert not near.any()  # no token on a bound, where rounding could decide
        surrogate = (call["modes"] == MODES["on_policy"]).unsqueeze(1)
        counted += int((hit & surrogate).sum())
        every_row += int(hit.sum())
        tokens += int(mask.sum())
    modes = loss_calls[0]["modes"].tolist()
    assert {MODES["tis"], MODES["shaped"], MODES["on_policy"]} <= set(modes)
    assert counted > 0 and every_row > counted  # the other rows' flags would change it
    assert row["clip_fraction"] == pytest.approx(counted / tokens, rel=1e-12)
