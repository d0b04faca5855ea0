"""Runs grouped by recipe and compared over their seeds.

Two runs are in one group when their recipes are the same but for `seed` and `output_dir`.
Per group: the mean over seeds of the final accuracy and of the change after − before, each
with the half-width of its 95% Student t-interval (n − 1 degrees of freedom; none for one
seed), and the stability: the standard deviation over seeds of the final accuracy, and the
standard deviation of the reward over the last 10% of each run's steps (their mean).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from .rundata import Run, number

# not part of a recipe's identity: runs that differ only here are seeds of one experiment
NOT_RECIPE = ("seed", "output_dir")
LAST_SHARE = 0.1  # "the last 10% of the steps"

# the 97.5% quantile of Student's t for 1..30 degrees of freedom
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (a table to 30, then
    the Cornish-Fisher expansion, within 0.001 of the exact value)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Estimate:
    """Mean over `n` values with the half-width of its 95% t-interval (None for n < 2) and
    the sample standard deviation (None for n < 2)."""

    mean: float | None
    half: float | None
    std: float | None
    n: int


def estimate(values: Sequence[float | None]) -> Estimate:
    xs = [v for v in values if v is not None]
    if not xs:
        return Estimate(None, None, None, 0)
    if len(xs) == 1:
        return Estimate(xs[0], None, None, 1)
    std = statistics.stdev(xs)
    return Estimate(
        statistics.fmean(xs), t_quantile(len(xs) - 1) * std / math.sqrt(len(xs)), std, len(xs)
    )


def recipe_identity(recipe: dict | None) -> dict | None:
    """The recipe without what tells its seeds apart."""
    if recipe is None:
        return None
    return {k: v for k, v in recipe.items() if k not in NOT_RECIPE}


@dataclass
class Group:
    """Runs of one recipe. `ident`: a short hash of that recipe; `label`: how it differs from
    the report's other groups (or what it is, when there is one group)."""

    ident: str
    recipe: dict | None
    runs: list[Run] = field(default_factory=list)
    label: str = ""


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """The runs by recipe, groups in the order of their first run. A run without recipe.yaml
    is a group of its own."""
    groups: dict[str, Group] = {}
    for run in runs:
        ident = recipe_identity(run.recipe)
        if ident is None:
            key = f"no recipe: {run.path}"
        else:
            key = json.dumps(ident, sort_keys=True, default=str)
        if key not in groups:
            digest = hashlib.sha256(key.encode()).hexdigest()[:8]
            groups[key] = Group(ident=digest if ident is not None else "-", recipe=ident)
        groups[key].runs.append(run)
    found = list(groups.values())
    _label(found)
    return found


def flatten(data, prefix: str = "") -> dict[str, object]:
    """A nested recipe as {dotted.key: value}."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return {prefix: data}
    out: dict[str, object] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    if not out and prefix:
        out[prefix] = data
    return out


def _label(groups: list[Group]) -> None:
    flat = [flatten(g.recipe) if g.recipe is not None else None for g in groups]
    known = [f for f in flat if f is not None]
    keys = sorted({k for f in known for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in known}) > 1]
    for g, f in zip(groups, flat, strict=True):
        if f is None:
            g.label = "no recipe.yaml"
        elif len(known) == 1 or not differ:
            g.label = _describe(f)
        else:
            shown = [f"{k}={f.get(k, '-')}" for k in differ[:6]]
            g.label = ", ".join(shown) + (f" (+{len(differ) - 6} more)" if len(differ) > 6 else "")


def _describe(f: dict[str, object]) -> str:
    peers = [str(v) for k, v in f.items() if k.startswith("peers.") and k.endswith(".name")]
    parts = [f"policy {f.get('policy.model', '?')}"]
    if peers:
        parts.append("peers " + ", ".join(peers))
    if "train.steps" in f:
        parts.append(f"{f['train.steps']} steps")
    return "; ".join(parts)


def last_reward_std(run: Run, share: float = LAST_SHARE) -> float | None:
    """Standard deviation of the reward over the last `share` of the run's steps (at least
    two steps; None with fewer)."""
    _, ys = run.series("reward")
    k = max(2, math.ceil(len(ys) * share))
    return statistics.stdev(ys[-k:]) if len(ys) >= 2 else None


def last_reward_mean(run: Run, share: float = LAST_SHARE) -> float | None:
    _, ys = run.series("reward")
    k = max(1, math.ceil(len(ys) * share))
    return statistics.fmean(ys[-k:]) if ys else None


def accuracy_change(run: Run) -> float | None:
    """Final accuracy − accuracy before training."""
    before, final = run.evaluation("before"), run.final_evaluation()
    a = number(before.get("accuracy")) if before else None
    b = number(final.get("accuracy")) if final else None
    return b - a if a is not None and b is not None else None


def final_accuracy(run: Run) -> float | None:
    final = run.final_evaluation()
    return number(final.get("accuracy")) if final else None


def before_accuracy(run: Run) -> float | None:
    before = run.evaluation("before")
    return number(before.get("accuracy")) if before else None


@dataclass(frozen=True)
class Comparison:
    """A group's figures over its seeds."""

    group: Group
    before: Estimate
    final: Estimate
    change: Estimate
    reward_last: Estimate
    reward_std_last: Estimate


def compare(groups: Sequence[Group]) -> list[Comparison]:
    return [
        Comparison(
            group=g,
            before=estimate([before_accuracy(r) for r in g.runs]),
            final=estimate([final_accuracy(r) for r in g.runs]),
            change=estimate([accuracy_change(r) for r in g.runs]),
            reward_last=estimate([last_reward_mean(r) for r in g.runs]),
            reward_std_last=estimate([last_reward_std(r) for r in g.runs]),
        )
        for g in groups
    ]
