"""Each loss piece against numbers computed by hand."""

import math

import torch

from grpo_ensemble.trainer.loss import (
    AGGREGATIONS,
    BatchSize,
    LossSettings,
    clipped_surrogate,
    grpo_loss,
    kl_k3,
)


def _logp_for_ratios(ratios):
    # old log-probs 0, so ratio = exp(logp)
    return torch.log(torch.tensor(ratios, dtype=torch.float64)).requires_grad_(True)


def test_clipped_surrogate_by_hand():
    logp = _logp_for_ratios([[1.5, 0.9], [0.5, 1.2]])
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, clipped = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # seq 0, A=+2: min(1.5·2, 1.28·2)=2.56 (clipped); min(0.9·2, 0.9·2)=1.8
    # seq 1, A=−1: min(−0.5, −0.8)=−0.8 (clipped); min(−1.2, −1.2)=−1.2
    expected = torch.tensor([[-2.56, -1.8], [0.8, 1.2]], dtype=torch.float64)
    assert torch.allclose(loss, expected, atol=1e-12)
    assert clipped.tolist() == [[True, False], [True, False]]
    loss.sum().backward()
    # d(−ρA)/dlogp = −Aρ where unclipped, 0 where the clipped branch is taken
    assert torch.allclose(
        logp.grad, torch.tensor([[0.0, -1.8], [0.0, 1.2]], dtype=torch.float64), atol=1e-12
    )


def test_ratio_one_gives_policy_gradient():
    # μ = 1: old = logp.detach(), so the gradient is −A per token
    logp = torch.tensor([[-0.7, -1.2]], requires_grad=True)
    loss, clipped = clipped_surrogate(logp, logp.detach(), torch.tensor([0.5]), 0.2, 0.2)
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5]]))
    assert not clipped.any()


def test_kl_k3_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.25]))
    # d = ref − logp = log 0.5 → 0.5 + log 2 − 1; and 0 where equal
    got = kl_k3(logp, ref)
    assert math.isclose(got[0].item(), 0.5 + math.log(2) - 1, rel_tol=1e-6)
    assert got[1].item() == 0.0


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    size = BatchSize(sequences=2, tokens=4, max_new_tokens=3)
    assert AGGREGATIONS["token_mean"](per_token, mask, size).item() == 10 / 4
    assert AGGREGATIONS["seq_mean"](per_token, mask, size).item() == (2.0 + 4.0) / 2
    assert math.isclose(
        AGGREGATIONS["constant"](per_token, mask, size).item(), 10 / 6, rel_tol=1e-6
    )


def test_micro_batch_shares_sum_to_full_batch():
    torch.manual_seed(0)
    per_token = torch.randn(5, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0.0]])
    size = BatchSize(sequences=5, tokens=int(mask.sum()), max_new_tokens=4)
    for name, agg in AGGREGATIONS.items():
        full = agg(per_token, mask, size)
        parts = agg(per_token[:2], mask[:2], size) + agg(per_token[2:], mask[2:], size)
        assert torch.allclose(full, parts, atol=1e-6), name


def test_grpo_loss_adds_beta_kl_and_masks_padding():
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.9]]))
    mask = torch.tensor([[1.0, 0.0]])  # second token is padding
    out = grpo_loss(
        logp,
        logp.detach(),
        ref,
        torch.tensor([1.0]),
        mask,
        BatchSize(1, 1, 2),
        LossSettings(clip_low=0.2, clip_high=0.2, beta=0.1, aggregation="token_mean"),
    )
    # token 0: surrogate −1·1 = −1; KL = 0.5 + log 2 − 1; padding contributes nothing
    expected = -1.0 + 0.1 * (0.5 + math.log(2) - 1)
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-6)


def test_kl_applies_to_the_policys_own_rows_by_default():
    # row 0 the policy's, row 1 a peer's (on_policy mode); ratio 1, A = 0: only the KL is left
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.25]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.25, 0.25], [0.25, 0.5]], dtype=torch.float64))
    mask = torch.ones(2, 2)
    size = BatchSize(sequences=2, tokens=4, max_new_tokens=2)
    own = torch.tensor([True, False])
    zero = torch.zeros(2, dtype=torch.float64)
    # k3 = exp(d) − d − 1, d = ref − logp: row 0 tokens d = log ½, 0 → ½ + log 2 − 1, 0
    k = 0.5 + math.log(2) - 1
    policy_only = grpo_loss(logp, logp, ref, zero, mask, size, LossSettings(beta=0.1), own=own)
    assert policy_only.loss.item() == math.fsum([0.1 * k]) / 4
    assert policy_only.kl[1].tolist() == [0.0, 0.0]
    # kl_tokens: all — row 1 adds d = log ½, log 2 → k, 2 − log 2 − 1
    every = grpo_loss(
        logp, logp, ref, zero, mask, size, LossSettings(beta=0.1, kl_tokens="all"), own=own
    )
    assert abs(every.loss.item() - 0.1 * (2 * k + 1 - math.log(2)) / 4) < 1e-15


def test_tis_rows_without_behaviour_logprobs_are_refused():
    logp = torch.zeros(2, 2, dtype=torch.float64)
    size = BatchSize(sequences=2, tokens=4, max_new_tokens=2)
    modes = torch.tensor([0, 2])
    import pytest

    with pytest.raises(ValueError, match="tis rows need behaviour_logp"):
        grpo_loss(logp, logp, None, torch.ones(2), torch.ones(2, 2), size, LossSettings(), modes)


def test_the_clip_flag_counts_only_clipped_surrogate_rows():
    # the same ratios (1.5: clipped for A > 0) on an on_policy, a shaped and a tis row: only
    # the on_policy row takes the clipped surrogate, so only it may count as clipped
    logp = torch.log(torch.full((3, 2), 1.5, dtype=torch.float64))
    old = torch.zeros(3, 2, dtype=torch.float64)
    adv = torch.ones(3, dtype=torch.float64)
    size = BatchSize(sequences=3, tokens=6, max_new_tokens=2)
    out = grpo_loss(
        logp,
        old,
        None,
        adv,
        torch.ones(3, 2),
        size,
        LossSettings(),
        modes=torch.tensor([0, 1, 2]),
        behaviour_logp=old,
    )
    assert out.clipped.tolist() == [[True, True], [False, False], [False, False]]
