"""The GRPO loss as small pure tensor functions, each tested with hand-computed numbers.

Shapes: B candidates in a micro-batch, C completion tokens. `mask` is 1 on real completion
tokens. Aggregations take the *whole step's* sizes so that summing micro-batch losses gives
exactly the full-batch loss, whatever the micro-batch split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ, 1−clip_low, 1+clip_high)A), ρ = exp(logp − old_logp).

    logp, old_logp: (B, C); advantages: (B,). Returns the loss (B, C) and a (B, C) bool that is
    True where the clipped term was the smaller one (the token gives no gradient).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    return -torch.min(unclipped, clipped), clipped < unclipped


def shaped_surrogate(logp: torch.Tensor, advantages: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token −A·f(π_θ), f(p) = p/(p+γ), no clipping (LUFFY): needs no behaviour probability.

    dL/dlogp = −A·γp/(p+γ)², which stays small for tokens the policy finds very unlikely.
    """
    p = torch.exp(logp)
    return -advantages.unsqueeze(1) * p / (p + gamma)


def tis_surrogate(
    logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token −A·w·logp with w = clamp(π_θ/μ, lo, hi) detached: truncated importance sampling
    of another model's tokens (μ: that model's own log-probs). dL/dlogp = −A·w.

    Returns the loss (B, C), the weights w (B, C) and where the clamp bit (B, C) bool.
    """
    ratio = torch.exp(logp.detach() - behaviour_logp)
    w = ratio.clamp(lo, hi)
    return -advantages.unsqueeze(1) * w * logp, w, (ratio < lo) | (ratio > hi)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass(frozen=True)
class BatchSize:
    """Sizes of the whole step's batch, which normalise every micro-batch's share."""

    sequences: int
    tokens: int
    max_new_tokens: int


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, size: BatchSize) -> torch.Tensor:
    """Σ loss over all tokens of the batch / number of tokens in the batch (DAPO)."""
    return (per_token * mask).sum() / max(size.tokens, 1)


def seq_mean(per_token: torch.Tensor, mask: torch.Tensor, size: BatchSize) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (the original GRPO)."""
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_seq.sum() / max(size.sequences, 1)


def constant_norm(per_token: torch.Tensor, mask: torch.Tensor, size: BatchSize) -> torch.Tensor:
    """Σ loss / (sequences × max_new_tokens): no length bias (Dr. GRPO)."""
    return (per_token * mask).sum() / max(size.sequences * size.max_new_tokens, 1)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, BatchSize], torch.Tensor]] = {
    "token_mean": token_mean,
    "seq_mean": seq_mean,
    "constant": constant_norm,
}


# How a candidate enters the loss, by its member's mode (docs/algorithm.md). baseline_only
# candidates never reach the loss: they only count in the group statistics.
MODES = {"on_policy": 0, "shaped": 1, "tis": 2}


@dataclass(frozen=True)
class LossSettings:
    """The loss's settings (the recipe's `loss` section), in one place."""

    clip_low: float = 0.2  # the ratio is clipped to [1 − clip_low, 1 + clip_high]
    clip_high: float = 0.28
    beta: float = 0.0  # weight of the k3 KL to the reference; 0: no reference at all
    aggregation: str = "token_mean"  # a name in AGGREGATIONS
    shaped_gamma: float = 0.1  # shaped: f(p) = p/(p+γ)
    tis_low: float = 0.0  # tis: importance weights clamped to [tis_low, tis_high]
    tis_high: float = 2.0
    kl_tokens: str = "policy"  # "policy": KL on the policy's own rows (`own`), "all": every row


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: this micro-batch's share of the step loss
    kl: torch.Tensor  # (B, C) per-token KL (zeros when beta = 0)
    clipped: torch.Tensor  # (B, C) bool
    weight: torch.Tensor  # (B, C) tis importance weight or shaped f(p), 1 for on_policy rows
    tis_clamped: torch.Tensor | None = None  # (B, C) bool: a tis weight hit its clamp


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    size: BatchSize,
    settings: LossSettings,
    modes: torch.Tensor | None = None,
    behaviour_logp: torch.Tensor | None = None,
    own: torch.Tensor | None = None,
) -> LossOutput:
    """Per-candidate surrogate (by `modes` (B,), see MODES) + beta·KL, aggregated by name.

    The policy's own candidates and on_policy peers take the clipped surrogate; shaped and
    tis rows their own surrogate. `own` (B,) bool marks the rows the policy sampled: with
    `kl_tokens: policy` the KL applies to those alone (k3 on tokens another model sampled
    estimates neither KL(π‖ref) nor its gradient); None: every row is the policy's.
    """
    c = settings
    if modes is not None and behaviour_logp is None and bool((modes == MODES["tis"]).any()):
        raise ValueError("grpo_loss: tis rows need behaviour_logp (the sampler's log-probs)")
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, c.clip_low, c.clip_high)
    weight = torch.ones_like(logp)
    tis_clamped = None
    if modes is not None and bool((modes != MODES["on_policy"]).any()):
        row = modes.unsqueeze(1)  # (B, 1)
        shaped = shaped_surrogate(logp, advantages, c.shaped_gamma)
        p = torch.exp(logp.detach())
        weight = torch.where(row == MODES["shaped"], p / (p + c.shaped_gamma), weight)
        per_token = torch.where(row == MODES["shaped"], shaped, per_token)
        if behaviour_logp is not None:
            tis, w, hit = tis_surrogate(logp, behaviour_logp, advantages, c.tis_low, c.tis_high)
            tis_clamped = hit & (row == MODES["tis"]) & mask.bool()
            per_token = torch.where(row == MODES["tis"], tis, per_token)
            weight = torch.where(row == MODES["tis"], w, weight)
        clipped = clipped & (row == MODES["on_policy"])
    kl = torch.zeros_like(logp)
    if c.beta > 0 and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        if c.kl_tokens == "policy" and own is not None:
            kl = kl * own.unsqueeze(1)  # (B, C)
        per_token = per_token + c.beta * kl
    loss = AGGREGATIONS[c.aggregation](per_token, mask, size)
    return LossOutput(loss, kl.detach(), clipped & mask.bool(), weight, tis_clamped)
