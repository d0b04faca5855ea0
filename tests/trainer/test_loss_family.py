"""The loss types and options of `loss:` against numbers computed by hand."""

import math

import pytest
import torch

from grpo_ensemble.models.logprobs import logprobs_and_entropy
from grpo_ensemble.trainer.loss import (
    MODES,
    BatchSize,
    LossSettings,
    cispo_surrogate,
    clipped_surrogate,
    grpo_loss,
    kl_k1,
    off_policy_keep,
    sapo_surrogate,
    sequence_log_ratio,
)
from grpo_ensemble.trainer.update import entropy_threshold

D = torch.float64


def _close(got, want):
    torch.testing.assert_close(got.detach().to(D), torch.tensor(want, dtype=D))


def _logp(ratios):
    # old log-probs 0: ratio = exp(logp)
    return torch.log(torch.tensor(ratios, dtype=D)).requires_grad_(True)


def test_each_type_implies_its_aggregation():
    implied = {t: LossSettings(type=t).norm for t in ("grpo", "bnpo", "dr_grpo", "dapo")}
    implied |= {t: LossSettings(type=t).norm for t in ("cispo", "sapo", "gspo")}
    assert implied == {
        "grpo": "seq_mean",
        "bnpo": "token_mean",
        "dr_grpo": "constant",
        "dapo": "token_mean",
        "cispo": "token_mean",
        "sapo": "seq_mean",
        "gspo": "seq_mean",
    }
    assert LossSettings(type="grpo", aggregation="constant").norm == "constant"
    with pytest.raises(ValueError, match="loss.type"):
        LossSettings(type="ppo")


def test_two_sided_clipping_caps_a_negative_advantages_ratio():
    # A = −1: ratios 5 (past delta 3), 2 (past 1 + 0.2 but under delta), 0.5
    logp = _logp([[5.0, 2.0, 0.5]])
    old = torch.zeros(1, 3, dtype=D)
    adv = torch.tensor([-1.0], dtype=D)
    loss, flat = clipped_surrogate(logp, old, adv, 0.2, 0.2, delta=3.0)
    # −min(min(ρ, δ)·A, clip(ρ)·A) = max(min(ρ, 3), clip(ρ)): 3, 2, 0.8
    _close(loss, [[3.0, 2.0, 0.8]])
    assert flat.tolist() == [[True, False, True]]
    loss.sum().backward()
    # gradient ρ where the unclipped, uncapped ratio is taken: token 2 only
    _close(logp.grad, [[0.0, 2.0, 0.0]])
    without, _ = clipped_surrogate(logp.detach(), old, adv, 0.2, 0.2)
    _close(without, [[5.0, 2.0, 0.8]])


def test_cispo_caps_and_detaches_the_weight():
    logp = _logp([[1.5, 0.5], [3.0, 1.0]])
    old = torch.zeros(2, 2, dtype=D)
    adv = torch.tensor([2.0, -1.0], dtype=D)
    loss, capped = cispo_surrogate(logp, old, adv, clip_high=0.28)
    w = [[1.28, 0.5], [1.28, 1.0]]
    lp = [[math.log(1.5), math.log(0.5)], [math.log(3.0), 0.0]]
    want = [[-w[0][0] * 2 * lp[0][0], -w[0][1] * 2 * lp[0][1]], [w[1][0] * lp[1][0], 0.0]]
    _close(loss, want)
    assert capped.tolist() == [[True, False], [True, False]]
    loss.sum().backward()
    # dL/dlogp = −A·w: every token keeps a gradient, capped ones included
    _close(logp.grad, [[-2.56, -1.0], [1.28, 1.0]])


def test_sapo_soft_gate_by_hand():
    logp = _logp([[1.0, 1.5], [1.0, 0.5]])
    old = torch.zeros(2, 2, dtype=D)
    adv = torch.tensor([2.0, -1.0], dtype=D)
    loss = sapo_surrogate(logp, old, adv, 1.0, 1.05)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    want = [
        [-sig(0.0) * 4 * 2, -sig(0.5) * 4 * 2],
        [sig(0.0) * 4 / 1.05, sig(1.05 * -0.5) * 4 / 1.05],
    ]
    _close(loss, want)
    loss.sum().backward()
    # d/dlogp of −(4/τ)σ(τ(ρ−1))A = −4σ(1−σ)ρA: −A at ρ = 1
    grad = [
        [-2.0, -4 * sig(0.5) * (1 - sig(0.5)) * 1.5 * 2],
        [1.0, 4 * sig(-0.525) * (1 - sig(-0.525)) * 0.5],
    ]
    _close(logp.grad, grad)


def test_gspo_uses_the_sequences_mean_log_ratio():
    # row 0: token ratios 2 and 0.5 (the third token padding): s = exp((log 2 + log 0.5)/2) = 1
    # row 1: ratios 1.5, 1.5, 1.5: s = 1.5, clipped at 1.2 for A = +1
    logp = _logp([[2.0, 0.5, 7.0], [1.5, 1.5, 1.5]])
    old = torch.zeros(2, 3, dtype=D)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=D)
    assert sequence_log_ratio(logp, old, mask).squeeze(1).tolist() == pytest.approx(
        [0.0, math.log(1.5)]
    )
    adv = torch.tensor([2.0, 1.0], dtype=D)
    out = grpo_loss(
        logp, old, None, adv, mask, BatchSize(2, 5, 3), LossSettings(type="gspo", clip_high=0.2)
    )
    # seq_mean: (−1·2 + −1.2·1) / 2 sequences
    assert out.loss.item() == pytest.approx((-2.0 - 1.2) / 2)
    assert out.clipped.tolist() == [[False, False, False], [True, True, True]]
    out.loss.backward()
    # row 0: d/dlogp_t of −s·A/2 = −A·s/(2·|y|) per real token; row 1 clipped: 0
    _close(logp.grad, [[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("kind", "want"),
    [("grpo", (-3.0 / 2 + -1.0) / 2), ("dapo", -4.0 / 3), ("dr_grpo", -4.0 / (2 * 4))],
)
def test_the_types_aggregations_by_hand(kind, want):
    # ratio 1: per-token loss −A; row 0 two tokens (A = 1.5), row 1 one token (A = 1)
    logp = torch.zeros(2, 2, dtype=D)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D)
    adv = torch.tensor([1.5, 1.0], dtype=D)
    size = BatchSize(sequences=2, tokens=3, max_new_tokens=4)
    out = grpo_loss(logp, logp, None, adv, mask, size, LossSettings(type=kind))
    assert out.loss.item() == pytest.approx(want)


def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=D)).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.5]], dtype=D))
    _close(kl_k1(logp, ref), [[math.log(2), -math.log(2)]])
    mask = torch.ones(1, 2, dtype=D)
    size = BatchSize(1, 2, 2)
    adv = torch.zeros(1, dtype=D)
    grads = {}
    for est in ("k3", "k3_bias_corrected"):
        logp.grad = None
        c = LossSettings(beta=1.0, kl_estimator=est)
        out = grpo_loss(logp, logp.detach(), ref, adv, mask, size, c)
        # value: k3 = r − log r − 1, r = ref/π: 0.5 + log 2 − 1 and 2 − log 2 − 1; ρ = 1
        k3 = [0.5 + math.log(2) - 1, 2 - math.log(2) - 1]
        _close(out.kl, [k3])
        out.loss.backward()
        grads[est] = logp.grad.tolist()[0]
    # ∇k3 = (1 − r)·∇logπ, per token /2 (token_mean over 2 tokens)
    assert grads["k3"] == pytest.approx([(1 - 0.5) / 2, (1 - 2) / 2])
    # bias corrected: ∇(ρ·k3) at ρ = 1 = (1 − r + k3)·∇logπ = (log π − log ref)·∇logπ, whose
    # expectation under π is ∇KL(π‖ref)
    assert grads["k3_bias_corrected"] == pytest.approx([math.log(2) / 2, -math.log(2) / 2])


def test_bias_corrected_kl_on_a_tis_peers_rows_weighs_by_the_clamped_ratio():
    # kl_tokens: all; a tis row sampled by a peer whose log-prob was log 0.25 where π has 0.5:
    # weight π/μ = 2, clamped to tis_high 1.5; its gradient keeps the clamped value
    logp = torch.log(torch.tensor([[0.5]], dtype=D)).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25]], dtype=D))
    behaviour = torch.log(torch.tensor([[0.25]], dtype=D))
    c = LossSettings(beta=1.0, kl_tokens="all", tis_high=1.5)
    out = grpo_loss(
        logp,
        logp.detach(),
        ref,
        torch.zeros(1, dtype=D),
        torch.ones(1, 1, dtype=D),
        BatchSize(1, 1, 1),
        c,
        torch.tensor([MODES["tis"]]),
        behaviour,
    )
    k3 = 0.5 + math.log(2) - 1
    assert out.kl.item() == pytest.approx(1.5 * k3)
    out.loss.backward()
    # d/dlogp [w·k3] with w = 1.5·π/sg(π): 1.5·(k3 + 1 − r) = 1.5·log(π/ref)
    assert logp.grad.item() == pytest.approx(1.5 * math.log(2))


def test_off_policy_mask_drops_far_negative_sequences():
    # mean log μ − log π per sequence: row 0 (A < 0) 0.5 > 0.3 dropped; row 1 (A < 0) 0.1
    # kept; row 2 (A > 0) 1.0 kept whatever its distance
    logp = torch.zeros(3, 2, dtype=D)
    sampler = torch.tensor([[0.4, 0.6], [0.1, 0.1], [1.0, 9.0]], dtype=D)
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]], dtype=D)
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=D)
    keep = off_policy_keep(logp, sampler, adv, mask, 0.3)
    assert keep.squeeze(1).tolist() == [0.0, 1.0, 1.0]
    c = LossSettings(off_policy_mask=0.3)
    out = grpo_loss(logp, sampler, None, adv, mask, BatchSize(3, 5, 2), c)
    # the policy's rows: the old log-probs are the sampler's. Ratios exp(−0.4), exp(−0.6)
    # on row 0 do not count; row 1: −min(ρ, clip)·A = ρ (A = −1, ratio 0.905 within the clip)
    # twice; row 2: −min(e^−1·1, 0.8·1) = −e^−1
    want = (2 * math.exp(-0.1) - math.exp(-1.0)) / 5
    assert out.loss.item() == pytest.approx(want)
    assert out.dropped.tolist() == [True, False, False]


def test_entropy_from_the_same_logits_by_hand():
    # one position with probabilities (0.5, 0.25, 0.25): H = 1.5·log 2
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]], dtype=D)).requires_grad_(True)
    logp, ent = logprobs_and_entropy(logits, torch.tensor([[1]]), entropy="grad")
    assert logp.item() == pytest.approx(math.log(0.25))
    assert ent.item() == pytest.approx(1.5 * math.log(2))
    ent.sum().backward()
    # dH/dz_i = −p_i(log p_i + H)
    h = 1.5 * math.log(2)
    p = [0.5, 0.25, 0.25]
    assert logits.grad[0, 0].tolist() == pytest.approx([-q * (math.log(q) + h) for q in p])
    _, value = logprobs_and_entropy(logits, torch.tensor([[1]]), entropy="value")
    assert not value.requires_grad


def test_entropy_threshold_is_the_linear_quantile():
    torch.manual_seed(0)
    ent = torch.rand(3, 5)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    real = ent[mask.bool()].double()
    for q in (0.2, 0.5, 0.8):
        want = torch.quantile(real, 1 - q).item()
        assert entropy_threshold(ent, mask, q) == pytest.approx(want, abs=1e-12)


def test_entropy_bonus_and_top_entropy_tokens():
    # ratio 1, A = 1 everywhere: per-token pg loss −1; keep_tokens drops token (0, 1)
    logp = torch.zeros(2, 2, dtype=D)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D)
    entropy = torch.tensor([[0.9, 0.1], [0.5, 7.0]], dtype=D)
    keep = torch.tensor([[True, False], [True, False]])
    c = LossSettings(entropy_coef=0.1, top_entropy_quantile=0.5)
    out = grpo_loss(
        logp,
        logp,
        None,
        torch.ones(2, dtype=D),
        mask,
        BatchSize(2, 3, 2),
        c,
        entropy=entropy,
        keep_tokens=keep,
    )
    # token_mean over 3 tokens of the kept pg terms (−1, −1), minus 0.1 × the kept tokens'
    # entropy over the step's 3 tokens
    assert out.loss.item() == pytest.approx(-2 / 3 - 0.1 * (0.9 + 0.5) / 3)
