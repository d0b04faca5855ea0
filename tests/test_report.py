"""`grpo-ensemble report`: the HTML page drawn from real short runs (two seeds of a tiny
recipe), its PNGs, a run still going, the comparison over seeds, and bad input (exit 2)."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import small_recipe_dict

from grpo_ensemble import train
from grpo_ensemble.cli import main
from grpo_ensemble.recipe import recipe_from_dict
from grpo_ensemble.report import package_version, write_report
from grpo_ensemble.report.rundata import load_runs
from grpo_ensemble.report.stats import estimate, group_runs, t_quantile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two seeds of one tiny recipe, 3 steps each: evaluations before, at step 2 and after,
    completions every step, and an alert at step 1 (entropy is far below 100)."""
    base = tmp_path_factory.mktemp("runs")
    dirs = []
    for seed in (0, 1):
        data = small_recipe_dict(
            base,
            seed=seed,
            output_dir=str(base / f"seed{seed}"),
            train__steps=3,
            eval__every=2,
            log__completions={"every": 1, "prompts": 2, "per_member": 2},
            alerts={"entropy_collapse": {"threshold": 100.0, "window": 1}},
        )
        dirs.append(train(recipe_from_dict(data)).run_dir)
    return dirs


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Cells(HTMLParser):
    """Each table's rows (by table id) as lists of (attributes, text) cells."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[tuple[dict, str]]]] = {}
        self._table, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table.append(dict(attrs).get("id", ""))
            self.tables.setdefault(self._table[-1], [])
        elif tag == "tr" and self._table:
            self.tables[self._table[-1]].append([])
        elif tag == "td" and self._table:
            self._cell = (dict(attrs), [])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table.pop()
        elif tag == "td" and self._cell is not None:
            attrs, text = self._cell
            self.tables[self._table[-1]][-1].append((attrs, "".join(text)))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)


def _tables(page: str) -> dict[str, list[list[tuple[dict, str]]]]:
    parser = Cells()
    parser.feed(page)
    return {k: [r for r in v if r] for k, v in parser.tables.items()}


def _value(cell: tuple[dict, str]) -> float:
    return float(cell[0]["data-value"])


def test_report_of_two_seeds_shows_curves_accuracy_alerts_completions(runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "-o", str(out)]) == 0
    assert f"report: {out} (2 runs," in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    # self-contained: inline SVG plots, no script, no stylesheet or image fetched
    svgs = page.count("<svg")
    assert svgs == page.count('<figure class="plot"') >= 10
    for slug in ("accuracy", "before-after", "reward", "reward-members", "kl", "entropy"):
        assert f'id="plot-{slug}"' in page
    for slug in ("completion-length", "clip-fraction", "injection", "times"):
        assert f'id="plot-{slug}"' in page
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert set(re.findall(r"https?://[^\s\"')]+", page)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }
    tables = _tables(page)
    # before/after: the figures of each run's eval.json
    rows = tables["before-after"]
    assert [r[0][1] for r in rows] == ["seed0", "seed1"]
    finals = []
    for row, run in zip(rows, runs, strict=True):
        evals = json.loads((run / "eval.json").read_text())
        assert [e["when"] for e in evals] == ["before", "during", "after"]
        assert _value(row[1]) == evals[0]["accuracy"]
        assert _value(row[2]) == evals[-1]["accuracy"]
        assert f"{100 * evals[0]['accuracy']:.1f}%" in row[1][1]
        finals.append((evals[0]["accuracy"], evals[-1]["accuracy"]))
    # the comparison: both runs in one recipe group, the mean of their final accuracies
    (group,) = tables["comparison-table"]
    assert "seed0 (seed 0)" in group[1][1] and "seed1 (seed 1)" in group[1][1]
    assert _value(group[2]) == 2
    assert _value(group[4]) == pytest.approx((finals[0][1] + finals[1][1]) / 2)
    change = ((finals[0][1] - finals[0][0]) + (finals[1][1] - finals[1][0])) / 2
    assert _value(group[5]) == pytest.approx(change)
    assert "95% Student t-interval" in page
    # alerts: each row of alerts.jsonl in the table
    fired = [a for run in runs for a in _rows(run / "alerts.jsonl")]
    assert fired and {a["rule"] for a in fired} == {"entropy_collapse"}
    assert len(tables["alerts-table"]) == len(fired)
    # completions: a logged completion's text, escaped, in the completions table
    logged = _rows(runs[0] / "completions.jsonl")
    assert {r["step"] for r in logged} == {1, 2, 3}
    texts = {
        c[1]
        for row in tables["completions-0"]
        for c in row
        if "completion" in c[0].get("class", "")
    }
    assert logged[-1]["completion"] in texts
    assert f'class="text completion">{html.escape(logged[-1]["completion"])}</td>' in page


def test_png_option_writes_each_plot_as_a_png(runs, tmp_path):
    out, pngs = tmp_path / "one.html", tmp_path / "png"
    assert main(["report", str(runs[0]), "-o", str(out), "--png", str(pngs)]) == 0
    files = sorted(pngs.glob("*.png"))
    assert len(files) == out.read_text(encoding="utf-8").count("<svg") >= 10
    for f in files:
        assert f.read_bytes().startswith(PNG_MAGIC)
    assert "comparison-table" not in out.read_text(encoding="utf-8")  # one run: nothing to compare


def _copy(run: Path, dest: Path) -> Path:
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "final")))


def test_a_run_still_going_is_drawn_as_far_as_it_goes(runs, tmp_path):
    run = _copy(runs[0], tmp_path / "going")
    (run / "summary.json").unlink()
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    out = tmp_path / "going.html"
    written = write_report([run], out)
    assert [r["step"] for r in written.runs[0].metrics] == [1, 2]
    page = out.read_text(encoding="utf-8")
    (row,) = _tables(page)["runs-table"]
    assert row[2][1] == "running (no summary.json)" and row[3][1] == "2 of 3"
    assert "metrics.jsonl: last line (3) cut short while written: left out" in page
    assert page.count("<svg") >= 10


def test_a_corrupt_line_in_the_middle_of_metrics_is_exit_2(runs, tmp_path, capsys):
    run = _copy(runs[0], tmp_path / "corrupt")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
    metrics.write_text("".join(lines))
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {metrics}:2: corrupt line")
    assert not (tmp_path / "r.html").exists()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "a file": (a_file, f"error: {a_file}: not a directory"),
        "missing": (tmp_path / "absent", f"error: {tmp_path / 'absent'}: no such directory"),
        "not a run": (empty, f"error: {empty}: not a run directory"),
    }


def test_bad_paths_are_exit_2_with_one_line(tmp_path, capsys):
    for path, start in _bad_inputs(tmp_path).values():
        assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith(start), err
    assert main(["report", "-o", str(tmp_path / "r.html")]) == 2  # no run directory
    assert "Missing argument" in capsys.readouterr().err


def test_the_command_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew\n{}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_ensemble", "report", str(bad), "-o", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad / 'metrics.jsonl'}:2: corrupt line (Unterminated string starting at); "
        "only the last line of a file being written may be cut short"
    ]


def _hand_run(path: Path, seed: int, lr: float, completion: str = "7") -> Path:
    """A run directory written by hand: a recipe, 10 steps, evaluations, one alert."""
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(
        f"seed: {seed}\noutput_dir: {path}\npolicy: {{model: m}}\ntrain: {{steps: 10, lr: {lr}}}\n"
    )
    rows = [{"step": s, "reward": 0.1 * s, "kl": 0.01, "time/step": 1.0} for s in range(1, 11)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [
        {"step": 0, "when": "before", "accuracy": 0.25, "ci95": 0.1, "n": 50},
        {"step": 10, "when": "after", "accuracy": 0.5 + 0.1 * seed, "ci95": 0.1, "n": 50},
    ]
    (path / "eval.json").write_text(json.dumps(evals))
    alert = {
        "step": 4,
        "rule": "kl_spike",
        "metric": "kl",
        "value": 9.0,
        "threshold": 1.0,
        "action": "warn",
        "message": "kl <b>spiked</b>",
    }
    (path / "alerts.jsonl").write_text(json.dumps(alert) + "\n")
    done = {
        "step": 5,
        "prompt": [{"role": "user", "content": "3+4=<?>"}],
        "member": "policy",
        "completion": completion,
        "rewards": {"exact_match": None},
        "reward": 0.0,
        "advantage": 0.0,
        "injected": False,
        "finished": True,
    }
    (path / "completions.jsonl").write_text(json.dumps(done) + "\n")
    return path


def test_text_from_a_run_is_escaped(tmp_path):
    evil = "</td><script>alert('x')</script>&amp;"
    run = _hand_run(tmp_path / "r", 0, 0.1, completion=evil)
    page = write_report([run], tmp_path / "r.html").path.read_text(encoding="utf-8")
    assert evil not in page and "<script" not in page and "<b>spiked" not in page
    assert html.escape(evil) in page
    assert html.escape("user: 3+4=<?>") in page and "kl &lt;b&gt;spiked&lt;/b&gt;" in page


def test_runs_are_grouped_by_recipe_without_seed_and_output_dir(tmp_path):
    paths = [
        _hand_run(tmp_path / "a0", 0, 0.1),
        _hand_run(tmp_path / "a1", 1, 0.1),
        _hand_run(tmp_path / "a2", 2, 0.1),
        _hand_run(tmp_path / "b0", 0, 0.2),
    ]
    groups = group_runs(load_runs(paths))
    assert [[r.name for r in g.runs] for g in groups] == [["a0", "a1", "a2"], ["b0"]]
    assert [g.label for g in groups] == ["train.lr=0.1", "train.lr=0.2"]
    page = write_report(paths, tmp_path / "r.html").path.read_text(encoding="utf-8")
    a, b = _tables(page)["comparison-table"]
    finals = [0.5, 0.6, 0.7]
    assert _value(a[4]) == pytest.approx(sum(finals) / 3)
    half = t_quantile(2) * 0.1 / math.sqrt(3)  # the sample std of 0.5, 0.6, 0.7 is 0.1
    assert f"± {100 * half:.1f}" in a[4][1] and "one seed: no interval" in b[4][1]
    assert _value(a[5]) == pytest.approx(0.6 - 0.25)
    # the reward over the last 10% of the steps (at least two): steps 9 and 10
    assert _value(a[8]) == pytest.approx(math.sqrt(0.005))


def test_t_interval_quantiles_and_estimate():
    assert t_quantile(1) == 12.706 and t_quantile(30) == 2.042
    assert t_quantile(40) == pytest.approx(2.021, abs=1e-3)
    assert t_quantile(120) == pytest.approx(1.980, abs=1e-3)
    est = estimate([0.2, 0.4, None])
    assert (est.n, est.mean) == (2, pytest.approx(0.3))
    assert est.half == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert estimate([0.5]).half is None and estimate([]).mean is None


def test_version_option(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"grpo-ensemble {package_version()}\n"
    assert package_version() not in ("", "unknown")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary")
def test_the_report_opens_in_headless_chromium(runs, tmp_path):
    out = write_report(runs, tmp_path / "report.html").path
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            out.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # a page drawn, not a blank one
