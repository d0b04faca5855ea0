"""The run directory: resolved recipe, metrics.jsonl, final model; and the progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import UserError
from .recipe import Recipe, dump_recipe

# what a run writes in its directory; a link at one of these names is refused, never followed
OURS = (
    "recipe.yaml",
    "data_report.json",
    "metrics.jsonl",
    "checkpoints",
    "final",
    "best",
    "eval.json",
    "alerts.jsonl",
    "completions.jsonl",
    "summary.json",
)


def prepare_run_dir(
    recipe: Recipe, write: bool = True, resuming: bool = False, source: str | Path | None = None
) -> Path:
    """Create the run directory and write the resolved recipe; fail early if not writable.
    Nothing of an earlier run, or of anyone else, is replaced: a directory holding a run
    (checkpoints, metrics or a final model) is only reused to resume it, a file at one of the
    names a run writes that a run did not write stops it, and a resumed run's recipe is written
    by `write_recipe` once the checkpoint has accepted it. Ranks other than 0 (`write=False`)
    only learn the path. `source`: the recipe file being run, never replaced."""
    out = Path(recipe.output_dir).expanduser()
    if not write:
        return out
    _check_place(out)
    if source is not None and (out / "recipe.yaml").resolve() == Path(source).resolve():
        raise UserError(
            f"output_dir: {str(out)!r} would get the resolved recipe as recipe.yaml, replacing "
            f"the recipe file being run ({source}); choose another output_dir"
        )
    _check_names(out)
    earlier = earlier_run(out)
    if not resuming and earlier:
        raise UserError(
            f"output_dir: {str(out)!r} holds an earlier run ({earlier}); continue it with "
            "--resume auto, or choose another output_dir (e.g. --set output_dir=runs/new)"
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


def _check_place(out: Path) -> None:
    """Refuse a run directory whose files would land among the user's own: the root, the home
    directory, the current directory or one of its ancestors."""
    where = out.resolve()
    here = Path.cwd().resolve()
    if where == Path(where.anchor):
        what = "the root directory"
    elif where == Path.home().resolve():
        what = "your home directory"
    elif where == here or where in here.parents:
        what = "the current directory" if where == here else "an ancestor of the current directory"
    else:
        return
    raise UserError(
        f"output_dir: {str(out)!r} is {what}; a run writes recipe.yaml, metrics.jsonl, "
        "checkpoints/ and final/ there: choose a folder of its own (e.g. runs/name)"
    )


def _check_names(out: Path) -> None:
    """Refuse links at the names a run writes, and files there that no run wrote."""
    for name in OURS:
        path = out / name
        if path.is_symlink():
            raise UserError(
                f"output_dir: {str(path)!r} is a symbolic link; a run never writes through "
                "one: remove it or choose another output_dir"
            )
    for name, ours in (("recipe.yaml", _is_run_recipe), ("data_report.json", _is_data_report)):
        path = out / name
        if path.exists() and not ours(path, out):
            raise UserError(
                f"output_dir: {str(path)!r} exists and was not written by a run (a run would "
                "replace it): move it or choose another output_dir"
            )


def _is_run_recipe(path: Path, out: Path) -> bool:
    """A resolved recipe of a run in `out` (as `write_recipe` writes it)."""
    import yaml

    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(data, dict) or not isinstance(data.get("output_dir"), str):
        return False
    return Path(data["output_dir"]).expanduser().resolve() == out.resolve()


def _is_data_report(path: Path, out: Path) -> bool:
    """A data report as `write_data_report` writes it."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 24:
            return False
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and "source" in r for r in rows)


def write_file(path: Path, text: str) -> None:
    """`text` as the file `path`, replaced whole: written to a new file of the same folder
    (created exclusively, so never through a link planted at its name) and renamed over
    `path`, which replaces a link there instead of writing where it points."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_recipe(out: Path, recipe: Recipe) -> None:
    """The resolved recipe, as `recipe.yaml` of the run directory."""
    write_file(out / "recipe.yaml", dump_recipe(recipe))


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
    """Appends one JSON object per step to metrics.jsonl, flushed so a crash loses nothing;
    a checkpoint flushes it to the disk and keeps a copy of the rows it covers."""

    def __init__(self, path: Path, keep_until: int = 0, saved: Path | None = None):
        """A new file, or with `keep_until` (a resumed run) the rows of steps up to it kept,
        from `saved` (the checkpoint's copy) where that exists: the rows of steps after the
        checkpoint are written again by the resumed run."""
        self.path = path
        kept: list[str] = []
        if keep_until:
            source = saved if saved is not None and saved.is_file() else path
            kept = rows_up_to(source, keep_until) if source.is_file() else []
        # the kept rows go to a new file that replaces the old one whole: a crash meanwhile
        # leaves the old file, never a cut one
        write_file(path, "".join(kept))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        self._fh = os.fdopen(fd, "a", encoding="utf-8")
        self.bad_in_a_row = 0  # the kept rows' last updates that were NaN or inf, in a row
        for line in kept:
            bad = json.loads(line).get("nonfinite_update")
            self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0

    def write(self, metrics: dict) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def rows_up_to(path: Path, step: int) -> list[str]:
    """The lines of a metrics.jsonl whose step is at most `step`, as they are. A line that does
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
    """The run's progress: on a terminal a bar with the step, the reward per member, the KL,
    time left and the latest alert; otherwise (a log file, CI, a scheduler) a plain line at
    most every `log.line_every_s` seconds, and for the first and last step (silent when
    disabled)."""

    def __init__(self, total: int, log, enabled: bool, console: Console | None = None, done=0):
        self.enabled, self.total, self.done = enabled, total, done
        self.started = self.last_line = time.perf_counter()
        self.every = log.line_every_s
        self.console = console if console is not None else Console()
        self.live = enabled and self.console.is_terminal
        self.alert = ""
        if not self.live:
            return
        self._progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=done, status="")
        self._progress.start()

    def update(self, metrics: dict, alert: str | None = None) -> None:
        if not self.enabled:
            return
        self.done += 1
        self.alert = alert or self.alert
        status = step_status(metrics) + (f" | alert: {self.alert}" if self.alert else "")
        if self.live:
            self._progress.update(self._task, advance=1, status=status)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every or self.done in (1, self.total):
            self.last_line = now
            per_step = (now - self.started) / max(self.done, 1)
            left = per_step * (self.total - self.done)
            self.console.print(
                f"step {self.done}/{self.total} {status} | {per_step:.1f} s/step, "
                f"{left / 60:.1f} min left",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def close(self) -> None:
        if self.live:
            self._progress.stop()


def step_status(metrics: dict) -> str:
    """reward (per member), KL: the figures a user watches."""
    members = [
        f"{k.split('/')[1]} {v:.3f}"
        for k, v in metrics.items()
        if k.startswith("member/") and k.endswith("/reward")
    ]
    text = f"reward {metrics.get('reward', float('nan')):.3f}"
    if len(members) > 1:
        text += f" ({', '.join(members)})"
    if "kl" in metrics:
        text += f" kl {metrics['kl']:.4f}"
    return text
