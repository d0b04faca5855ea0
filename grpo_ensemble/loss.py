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


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: this micro-batch's share of the step loss
    kl: torch.Tensor  # (B, C) per-token KL (zeros when beta = 0)
    clipped: torch.Tensor  # (B, C) bool


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    size: BatchSize,
    clip_low: float,
    clip_high: float,
    beta: float,
    aggregation: str,
) -> LossOutput:
    """Clipped surrogate + beta·KL, aggregated by name."""
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    kl = torch.zeros_like(logp)
    if beta > 0 and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
    loss = AGGREGATIONS[aggregation](per_token, mask, size)
    return LossOutput(loss=loss, kl=kl.detach(), clipped=clipped & mask.bool())
