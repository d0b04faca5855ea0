"""The built-in trackers (tensorboard, wandb, mlflow) read back from what they wrote, the recipe
errors of a missing package or an unknown name, and a user's tracker plugin."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_ensemble import Tracker, hookimpl, plugins
from grpo_ensemble.cli import main
from grpo_ensemble.plugins.builtin.trackers import (
    MlflowTracker,
    TensorBoardTracker,
    WandbTracker,
    _is_file_store,
    completion_table,
    metric_key,
    numeric_items,
)
from grpo_ensemble.recipe import dump_recipe
from grpo_ensemble.trainer.observers import HOOKS, Observers, build_trackers

RECIPE = {"seed": 0, "policy": {"model": "builtin:tiny-arith-small", "n": 2}, "peers": []}
# rows as a run writes them: metrics.jsonl, eval.json, completions.jsonl, alerts.jsonl
METRICS = [
    {
        "step": 1,
        "reward": 0.25,
        "reward/exact_match": 0.25,
        "member/policy/reward": 0.125,
        "member/policy/candidates": 8,
        "time/generate/policy": 0.5,
        "lr": 1e-4,
        "loss": float("nan"),  # left out: not a finite number
        "kl": float("inf"),
        "note": "text",  # left out: not a number
    },
    {
        "step": 2,
        "reward": 0.5,
        "reward/exact_match": 0.5,
        "member/policy/reward": 0.375,
        "lr": 5e-5,
    },
]
EVAL = {"step": 0, "when": "before", "accuracy": 0.25, "ci95": 0.2, "n": 16}
EVAL |= {"mean_reward": None, "pass@4": 0.5}
COMPLETIONS = [
    {
        "step": 2,
        "prompt": "12+7=",
        "member": "policy",
        "completion": "19 | yes\nend",
        "rewards": {"exact_match": 1.0},
        "reward": 1.0,
        "advantage": 0.7,
        "injected": False,
        "finished": True,
    },
    {
        "step": 2,
        "prompt": [{"role": "user", "content": "3+4="}],
        "member": "strong",
        "completion": "7",
        "rewards": {"exact_match": None},
        "reward": 0.0,
        "advantage": -0.7,
        "injected": True,
        "finished": False,
    },
]
ALERT = {"step": 2, "rule": "kl_spike", "metric": "kl", "value": 9.0, "threshold": 5.0}
ALERT |= {"action": "warn", "message": "kl 9 is above 5 × its median"}
FINITE = {1: {"reward": 0.25, "member/policy/reward": 0.125}, 2: {"reward": 0.5}}


@pytest.fixture(autouse=True)
def _tracker_env(tmp_path, monkeypatch):
    """Each tracker's defaults, and their own files under this test's directory."""
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_SILENT", "WANDB_CONSOLE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def _feed(tracker, run_dir: Path, status: str = "completed", metrics=METRICS) -> None:
    """A run's records, in the order a run sends them."""
    tracker.on_run_start(run_dir, RECIPE)
    tracker.on_eval(0, EVAL)
    for row in metrics:
        tracker.on_step_end(row["step"], row)
    tracker.on_completions(2, COMPLETIONS)
    tracker.on_alert(ALERT)
    tracker.on_run_end(run_dir, {"status": status, "steps": 2, "change": 0.1})


def test_numeric_items_keep_finite_numbers_under_names_every_tracker_takes():
    row = {"step": 3, "a": 1, "b": float("nan"), "c": None, "d": "x", "e": True, "f": {"g": 2.5}}
    assert dict(numeric_items(row, "eval/")) == {"eval/a": 1.0, "eval/f/g": 2.5}
    assert metric_key("pass@4") == "pass_at_4"
    assert metric_key("member/policy/reward") == "member/policy/reward"
    assert metric_key("/a//b/../c d:e") == "a/b/__/c_d_e"
    columns, data = completion_table([{"prompt": None, "reward": float("nan"), "rewards": {}}])
    assert columns[:4] == ["step", "member", "prompt", "completion"]
    assert data == [[None, None, "", "", None, None, None, None]]
    stores = ("file:///r/mlruns", "./mlruns", "http://host:5000", "sqlite:///m.db", "databricks")
    assert [_is_file_store(u) for u in stores] == [True, True, False, False, False]


# -- tensorboard


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    out["_text"] = {t: len(acc.Tensors(t)) for t in acc.Tags()["tensors"]}
    return out


def test_tensorboard_writes_every_number_at_its_step(tmp_path):
    _feed(TensorBoardTracker(), tmp_path)
    got = _scalars(tmp_path / "tensorboard")
    for step, row in FINITE.items():
        for key, value in row.items():
            assert got[key][step] == pytest.approx(value)
    assert got["member/policy/candidates"] == {1: 8.0}
    assert got["eval/accuracy"] == {0: 0.25} and got["eval/pass_at_4"] == {0: 0.5}
    assert "loss" not in got and "kl" not in got and "note" not in got
    assert "eval/mean_reward" not in got and "eval/step" not in got
    assert got["alerts"] == {2: 1.0}
    assert {"recipe", "completions", "alerts"} <= {t.split("/")[0] for t in got["_text"]}


# -- wandb


def _wandb_file(path: Path) -> list:
    """The records of one offline .wandb file. wandb offline writes no summary file and its
    Python package has no reader, so this one reads the LevelDB-style log (7-byte header, then
    records of 7-byte headers in 32 KiB blocks) into wandb's protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block, out = path.read_bytes(), 7, b"", 32768, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf, pos = buf + data[pos + 7 : pos + 7 + size], pos + 7 + size
        if kind in (1, 4):  # a full record, or the last part of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline runs, oldest run first (wandb names a run started in
    the same second as another with a -1 suffix). wandb's service writes a run's file on its
    own after `finish` returns: each is read once it ends with the run's exit record."""
    out = []
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    for path in sorted(files, key=lambda p: Path(p).parent.name.split("-", 3)[2:]):
        deadline = time.monotonic() + 30
        records = _wandb_file(Path(path))
        while time.monotonic() < deadline and (
            not records or records[-1].WhichOneof("record_type") != "exit"
        ):
            time.sleep(0.1)
            records = _wandb_file(Path(path))
        out += records
    return out


def _wandb_history(records) -> dict[str, dict[int, object]]:
    """Each logged key's values by our step (a value of each row: the x-axis)."""
    out: dict[str, dict[int, object]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            for key, value in row.items():
                out.setdefault(key, {})[row["step"]] = value
    return out


def test_wandb_logs_offline_quietly_and_a_resumed_run_keeps_its_id(tmp_path, capfd):
    _feed(WandbTracker(), tmp_path)
    first = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    _feed(WandbTracker(), tmp_path, status="failed", metrics=[{"step": 3, "reward": 0.75}])
    assert capfd.readouterr() == ("", "")  # nothing on the console
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == first
    folders = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(first in f for f in folders)
    records = _wandb_records(tmp_path)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {first} and runs[0].project == "grpo-ensemble"
    assert runs[0].display_name == tmp_path.name
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["policy"] == RECIPE["policy"]
    history = _wandb_history(records)
    for step, row in FINITE.items():
        for key, value in row.items():
            assert history[key][step] == pytest.approx(value)
    assert history["reward"][3] == 0.75
    assert history["eval/accuracy"] == {0: 0.25} and history["eval/pass_at_4"] == {0: 0.5}
    assert "loss" not in history and "note" not in history
    assert history["alerts"][2] == 1 and history["completions/nrows"] == {2: 2}
    assert history["completions/ncols"] == {2: 9}  # 8 columns and reward/exact_match
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0, 1]  # the resumed run failed


def test_wandb_leaves_no_active_run_and_another_run_alone(tmp_path):
    import wandb

    mine = wandb.init(dir=str(tmp_path), mode="offline", reinit="create_new")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = WandbTracker()
    _feed(tracker, run_dir)
    assert tracker._run is None
    mine.log({"x": 1.0})  # the user's own run goes on (a finished run's log raises)
    mine.finish()


# -- mlflow


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient

    kept = json.loads((run_dir / "mlflow_run.json").read_text())
    return MlflowClient(kept["tracking_uri"]), kept["run_id"]


def _history(client, run_id: str, key: str) -> dict[int, float]:
    """A metric's values by step; `key` as the run logs it (a file store's name: `.` for `/`)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key.replace("/", "."))}


def test_mlflow_logs_params_metrics_and_a_table_and_resumes_the_same_run(tmp_path):
    tracker = MlflowTracker()
    tracker.on_run_start(tmp_path, {**RECIPE, "seed": 5, "data": {"system": "x" * 10_000}})
    first = tracker.run_id
    tracker.on_run_end(tmp_path, {"status": "failed"})
    _feed(MlflowTracker(), tmp_path)  # resumed, its recipe's seed changed
    client, run_id = _mlflow(tmp_path)
    assert run_id == first and (tmp_path / "mlruns").is_dir()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    params = run.data.params
    assert params["policy.model"] == "builtin:tiny-arith-small" and params["policy.n"] == "2"
    assert params["peers"] == "[]" and params["seed"] == "5"  # mlflow keeps a param's value
    assert 250 <= len(params["data.system"]) < 10_000  # cut to mlflow's limit
    for step, row in FINITE.items():
        for key, value in row.items():
            assert _history(client, run_id, key)[step] == pytest.approx(value)
    assert _history(client, run_id, "eval/pass_at_4") == {0: 0.5}
    assert _history(client, run_id, "alerts") == {2: 1.0}
    assert "loss" not in run.data.metrics and "note" not in run.data.metrics
    table = json.loads(
        Path(client.download_artifacts(run_id, "completions/step_000002.json")).read_text()
    )
    assert [r[table["columns"].index("member")] for r in table["data"]] == ["policy", "strong"]
    row = dict(zip(table["columns"], table["data"][1], strict=True))
    assert row["prompt"] == "user: 3+4=" and row["reward/exact_match"] is None
    alerts = client.download_artifacts(run_id, "alerts/step_000002.jsonl", str(tmp_path))
    assert json.loads(Path(alerts).read_text()) == ALERT


def test_mlflow_honours_its_environment_and_needs_no_pandas(tmp_path, monkeypatch, capfd):
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store))  # a plain path: a file store too
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    monkeypatch.setitem(sys.modules, "pandas", None)  # mlflow-skinny brings no pandas
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _feed(MlflowTracker(), run_dir, status="stopped")
    assert capfd.readouterr().err == ""  # no progress bar of artifact transfers
    client, run_id = _mlflow(run_dir)
    run = client.get_run(run_id)
    assert client.get_experiment_by_name("mine").experiment_id == run.info.experiment_id
    assert run.info.status == "KILLED" and run.data.tags["grpo_ensemble.status"] == "stopped"
    assert not (run_dir / "mlruns").exists() and store.is_dir()
    assert _history(client, run_id, "member/policy/reward") == {1: 0.125, 2: 0.375}


# -- recipe errors, plugins, observers


def test_importing_the_package_imports_no_tracker_package(tmp_path):
    code = (
        "import sys, grpo_ensemble\n"
        "from grpo_ensemble.plugins import registry\n"
        "assert set(registry.components('tracker')) >= {'tensorboard', 'wandb', 'mlflow'}\n"
        "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.fixture
def validate(tmp_path, small_recipe):
    """`grpo-ensemble validate` of the small recipe with this `log.report_to`: its exit code."""

    def run(report_to: list[str]) -> int:
        path = tmp_path / "recipe.yaml"
        path.write_text(dump_recipe(small_recipe(log__report_to=report_to)))
        return main(["validate", str(path)])

    return run


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_validate_names_a_missing_tracker_package(validate, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    assert validate(["jsonl", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log.report_to.1" in err, err
    assert f"needs the package '{name}': pip install {name}" in err


def test_validate_refuses_an_unknown_tracker(validate, capsys):
    assert validate(["tensorbord"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log.report_to.0" in err, err
    assert "unknown tracker 'tensorbord'" in err and "tensorboard" in err


def test_validate_builds_the_builtin_trackers_without_starting_them(validate, tmp_path, capsys):
    assert validate(["tensorboard", "wandb", "mlflow"]) == 0, capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]  # no run, no tracker files


class Recorder(Tracker):
    """A user's tracker: notes every call in `calls` (class-wide: a run builds its trackers)."""

    name = "recorder"
    calls: list[tuple[str, dict]] = []

    def on_run_start(self, run_dir, recipe):
        self.calls.append(("on_run_start", {"run_dir": run_dir, "recipe": recipe}))

    def on_step_end(self, step, metrics):
        self.calls.append(("on_step_end", {"step": step, "metrics": metrics}))

    def on_eval(self, step, results):
        self.calls.append(("on_eval", {"step": step, "results": results}))

    def on_completions(self, step, rows):
        self.calls.append(("on_completions", {"step": step, "rows": rows}))

    def on_alert(self, alert):
        self.calls.append(("on_alert", {"alert": alert}))

    def on_run_end(self, run_dir, summary):
        self.calls.append(("on_run_end", {"run_dir": run_dir, "summary": summary}))


class Raising(Tracker):
    name = "raising"

    def on_step_end(self, step, metrics):
        raise ValueError("the tracker's server\nis down")


class UserPlugin:
    @hookimpl
    def register_trackers(self, register):
        register(Recorder)
        register(Raising)


@pytest.fixture
def user_plugin():
    plugins.get_plugin_manager().register(UserPlugin(), name="user-trackers")
    Recorder.calls = []
    yield
    Recorder.calls = []


def _emit_all(observers: Observers, run_dir: Path) -> None:
    observers.emit("on_run_start", run_dir=run_dir, recipe=RECIPE)
    observers.emit("on_eval", step=0, results=EVAL)
    for row in METRICS:
        observers.emit("on_step_end", step=row["step"], metrics=row)
    observers.emit("on_completions", step=2, rows=COMPLETIONS)
    observers.emit("on_alert", alert=ALERT)
    observers.emit("on_run_end", run_dir=run_dir, summary={"status": "completed"})


def test_a_users_tracker_plugin_gets_every_hook(tmp_path, small_recipe, user_plugin):
    assert "recorder" in plugins.components("tracker")
    trackers = build_trackers(small_recipe(log__report_to=["jsonl", "recorder"]))
    assert [type(t) for t in trackers] == [Recorder]
    _emit_all(Observers(trackers), tmp_path)
    assert [c[0] for c in Recorder.calls] == [
        "on_run_start",
        "on_eval",
        "on_step_end",
        "on_step_end",
        "on_completions",
        "on_alert",
        "on_run_end",
    ]
    assert {c[0] for c in Recorder.calls} == set(HOOKS)
    assert Recorder.calls[2][1] == {"step": 1, "metrics": METRICS[0]}
    assert Recorder.calls[5][1] == {"alert": ALERT}


def test_a_tracker_that_raises_is_left_out_with_one_line(
    tmp_path, small_recipe, user_plugin, capsys
):
    trackers = build_trackers(small_recipe(log__report_to=["raising", "recorder"]))
    _emit_all(Observers(trackers), tmp_path)
    err = capsys.readouterr().err
    assert err == (
        "warning: tracker 'raising' left out: its on_step_end raised "
        "ValueError: the tracker's server is down\n"
    )
    assert len(Recorder.calls) == 7  # the others go on


def test_a_tracker_whose_hook_is_called_before_the_run_starts_says_so(tmp_path):
    for cls in (TensorBoardTracker, WandbTracker, MlflowTracker):
        with pytest.raises(RuntimeError, match="on_run_start was not called"):
            cls().on_step_end(1, {"reward": 1.0})
        cls().on_run_end(tmp_path, {"status": "completed"})  # nothing to end: nothing done
    assert list(tmp_path.iterdir()) == []


# -- a training run


def test_a_training_run_reports_to_every_tracker(small_recipe, tmp_path, user_plugin, capsys):
    from grpo_ensemble import train

    recipe = small_recipe(
        log__report_to=["tensorboard", "wandb", "mlflow", "recorder", "raising"],
        log__completions={"every": 1, "prompts": 1, "per_member": 1},
        # fires at the first step: every run has an alert to report
        alerts__zero_variance_groups={"threshold": -1.0, "window": 1},
    )
    result = train(recipe)
    run_dir = result.run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = json.loads((run_dir / "eval.json").read_text())
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [e["step"] for e in evals] == [0, 2]
    assert alerts and json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    expected = {r["step"]: dict(numeric_items(r)) for r in rows}
    for e in evals:
        expected.setdefault(e["step"], {}).update(numeric_items(e, "eval/"))
    assert len(expected[1]) > 20 and "eval/accuracy" in expected[0]

    tb = _scalars(run_dir / "tensorboard")
    wb = _wandb_history(_wandb_records(run_dir))
    client, run_id = _mlflow(run_dir)
    for step, values in expected.items():
        for key, value in values.items():
            assert tb[key][step] == pytest.approx(value, rel=1e-6, abs=1e-12), key  # float32
            assert wb[key][step] == pytest.approx(value, rel=1e-12), key
            assert _history(client, run_id, key)[step] == pytest.approx(value, rel=1e-12), key
    assert tb["alerts"][alerts[-1]["step"]] == len(alerts) and "completions" in str(tb["_text"])
    assert wb["completions/nrows"] == {1: 2, 2: 2}  # one prompt: the policy's and the peer's
    assert client.get_run(run_id).info.status == "FINISHED"

    calls = [c[0] for c in Recorder.calls]
    assert calls[0] == "on_run_start" and calls[-1] == "on_run_end"
    assert calls.count("on_step_end") == 2 and calls.count("on_eval") == 2
    assert calls.count("on_completions") == 2 and calls.count("on_alert") == len(alerts)
    assert [kw["metrics"] for name, kw in Recorder.calls if name == "on_step_end"] == rows
    assert [kw["results"] for name, kw in Recorder.calls if name == "on_eval"] == evals
    assert [kw["alert"] for name, kw in Recorder.calls if name == "on_alert"] == alerts
    assert Recorder.calls[-1][1]["summary"]["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("warning: tracker 'raising' left out") == 1, err
