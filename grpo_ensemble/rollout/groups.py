"""A step's groups scored and turned into advantages: the `Rollout` the update trains on.

Scorers and the group evaluator are plugins; their error policies (`rewards[i].on_error`,
`group.on_error`) decide here whether a group they failed on stops the run or leaves the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import dist
from ..errors import PluginError
from ..types import POLICY, Candidate, Group, GroupLayout, Prompt
from .scoring import Known, score_groups

if TYPE_CHECKING:
    from ..trainer.step import Run


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

    @property
    def candidate_prompt(self) -> list[Prompt]:
        """The prompt of each candidate, in flat order."""
        return [g.prompt for g in self.groups for _ in g.candidates]


def evaluate_groups(run: Run, groups: list[Group], known: Known | None = None) -> Rollout:
    """Score the candidates and turn each group's rewards into advantages. Groups that a
    scorer or the evaluator failed on leave the step where the recipe says so (counted).
    `known`: scores already taken of each group's first candidates (see `score_groups`)."""
    scores = score_groups(groups, run.scorers, known)
    n_groups = len(groups)
    groups, rewards, per_scorer = _drop(groups, scores.skip, scores.combined, scores.per_scorer)
    layout, adv, bad = group_advantages(run, groups, rewards)
    while any(bad):  # group.on_error = skip_group: evaluate the others again without them
        groups, rewards, per_scorer = _drop(groups, bad, rewards, per_scorer)
        layout, adv, bad = group_advantages(run, groups, rewards)
    grid = layout.to_grid(rewards)  # (n_prompts, group_size)
    if groups:
        lo = grid.masked_fill(~layout.valid, float("inf")).min(dim=1).values
        hi = grid.masked_fill(~layout.valid, float("-inf")).max(dim=1).values
        equal = lo == hi  # (n_prompts,) groups with no learning signal
    else:  # every group left the step
        equal = torch.zeros(0, dtype=torch.bool)
    mode = {m.name: m.mode for m in run.ensemble.members}
    candidates = [c for g in groups for c in g.candidates]
    trained = [mode[c.source] != "baseline_only" for c in candidates]
    keep = layout.valid & layout.to_grid(torch.tensor(trained, dtype=torch.bool), fill=False)
    if run.recipe.group.drop_equal_reward_groups:
        keep &= ~equal.unsqueeze(1)
    return Rollout(
        groups,
        layout,
        candidates,
        rewards,
        per_scorer,
        layout.to_flat(adv),
        layout.to_flat(keep),
        int(equal.sum()),
        skipped_groups=n_groups - len(groups),
        scorer_faults=scores.faults,
    )


def _drop(groups: list[Group], drop: list[bool], rewards, per_scorer):
    """The groups not marked in `drop`, with their candidates' rewards."""
    if not any(drop):
        return groups, rewards, per_scorer
    keep = torch.tensor([not d for g, d in zip(groups, drop, strict=True) for _ in g.candidates])
    kept = [g for g, d in zip(groups, drop, strict=True) if not d]
    return kept, rewards[keep], {k: v[keep] for k, v in per_scorer.items()}


def group_advantages(
    run: Run, groups: list[Group], rewards: torch.Tensor
) -> tuple[GroupLayout, torch.Tensor, list[bool]]:
    """The evaluator's advantages (n_prompts, group_size) and, per group, whether it failed
    there (only with group.on_error = skip_group; with fail, a failure stops the run)."""
    layout = GroupLayout.from_groups(groups)
    grid = layout.to_grid(rewards)  # (n_prompts, group_size)
    if not groups:
        return layout, grid, []
    stats = stats_mask(run, groups, layout)
    name = getattr(run.evaluator, "name", "") or type(run.evaluator).__name__
    skip = run.recipe.group.on_error == "skip_group"
    try:
        adv = _advantages(run.evaluator, grid, layout.valid, stats)
    except _EvalFault as exc:
        if not skip:
            raise PluginError(name, str(exc)) from exc.__cause__
        adv, bad = torch.zeros_like(grid), [False] * len(groups)
        for i in range(len(groups)):  # one group at a time, to find where it fails
            rows = slice(i, i + 1)
            try:
                one = _advantages(run.evaluator, grid[rows], layout.valid[rows], stats[rows])
            except _EvalFault:
                bad[i] = True
                continue
            bad[i] = not bool(torch.isfinite(one[layout.valid[rows]]).all())
            adv[rows] = torch.where(layout.valid[rows], one, 0.0) if not bad[i] else 0.0
        return layout, adv, bad
    finite = torch.isfinite(adv).logical_or(~layout.valid).all(dim=1)  # (n_prompts,)
    if not bool(finite.all()) and not skip:
        i = int((~finite).nonzero()[0])
        raise PluginError(name, f"advantages are not finite for prompt {groups[i].prompt.text!r}")
    return layout, torch.where(layout.valid & finite.unsqueeze(1), adv, 0.0), (~finite).tolist()


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


def stats_mask(run: Run, groups: list[Group], layout: GroupLayout) -> torch.Tensor:
    """(n_prompts, group_size) candidates that count in the group statistics."""
    if run.recipe.group.stats == "group":
        return layout.valid
    own = torch.tensor([c.source == POLICY for g in groups for c in g.candidates])
    return layout.to_grid(own, fill=False)


class PolicyFailed:
    """On-failure injection's test, called by the ensemble once the policy has sampled: True
    for the prompts where no policy candidate reached success. It keeps the scores it took
    (`known`) for the step's scoring, which then scores only the peers' candidates."""

    def __init__(self, run: Run):
        self.run = run
        self.known: Known | None = None

    def __call__(self, groups: list[Group]) -> list[bool]:
        # only the policy's candidates so far; a scorer failing on any rank stops every rank
        scores = dist.agree(lambda: score_groups(groups, self.run.scorers))
        self.known = Known([len(g.candidates) for g in groups], scores)
        out, k = [], 0
        for g, leaves in zip(groups, scores.skip, strict=True):
            n = len(g.candidates)
            best = float(scores.combined[k : k + n].max()) if n else None
            # a group a skip_group scorer failed on leaves the step anyway: no peers for it
            out.append(not leaves and (best is None or best < self.run.recipe.group.success_reward))
            k += n
        return out
