"""Reward scoring: every weighted scorer over every candidate, checked, then combined.

A scorer is a plugin, and plugins misbehave: they raise, return the wrong number of scores,
return NaN, or hang. Each scorer's recipe entry says what then happens (`rewards[i].on_error`):
- `fail`: the run stops; the message names the scorer and the prompt;
- `skip_group`: the groups it failed on leave the step (counted in `skipped_groups`);
- `zero`: its score is 0 where it failed (counted in `scorer_faults/NAME`).
A scorer may return None for a sample it cannot score (a TRL reward function's convention):
that is no fault, and its weight is left out of that candidate's combined reward. A candidate
no scorer scored is `unscored`: it leaves the group statistics and gets no gradient.
A failure of a whole call is localised by scoring group by group, so one bad prompt costs one
group. A call that runs past `rewards[i].timeout_s` counts as failed for every group of the
step (it is not retried: it would hang again); its thread is abandoned, never waited for.
Every call runs in a thread of its own, so that a stop signal can abandon one that hangs.
A scorer with `collective = True` (a reward model sharded across the ranks) is called once per
scoring on every rank, with no samples where a rank has none, in the scoring thread itself (no
timeout: a call abandoned inside a collective would go on in it), and is not retried group by
group (only the rank that failed would retry). Every scorer is called before a failure stops
the step, so that one rank's failing scorer does not keep it from another's collectives. A
failure inside a collective forward itself (out of memory on one rank) cannot be recovered:
the ranks wait until the process group's timeout (`train.dist_timeout_s`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import stopping
from ..errors import Interrupted, PluginError, UserError
from ..plugins.interfaces import RewardScorer
from ..types import Group, Sample


@dataclass
class Scores:
    combined: torch.Tensor  # (n_candidates,) Σ wᵢ·rᵢ over the scorers that scored each
    per_scorer: dict[str, torch.Tensor]  # name → (n_candidates,), 0 where it gave no score
    skip: list[bool]  # per group: leave the step (a skip_group scorer failed on it)
    failed: dict[str, set[int]] = field(default_factory=dict)  # name → groups it failed on
    # name → (n_candidates,) bool: the scorer gave a score (not None); absent: every one
    scored: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def any_scored(self) -> torch.Tensor:
        """(n_candidates,) bool: some scorer scored the candidate."""
        out = torch.zeros(len(self.combined), dtype=torch.bool)
        for name in self.per_scorer:
            out |= self.scored_by(name)
        return out if self.per_scorer else ~out

    def scored_by(self, name: str) -> torch.Tensor:
        """(n_candidates,) bool: `name` gave the candidate a score."""
        mask = self.scored.get(name)
        return mask if mask is not None else torch.ones(len(self.combined), dtype=torch.bool)

    def select(self, rows: torch.Tensor) -> Scores:
        """The candidates `rows` (a bool mask) of these scores (group facts dropped)."""
        return Scores(
            self.combined[rows],
            {k: v[rows] for k, v in self.per_scorer.items()},
            [],
            {},
            {k: self.scored_by(k)[rows] for k in self.per_scorer},
        )

    @property
    def faults(self) -> dict[str, int]:
        """Scorer name → how many groups it failed on."""
        return {name: len(groups) for name, groups in self.failed.items()}

    def __iter__(self):  # unpacks as `combined, per_scorer = score_groups(...)`
        return iter((self.combined, self.per_scorer))


@dataclass
class WeightedScorer:
    name: str  # used in metrics: reward/<name>
    scorer: RewardScorer
    weight: float
    on_error: str = "fail"  # fail | skip_group | zero (see above)
    timeout_s: float | None = None


class ScorerFault(Exception):
    """One call of a scorer misbehaved; the message says how."""


class ScorerTimeout(ScorerFault):
    pass


def call_with_timeout(fn, timeout: float | None, what: str):
    """`fn()`, or ScorerTimeout after `timeout` seconds (None: no limit). The call runs in a daemon
    thread, so that the run can leave it: one that runs out of time, or does not return soon
    after a stop signal (`stopping.wait`), is abandoned (not killed: Python cannot)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 — handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"grpo-ensemble {what}")
    thread.start()
    stopping.wait(thread, timeout, what)
    if thread.is_alive():
        raise ScorerTimeout(f"timed out after {timeout:g} s")
    if "error" in box:
        if not isinstance(box["error"], Exception):  # KeyboardInterrupt, SystemExit of its own
            err = box["error"]
            raise ScorerFault(f"reward scorer raised {_named(err)}") from err
        raise box["error"]
    return box["value"]


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _call(ws: WeightedScorer, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(samples),) scores from one call (0 where None) and (len(samples),) bool: not None;
    or ScorerFault. Non-finite values are returned as is."""
    try:
        if _collective(ws):  # inline: a thread abandoned inside a collective would go on in it
            raw = ws.scorer.score(samples)
        else:
            raw = call_with_timeout(lambda: ws.scorer.score(samples), ws.timeout_s, ws.name)
    except (UserError, Interrupted, ScorerFault):  # (Interrupted: a signal during an evaluation)
        raise
    except Exception as exc:
        raise ScorerFault(f"reward scorer raised {_named(exc)}") from exc
    if isinstance(raw, str | bytes | dict) or not hasattr(raw, "__iter__"):
        # a string would be taken for its characters, a dict for its keys
        raise ScorerFault(f"returned a {type(raw).__name__}, not a list of scores")
    raw = list(raw)
    if len(raw) != len(samples):
        raise ScorerFault(f"returned {len(raw)} scores for {len(samples)} candidates")
    try:
        values = [0.0 if x is None else float(x) for x in raw]
    except (TypeError, ValueError) as exc:
        raise ScorerFault(f"returned a score that is not a number: {exc}") from None
    scored = torch.tensor([x is not None for x in raw], dtype=torch.bool)
    return torch.tensor(values, dtype=torch.float32), scored


def checked_scores(scorer: RewardScorer, samples: list[Sample], what: str) -> list[float]:
    """One call of `scorer` for `samples`, checked as the training's scorers are: a raise, a
    wrong count, or a value that is not a finite number is a `PluginError` naming `what`.
    None (no score) counts as 0: a held-out completion it cannot judge is not solved."""
    name = getattr(scorer, "name", type(scorer).__name__)
    try:
        values = _call(WeightedScorer(what, scorer, 1.0), samples)[0].tolist()
    except ScorerFault as exc:
        raise PluginError(name, f"{what}: {exc}") from None
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        where = samples[bad[0]].prompt.text
        raise PluginError(name, f"{what}: returned {values[bad[0]]} for the prompt {where!r}")
    return values


def _score_one(
    ws: WeightedScorer, groups: Sequence[Group], samples: list[Sample]
) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    """One scorer's values (n_candidates,), where it gave a score (n_candidates,) bool, and
    {group index: what went wrong}. A failed group counts as scored (0, or it leaves)."""
    bounds, k = [], 0
    for g in groups:
        bounds.append((k, k + len(g.candidates)))
        k += len(g.candidates)
    values = torch.zeros(len(samples), dtype=torch.float32)
    scored = torch.ones(len(samples), dtype=torch.bool)
    faults: dict[int, str] = {}
    try:
        values, scored = _call(ws, samples)
    except ScorerTimeout as exc:
        return values, scored, {i: str(exc) for i in range(len(groups))}
    except ScorerFault as exc:
        if _collective(ws):  # one rank's retries group by group would leave the others waiting
            return values, scored, {i: str(exc) for i in range(len(groups))}
        # find the groups it fails on
        for i, (a, b) in enumerate(bounds):
            try:
                values[a:b], scored[a:b] = _call(ws, samples[a:b])
            except ScorerFault as exc:
                faults[i] = str(exc)
    for i, (a, b) in enumerate(bounds):
        bad = ~torch.isfinite(values[a:b])
        if i not in faults and bool(bad.any()):
            faults[i] = f"returned {values[a:b][bad][0].item()}"
    # a failed call left its group at 0; a NaN or inf score becomes 0 (zero policy), and a
    # skipped group's values are never used
    return torch.where(torch.isfinite(values), values, 0.0), scored, faults


def _collective(ws: WeightedScorer) -> bool:
    """The scorer's calls take part in collectives (weights sharded across the ranks)."""
    return bool(getattr(ws.scorer, "collective", False))


@dataclass
class Known:
    """Scores of each group's first `counts[i]` candidates, taken earlier in the same step (on
    failure injection scores the policy's candidates to decide where peers sample)."""

    counts: list[int]
    scores: Scores


def score_groups(
    groups: Sequence[Group], scorers: Sequence[WeightedScorer], known: Known | None = None
) -> Scores:
    """Every scorer over every candidate, with each scorer's error policy applied. With
    `known`, each group's first candidates keep those scores (and faults) and only the ones
    after them are scored: each candidate is scored once a step, so a scorer that costs much
    is not called twice and one that is not deterministic gives the update the very rewards
    that decided the injection."""
    if known is None:
        return _score_all(groups, scorers)
    if len(known.counts) != len(groups):
        raise ValueError(f"known scores for {len(known.counts)} groups, not {len(groups)}")
    rest = [Group(g.prompt, g.candidates[n:]) for g, n in zip(groups, known.counts, strict=True)]
    todo = [i for i, g in enumerate(rest) if g.candidates]
    # a collective scorer is called on every rank alike, with nothing to score or not
    called = todo or any(_collective(ws) for ws in scorers)
    fresh = _score_all([rest[i] for i in todo], scorers) if called else None
    return _merge(known, fresh, todo, [len(g.candidates) for g in rest])


def _merge(known: Known, fresh: Scores | None, todo: list[int], extra: list[int]) -> Scores:
    """Group by group: the known scores of its first candidates, then the fresh ones of the
    rest (`fresh` holds the groups `todo`, `extra[i]` candidates each)."""
    old = known.scores
    names = list(old.per_scorer)
    pieces: dict[str, list[torch.Tensor]] = {n: [] for n in ["", *names]}
    masks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    skip = list(old.skip)
    failed = {n: set(old.failed.get(n, ())) for n in names}
    at_old = at_new = 0
    slot = {g: j for j, g in enumerate(todo)}
    for i, n in enumerate(known.counts):
        parts = [(old, at_old, n)]
        at_old += n
        if i in slot:
            parts.append((fresh, at_new, extra[i]))
            at_new += extra[i]
            skip[i] = skip[i] or fresh.skip[slot[i]]
        for src, a, k in parts:
            pieces[""].append(src.combined[a : a + k])
            for name in names:
                pieces[name].append(src.per_scorer[name][a : a + k])
                masks[name].append(src.scored_by(name)[a : a + k])
    if fresh is not None:
        for name in names:
            failed[name] |= {todo[j] for j in fresh.failed.get(name, ())}

    def cat(xs, dtype=torch.float32):
        return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)

    return Scores(
        cat(pieces[""]),
        {name: cat(pieces[name]) for name in names},
        skip,
        failed,
        {name: cat(masks[name], torch.bool) for name in names},
    )


def _score_all(groups: Sequence[Group], scorers: Sequence[WeightedScorer]) -> Scores:
    samples = [Sample(g.prompt, c) for g in groups for c in g.candidates]
    combined = torch.zeros(len(samples), dtype=torch.float32)
    per_scorer: dict[str, torch.Tensor] = {}
    skip = [False] * len(groups)
    failed: dict[str, set[int]] = {}
    scored: dict[str, torch.Tensor] = {}
    fatal: PluginError | None = None
    for ws in scorers:
        # every scorer is called before a failure stops the step, so that a collective one
        # runs on every rank even where another scorer failed on one rank only
        values, scored[ws.name], faults = _score_one(ws, groups, samples)
        failed[ws.name] = set(faults)
        if faults and ws.on_error == "fail" and fatal is None:
            i = min(faults)
            fatal = PluginError(ws.name, f"{faults[i]} for prompt {groups[i].prompt.text!r}")
        if ws.on_error == "skip_group":
            for i in faults:
                skip[i] = True
        per_scorer[ws.name] = values
        combined += ws.weight * values  # 0 where it gave no score: its weight drops out
    if fatal is not None:
        raise fatal
    return Scores(combined, per_scorer, skip, failed, scored)
