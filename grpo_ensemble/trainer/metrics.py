"""A step's metrics row, global over ranks.

Each rank holds its own groups, so every metric is built from sums (and counts) that are added
up across ranks before anything is divided: a mean over 2 ranks is then the mean over all
candidates, not the mean of two rank means. Every rank holds the same keys (zeros where it
has nothing), as the element-wise reduction needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import dist
from ..rollout.groups import Rollout
from ..types import POLICY
from .batching import LeftOut, MicroBatch
from .loss import MODES


def best_candidates(ro: Rollout) -> torch.Tensor:
    """(n_candidates,) bool: the scored candidates that tie for their group's highest reward."""
    rewards = ro.rewards.masked_fill(~ro.any_scored, float("-inf"))
    grid = ro.layout.to_grid(rewards, fill=float("-inf"))  # (n_prompts, group_size)
    top = grid.max(dim=1, keepdim=True).values
    return ro.layout.to_flat((grid == top) & (grid > float("-inf")))


def rollout_sums(
    ro: Rollout, scorers: Sequence[str], members: Sequence[str], faults: Mapping[str, int]
) -> dict[str, float]:
    """This rank's sums over its candidates, keyed by the metric they feed. `faults`: the
    generator calls per member that failed and were skipped."""
    lengths = torch.tensor([len(c.token_ids) for c in ro.candidates], dtype=torch.float64)
    scored = ro.any_scored  # rewards average over the candidates some scorer scored
    rewards = ro.rewards.double() * scored
    s = {
        "n": float(len(ro.candidates)),
        "n_scored": float(scored.sum()),
        "reward": float(rewards.sum()),
        "reward_sq": float((rewards**2).sum()),
        "advantage_abs": float(ro.advantages.abs().sum()),
        "equal_reward_groups": float(ro.equal_groups),
        "trained_candidates": float(ro.keep.sum()),
        "completion_len": float(lengths.sum()),
        "truncated": float(sum(not c.finished for c in ro.candidates)),
        "groups": float(len(ro.groups)),
        "skipped_groups": float(ro.skipped_groups),
    }
    for name in scorers:  # every scorer a key, as the reduction needs
        s[f"scorer_faults/{name}"] = float(ro.scorer_faults.get(name, 0))
    for k, v in ro.per_scorer.items():
        by = ro.scored[k] if ro.scored else torch.ones(len(v), dtype=torch.bool)
        s[f"reward/{k}"] = float((v.double() * by).sum())
        s[f"scored/{k}"] = float(by.sum())
    sources = [c.source for c in ro.candidates]
    best = best_candidates(ro) if ro.candidates else torch.zeros(0, dtype=torch.bool)
    s["best"] = float(best.sum())
    for member in members:
        idx = [i for i, src in enumerate(sources) if src == member]
        p = f"member/{member}"
        s[f"{p}/candidates"] = float(len(idx))
        s[f"{p}/scored"] = float(scored[idx].sum())
        s[f"{p}/reward"] = float(rewards[idx].sum())
        s[f"{p}/completion_len"] = float(lengths[idx].sum())
        s[f"{p}/best"] = float(best[idx].sum())
        s[f"{p}/generator_faults"] = float(faults.get(member, 0))
    return s


def scorer_metrics(scorers: Sequence, row: Mapping[str, Any]) -> dict[str, float]:
    """What the scorers logged this step (a TRL reward function's `log_metric`), each name's
    mean over the values every rank logged. A name the step's row has already is prefixed
    with the scorer's (`NAME/name`) rather than overwrite it. Called on every rank."""
    takers = [ws for ws in scorers if hasattr(ws.scorer, "take_metrics")]
    if not takers:  # the same scorers on every rank: no rank gathers then
        return {}
    mine: dict[str, list[float]] = {}
    for ws in takers:
        for name, values in ws.scorer.take_metrics().items():
            key = name if name not in row else f"{ws.name}/{name}"
            mine.setdefault(key, []).extend(values)
    merged: dict[str, list[float]] = {}
    for part in dist.all_gather_objects(mine):
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    return {k: sum(v) / len(v) for k, v in merged.items() if v}


def step_metrics(
    step: int,
    ro: Rollout,
    upd: dict,
    lr: float,
    times: dict[str, float],
    scorers: Sequence[str],
    members: Sequence[str],
    faults: Mapping[str, int],
) -> dict[str, Any]:
    """Rewards (combined, per scorer, per member), advantages, lengths, timings: global.
    `lr`: the rate the next optimizer step would use; `times`: seconds per phase on this rank
    (and `generate/<member>` per member that sampled)."""
    s = dist.sum_dict(rollout_sums(ro, scorers, members, faults))
    n = max(s["n"], 1.0)
    scored = max(s["n_scored"], 1.0)
    var = (s["reward_sq"] - s["reward"] ** 2 / scored) / max(scored - 1, 1.0)
    # a step with no scored candidate (every group skipped, or nothing scorable) has no mean
    # reward: the keys are absent, not 0.0 (which would read as a step of wrong answers)
    rewards = {"reward": s["reward"] / scored} if s["n_scored"] else {}
    if s["n_scored"]:
        rewards["reward_std"] = math.sqrt(max(var, 0.0)) if scored > 1 else 0.0
    for k, v in s.items():
        if k.startswith("reward/") and s[f"scored/{k.removeprefix('reward/')}"]:
            rewards[k] = v / s[f"scored/{k.removeprefix('reward/')}"]
    m: dict[str, Any] = {
        "step": step,
        **rewards,
        "advantage_abs_mean": s["advantage_abs"] / n,
        "equal_reward_groups": int(s["equal_reward_groups"]),
        "candidates": int(s["n"]),
        "trained_candidates": int(s["trained_candidates"]),
        "completion_len": s["completion_len"] / n,
        # completions cut at max_new_tokens without EOS
        "truncated_fraction": s["truncated"] / n,
        "groups": int(s["groups"]),
        "skipped_groups": int(s["skipped_groups"]),
        **{k: int(v) for k, v in s.items() if k.startswith("scorer_faults/")},
        # the learning rate the step's optimizer steps used (their mean when μ > 1); a step
        # without one reports the rate the next would use
        "lr": lr,
        **upd,
    }
    if s["n"] > s["n_scored"]:  # candidates no scorer scored (all returned None)
        m["unscored_candidates"] = int(s["n"] - s["n_scored"])
    for member in members:
        p = f"member/{member}"
        if s[f"{p}/generator_faults"]:
            m[f"{p}/generator_faults"] = int(s[f"{p}/generator_faults"])
        count = s[f"{p}/candidates"]
        if count:
            m[f"{p}/best_share"] = s[f"{p}/best"] / max(s["best"], 1.0)
            if s[f"{p}/scored"]:  # a member no scorer could score has no mean reward
                m[f"{p}/reward"] = s[f"{p}/reward"] / s[f"{p}/scored"]
            m[f"{p}/candidates"] = int(count)
            m[f"{p}/completion_len"] = s[f"{p}/completion_len"] / count
    m.update(step_times(times, members))
    return m


def step_times(times: dict[str, float], members: Sequence[str]) -> dict[str, float]:
    """Seconds per phase, the slowest rank's (the others wait for it)."""
    phases = ("generate", "score", "update", "sync")
    out = {f"time/{p}": times.get(p, 0.0) for p in phases}
    out["time/step"] = sum(out.values())
    for member in members:
        out[f"time/generate/{member}"] = times.get(f"generate/{member}", 0.0)
    keys = sorted(out)
    slowest = dict(zip(keys, dist.all_max([out[k] for k in keys]), strict=True))
    return {
        k: v
        for k, v in slowest.items()
        if not k.startswith("time/generate/") or v > 0  # members that did not sample: no key
    }


def tokens_by_member(
    members: Sequence[str], batches: list[MicroBatch], left: LeftOut | None = None
) -> dict:
    """Completion tokens in the loss, per member that produced them (every member a key), the
    candidates `left` out of the micro-batches included."""
    out = dict.fromkeys(members, 0.0)
    if left is not None:
        for name, n in left.by_member.items():
            out[name] += n
    for b in batches:
        if not b.index:  # a filler micro-batch (see batching.filler_batch)
            continue
        per_row = b.tokens.completion_mask.sum(dim=1).tolist()  # (B,)
        for source, n in zip(b.sources, per_row, strict=True):
            out[source] += n
    return out


def update_metrics(sums: dict[str, float], grad_norms: list[float], mu: int) -> dict[str, float]:
    """Loss, KL, clipping and per-mode weights from the update's sums (already global).
    `sums` holds per-pass totals added over the μ passes, and the first pass's token counts."""
    tokens = max(sums["tokens"], 1.0)  # over all passes
    m: dict[str, float] = {}
    for name in ("shaped", "tis"):
        if sums[f"w/{name}/tokens"]:
            m[f"{name}/weight_mean"] = sums[f"w/{name}/weight"] / sums[f"w/{name}/tokens"]
    if sums["w/tis/tokens"]:
        m["tis/clamped_fraction"] = sums["w/tis_clamped/weight"] / sums["w/tis/tokens"]
    computed = max(sums["tokens/first"], 1.0)  # the first pass's tokens
    first_pass = max(sums["tokens/first"] + sums.get("left_out/first", 0.0), 1.0)  # in the loss
    members = {k.removeprefix("member/"): v for k, v in sums.items() if k.startswith("member/")}
    for name, v in members.items():
        m[f"member/{name}/token_fraction"] = v / first_pass
    m["offpolicy_token_fraction"] = sum(v for k, v in members.items() if k != POLICY) / first_pass
    m["reused_sampling_fraction"] = sums.get("reused/first", 0.0) / computed
    m["zero_advantage_skipped_fraction"] = sums.get("left_out/first", 0.0) / first_pass
    ent = [(k.removeprefix("H/"), v) for k, v in sums.items() if k.startswith("H/")]
    if ent:  # the policy's entropy at the completion positions computed in the first pass
        m["entropy"] = sum(v for _, v in ent) / computed
        for name, v in ent:
            if sums[f"Ht/{name}"]:
                m[f"member/{name}/entropy"] = v / sums[f"Ht/{name}"]
    if sums.get("off_policy_dropped/first"):
        m["off_policy_dropped_fraction"] = sums["off_policy_dropped/first"] / max(
            sums["sequences/first"], 1.0
        )
    m["loss"] = sums["loss"] / mu
    m["kl"] = sums["kl_sum"] / tokens
    m["clip_fraction"] = sums["clipped"] / tokens
    m["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return m


WEIGHT_KEYS = [*MODES, "tis_clamped"]
