"""A step's metrics row, global over ranks.

Each rank holds its own groups, so every metric is built from sums (and counts) that are added
up across ranks before anything is divided: a mean over 2 ranks is then the mean over all
candidates, not the mean of two rank means. Every rank holds the same keys (zeros where it
has nothing), as the element-wise reduction needs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .. import dist
from ..types import POLICY
from .loss import MODES

if TYPE_CHECKING:
    from .batching import LeftOut, MicroBatch
    from .step import Rollout, Run


def best_candidates(ro: Rollout) -> torch.Tensor:
    """(n_candidates,) bool: the candidates that tie for their group's highest reward."""
    grid = ro.layout.to_grid(ro.rewards, fill=float("-inf"))  # (n_prompts, group_size)
    top = grid.max(dim=1, keepdim=True).values
    return ro.layout.to_flat(grid == top)


def rollout_sums(run: Run, ro: Rollout) -> dict[str, float]:
    """This rank's sums over its candidates, keyed by the metric they feed."""
    lengths = torch.tensor([len(c.token_ids) for c in ro.candidates], dtype=torch.float64)
    rewards = ro.rewards.double()
    s = {
        "n": float(len(ro.candidates)),
        "reward": float(rewards.sum()),
        "reward_sq": float((rewards**2).sum()),
        "advantage_abs": float(ro.advantages.abs().sum()),
        "equal_reward_groups": float(ro.equal_groups),
        "trained_candidates": float(ro.keep.sum()),
        "completion_len": float(lengths.sum()),
        "skipped_groups": float(ro.skipped_groups),
    }
    for ws in run.scorers:  # every scorer a key, as the reduction needs
        s[f"scorer_faults/{ws.name}"] = float(ro.scorer_faults.get(ws.name, 0))
    for k, v in ro.per_scorer.items():
        s[f"reward/{k}"] = float(v.double().sum())
    sources = [c.source for c in ro.candidates]
    best = best_candidates(ro) if ro.candidates else torch.zeros(0, dtype=torch.bool)
    s["best"] = float(best.sum())
    for member in run.ensemble.members:
        idx = [i for i, src in enumerate(sources) if src == member.name]
        p = f"member/{member.name}"
        s[f"{p}/candidates"] = float(len(idx))
        s[f"{p}/reward"] = float(rewards[idx].sum())
        s[f"{p}/completion_len"] = float(lengths[idx].sum())
        s[f"{p}/best"] = float(best[idx].sum())
        s[f"{p}/generator_faults"] = float(run.ensemble.faults.get(member.name, 0))
    return s


def step_metrics(run: Run, step: int, ro: Rollout, upd: dict, t: dict) -> dict[str, Any]:
    """Rewards (combined, per scorer, per member), advantages, lengths, timings: global."""
    s = dist.sum_dict(rollout_sums(run, ro))
    n = max(s["n"], 1.0)
    var = (s["reward_sq"] - s["reward"] ** 2 / n) / max(n - 1, 1.0)
    m: dict[str, Any] = {
        "step": step,
        "reward": s["reward"] / n,
        "reward_std": math.sqrt(max(var, 0.0)) if n > 1 else 0.0,
        **{k: v / n for k, v in s.items() if k.startswith("reward/")},
        "advantage_abs_mean": s["advantage_abs"] / n,
        "equal_reward_groups": int(s["equal_reward_groups"]),
        "candidates": int(s["n"]),
        "trained_candidates": int(s["trained_candidates"]),
        "completion_len": s["completion_len"] / n,
        "skipped_groups": int(s["skipped_groups"]),
        **{k: int(v) for k, v in s.items() if k.startswith("scorer_faults/")},
        # the learning rate the step's optimizer steps used (their mean when μ > 1); a step
        # without one reports the rate the next would use
        "lr": run.engine.get_lr()[0],
        **upd,
    }
    for member in run.ensemble.members:
        p = f"member/{member.name}"
        if s[f"{p}/generator_faults"]:
            m[f"{p}/generator_faults"] = int(s[f"{p}/generator_faults"])
        count = s[f"{p}/candidates"]
        if count:
            m[f"{p}/best_share"] = s[f"{p}/best"] / max(s["best"], 1.0)
            m[f"{p}/reward"] = s[f"{p}/reward"] / count
            m[f"{p}/candidates"] = int(count)
            m[f"{p}/completion_len"] = s[f"{p}/completion_len"] / count
    m.update(step_times(run, t))
    return m


def step_times(run: Run, t: dict) -> dict[str, float]:
    """Seconds per phase, the slowest rank's (the others wait for it)."""
    times = {
        f"time/{b}": t[b] - t[a]
        for a, b in (("start", "generate"), ("generate", "score"), ("score", "update"))
    }
    times["time/sync"] = t["sync"] - t["update"]
    times["time/step"] = t["sync"] - t["start"]
    for member in run.ensemble.members:
        times[f"time/generate/{member.name}"] = run.ensemble.seconds.get(member.name, 0.0)
    keys = sorted(times)
    slowest = dict(zip(keys, dist.all_max([times[k] for k in keys]), strict=True))
    return {
        k: v
        for k, v in slowest.items()
        if not k.startswith("time/generate/") or v > 0  # members that did not sample: no key
    }


def tokens_by_member(run: Run, batches: list[MicroBatch], left: LeftOut | None = None) -> dict:
    """Completion tokens in the loss, per member that produced them (every member a key), the
    candidates `left` out of the micro-batches included."""
    out = {m.name: 0.0 for m in run.ensemble.members}
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


def update_metrics(run: Run, sums: dict[str, float], grad_norms: list[float]) -> dict[str, float]:
    """Loss, KL, clipping and per-mode weights from the update's sums (already global).
    `sums` holds per-pass totals added over the μ passes, and the first pass's token counts."""
    mu = run.recipe.loss.mu
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
    m["loss"] = sums["loss"] / mu
    m["kl"] = sums["kl_sum"] / tokens
    m["clip_fraction"] = sums["clipped"] / tokens
    m["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return m


WEIGHT_KEYS = [*MODES, "tis_clamped"]
