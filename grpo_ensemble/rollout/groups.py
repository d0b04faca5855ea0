"""A step's groups scored and turned into advantages: the `Rollout` the update trains on.

Scorers and the group evaluator are plugins; their error policies (`rewards[i].on_error`,
`group.on_error`) decide here whether a group they failed on stops the run or leaves the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PluginError
from ..plugins.interfaces import GroupEvaluator
from ..types import POLICY, Candidate, Group, GroupLayout, Prompt
from .scoring import Scores


@dataclass(frozen=True)
class GroupSettings:
    """How groups become advantages (the recipe's `group` section and each member's mode)."""

    modes: dict[str, str]  # member name → mode (on_policy, shaped, tis, baseline_only)
    stats: str = "group"  # group | policy: whose candidates count in the group statistics
    on_error: str = "fail"  # fail | skip_group: what a failing group evaluator does
    drop_equal_reward_groups: bool = True


@dataclass
class Rollout:
    """One step's generations, rewards and advantages, flat in candidate order."""

    groups: list[Group]
    layout: GroupLayout
    candidates: list[Candidate]
    rewards: torch.Tensor  # (n_candidates,) combined
    per_scorer: dict[str, torch.Tensor]  # name → (n_candidates,)
    advantages: torch.Tensor  # (n_candidates,)
    keep: torch.Tensor  # (n_candidates,) bool: enters the loss
    equal_groups: int
    skipped_groups: int = 0  # left out: a plugin failed on them (on_error: skip_group)
    scorer_faults: dict[str, int] = field(default_factory=dict)  # scorer → groups failed
    # (n_candidates,) bool per scorer: it gave a score (None: every scorer scored every one)
    scored: dict[str, torch.Tensor] | None = None

    @property
    def any_scored(self) -> torch.Tensor:
        """(n_candidates,) bool: some scorer scored the candidate."""
        if not self.scored:
            return torch.ones(len(self.rewards), dtype=torch.bool)
        return torch.stack(list(self.scored.values())).any(dim=0)

    @property
    def candidate_prompt(self) -> list[Prompt]:
        """The prompt of each candidate, in flat order."""
        return [g.prompt for g in self.groups for _ in g.candidates]


def evaluate_groups(
    groups: list[Group], scores: Scores, evaluator: GroupEvaluator, how: GroupSettings
) -> Rollout:
    """Turn each group's rewards (`scores`, in candidate order) into advantages. Groups that a
    scorer or the evaluator failed on leave the step where the recipe says so (counted). A
    candidate no scorer scored is, for the evaluator, not there: out of the statistics, no
    advantage, no gradient."""
    n_groups = len(groups)
    faults = scores.faults
    groups, scores = _drop(groups, scores.skip, scores)
    layout, adv, bad = group_advantages(groups, scores, evaluator, how)
    while any(bad):  # group.on_error = skip_group: evaluate the others again without them
        groups, scores = _drop(groups, bad, scores)
        layout, adv, bad = group_advantages(groups, scores, evaluator, how)
    rewards = scores.combined
    real = layout.valid & layout.to_grid(scores.any_scored, fill=False)  # (n_prompts, size)
    grid = layout.to_grid(rewards)  # (n_prompts, group_size)
    if groups:
        lo = grid.masked_fill(~real, float("inf")).min(dim=1).values
        hi = grid.masked_fill(~real, float("-inf")).max(dim=1).values
        equal = lo == hi  # (n_prompts,) groups with no learning signal
    else:  # every group left the step
        equal = torch.zeros(0, dtype=torch.bool)
    candidates = [c for g in groups for c in g.candidates]
    trained = [how.modes[c.source] != "baseline_only" for c in candidates]
    keep = real & layout.to_grid(torch.tensor(trained, dtype=torch.bool), fill=False)
    if how.drop_equal_reward_groups:
        keep &= ~equal.unsqueeze(1)
    return Rollout(
        groups,
        layout,
        candidates,
        rewards,
        scores.per_scorer,
        layout.to_flat(adv),
        layout.to_flat(keep),
        int(equal.sum()),
        skipped_groups=n_groups - len(groups),
        scorer_faults=faults,
        scored={k: scores.scored_by(k) for k in scores.per_scorer},
    )


def _drop(groups: list[Group], drop: list[bool], scores: Scores) -> tuple[list[Group], Scores]:
    """The groups not marked in `drop`, with their candidates' scores."""
    if not any(drop):
        return groups, scores
    keep = torch.tensor([not d for g, d in zip(groups, drop, strict=True) for _ in g.candidates])
    kept = [g for g, d in zip(groups, drop, strict=True) if not d]
    return kept, scores.select(keep)


def group_advantages(
    groups: list[Group], scores: Scores, evaluator: GroupEvaluator, how: GroupSettings
) -> tuple[GroupLayout, torch.Tensor, list[bool]]:
    """The evaluator's advantages (n_prompts, group_size) and, per group, whether it failed
    there (only with group.on_error = skip_group; with fail, a failure stops the run). The
    evaluator sees the unscored candidates as padding: not `valid`, not in `stats`."""
    layout = GroupLayout.from_groups(groups)
    grid = layout.to_grid(scores.combined)  # (n_prompts, group_size)
    if not groups:
        return layout, grid, []
    valid = layout.valid & layout.to_grid(scores.any_scored, fill=False)
    stats = stats_mask(groups, layout, how.stats) & valid
    name = getattr(evaluator, "name", "") or type(evaluator).__name__
    skip = how.on_error == "skip_group"
    try:
        adv = _advantages(evaluator, grid, valid, stats)
    except _EvalFault as exc:
        if not skip:
            raise PluginError(name, str(exc)) from exc.__cause__
        adv, bad = torch.zeros_like(grid), [False] * len(groups)
        for i in range(len(groups)):  # one group at a time, to find where it fails
            rows = slice(i, i + 1)
            try:
                one = _advantages(evaluator, grid[rows], valid[rows], stats[rows])
            except _EvalFault:
                bad[i] = True
                continue
            bad[i] = not bool(torch.isfinite(one[valid[rows]]).all())
            adv[rows] = torch.where(valid[rows], one, 0.0) if not bad[i] else 0.0
        return layout, adv, bad
    finite = torch.isfinite(adv).logical_or(~valid).all(dim=1)  # (n_prompts,)
    if not bool(finite.all()) and not skip:
        i = int((~finite).nonzero()[0])
        raise PluginError(name, f"advantages are not finite for prompt {groups[i].prompt.text!r}")
    return layout, torch.where(valid & finite.unsqueeze(1), adv, 0.0), (~finite).tolist()


class _EvalFault(Exception):
    pass


def _advantages(evaluator, grid, valid, stats) -> torch.Tensor:
    try:
        adv = evaluator.advantages(grid, valid, stats)
    except Exception as exc:
        raise _EvalFault(f"group evaluator raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(adv, torch.Tensor) or adv.shape != grid.shape:
        raise _EvalFault(f"advantages must be a tensor of shape {tuple(grid.shape)}")
    return adv


def stats_mask(groups: list[Group], layout: GroupLayout, stats: str) -> torch.Tensor:
    """(n_prompts, group_size) candidates that count in the group statistics."""
    if stats == "group":
        return layout.valid
    own = torch.tensor([c.source == POLICY for g in groups for c in g.candidates])
    return layout.to_grid(own, fill=False)
