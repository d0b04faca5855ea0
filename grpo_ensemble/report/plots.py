"""The report's plots, drawn with matplotlib (no pyplot: no display, no global figures) and
kept as inline SVG (and, on request, PNG).

One run: one colour per line. Several runs: one colour per run and one line style per
series, so that the runs overlay. Alerts are vertical dotted lines at their step.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .rundata import POLICY, Run, number

PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#d62728",
)  # fmt: skip
STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))
ALERT = "#d62728"
SMOOTH_FROM = 100  # a series of this many points is drawn with its moving mean
RASTER_FROM = 2000  # ... and its raw line as an image
LABEL_CHARS = 26  # legend labels are cut to this length
TIMES = ("time/generate", "time/score", "time/update", "time/sync", "time/step")

Line = tuple[str, list[int], list[float]]


@dataclass(frozen=True)
class Plot:
    """A drawn plot: `svg` to inline, `png` (bytes) when asked for."""

    slug: str
    title: str
    caption: str
    svg: str
    png: bytes | None = None


@dataclass(frozen=True)
class Panel:
    """A plot of metrics over steps: `lines(run)` gives its (label, steps, values)."""

    slug: str
    title: str
    ylabel: str
    lines: Callable[[Run], list[Line]]
    caption: str = ""


def run_colours(runs: Sequence[Run]) -> dict[str, str]:
    return {r.name: PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}


def _metric(key: str, label: str) -> Callable[[Run], list[Line]]:
    return lambda run: [(label, *run.series(key))]


def _per_scorer(run: Run) -> list[Line]:
    return [(s, *run.series(f"reward/{s}")) for s in run.scorers()]


def _per_member(key: str, total: str | None = None) -> Callable[[Run], list[Line]]:
    def lines(run: Run) -> list[Line]:
        out = [("all", *run.series(total))] if total else []
        return out + [(m, *run.series(f"member/{m}/{key}")) for m in run.members()]

    return lines


def _peer_share(run: Run) -> tuple[list[int], list[float]]:
    """Share of the step's candidates that came from peers."""
    xs, ys = [], []
    members = run.members()
    for row in run.metrics:
        counts = {m: number(row.get(f"member/{m}/candidates")) for m in members}
        total = number(row.get("candidates")) or sum(v for v in counts.values() if v)
        own = counts.get(POLICY)
        if total and own is not None:
            xs.append(row["step"])
            ys.append((total - own) / total)
    return xs, ys


def _injection(run: Run) -> list[Line]:
    return [
        ("off-policy token share", *run.series("offpolicy_token_fraction")),
        ("peer candidate share", *_peer_share(run)),
    ]


def _times(run: Run) -> list[Line]:
    found = {k for row in run.metrics for k in row if k.startswith("time/") and k.count("/") == 1}
    keys = [k for k in TIMES if k in found] + sorted(found - set(TIMES))
    return [(k.removeprefix("time/"), *run.series(k)) for k in keys]


PANELS = (
    Panel("reward", "Reward", "mean reward", _metric("reward", "reward")),
    Panel("reward-scorers", "Reward per scorer", "mean raw score", _per_scorer),
    Panel("reward-members", "Reward per member", "mean reward", _per_member("reward")),
    Panel("kl", "KL to the reference", "KL (token mean)", _metric("kl", "kl")),
    Panel("entropy", "Entropy", "nats per token", _per_member("entropy", "entropy")),
    Panel(
        "completion-length",
        "Completion length",
        "tokens",
        _per_member("completion_len", "completion_len"),
    ),
    Panel("clip-fraction", "Clip fraction", "share of tokens", _metric("clip_fraction", "clip")),
    Panel(
        "injection",
        "Injection share",
        "share",
        _injection,
        "off-policy token share: offpolicy_token_fraction; peer candidate share: the "
        "candidates from peers over all candidates of the step",
    ),
    Panel("grad-norm", "Gradient norm", "norm", _metric("grad_norm", "grad norm")),
    Panel("times", "Phase times", "seconds per step", _times),
)


def make_plots(runs: Sequence[Run], png: bool = False) -> list[Plot]:
    """Every plot the runs have data for, in the report's order."""
    colours = run_colours(runs)
    plots = [_eval_plot(runs, colours, png), _before_after_plot(runs, colours, png)]
    plots += [_panel_plot(p, runs, colours, png) for p in PANELS]
    return [p for p in plots if p is not None]


def _figure(title: str, ylabel: str, xlabel: str = "step"):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9.0, 3.3))
    fig.subplots_adjust(left=0.09, right=0.79, top=0.89, bottom=0.16)  # axes aligned page-wide
    ax = fig.add_subplot()
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _panel_plot(panel: Panel, runs: Sequence[Run], colours, png: bool) -> Plot | None:
    data = {r.name: [line for line in panel.lines(r) if line[1]] for r in runs}
    labels = list(dict.fromkeys(label for lines in data.values() for label, _, _ in lines))
    if not labels:
        return None
    fig, ax = _figure(panel.title, panel.ylabel)
    multi, windows = len(runs) > 1, set()
    for run in runs:
        for label, xs, ys in data[run.name]:
            j = labels.index(label)
            colour = colours[run.name] if multi else PALETTE[j % len(PALETTE)]
            style = STYLES[j % len(STYLES)] if multi else "-"
            windows.add(_draw_line(ax, xs, ys, colour, style))
    alerts = _mark_alerts(ax, runs, colours)
    _legend(ax, runs, colours, labels, alerts)
    caption = panel.caption
    if windows - {None}:
        w = "/".join(str(w) for w in sorted(windows - {None}))
        smooth = f"faint: each step; bold: the mean of the last {w} steps"
        caption = f"{caption}; {smooth}" if caption else smooth
    return _render(fig, panel.slug, panel.title, caption, png)


def _draw_line(ax, xs: list[int], ys: list[float], colour: str, style) -> int | None:
    """The line; past SMOOTH_FROM points, faint, under its moving mean (whose window it
    returns). Many points are drawn as an image inside the SVG, which keeps the page small."""
    if len(xs) < SMOOTH_FROM:
        marker = "o" if len(xs) <= 30 else None
        ax.plot(xs, ys, color=colour, linestyle=style, linewidth=1.4, marker=marker, markersize=2.5)
        return None
    window = max(5, len(ys) // 50)
    ax.plot(xs, ys, color=colour, linewidth=0.7, alpha=0.25, rasterized=len(xs) > RASTER_FROM)
    mean = moving_mean(ys, window)
    keep = sorted({*range(0, len(xs), max(1, len(xs) // 1000)), len(xs) - 1})  # it is smooth
    kept_x, kept_y = [xs[i] for i in keep], [mean[i] for i in keep]
    ax.plot(kept_x, kept_y, color=colour, linestyle=style, linewidth=1.6)
    return window


def moving_mean(ys: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the `window` − 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mark_alerts(ax, runs: Sequence[Run], colours) -> bool:
    """A vertical dotted line at each step where an alert fired (in the run's colour when
    there are several runs)."""
    marked = False
    for run in runs:
        for step in sorted({a["step"] for a in run.alerts}):
            colour = colours[run.name] if len(runs) > 1 else ALERT
            ax.axvline(step, color=colour, linestyle=":", linewidth=1.2, alpha=0.85)
            marked = True
    return marked


def _legend(ax, runs: Sequence[Run], colours, labels: list[str], alerts: bool) -> None:
    from matplotlib.lines import Line2D

    handles = []
    if len(runs) > 1:
        handles += [Line2D([], [], color=colours[r.name], label=r.name) for r in runs]
        if len(labels) > 1:
            handles += [
                Line2D([], [], color="#333", linestyle=STYLES[j % len(STYLES)], label=label)
                for j, label in enumerate(labels)
            ]
    elif len(labels) > 1:
        handles += [
            Line2D([], [], color=PALETTE[j % len(PALETTE)], label=label)
            for j, label in enumerate(labels)
        ]
    if alerts:
        colour = ALERT if len(runs) == 1 else "#555"
        handles.append(Line2D([], [], color=colour, linestyle=":", label="alert"))
    if handles:
        _place_legend(ax, handles)


def _place_legend(ax, handles) -> None:
    """The legend right of the axes (in the margin every figure keeps for it)."""
    for h in handles:
        label = h.get_label()
        if len(label) > LABEL_CHARS:
            h.set_label(label[: LABEL_CHARS - 1] + "…")
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
    )


def _eval_plot(runs: Sequence[Run], colours, png: bool) -> Plot | None:
    """Held-out accuracy over steps with its 95% interval (a band, and bars at each point),
    and pass@k where measured."""
    from matplotlib.ticker import PercentFormatter

    rows = {r.name: [e for e in r.evals if number(e.get("accuracy")) is not None] for r in runs}
    if not any(rows.values()):
        return None
    fig, ax = _figure("Held-out accuracy (95% interval)", "accuracy")
    passes = []
    for run in runs:
        evals, colour = rows[run.name], colours[run.name]
        if not evals:
            continue
        xs = [e["step"] for e in evals]
        ys = [number(e["accuracy"]) for e in evals]
        half = [number(e.get("ci95")) or 0.0 for e in evals]
        if len(xs) > 1:
            lo = [y - h for y, h in zip(ys, half, strict=True)]
            hi = [y + h for y, h in zip(ys, half, strict=True)]
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, linewidth=0)
        ax.errorbar(xs, ys, yerr=half, color=colour, marker="o", markersize=4, capsize=3)
        for key in sorted({k for e in evals for k in e if k.startswith("pass@")}):
            pts = [(e["step"], number(e.get(key))) for e in evals]
            pts = [(x, y) for x, y in pts if y is not None]
            ax.plot(*zip(*pts, strict=True), color=colour, linestyle="--", marker="^")
            passes.append(key)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    alerts = _mark_alerts(ax, runs, colours)
    labels = ["accuracy", *dict.fromkeys(passes)]
    _eval_legend(ax, runs, colours, labels, alerts)
    caption = "held-out accuracy at each evaluation (eval.json); the band is its 95% interval"
    return _render(fig, "accuracy", "Held-out accuracy", caption, png)


def _eval_legend(ax, runs, colours, labels: list[str], alerts: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[r.name], marker="o", label=r.name) for r in runs]
    if len(labels) > 1:
        handles += [
            Line2D([], [], color="#333", linestyle="-" if i == 0 else "--", label=label)
            for i, label in enumerate(labels)
        ]
    if alerts:
        handles.append(Line2D([], [], color="#555", linestyle=":", label="alert"))
    _place_legend(ax, handles)


def _before_after_plot(runs: Sequence[Run], colours, png: bool) -> Plot | None:
    """Each run's accuracy before and after training, with 95% intervals."""
    from matplotlib.ticker import PercentFormatter

    pairs = [(r, r.evaluation("before"), r.final_evaluation()) for r in runs]
    if not any(b or a for _, b, a in pairs):
        return None
    fig, ax = _figure("Accuracy before → after training (95% interval)", "accuracy", "run")
    for i, (run, before, after) in enumerate(pairs):
        pts = [(i - 0.15, before, "o"), (i + 0.15, after, "s")]
        pts = [(x, e, m) for x, e, m in pts if e and number(e.get("accuracy")) is not None]
        for x, e, marker in pts:
            ax.errorbar(
                [x],
                [number(e["accuracy"])],
                yerr=[number(e.get("ci95")) or 0.0],
                color=colours[run.name],
                marker=marker,
                capsize=4,
            )
        if len(pts) == 2:
            ax.plot(
                [p[0] for p in pts],
                [number(p[1]["accuracy"]) for p in pts],
                color=colours[run.name],
                linewidth=1,
                alpha=0.6,
            )
    ax.set_xticks(range(len(runs)), [r.name for r in runs], rotation=20 if len(runs) > 3 else 0)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    _before_after_legend(ax)
    caption = "circle: before training; square: after (or the latest evaluation of a run going)"
    return _render(fig, "before-after", "Accuracy before and after", caption, png)


def _before_after_legend(ax) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="#333", marker="o", linestyle="", label="before"),
        Line2D([], [], color="#333", marker="s", linestyle="", label="after"),
    ]
    _place_legend(ax, handles)


def _render(fig, slug: str, title: str, caption: str, png: bool) -> Plot:
    from matplotlib import rc_context

    with rc_context({"svg.fonttype": "path", "svg.hashsalt": slug}):
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", dpi=150, metadata={"Date": None})  # dpi: of rasterized lines
    svg = scoped_svg(buf.getvalue().decode("utf-8"), f"g-{slug}")
    raw = None
    if png:
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=120)
        raw = out.getvalue()
    return Plot(slug=slug, title=title, caption=caption, svg=svg, png=raw)


def scoped_svg(svg: str, prefix: str) -> str:
    """The `<svg>` element alone (no XML declaration, doctype or metadata), its ids prefixed
    so that several SVGs inline in one page never share an id."""
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    ids = set(re.findall(r'\sid="([^"]+)"', svg))
    svg = re.sub(r'(\sid=")([^"]+)"', lambda m: f'{m[1]}{prefix}-{m[2]}"', svg)

    def ref(m: re.Match) -> str:
        return f"{m[1]}{prefix}-{m[2]}{m[3]}" if m[2] in ids else m[0]

    svg = re.sub(r'(href="#)([^"]+)(")', ref, svg)
    return re.sub(r"(url\(#)([^)]+)(\))", ref, svg)
