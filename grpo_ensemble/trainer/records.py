"""What a run keeps beside metrics.jsonl, and who hears of it.

eval.json (every evaluation), alerts.jsonl (created when the run starts: empty while nothing
fired), completions.jsonl (`log.completions`), summary.json (when the run ends, however it
ends); each record also goes to the observers (plugins' hooks and the recipe's trackers).
Rank 0 writes and tells. The alert rules run on every rank: they read the step's metrics,
which are global, so every rank takes the same action.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..recipe.schema import CompletionsConfig
from ..rollout.groups import Rollout
from ..rundir import rows_up_to, write_file
from ..types import POLICY
from .evaluation import EvalResult
from .observers import Observers

EVAL, ALERTS, COMPLETIONS, SUMMARY = (
    "eval.json",
    "alerts.jsonl",
    "completions.jsonl",
    "summary.json",
)


def completion_rows(ro: Rollout, step: int, how: CompletionsConfig) -> list[dict]:
    """Up to `how.per_member` completions of each member for the first `how.prompts` groups
    of the rollout: the prompt, the completion, its reward per scorer (None: not scored) and
    combined, its advantage, and whether a peer's candidate was injected into the group."""
    rows, at = [], 0
    for g in ro.groups[: how.prompts]:
        taken: dict[str, int] = {}
        for j, c in enumerate(g.candidates):
            i = at + j
            if taken.get(c.source, 0) >= how.per_member:
                continue
            taken[c.source] = taken.get(c.source, 0) + 1
            scored = {k: bool(v[i]) for k, v in (ro.scored or {}).items()}
            rewards = {
                k: float(v[i]) if scored.get(k, True) else None for k, v in ro.per_scorer.items()
            }
            prompt: Any = g.prompt.text if g.prompt.messages is None else list(g.prompt.messages)
            rows.append(
                {
                    "step": step,
                    "prompt": prompt,
                    "member": c.source,
                    "completion": c.text,
                    "rewards": rewards,
                    "reward": float(ro.rewards[i]),
                    "advantage": float(ro.advantages[i]),
                    "injected": c.source != POLICY,
                    "finished": c.finished,
                    **({"extra": {k: _plain(v) for k, v in c.extra.items()}} if c.extra else {}),
                }
            )
        at += len(g.candidates)
    return rows


def _plain(value):
    """A reward function's extra column value as JSON can hold it: numbers (numpy's and
    torch's scalars too), strings, lists and mappings of them; anything else as its text."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _jsonable(value):
    """NaN and infinities as None: JSON has no such numbers (json.dumps would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class Records:
    """The run's records after `start` (the step it resumes from; rows of later steps, of the
    way the run went before, are dropped). `main`: this rank writes and tells."""

    def __init__(
        self, run_dir: Path, recipe, observers: Observers, members, main: bool, start=0, t0=None
    ):
        from ..alerts import Alerts

        self.run_dir, self.main, self.observers = run_dir, main, observers
        self.alerts = Alerts(recipe.alerts, members=list(members))
        self.started_at = time.time() if t0 is None else t0  # when the run was asked for
        self.fired: list[dict] = []
        self.evals: list[dict] = []
        if main:
            self.evals = [r for r in self._read(EVAL) if r.get("step", 0) <= start]
            for name in (ALERTS, COMPLETIONS):  # created now; a resumed run keeps its rows
                path = run_dir / name
                kept = rows_up_to(path, start) if start and path.is_file() else []
                write_file(path, "".join(kept))
            self.fired = [json.loads(line) for line in rows_up_to(run_dir / ALERTS, start)]
            write_file(run_dir / EVAL, json.dumps(self.evals, indent=1) + "\n")

    def _read(self, name: str) -> list[dict]:
        try:
            rows = json.loads((self.run_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []

    def _append(self, name: str, rows: Sequence[dict]) -> None:
        with open(self.run_dir / name, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
            fh.flush()

    def run_started(self, recipe_data: dict, history: Sequence[dict] = ()) -> None:
        """The alert rules' history from the steps a resumed run already has, and the
        observers told of the (re)start."""
        self.alerts.replay(list(history))
        start = history[-1]["step"] if history else 0
        self.observers.start(self.run_dir, recipe_data, start)
        if self.main:
            self.observers.emit("on_run_start", run_dir=self.run_dir, recipe=recipe_data)

    def evaluated(self, step: int, when: str, result: EvalResult | None) -> dict | None:
        if result is None:
            return None
        row = _jsonable(result.row(step, when))
        if self.main:
            self.evals.append(row)
            write_file(self.run_dir / EVAL, json.dumps(self.evals, indent=1) + "\n")
            self.observers.emit("on_eval", step=step, results=row)
        return row

    def completions(self, step: int, rows: list[dict]) -> None:
        if self.main and rows:
            self._append(COMPLETIONS, rows)
            self.observers.emit("on_completions", step=step, rows=rows)

    def stepped(self, metrics: dict) -> list:
        """The observers told of the step; the alerts it fires (every rank gets the same),
        each written to alerts.jsonl and told."""
        self.observers.at(metrics["step"])
        if self.main:
            self.observers.emit("on_step_end", step=metrics["step"], metrics=metrics)
        fired = self.alerts.check(metrics)
        if self.main and fired:
            rows = [_jsonable(a.row()) for a in fired]
            self._append(ALERTS, rows)
            self.fired += rows
            for row in rows:
                self.observers.emit("on_alert", alert=row)
        return fired

    def finished(self, status: str, steps: int, before: dict | None, after: dict | None) -> dict:
        """summary.json, and the observers told the run ended (`status`: completed, failed or
        stopped)."""
        summary = {
            "status": status,
            "steps": steps,
            "seconds": round(time.time() - self.started_at, 1),
            "before": before,
            "after": after,
            "change": after["accuracy"] - before["accuracy"] if before and after else None,
            "evaluations": len(self.evals),
            "alerts": len(self.fired),
            "alerts_by_rule": _count(r.get("rule") for r in self.fired),
            "run_dir": str(self.run_dir),
            "report": f"grpo-ensemble report {self.run_dir} -o {self.run_dir / 'report.html'}",
        }
        if self.main:
            write_file(self.run_dir / SUMMARY, json.dumps(_jsonable(summary), indent=1) + "\n")
            self.observers.emit("on_run_end", run_dir=self.run_dir, summary=summary)
        return summary

    def earliest(self, when: str) -> dict | None:
        """The first evaluation of this kind kept (a resumed run's "before" figure)."""
        return next((r for r in self.evals if r.get("when") == when), None)


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out
