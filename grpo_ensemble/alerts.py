"""Anomaly alerts: rules over each step's metrics row (docs/monitoring.md, "Alerts").

The rules read only the metrics row (what metrics.jsonl holds), so the same code checks a
live step and rebuilds its history from the rows a resumed run already has (`replay`): the
resumed run then fires exactly what the uninterrupted run would have fired after that point.

Each rule keeps the history it needs, from the steps whose row holds its metric as a finite
number: a missing key, None (how metrics.jsonl writes NaN and inf), or a non-number is not
history. A rule is evaluated only on a step that holds its metric and once it has the
history it needs; such a step neither fires nor clears it. A rule that fired does not fire
again until a step where its condition was evaluated and found false (it "re-arms"): a
condition that holds for 50 steps is one alert, not 50.

Pure Python, no torch: it runs on every rank after each step and must cost nothing.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe.schema import AlertRule, AlertsConfig

# = types.POLICY; not imported from there, as that module needs torch
POLICY = "policy"

# a spike rule says nothing while the median it compares with is below this: kl is ~0 with
# beta 0 and in the first steps, and any kl is then an "×∞ spike"
MIN_MEDIAN = {"kl": 1e-4, "grad_norm": 1e-4, "completion_len": 1.0}
# reward_collapse needs a best mean above this: "below half of a best of ~0" is noise, and
# a ratio to a best at or below zero means nothing
MIN_BEST_REWARD = 1e-2
# a step without an optimizer step (all groups dropped, or a NaN/inf gradient) reports these
# as 0.0 (update.NO_UPDATE): zeros that are no measurement and would drag a median to 0
UPDATE_KEYS = frozenset({"loss", "kl", "clip_fraction", "grad_norm", "entropy"})

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Alert:
    """One rule firing at one step. `value` is what the rule compared and `threshold` what it
    compared it with, in the same units (for a spike: the metric and threshold × its median)."""

    step: int
    rule: str
    metric: str
    value: float
    threshold: float
    action: str
    message: str

    def row(self) -> dict[str, Any]:
        """The row written to alerts.jsonl."""
        return asdict(self)


@dataclass(frozen=True)
class _Finding:
    """A rule's condition found true at a step: what an Alert would say."""

    metric: str
    value: float
    threshold: float
    message: str


# (re-arm key, finding): a finding of None means the condition was evaluated and is false
Outcome = list[tuple[str, _Finding | None]]


def _number(row: Row, key: str) -> float | None:
    """The row's finite number at `key`, else None (missing, null, NaN, inf, a bool, text)."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _measured(row: Row, key: str) -> float | None:
    """`_number`, except an update metric of a step that ran no optimizer step (see
    UPDATE_KEYS)."""
    if key in UPDATE_KEYS and (row.get("skipped_update") or row.get("nonfinite_update")):
        return None
    return _number(row, key)


def _past(value: float, bound: float) -> bool:
    """value > bound by more than float rounding: a mean of 0.8s and 0.3s lands a hair past
    a threshold it equals, and "more than 0.3" should not fire on 0.30000000000000004."""
    return value - bound > 1e-9 * max(1.0, abs(bound))


def _n(x: float) -> str:
    return f"{x:.3g}"


def _last(window: int) -> str:
    return "the last step" if window == 1 else f"the last {window} steps"


def _count_of(count: int, steps: int) -> str:
    return "the last step" if steps == 1 else f"{count} of the last {steps} steps"


class _Rule:
    """One enabled rule of the recipe; `observe` is called once per step, in step order."""

    def __init__(self, name: str, rule: AlertRule):
        self.name, self.action = name, rule.action
        self.threshold, self.window = float(rule.threshold), int(rule.window)

    def observe(self, row: Row) -> Outcome:
        raise NotImplementedError

    def _result(self, key: str, finding: _Finding | None) -> Outcome:
        return [(key, finding)]


class _Spike(_Rule):
    """`metric` above threshold × its median over the previous `window` measured steps (the
    current one not among them: a spike would raise its own median)."""

    def __init__(self, name: str, rule: AlertRule, metric: str):
        super().__init__(name, rule)
        self.metric = metric
        self.history: deque[float] = deque(maxlen=self.window)

    def observe(self, row: Row) -> Outcome:
        value = _measured(row, self.metric)
        if value is None:
            return []
        previous = list(self.history)
        self.history.append(value)  # a spike is history too: a lasting new level re-arms
        if len(previous) < self.window:
            return []
        median = statistics.median(previous)
        if median < MIN_MEDIAN[self.metric]:
            return []
        bound = self.threshold * median
        if not _past(value, bound):
            return self._result(self.name, None)
        message = (
            f"{self.metric} {_n(value)} is {_n(value / median)}× its median {_n(median)} "
            f"over {_last(self.window)} (threshold {self.threshold:g}×)"
        )
        return self._result(self.name, _Finding(self.metric, value, bound, message))


class _Sustained(_Rule):
    """A share or level past threshold in each of the last `window` measured steps: one bad
    step is noise, `window` in a row is a state. `above`: past means above, else below."""

    def __init__(
        self,
        name: str,
        rule: AlertRule,
        metric: str,
        read: Callable[[Row], float | None],
        above: bool,
    ):
        super().__init__(name, rule)
        self.metric, self.read, self.above = metric, read, above
        self.history: deque[float] = deque(maxlen=self.window)

    def observe(self, row: Row) -> Outcome:
        value = self.read(row)
        if value is None:
            return []
        self.history.append(value)
        if len(self.history) < self.window:
            return []
        # every step past the threshold <=> the least extreme one is
        least = min(self.history) if self.above else max(self.history)
        hit = _past(least, self.threshold) if self.above else _past(self.threshold, least)
        if not hit:
            return self._result(self.name, None)
        side, which = ("above", "lowest") if self.above else ("below", "highest")
        message = (
            f"{self.metric} {side} {self.threshold:g} in each of {_last(self.window)} "
            f"({which} {_n(least)})"
        )
        return self._result(self.name, _Finding(self.metric, least, self.threshold, message))


class _Collapse(_Rule):
    """The mean reward of the last `window` steps below threshold × the best such mean so far
    (the current one included), once that best is above MIN_BEST_REWARD."""

    def __init__(self, name: str, rule: AlertRule):
        super().__init__(name, rule)
        self.history: deque[float] = deque(maxlen=self.window)
        self.best = -math.inf

    def observe(self, row: Row) -> Outcome:
        value = _number(row, "reward")
        if value is None:
            return []
        self.history.append(value)
        if len(self.history) < self.window:
            return []
        mean = math.fsum(self.history) / self.window
        self.best = max(self.best, mean)
        if self.best <= MIN_BEST_REWARD:
            return []
        bound = self.threshold * self.best
        if not _past(bound, mean):
            return self._result(self.name, None)
        message = (
            f"reward mean {_n(mean)} over {_last(self.window)} is {_n(mean / self.best)}× "
            f"the best such mean {_n(self.best)} (threshold {self.threshold:g}×)"
        )
        return self._result(self.name, _Finding("reward", mean, bound, message))


class _Drift(_Rule):
    """Per peer (a member other than the policy: peers do not train), the mean of its last
    `window` rewards against the mean of its first `window`, once it has 2 × window (so the
    two windows do not overlap). Each peer fires and re-arms on its own."""

    def __init__(self, name: str, rule: AlertRule, peers: Sequence[str] | None):
        super().__init__(name, rule)
        self.peers = peers  # None: every member/<name>/reward in the rows but the policy's
        self.first: dict[str, list[float]] = {}
        self.last: dict[str, deque[float]] = {}
        self.seen: Counter[str] = Counter()

    def _peers_in(self, row: Row) -> Iterable[str]:
        if self.peers is not None:
            return self.peers
        keys = (k for k in row if isinstance(k, str))
        rewards = (k for k in keys if k.startswith("member/") and k.endswith("/reward"))
        return [n for n in (k[7:-7] for k in rewards) if n and n != POLICY]

    def observe(self, row: Row) -> Outcome:
        out: Outcome = []
        for peer in self._peers_in(row):
            metric = f"member/{peer}/reward"
            value = _number(row, metric)  # absent on a step the peer did not sample
            if value is None:
                continue
            first = self.first.setdefault(peer, [])
            last = self.last.setdefault(peer, deque(maxlen=self.window))
            if len(first) < self.window:
                first.append(value)
            last.append(value)
            self.seen[peer] += 1
            if self.seen[peer] < 2 * self.window:
                continue
            start, now = math.fsum(first) / self.window, math.fsum(last) / self.window
            drift = now - start
            key = f"{self.name}/{peer}"
            if not _past(abs(drift), self.threshold):
                out.append((key, None))
                continue
            message = (
                f"{metric} mean {_n(now)} over {_last(self.window)} is {_n(abs(drift))} "
                f"{'above' if drift > 0 else 'below'} its mean {_n(start)} over the first "
                f"{self.window} (threshold {self.threshold:g})"
            )
            out.append((key, _Finding(metric, drift, self.threshold, message)))
        return out


class _NonFinite(_Rule):
    """More than threshold of the last `window` steps had a NaN or inf loss or gradient:
    `nonfinite_update` set, or loss / grad_norm not finite (null in a row read back from
    metrics.jsonl, which writes NaN and inf as null)."""

    def __init__(self, name: str, rule: AlertRule):
        super().__init__(name, rule)
        self.history: deque[bool] = deque(maxlen=self.window)

    @staticmethod
    def causes(row: Row) -> list[str]:
        found = (
            [f"nonfinite_update {row['nonfinite_update']}"] if row.get("nonfinite_update") else []
        )
        for key in ("loss", "grad_norm"):
            value = row.get(key, 0.0)
            if value is None:
                found.append(f"{key} null")
            elif isinstance(value, float) and not math.isfinite(value):
                found.append(f"{key} {value}")
        return found

    def observe(self, row: Row) -> Outcome:
        causes = self.causes(row)
        self.history.append(bool(causes))
        count = sum(self.history)
        if not _past(count, self.threshold):
            return self._result(self.name, None)
        # the count rises only with a bad step, so a newly true condition has causes here
        message = (
            f"NaN or inf loss or gradient in {_count_of(count, len(self.history))} "
            f"(threshold {self.threshold:g})" + (f": {', '.join(causes)}" if causes else "")
        )
        return self._result(
            self.name, _Finding("nonfinite_update", float(count), self.threshold, message)
        )


def _fault_keys(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    member = key.startswith("member/") and key.endswith("/generator_faults")
    return key == "skipped_groups" or key.startswith("scorer_faults/") or member


class _Faults(_Rule):
    """More than threshold failures over the last `window` steps: skipped_groups +
    Σ scorer_faults/* + Σ member/*/generator_faults."""

    def __init__(self, name: str, rule: AlertRule):
        super().__init__(name, rule)
        self.history: deque[dict[str, float]] = deque(maxlen=self.window)

    def observe(self, row: Row) -> Outcome:
        parts = {k: _number(row, k) for k in row if _fault_keys(k)}
        self.history.append({k: v for k, v in parts.items() if v is not None and v > 0})
        total: Counter[str] = Counter()
        for step in self.history:
            total.update(step)
        count = math.fsum(total.values())
        if not _past(count, self.threshold):
            return self._result(self.name, None)
        detail = ", ".join(f"{k} {v:g}" for k, v in sorted(total.items()))
        message = (
            f"{count:g} failures in {_last(len(self.history))}: {detail} "
            f"(threshold {self.threshold:g})"
        )
        return self._result(self.name, _Finding("faults", count, self.threshold, message))


def _share_of_equal_groups(row: Row) -> float | None:
    equal, groups = _number(row, "equal_reward_groups"), _number(row, "groups")
    if equal is None or not groups or groups <= 0:
        return None
    return equal / groups


def _rules(config: AlertsConfig, peers: Sequence[str] | None) -> list[_Rule]:
    """The recipe's enabled rules, in the order alerts of one step are reported."""

    def sustained(metric: str, above: bool, read=None):
        return lambda n, r: _Sustained(
            n, r, metric, read or (lambda row: _measured(row, metric)), above
        )

    makers: dict[str, Callable[[str, AlertRule], _Rule]] = {
        "nonfinite": _NonFinite,
        "kl_spike": lambda n, r: _Spike(n, r, "kl"),
        "reward_collapse": _Collapse,
        "zero_variance_groups": sustained(
            "equal_reward_groups/groups", True, _share_of_equal_groups
        ),
        "entropy_collapse": sustained("entropy", False),
        "length_blowup": lambda n, r: _Spike(n, r, "completion_len"),
        "truncation": sustained("truncated_fraction", True),
        "clip_fraction": sustained("clip_fraction", True),
        "grad_norm_spike": lambda n, r: _Spike(n, r, "grad_norm"),
        "member_reward_drift": lambda n, r: _Drift(n, r, peers),
        "scorer_failures": _Faults,
    }
    return [
        make(name, getattr(config, name))
        for name, make in makers.items()
        if getattr(config, name).enabled
    ]


class Alerts:
    """The alert rules of a run. `members`: the ensemble's member names (the policy's among
    them); member_reward_drift watches the others. None: every member but the policy
    whose reward a row holds."""

    def __init__(self, config: AlertsConfig | None = None, members: Sequence[str] | None = None):
        if config is None:
            from .recipe.schema import AlertsConfig  # the package imports this module

            config = AlertsConfig()
        peers = None if members is None else [m for m in members if m != POLICY]
        self._rules = _rules(config, peers)
        self._firing: set[str] = set()  # re-arm keys whose condition held when last evaluated
        self._step = 0

    def replay(self, rows: Iterable[Row | str]) -> None:
        """Rebuild the history from earlier metrics rows (dicts, or metrics.jsonl lines),
        in step order; fires nothing, but a condition that held at the last of them stays
        fired, as it would have in the uninterrupted run."""
        for row in rows:
            if isinstance(row, str):
                if not row.strip():
                    continue
                row = json.loads(row)
            self._observe(row)

    def check(self, metrics: Row) -> list[Alert]:
        """The alerts this step's metrics row fires (metrics["step"] is the step)."""
        return self._observe(metrics)

    def _observe(self, row: Row) -> list[Alert]:
        step = row.get("step")
        # a row without a step number (never from the loop) is the step after the last
        self._step = (
            step if isinstance(step, int) and not isinstance(step, bool) else self._step + 1
        )
        fired: list[Alert] = []
        for rule in self._rules:
            for key, finding in rule.observe(row):
                if finding is None:
                    self._firing.discard(key)
                elif key not in self._firing:
                    self._firing.add(key)
                    fired.append(
                        Alert(
                            self._step,
                            rule.name,
                            finding.metric,
                            finding.value,
                            finding.threshold,
                            rule.action,
                            finding.message,
                        )
                    )
        return fired
