"""A run directory as the report reads it: its recipe, its metrics and its records.

A run may still be going: it has no summary.json yet, and the last line of an appended file
(metrics.jsonl, alerts.jsonl, completions.jsonl) may be cut short while it is written; such a
line is left out (and said so in the report). A line that does not parse anywhere else is a
corrupt file: a `UserError` naming the file and the line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputFileError, UserError
from ..recipe.cotraining import POLICIES_DIR

METRICS, RECIPE, EVAL = "metrics.jsonl", "recipe.yaml", "eval.json"
ALERTS, COMPLETIONS, SUMMARY = "alerts.jsonl", "completions.jsonl", "summary.json"
POLICY = "policy"


@dataclass
class Run:
    """One run directory, read. `name` tells it apart from the report's other runs."""

    path: Path
    name: str
    recipe: dict | None
    metrics: list[dict]
    evals: list[dict]
    alerts: list[dict]
    completions: list[dict]
    summary: dict | None
    notes: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        """No summary.json: the run is still going (or was killed before it could write one)."""
        return self.summary is None

    @property
    def status(self) -> str:
        if self.summary is None:
            return "running" if self.metrics or self.recipe else "not started"
        return str(self.summary.get("status", "ended"))

    @property
    def seed(self) -> Any:
        return (self.recipe or {}).get("seed")

    @property
    def planned_steps(self) -> int | None:
        train = (self.recipe or {}).get("train")
        steps = train.get("steps") if isinstance(train, dict) else None
        return steps if isinstance(steps, int) and not isinstance(steps, bool) else None

    @property
    def last_step(self) -> int:
        return self.metrics[-1]["step"] if self.metrics else 0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a metric, at the steps that hold it as a finite number."""
        xs, ys = [], []
        for row in self.metrics:
            value = number(row.get(key))
            if value is not None:
                xs.append(row["step"])
                ys.append(value)
        return xs, ys

    def has(self, key: str) -> bool:
        return any(number(row.get(key)) is not None for row in self.metrics)

    def members(self) -> list[str]:
        """The ensemble's members: the policy and each peer (from the recipe, then any other
        the metrics name)."""
        peers = (self.recipe or {}).get("peers")
        peers = peers if isinstance(peers, list) else []
        names = [POLICY] + [str(p["name"]) for p in peers if isinstance(p, dict) and p.get("name")]
        return _unique(names + self._named("member/", "/reward"))

    def scorers(self) -> list[str]:
        """The reward scorers whose mean the metrics hold (`reward/<scorer>`)."""
        return self._named("reward/", "")

    def _named(self, prefix: str, suffix: str) -> list[str]:
        found = []
        for row in self.metrics:
            for key in row:
                if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix):
                    name = key[len(prefix) : len(key) - len(suffix)]
                    if name and (suffix or "/" not in name):
                        found.append(name)
        return _unique(found)

    def evaluation(self, when: str) -> dict | None:
        """The first evaluation of this kind (`before`, `after`)."""
        return next((r for r in self.evals if r.get("when") == when), None)

    def final_evaluation(self) -> dict | None:
        """The evaluation after training, else the latest one (a run still going)."""
        after = self.evaluation("after")
        if after is not None:
            return after
        during = [r for r in self.evals if r.get("when") != "before"]
        return during[-1] if during else None


def number(value: Any) -> float | None:
    """A finite number as a float; None for anything else (null is how NaN is written)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Each run directory read, in the order given (a directory given twice, once)."""
    seen, dirs = set(), []
    for p in paths:
        for path in policy_dirs(check_run_dir(Path(p))):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                dirs.append(path)
    if not dirs:
        raise UserError("no run directory given")
    names = run_names(dirs)
    return [load_run(d, n) for d, n in zip(dirs, names, strict=True)]


def policy_dirs(path: Path) -> list[Path]:
    """A run directory, or a co-training run's: each policy's own run directory in it (in the
    recipe's order), shown as one run each."""
    recipe = _recipe(path / RECIPE) or {}
    policies = recipe.get("policies")
    if not isinstance(policies, list):
        return [path]
    names = [p.get("name") for p in policies if isinstance(p, dict)]
    found = [path / POLICIES_DIR / n for n in names if isinstance(n, str)]
    return [d for d in found if d.is_dir()] or [path]


def check_run_dir(path: Path) -> Path:
    """`path`, or a `UserError` where it is not a run directory."""
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (give the run directory: a run's output_dir)")
    if not (path / METRICS).is_file() and not (path / RECIPE).is_file():
        raise UserError(
            f"{path}: not a run directory (it has neither {METRICS} nor {RECIPE}); give the "
            "output_dir of a run"
        )
    return path


def run_names(dirs: Sequence[Path]) -> list[str]:
    """Each directory's name, with as many parent folders as it takes to tell them apart."""
    parts = [d.resolve().parts for d in dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]


def load_run(path: Path, name: str) -> Run:
    notes: list[str] = []
    metrics = _by_step(read_jsonl(path / METRICS, notes))
    run = Run(
        path=path,
        name=name,
        recipe=_recipe(path / RECIPE),
        metrics=metrics,
        evals=_evals(path / EVAL),
        alerts=read_jsonl(path / ALERTS, notes),
        completions=read_jsonl(path / COMPLETIONS, notes),
        summary=_summary(path / SUMMARY),
        notes=notes,
    )
    if run.summary is None and (run.metrics or run.recipe):
        notes.insert(0, f"no {SUMMARY}: the run is still going, or ended without one")
    return run


def read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """The rows of a JSON-lines file whose rows each have an integer `step` ([] where there is
    no file). An unparseable last line (being written) is left out, with a note; one before
    it is an `InputFileError`."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputFileError(str(path), f"cannot read: {exc.strerror or exc}") from None
    lines = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(lines):
        row, problem = _row(line)
        if problem is None:
            rows.append(row)
        elif k == len(lines) - 1:
            notes.append(f"{path.name}: last line ({lineno}) cut short while written: left out")
        else:
            raise InputFileError(
                str(path),
                f"corrupt line ({problem}); only the last line of a file being written may "
                "be cut short",
                line=lineno,
            )
    return rows


def _row(line: str) -> tuple[dict, str | None]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        return {}, getattr(exc, "msg", None) or "not JSON"
    if not isinstance(row, dict):
        return {}, "not a JSON object"
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return {}, "no integer step"
    return row, None


def _by_step(rows: list[dict]) -> list[dict]:
    """One row per step (a step written twice: the later row), in step order."""
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputFileError(str(path), f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        raise InputFileError(str(path), f"not JSON: {getattr(exc, 'msg', exc)}", line) from None


def _evals(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = _json(path)
    if not isinstance(rows, list):
        raise InputFileError(str(path), "not a list of evaluations")
    kept = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]
    return sorted(kept, key=lambda r: r["step"])


def _summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    data = _json(path)
    if not isinstance(data, dict):
        raise InputFileError(str(path), "not a JSON object")
    return data


def _recipe(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from ..recipe.reading import read_yaml

    data, _ = read_yaml(path, "the run's recipe")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InputFileError(str(path), "not a recipe (a YAML mapping)")
    return data
