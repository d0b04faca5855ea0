"""Built-in group evaluators: rewards (n_prompts, group_size) → advantages, ragged groups allowed.

Each is a small pure tensor function over a padded grid with two masks: `valid` (a real
candidate) and `stats` (counts in the group statistics). A group whose statistics rewards are
all equal gets zero advantages, never NaN.
"""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..interfaces import GroupEvaluator


def group_mean(rewards: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over `stats` per group, and the count. Shapes (n_prompts, 1)."""
    w = stats.to(rewards.dtype)
    count = w.sum(dim=1, keepdim=True)
    mean = (rewards * w).sum(dim=1, keepdim=True) / count.clamp(min=1)
    return mean, count


def group_std(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased std (as TRL) over `mask` per group, (n_prompts, 1); 0 for fewer than 2."""
    mean, count = group_mean(rewards, mask)
    sq = ((rewards - mean) ** 2) * mask.to(rewards.dtype)
    return (sq.sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()


def grpo_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    stats: torch.Tensor,
    eps: float = 1e-4,
    scale: bool = True,
) -> torch.Tensor:
    """(r − mean) / (std + eps), mean and std over the `stats` candidates (without `scale`:
    r − mean, as Dr. GRPO, for `group.scale_rewards` none and batch). Where their std is 0
    (rewards all equal, or one candidate) the std of the whole group scales: the statistics
    candidates' advantages are 0 then anyway, and a candidate outside them (a peer's, with
    `group.stats: policy`) is measured against their mean on the group's scale, not divided
    by `eps` (which would make it about 10⁴ where on-failure injection gives the policy's
    candidates equal rewards). A group whose rewards are all equal gets 0."""
    if not scale:
        return dr_grpo_advantages(rewards, valid, stats)
    mean, _ = group_mean(rewards, stats)
    std = group_std(rewards, stats)
    std = torch.where(std > 0, std, group_std(rewards, valid))
    return torch.where(valid, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def dr_grpo_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, stats: torch.Tensor
) -> torch.Tensor:
    """r − mean: Dr. GRPO drops the std normaliser, which over-weights easy and hard groups."""
    mean, _ = group_mean(rewards, stats)
    return torch.where(valid, rewards - mean, torch.zeros_like(rewards))


def rloo_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, stats: torch.Tensor
) -> torch.Tensor:
    """r − mean of the *other* statistics candidates (leave-one-out baseline).

    For a candidate outside `stats` the baseline is the mean of all statistics candidates.
    """
    w = stats.to(rewards.dtype)
    total = (rewards * w).sum(dim=1, keepdim=True)
    count = w.sum(dim=1, keepdim=True)
    others = count - w
    # a lone statistics candidate has no others: its baseline is itself (advantage 0)
    baseline = torch.where(others > 0, (total - rewards * w) / others.clamp(min=1), rewards)
    return torch.where(valid, rewards - baseline, torch.zeros_like(rewards))


class GRPO(GroupEvaluator):
    """`scale`: group divides each group's advantages by its std (+ eps); none does not (the
    recipe's `group.scale_rewards` sets it: none, and batch, whose division comes later)."""

    name = "grpo"

    def __init__(self, eps: float = 1e-4, scale: str = "group"):
        if scale not in ("group", "none"):
            raise ValueError(f"scale must be 'group' or 'none', not {scale!r}")
        self.eps = float(eps)
        self.scale = scale

    def advantages(self, rewards, valid, stats):
        return grpo_advantages(rewards, valid, stats, self.eps, self.scale == "group")


class DrGRPO(GroupEvaluator):
    name = "dr_grpo"

    def advantages(self, rewards, valid, stats):
        return dr_grpo_advantages(rewards, valid, stats)


class RLOO(GroupEvaluator):
    name = "rloo"

    def advantages(self, rewards, valid, stats):
        return rloo_advantages(rewards, valid, stats)


@hookimpl
def register_group_evaluators(register):
    for cls in (GRPO, DrGRPO, RLOO):
        register(cls)
