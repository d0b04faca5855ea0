"""`grpo-ensemble report`: one self-contained HTML page drawing one or more run directories.

    from grpo_ensemble.report import write_report
    write_report(["runs/a", "runs/b"], "report.html", png_dir="plots")

The page needs no network: its plots are inline SVG, its style inline CSS, and it has no
script. With several runs the curves overlay (one colour per run) and a table compares the
runs grouped by recipe over their seeds (stats.py). A run still going is drawn as far as it
has got. A path that is not a run directory, or a corrupt file, is a `UserError`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .page import render_page
from .plots import Plot, make_plots
from .rundata import Run, load_runs
from .stats import compare, group_runs


@dataclass(frozen=True)
class Written:
    """What `write_report` wrote: the page, and the PNG files (with `png_dir`)."""

    path: Path
    runs: list[Run]
    plots: list[Plot]
    pngs: list[Path]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grpo-ensemble")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_report(runs: Sequence[Run], png: bool = False) -> tuple[str, list[Plot]]:
    """(the page's HTML, its plots) for runs already read."""
    plots = make_plots(runs, png=png)
    comparisons = compare(group_runs(runs)) if len(runs) > 1 else None
    meta = {
        "version": package_version(),
        "generated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    return render_page(runs, plots, comparisons, meta), plots


def write_report(
    run_dirs: Sequence[str | Path], output: str | Path, png_dir: str | Path | None = None
) -> Written:
    """Read the run directories, write the page to `output`, and each plot as a PNG into
    `png_dir` when given (created if missing)."""
    runs = load_runs(run_dirs)
    text, plots = build_report(runs, png=png_dir is not None)
    output = Path(output)
    if output.is_dir():
        raise UserError(f"-o {output}: is a directory; give the HTML file to write")
    _write(output, text.encode("utf-8"), "-o")
    pngs = []
    if png_dir is not None:
        folder = Path(png_dir)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--png {folder}: not a directory")
        for i, plot in enumerate(plots, 1):
            path = folder / f"{i:02d}-{plot.slug}.png"
            _write(path, plot.png or b"", "--png")
            pngs.append(path)
    return Written(path=output, runs=list(runs), plots=plots, pngs=pngs)


def _write(path: Path, data: bytes, option: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None


__all__ = ["Written", "build_report", "package_version", "write_report"]
