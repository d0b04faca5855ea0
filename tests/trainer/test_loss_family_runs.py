"""The loss family through the real update: the entropy it logs and its bonus's gradient
against an independent forward, and short runs of each surrogate with its options."""

import importlib
import math
from dataclasses import replace

import pytest
import torch
from helpers import batches_of, rollout_of, update_inputs

from grpo_ensemble import train
from grpo_ensemble.trainer.setup import build_run
from grpo_ensemble.trainer.update import accumulate, batch_size_of


def _row_entropies(model, batch, row, temperature=1.0, grad=False):
    """(c,) entropy of the model at each completion position of one row, from a forward of
    its real tokens alone (no padding), in float64."""
    attn = batch.attention_mask[row].bool()
    ids = batch.input_ids[row][attn].unsqueeze(0)
    p_real = int(
        batch.attention_mask[row, : batch.input_ids.shape[1] - batch.completion_ids.shape[1]].sum()
    )
    c = int(batch.completion_mask[row].sum())
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids).logits[0, p_real - 1 : p_real - 1 + c].double() / temperature
        logp = torch.log_softmax(logits, -1)
        return -(logp.exp() * logp).sum(-1)


def _settings(run, **loss):
    s = run.settings.update
    return replace(s, loss=replace(s.loss, **loss))


def test_the_logged_entropy_is_the_policys_per_member(small_recipe, tmp_path):
    run = build_run(small_recipe(train__skip_zero_advantage=False), tmp_path)
    torch.manual_seed(0)
    batches = batches_of(run, rollout_of(run))
    size = batch_size_of(batches, run.settings.update.max_new_tokens)
    sums = accumulate(update_inputs(run), run.settings.update, batches, size, None, None)
    model = run.engine.module
    want = {"policy": [0.0, 0], "strong": [0.0, 0]}
    for b in batches:
        for row, source in enumerate(b.sources):
            h = _row_entropies(model, b.tokens, row)
            want[source][0] += float(h.sum())
            want[source][1] += len(h)
    for name, (total, count) in want.items():
        assert count > 0
        assert sums[f"Ht/{name}"] == count
        assert sums[f"H/{name}"] == pytest.approx(total, rel=1e-5)


def test_the_entropy_bonus_gradient(small_recipe, tmp_path):
    # with entropy_coef c the accumulated gradient is the one without, minus c × the gradient
    # of the mean entropy over the step's tokens, computed here from plain forwards
    run = build_run(small_recipe(train__skip_zero_advantage=False), tmp_path)
    module = run.engine.module
    torch.manual_seed(0)
    batches = batches_of(run, rollout_of(run))
    size = batch_size_of(batches, run.settings.update.max_new_tokens)
    grads = []
    for coef in (0.0, 0.5):
        module.zero_grad(set_to_none=True)
        accumulate(update_inputs(run), _settings(run, entropy_coef=coef), batches, size, None, None)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    module.zero_grad(set_to_none=True)
    total = sum(
        _row_entropies(module, b.tokens, row, grad=True).sum()
        for b in batches
        for row in range(len(b.index))
    )
    (total / size.tokens).backward()
    checked = 0
    for name, p in module.named_parameters():
        want = grads[0][name] - 0.5 * p.grad
        scale = want.abs().max()
        if scale == 0:
            continue
        torch.testing.assert_close(grads[1][name] / scale, want / scale, rtol=0, atol=1e-5)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    "loss",
    [
        {"type": "cispo", "off_policy_mask": 0.0, "entropy_coef": 0.01, "mask_truncated": True},
        {
            "type": "gspo",
            "delta": 1.5,
            "top_entropy_quantile": 0.5,
            "beta": 0.05,
            "kl_estimator": "k1",
        },
        {"type": "sapo", "mu": 2, "beta": 0.05, "kl_tokens": "all"},
    ],
    ids=["cispo", "gspo", "sapo"],
)
def test_each_surrogate_trains(small_recipe, loss):
    recipe = small_recipe(
        loss={**loss},
        train__lr=1e-3,
        train__steps=1,
        eval__before=False,
        eval__after=False,
    )
    result = train(recipe)
    m = result.metrics[0]
    for key in ("loss", "entropy", "member/policy/entropy", "member/strong/entropy", "grad_norm"):
        assert math.isfinite(m[key]), key
    assert m["entropy"] > 0 and m["grad_norm"] > 0


def test_replayed_forward_gives_the_same_entropy(small_recipe, tmp_path, monkeypatch):
    # the first pass that takes its products from sampling reports the entropy, and with
    # entropy_coef the gradient, that the plain forward gives (recorded whatever the size)
    monkeypatch.setattr(importlib.import_module("grpo_ensemble.engine.recording"), "REPLAY_MIN", 0)
    run = build_run(small_recipe(peers=[], train__skip_zero_advantage=False), tmp_path)
    module, policy = run.engine.module, run.ensemble.members[0].generator
    torch.manual_seed(0)
    with policy.recording():
        rollout = rollout_of(run)
    batches = batches_of(run, rollout)
    traces = batches[0].traces
    assert traces is not None and all(t is not None for t in traces)
    size = batch_size_of(batches, run.settings.update.max_new_tokens)
    s = _settings(run, entropy_coef=0.5)
    sums, grads = [], []
    for replay in (policy, None):
        batches[0].traces = traces
        module.zero_grad(set_to_none=True)
        sums.append(accumulate(update_inputs(run), s, batches, size, None, None, None, replay))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    assert sums[0]["reused"] == sums[0]["tokens"] > 0 and sums[1]["reused"] == 0
    assert sums[0]["H/policy"] == pytest.approx(sums[1]["H/policy"], rel=1e-5)
    for name, g in grads[1].items():
        scale = g.abs().max()
        torch.testing.assert_close(grads[0][name] / scale, g / scale, rtol=0, atol=1e-5)
