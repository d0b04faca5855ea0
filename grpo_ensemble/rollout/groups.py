"""A step's groups scored and turned into advantages: the `Rollout` the update trains on.

Scorers and the group evaluator are plugins; their error policies (`rewards[i].on_error`,
`group.on_error`) decide here whether a group they failed on stops the run or leaves the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from .. import dist
from ..errors import PluginError
from ..plugins.builtin.evaluators import group_mean, group_std
from ..plugins.interfaces import GroupEvaluator
from ..types import POLICY, Candidate, Group, GroupLayout, Prompt
from .scoring import Scores

NORM_EPS = 1e-4  # added to a std before dividing by it (TRL's)


@dataclass(frozen=True)
class GroupSettings:
    """How groups become advantages (the recipe's `group` section and each member's mode)."""

    modes: dict[str, str]  # member name → mode (on_policy, shaped, tis, baseline_only)
    stats: str = "group"  # group | policy: whose candidates count in the group statistics
    on_error: str = "fail"  # fail | skip_group: what a failing group evaluator does
    drop_equal_reward_groups: bool = True
    # group | batch | none | None (the evaluator's own): what divides the advantages
    scale_rewards: str | None = None
    reward_aggregation: str = "sum_then_normalize"  # or normalize_then_sum
    mask_truncated: bool = False  # completions cut at max_new_tokens leave the loss


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
    # (n_candidates,) the rewards the evaluator saw (None: `rewards`), and bool: the candidate
    # counts in its group's statistics (None: every scored one)
    signal: torch.Tensor | None = None
    in_stats: torch.Tensor | None = None

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
    groups: list[Group],
    scores: Scores,
    evaluator: GroupEvaluator,
    how: GroupSettings,
    weights: Mapping[str, float] | None = None,
) -> Rollout:
    """Turn each group's rewards (`scores`, in candidate order) into advantages. Groups that a
    scorer or the evaluator failed on leave the step where the recipe says so (counted). A
    candidate no scorer scored is, for the evaluator, not there: out of the statistics, no
    advantage, no gradient. `weights`: scorer name → weight, which normalize_then_sum needs.
    With `scale_rewards: batch` the advantages are not yet divided: see `batch_scaled`."""
    n_groups = len(groups)
    faults = scores.faults
    groups, scores = _drop(groups, scores.skip, scores)
    ev = group_advantages(groups, scores, evaluator, how, weights)
    while any(ev.bad):  # group.on_error = skip_group: evaluate the others again without them
        groups, scores = _drop(groups, ev.bad, scores)
        ev = group_advantages(groups, scores, evaluator, how, weights)
    layout, real = ev.layout, ev.valid  # (n_prompts, group_size)
    if groups:  # equal: the rewards the evaluator saw are all equal, no learning signal
        lo = ev.signal.masked_fill(~real, float("inf")).min(dim=1).values
        hi = ev.signal.masked_fill(~real, float("-inf")).max(dim=1).values
        equal = lo == hi  # (n_prompts,)
    else:  # every group left the step
        equal = torch.zeros(0, dtype=torch.bool)
    candidates = [c for g in groups for c in g.candidates]
    trained = [how.modes[c.source] != "baseline_only" for c in candidates]
    if how.mask_truncated:  # cut at max_new_tokens: still in the statistics, not in the loss
        trained = [t and c.finished for t, c in zip(trained, candidates, strict=True)]
    keep = real & layout.to_grid(torch.tensor(trained, dtype=torch.bool), fill=False)
    if how.drop_equal_reward_groups:
        keep &= ~equal.unsqueeze(1)
    return Rollout(
        groups,
        layout,
        candidates,
        scores.combined,
        scores.per_scorer,
        layout.to_flat(ev.advantages),
        layout.to_flat(keep),
        int(equal.sum()),
        skipped_groups=n_groups - len(groups),
        scorer_faults=faults,
        scored={k: scores.scored_by(k) for k in scores.per_scorer},
        signal=layout.to_flat(ev.signal),
        in_stats=layout.to_flat(ev.stats),
    )


def _drop(groups: list[Group], drop: list[bool], scores: Scores) -> tuple[list[Group], Scores]:
    """The groups not marked in `drop`, with their candidates' scores."""
    if not any(drop):
        return groups, scores
    keep = torch.tensor([not d for g, d in zip(groups, drop, strict=True) for _ in g.candidates])
    kept = [g for g, d in zip(groups, drop, strict=True) if not d]
    return kept, scores.select(keep)


@dataclass
class Evaluated:
    """The groups as the evaluator saw them, and what it made of them; (n_prompts, group_size)
    each."""

    layout: GroupLayout
    signal: torch.Tensor  # the rewards the evaluator saw (see `reward_signal`)
    valid: torch.Tensor  # real candidates that some scorer scored
    stats: torch.Tensor  # those of them that count in the group statistics
    advantages: torch.Tensor
    bad: list[bool]  # per group: the evaluator failed there (group.on_error = skip_group)


def group_advantages(
    groups: list[Group],
    scores: Scores,
    evaluator: GroupEvaluator,
    how: GroupSettings,
    weights: Mapping[str, float] | None = None,
) -> Evaluated:
    """The evaluator's advantages and, per group, whether it failed there (only with
    group.on_error = skip_group; with fail, a failure stops the run). The evaluator sees the
    unscored candidates as padding: not `valid`, not in `stats`."""
    layout = GroupLayout.from_groups(groups)
    valid = layout.valid & layout.to_grid(scores.any_scored, fill=False)
    if not groups:
        grid = layout.to_grid(scores.combined)
        return Evaluated(layout, grid, valid, valid, grid, [])
    stats = stats_mask(groups, layout, how.stats) & valid
    signal = reward_signal(scores, layout, valid, stats, how.reward_aggregation, weights)
    adv, bad = _evaluate(evaluator, signal, valid, stats, groups, how.on_error == "skip_group")
    return Evaluated(layout, signal, valid, stats, adv, bad)


def _evaluate(evaluator, grid, valid, stats, groups, skip: bool) -> tuple[torch.Tensor, list]:
    """The evaluator's advantages (0 where not valid) and the groups it failed on."""
    name = getattr(evaluator, "name", "") or type(evaluator).__name__
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
        return adv, bad
    finite = torch.isfinite(adv).logical_or(~valid).all(dim=1)  # (n_prompts,)
    if not bool(finite.all()) and not skip:
        i = int((~finite).nonzero()[0])
        raise PluginError(name, f"advantages are not finite for prompt {groups[i].prompt.text!r}")
    return torch.where(valid & finite.unsqueeze(1), adv, 0.0), (~finite).tolist()


def reward_signal(
    scores: Scores,
    layout: GroupLayout,
    valid: torch.Tensor,
    stats: torch.Tensor,
    aggregation: str,
    weights: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """(n_prompts, group_size) the rewards the evaluator sees. sum_then_normalize: the
    weighted sum Σ wₖ·rₖ. normalize_then_sum (TRL's multi_objective_aggregation): each
    scorer's rewards normalised within the group first, Σ wₖ·(rₖ − meanₖ) / (stdₖ + 1e-4), mean
    and unbiased std over the statistics candidates that scorer k scored. A scorer's None
    leaves its term out for that candidate (TRL's nansum), as does a group where it scored
    no statistics candidate (nothing to measure against). Where the statistics candidates'
    stdₖ is 0, the std over all the group's candidates k scored scales (as the grpo evaluator
    does), so that a candidate outside the statistics is not divided by 1e-4."""
    if aggregation == "sum_then_normalize":
        return layout.to_grid(scores.combined)
    if aggregation != "normalize_then_sum":
        raise ValueError(f"unknown reward aggregation {aggregation!r}")
    if weights is None or set(scores.per_scorer) - set(weights):
        raise ValueError("normalize_then_sum needs every scorer's weight")
    out = torch.zeros(valid.shape, dtype=scores.combined.dtype)
    for name, values in scores.per_scorer.items():
        by = valid & layout.to_grid(scores.scored_by(name), fill=False)
        base = stats & by
        r = layout.to_grid(values)
        mean, count = group_mean(r, base)
        std = group_std(r, base)
        std = torch.where(std > 0, std, group_std(r, by))
        term = weights[name] * (r - mean) / (std + NORM_EPS)
        out += torch.where(by & (count > 0), term, 0.0)
    return out


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


def batch_scaled(ro: Rollout, how: GroupSettings) -> Rollout:
    """With `group.scale_rewards: batch` (TRL's), `ro` with its advantages divided by
    (std + 1e-4): std is the unbiased std of the rewards the evaluator saw, over the candidates
    that count in the statistics of every group of the step, on every rank. Where that std is
    0 the std over every scored candidate scales, so that a candidate outside the statistics
    (a peer's, with `group.stats: policy`) is not divided by 1e-4 (the others' advantages are
    0 then). Other settings: `ro` as is.

    It sums across ranks: every rank calls it, and outside `dist.agree` (a rank that raised
    inside would leave the others waiting in the sum)."""
    if how.scale_rewards != "batch":
        return ro
    signal = ro.rewards if ro.signal is None else ro.signal
    stats = ro.any_scored if ro.in_stats is None else ro.in_stats
    own, every = batch_std(signal, [stats, ro.any_scored])
    std = own if own > 0 else every
    return replace(ro, advantages=ro.advantages / (std + NORM_EPS))


def batch_std(values: torch.Tensor, masks: list[torch.Tensor]) -> list[float]:
    """The unbiased std of `values` over each mask, over all ranks (0 for fewer than 2). In
    float64 and in two passes, mean then squared deviations, so that equal values give 0
    exactly, not a rounding residue of Σr² − (Σr)²/n."""
    x = values.double()
    sums = dist.all_sum([v for m in masks for v in (float(m.sum()), float(x[m].sum()))])
    counts, totals = sums[::2], sums[1::2]
    means = [t / max(n, 1.0) for n, t in zip(counts, totals, strict=True)]
    deviations = [float(((x[m] - mu) ** 2).sum()) for m, mu in zip(masks, means, strict=True)]
    squares = dist.all_sum(deviations)
    return [math.sqrt(q / (n - 1)) if n > 1 else 0.0 for q, n in zip(squares, counts, strict=True)]


def stats_mask(groups: list[Group], layout: GroupLayout, stats: str) -> torch.Tensor:
    """(n_prompts, group_size) candidates that count in the group statistics."""
    if stats == "group":
        return layout.valid
    own = torch.tensor([c.source == POLICY for g in groups for c in g.candidates])
    return layout.to_grid(own, fill=False)
