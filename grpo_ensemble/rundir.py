"""The run directory: resolved recipe, metrics.jsonl, final model; and the progress bar."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import UserError
from .recipe import Recipe, dump_recipe


def prepare_run_dir(
    recipe: Recipe, write: bool = True, resuming: bool = False, source: str | Path | None = None
) -> Path:
    """Create the run directory and write the resolved recipe; fail early if not writable.
    Nothing of an earlier run is replaced: a directory holding one (checkpoints, metrics or a
    final model) is only reused to resume it, and a resumed run's recipe is written by
    `write_recipe` once the checkpoint has accepted it. Ranks other than 0 (`write=False`)
    only learn the path. `source`: the recipe file being run, never replaced."""
    out = Path(recipe.output_dir).expanduser()
    if not write:
        return out
    earlier = earlier_run(out)
    if not resuming and earlier:
        raise UserError(
            f"output_dir: {str(out)!r} holds an earlier run ({earlier}); continue it with "
            "--resume auto, or choose another output_dir (e.g. --set output_dir=runs/new)"
        )
    if source is not None and (out / "recipe.yaml").resolve() == Path(source).resolve():
        raise UserError(
            f"output_dir: {str(out)!r} would get the resolved recipe as recipe.yaml, replacing "
            f"the recipe file being run ({source}); choose another output_dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        if resuming:  # writable? the recipe itself waits for the checkpoint's consent
            with tempfile.TemporaryFile(dir=out):
                pass
        else:
            write_recipe(out, recipe)
    except OSError as exc:
        raise UserError(
            f"output_dir: cannot write to {str(out)!r}: {exc.strerror or exc}"
        ) from None
    return out


def write_recipe(out: Path, recipe: Recipe) -> None:
    """The resolved recipe, as `recipe.yaml` of the run directory."""
    (out / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")


def earlier_run(out: Path) -> str:
    """What of an earlier run `out` holds ('' for nothing): its checkpoints, its metrics, its
    final model."""
    found = []
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
        found.append("checkpoints")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if (out / "final").is_dir():
        found.append("final/")
    return ", ".join(found)


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl, flushed so a crash loses nothing."""

    def __init__(self, path: Path, keep_until: int = 0):
        """A new file, or with `keep_until` (a resumed run) the rows of steps up to it kept:
        the rows of steps after the checkpoint are written again by the resumed run."""
        self.path = path
        kept: list[str] = []
        if keep_until and path.is_file():
            kept = _rows_up_to(path, keep_until)
        # the kept rows go to a new file that replaces the old one whole: a crash meanwhile
        # leaves the old file, never a cut one
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        self._fh = path.open("a", encoding="utf-8")
        self.bad_in_a_row = 0  # the kept rows' last updates that were NaN or inf, in a row
        for line in kept:
            bad = json.loads(line).get("nonfinite_update")
            self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0

    def write(self, metrics: dict) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _rows_up_to(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl whose step is at most `step`, as they are. A line that does
    not parse (the last row, cut by a crash or a full disk while it was written) is left out:
    rows after the checkpoint are written again anyway."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    return kept


def read_metrics(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class StepProgress:
    """A progress bar with step, mean reward and time left (silent when disabled)."""

    def __init__(self, total: int, enabled: bool, console: Console | None = None, done: int = 0):
        self.enabled = enabled
        self.started = time.perf_counter()
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("reward {task.fields[reward]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=done, reward="-")
        self._progress.start()

    def update(self, reward: float) -> None:
        if self.enabled:
            self._progress.update(self._task, advance=1, reward=f"{reward:.3f}")

    def close(self) -> None:
        if self.enabled:
            self._progress.stop()
