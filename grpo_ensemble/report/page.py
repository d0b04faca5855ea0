"""The report as one self-contained HTML page: inline CSS and SVG, no script, nothing fetched.

Every text that comes from a run (names, prompts, completions, alert messages, recipe values)
is HTML-escaped. Cells holding a measured figure carry it unrounded in `data-value`.
"""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Sequence

from .plots import Plot, run_colours
from .rundata import Run, number
from .stats import Comparison, Estimate

STEPS_SHOWN = 4  # completions: of each run, the rows of this many logged steps
TEXT_LIMIT = 3000  # characters of a prompt or completion shown
ALERTS_SHOWN = 500

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1200px;padding:1rem 2rem 3rem;color:#222;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd}
nav a{margin-right:1rem}.muted{color:#666;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;vertical-align:top;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;white-space:nowrap}
td.text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;
max-width:32rem;overflow-wrap:anywhere}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;margin-right:.35em;
vertical-align:-.1em}td.runs{white-space:nowrap}td.recipe{min-width:14rem}.ci{color:#666}.warn{color:#a40000}
figure.plot{margin:1rem 0}figure.plot svg{width:100%;max-width:980px;height:auto}
figcaption{color:#666;font-size:.85rem}details{margin:.5rem 0}summary{cursor:pointer}
"""


def e(value) -> str:
    return html.escape(str(value), quote=True)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def points(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def td(text: str, value: float | None = None, cls: str = "", raw: bool = False) -> str:
    """A cell; `raw`: `text` is HTML already (made of escaped parts)."""
    attrs = f' class="{cls}"' if cls else ""
    if value is not None:
        attrs += f' data-value="{value!r}"'
    return f"<td{attrs}>{text if raw else e(text)}</td>"


def table(ident: str, head: Sequence[str], rows: Sequence[str]) -> str:
    ths = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "\n".join(f"<tr>{r}</tr>" for r in rows)
    return (
        f'<table id="{e(ident)}">\n<thead><tr>{ths}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'
    )


def render_page(runs: Sequence[Run], plots: Sequence[Plot], comparisons, meta: dict) -> str:
    """The whole page. `comparisons`: the per-recipe figures (None with a single run)."""
    colours = run_colours(runs)
    by_slug = {p.slug: p for p in plots}
    curves = [p for p in plots if p.slug not in ("accuracy", "before-after")]
    sections = [
        ("runs", "Runs", _overview(runs, colours)),
        ("comparison", "Comparison over seeds", _comparison(comparisons) if comparisons else ""),
        ("accuracy", "Held-out accuracy", _accuracy(runs, colours, by_slug)),
        ("curves", "Training curves", "\n".join(_figure(p) for p in curves) or _none("steps")),
        ("alerts", "Alerts", _alerts(runs, colours)),
        ("completions", "Sample completions", _completions(runs, colours)),
    ]
    sections = [s for s in sections if s[2]]
    nav = " ".join(f'<a href="#{k}">{e(t)}</a>' for k, t, _ in sections)
    body = "\n".join(
        f'<section id="{k}">\n<h2>{e(t)}</h2>\n{h}\n</section>' for k, t, h in sections
    )
    title = "grpo-ensemble report: " + ", ".join(r.name for r in runs)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{e(title)}</h1>\n"
        f'<p class="muted">made by grpo-ensemble {e(meta["version"])} on '
        f"{e(meta['generated'])}</p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def _none(what: str) -> str:
    return f'<p class="muted">No {e(what)} recorded yet.</p>'


def _figure(plot: Plot) -> str:
    caption = f"<figcaption>{e(plot.caption)}</figcaption>" if plot.caption else ""
    return (
        f'<figure class="plot" id="plot-{e(plot.slug)}" aria-label="{e(plot.title)}">\n'
        f"{plot.svg}\n{caption}</figure>"
    )


def _swatch(run: Run, colours) -> str:
    return f'<span class="swatch" style="background:{colours[run.name]}"></span>{e(run.name)}'


def _member_list(run: Run) -> str:
    peers = (run.recipe or {}).get("peers")
    peers = [p for p in peers if isinstance(p, dict)] if isinstance(peers, list) else []
    return ", ".join(f"{p.get('name', '?')} ({p.get('model', '?')})" for p in peers) or "—"


def _policy_model(run: Run) -> str:
    policy = (run.recipe or {}).get("policy")
    return str(policy.get("model", "—")) if isinstance(policy, dict) else "—"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _wall_time(run: Run) -> float | None:
    seconds = number((run.summary or {}).get("seconds"))
    if seconds is None:
        _, ys = run.series("time/step")
        seconds = sum(ys) if ys else None
    return seconds


def _overview(runs: Sequence[Run], colours) -> str:
    rows = []
    for run in runs:
        planned = run.planned_steps
        steps = f"{run.last_step} of {planned}" if planned else str(run.last_step)
        seconds = _wall_time(run)
        status = run.status + (" (no summary.json)" if run.running else "")
        notes = "<br>".join(e(n) for n in run.notes) or "—"
        rows.append(
            td(_swatch(run, colours), raw=True)
            + td(str(run.path))
            + td(status, cls="warn" if run.status not in ("completed",) else "")
            + td(steps, cls="num")
            + td("—" if run.seed is None else str(run.seed), cls="num")
            + td(_policy_model(run))
            + td(_member_list(run))
            + td(duration(seconds), seconds, "num")
            + td(str(len(run.alerts)), cls="num")
            + td(notes, raw=True)
        )
    head = ["run", "directory", "status", "steps", "seed", "policy", "peers", "time"]
    return table("runs-table", [*head, "alerts", "notes"], rows)


def _est(est: Estimate, sign: bool = False) -> str:
    """'37.5% ± 4.2 [33.3, 41.7]' for an accuracy (points for a change)."""
    if est.mean is None:
        return "—"
    main = points(est.mean, sign=True) + " pts" if sign else pct(est.mean)
    if est.half is None:
        return f'{e(main)} <span class="ci">(one seed: no interval)</span>'
    lo, hi = est.mean - est.half, est.mean + est.half
    ci = f"± {points(est.half)} [{points(lo)}, {points(hi)}]"
    return f'{e(main)} <span class="ci">{e(ci)}</span>'


def _comparison(comparisons: Sequence[Comparison]) -> str:
    rows = []
    for c in comparisons:
        g = c.group
        runs = "<br>".join(f"{e(r.name)} (seed {e(r.seed)})" for r in g.runs)
        seeds = len(g.runs)
        distinct = len({json.dumps(r.seed) for r in g.runs})
        rows.append(
            td(f"{g.ident}: {g.label}", cls="recipe")
            + td(runs, raw=True, cls="runs")
            + td(f"{seeds}" + (f" ({distinct} distinct)" if distinct < seeds else ""), seeds, "num")
            + td(pct(c.before.mean), c.before.mean, "num")
            + td(_est(c.final), c.final.mean, "num final-accuracy", raw=True)
            + td(_est(c.change, sign=True), c.change.mean, "num change", raw=True)
            + td(points(c.final.std), c.final.std, "num")
            + td(fmt(c.reward_last.mean), c.reward_last.mean, "num")
            + td(fmt(c.reward_std_last.mean), c.reward_std_last.mean, "num")
        )
    head = [
        "recipe",
        "runs",
        "seeds",
        "accuracy before",
        "final accuracy",
        "change",
        "std final",
        "reward last 10%",
        "reward std last 10%",
    ]
    note = (
        '<p class="muted">Runs are grouped by recipe (the recipe without <code>seed</code> and '
        "<code>output_dir</code>); recipe: a hash of it, and what sets it apart. Accuracy "
        "before: the mean over seeds. Final accuracy: the evaluation after training (of a run "
        "still going: its latest), mean over seeds ± the half-width of the 95% Student "
        "t-interval (t with n − 1 degrees of freedom; none for one seed), the interval in "
        "brackets. Change: final accuracy − accuracy before, in percentage points, the same "
        "way. Stability: std final: the standard deviation over seeds of the final accuracy "
        "(points); reward last 10%: the mean reward over the last 10% of each run's steps, and "
        "reward std last 10%: its standard deviation over those steps (means over seeds).</p>"
    )
    return table("comparison-table", head, rows) + "\n" + note


def _eval_cell(row: dict | None) -> str:
    acc = number(row.get("accuracy")) if row else None
    if acc is None:
        return td("—", cls="num")
    ci, n = number(row.get("ci95")), row.get("n")
    text = f'{e(pct(acc))} <span class="ci">± {e(points(ci))}, n={e(n)}</span>'
    return td(text, acc, "num", raw=True)


def _accuracy(runs: Sequence[Run], colours, plots: dict[str, Plot]) -> str:
    rows = []
    for run in runs:
        before, final = run.evaluation("before"), run.final_evaluation()
        a = number(before.get("accuracy")) if before else None
        b = number(final.get("accuracy")) if final else None
        change = b - a if a is not None and b is not None else None
        which = "—" if final is None else f"{final.get('when')} (step {final.get('step')})"
        rows.append(
            td(_swatch(run, colours), raw=True)
            + _eval_cell(before)
            + _eval_cell(final)
            + td(points(change, sign=True), change, "num")
            + td(which)
            + td(str(len(run.evals)), cls="num")
        )
    head = ["run", "before", "after", "change (pts)", "after: which evaluation", "evaluations"]
    if not any(r.evals for r in runs):
        return _none("evaluations")
    figures = [_figure(plots[k]) for k in ("accuracy", "before-after") if k in plots]
    note = '<p class="muted">Accuracy with the half-width of its 95% interval (eval.json).</p>'
    return "\n".join([table("before-after", head, rows), note, *figures, _eval_rows(runs)])


def _eval_rows(runs: Sequence[Run]) -> str:
    rows = []
    for run in runs:
        for r in run.evals:
            extra = ", ".join(
                f"{k} {fmt(number(v))}" for k, v in r.items() if k.startswith("pass@")
            )
            rows.append(
                td(run.name)
                + td(str(r.get("step")), cls="num")
                + td(str(r.get("when")))
                + _eval_cell(r)
                + td(fmt(number(r.get("mean_reward"))), cls="num")
                + td(extra or "—")
            )
    head = ["run", "step", "when", "accuracy", "mean reward", "pass@k"]
    return f"<details><summary>Every evaluation</summary>\n{table('evals', head, rows)}</details>"


def _alerts(runs: Sequence[Run], colours) -> str:
    fired = [(run, a) for run in runs for a in run.alerts]
    if not fired:
        return '<p class="muted">No alert fired.</p>'
    rows = []
    for run, a in sorted(fired, key=lambda x: x[1]["step"])[:ALERTS_SHOWN]:
        rows.append(
            td(_swatch(run, colours), raw=True)
            + td(str(a.get("step")), cls="num")
            + td(str(a.get("rule", "")))
            + td(str(a.get("metric", "")))
            + td(fmt(number(a.get("value"))), number(a.get("value")), "num")
            + td(fmt(number(a.get("threshold"))), cls="num")
            + td(str(a.get("action", "")))
            + td(str(a.get("message", "")))
        )
    more = len(fired) - ALERTS_SHOWN
    tail = f'<p class="muted">{more} more in alerts.jsonl.</p>' if more > 0 else ""
    head = ["run", "step", "rule", "metric", "value", "threshold", "action", "message"]
    intro = '<p class="muted">Each is a dotted vertical line at its step on the curves.</p>'
    return intro + table("alerts-table", head, rows) + tail


def _shown_steps(rows: Sequence[dict]) -> list[int]:
    """Of the logged steps: the first, the last and evenly spaced ones between."""
    steps = sorted({r["step"] for r in rows})
    if len(steps) <= STEPS_SHOWN:
        return steps
    picks = {round(i * (len(steps) - 1) / (STEPS_SHOWN - 1)) for i in range(STEPS_SHOWN)}
    return [steps[i] for i in sorted(picks)]


def _clip(text: str) -> str:
    if len(text) <= TEXT_LIMIT:
        return text
    return f"{text[:TEXT_LIMIT]}… ({len(text) - TEXT_LIMIT} more characters)"


def prompt_text(prompt) -> str:
    """A prompt as text: a chat prompt as one 'role: content' line per message."""
    if isinstance(prompt, list):
        lines = []
        for m in prompt:
            if isinstance(m, dict):
                lines.append(f"{m.get('role', '?')}: {m.get('content', '')}")
            else:
                lines.append(str(m))
        return "\n".join(lines)
    return "" if prompt is None else str(prompt)


def _completions(runs: Sequence[Run], colours) -> str:
    parts = []
    for i, run in enumerate(runs):
        if not run.completions:
            continue
        steps = _shown_steps(run.completions)
        rows = [r for r in run.completions if r["step"] in steps]
        summary = (
            f"{_swatch(run, colours)}: {len(rows)} of {len(run.completions)} rows "
            f"(steps {e(', '.join(map(str, steps)))})"
        )
        body = _completion_table(f"completions-{i}", rows)
        parts.append(
            f"<details{' open' if i == 0 else ''}><summary>{summary}</summary>{body}</details>"
        )
    if not parts:
        return '<p class="muted">No completions logged (log.completions).</p>'
    intro = (
        '<p class="muted">From completions.jsonl: the first, the last and evenly spaced logged '
        "steps. Injected: a peer's candidate in the policy's group.</p>"
    )
    return intro + "\n".join(parts)


def _prompt_key(row: dict) -> tuple:
    return row["step"], json.dumps(row.get("prompt"), sort_keys=True, default=str)


def _completion_table(ident: str, rows: Sequence[dict]) -> str:
    """One row per completion; the step and the prompt once per group (consecutive rows of
    one step and prompt)."""
    out = []
    for _, group in itertools.groupby(rows, key=_prompt_key):
        group = list(group)
        first = group[0]
        lead = (
            f'<td rowspan="{len(group)}" class="num">{e(first["step"])}</td>'
            f'<td rowspan="{len(group)}" class="text prompt">'
            f"{e(_clip(prompt_text(first.get('prompt'))))}</td>"
        )
        for k, r in enumerate(group):
            out.append((lead if k == 0 else "") + _completion_cells(r))
    head = ["step", "prompt", "member", "completion", "rewards", "reward", "advantage"]
    return table(ident, [*head, "injected", "finished"], out)


def _completion_cells(r: dict) -> str:
    rewards = r.get("rewards") if isinstance(r.get("rewards"), dict) else {}
    scores = ", ".join(f"{k}: {fmt(number(v))}" for k, v in rewards.items())
    return (
        td(str(r.get("member", "")))
        + td(_clip(str(r.get("completion", ""))), cls="text completion")
        + td(scores or "—")
        + td(fmt(number(r.get("reward"))), number(r.get("reward")), "num")
        + td(fmt(number(r.get("advantage"))), number(r.get("advantage")), "num")
        + td("yes" if r.get("injected") else "no")
        + td("yes" if r.get("finished") else "no (cut)")
    )
