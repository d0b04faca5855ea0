"""Built-in trackers: tensorboard, wandb, mlflow (metrics.jsonl is always written).

Each imports its package in `__init__`, never at module level: importing grpo_ensemble must not
import them, and a missing package must raise `ImportError` where `build_trackers` turns it
into a recipe error. Each keeps its state on the instance and closes what it opened at run end
(no active wandb run, no open writer), so several runs in one process do not mix.

Every numeric value is logged at its step: a training step's metrics under their own names, an
evaluation's under ``eval/<name>``; a value that is not a finite number is left out. Alerts
count as the scalar ``alerts`` (alerts fired since the run started or resumed) and their
messages as text; completions as a table.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ...rundir import write_file
from ..hookspecs import hookimpl
from ..interfaces import Tracker

WANDB_ID_FILE = "wandb_run.json"
MLFLOW_ID_FILE = "mlflow_run.json"
COMPLETION_COLUMNS = (
    "step",
    "member",
    "prompt",
    "completion",
    "reward",
    "advantage",
    "injected",
    "finished",
)
# the characters every tracker takes in a metric name (mlflow's set, without the colon that
# it refuses on Windows, and without spaces, which tensorboard replaces)
_BAD_KEY_CHARS = re.compile(r"[^\w./-]")


def metric_key(key: str) -> str:
    """`key` as a name every tracker accepts: ``pass@4`` → ``pass_at_4``, other odd characters
    → ``_``, and no empty, ``.`` or ``..`` path parts (mlflow refuses a name that is not
    already a normalised path)."""
    key = _BAD_KEY_CHARS.sub("_", key.replace("@", "_at_"))
    parts = [p if p not in (".", "..") else p.replace(".", "_") for p in key.split("/") if p]
    return "/".join(parts) or "_"


def numeric_items(row: Mapping, prefix: str = "") -> Iterator[tuple[str, float]]:
    """The finite numbers of `row` as (name, value), nested mappings as ``a/b``; `step`, text,
    None, booleans, NaN and infinities are left out (a tracker takes none of them as a
    scalar, and one odd value must not stop the others)."""
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from numeric_items(value, f"{name}/")
        elif key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        elif math.isfinite(value):
            yield metric_key(name), float(value)


def _prompt_text(prompt: Any) -> str:
    """A prompt as one string: chat messages as ``role: content`` lines."""
    if isinstance(prompt, list):
        lines = []
        for m in prompt:
            is_msg = isinstance(m, Mapping)
            lines.append(f"{m.get('role', '?')}: {m.get('content', '')}" if is_msg else str(m))
        return "\n".join(lines)
    return "" if prompt is None else str(prompt)


def completion_table(rows: list) -> tuple[list[str], list[list]]:
    """Completion rows as (columns, data): the fixed columns, then ``reward/<scorer>`` for each
    scorer any row has (None where a row's scorer did not score it)."""
    scorers = sorted({k for r in rows for k in (r.get("rewards") or {})})
    columns = [*COMPLETION_COLUMNS, *(f"reward/{s}" for s in scorers)]
    data = []
    for r in rows:
        own = {c: r.get(c) for c in COMPLETION_COLUMNS}
        own["prompt"] = _prompt_text(own["prompt"])
        own["completion"] = "" if own["completion"] is None else str(own["completion"])
        own["reward"], own["advantage"] = _finite(own["reward"]), _finite(own["advantage"])
        rewards = r.get("rewards") or {}
        data.append([*own.values(), *(_finite(rewards.get(s)) for s in scorers)])
    return columns, data


def _finite(value: Any) -> float | None:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = real and math.isfinite(value)
    return float(value) if ok else None


def _alert_line(alert: Mapping) -> str:
    message = alert.get("message") or f"{alert.get('metric')} = {alert.get('value')}"
    return f"step {alert.get('step')}: {alert.get('rule')} ({alert.get('action')}): {message}"


def _read_json(path: Path) -> dict:
    """A tracker's small state file of the run directory ({} when absent or unreadable: the
    tracker then starts a new run rather than failing)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _completed(summary: Mapping) -> bool:
    return summary.get("status") == "completed"


class TensorBoardTracker(Tracker):
    """Event files under ``<run_dir>/tensorboard/``: scalars, completions and alerts as text."""

    name = "tensorboard"

    def __init__(self):
        import tensorboard  # noqa: F401 — the package's own name in the ImportError
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self._writer = None
        self._alerts = 0

    @property
    def writer(self):
        if self._writer is None:
            raise RuntimeError("on_run_start was not called")
        return self._writer

    def on_run_start(self, run_dir, recipe: dict) -> None:
        self.on_run_end(run_dir, {})  # a second start without an end: close the first
        self._writer = self._writer_cls(log_dir=str(Path(run_dir) / "tensorboard"))
        self._alerts = 0
        # four-space indent: a code block in tensorboard's markdown
        text = "\n".join(
            f"    {line}" for line in json.dumps(recipe, indent=1, default=str).splitlines()
        )
        self.writer.add_text("recipe", text, 0)

    def _scalars(self, step: int, row: Mapping, prefix: str = "") -> None:
        for key, value in numeric_items(row, prefix):
            self.writer.add_scalar(key, value, step)

    def on_step_end(self, step: int, metrics: dict) -> None:
        self._scalars(step, metrics)

    def on_eval(self, step: int, results: dict) -> None:
        self._scalars(step, results, "eval/")

    def on_completions(self, step: int, rows: list) -> None:
        columns, data = completion_table(rows)
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in data]
        self.writer.add_text("completions", "\n".join(lines), step)

    def on_alert(self, alert: dict) -> None:
        step = int(alert.get("step") or 0)
        self._alerts += 1
        self.writer.add_scalar("alerts", self._alerts, step)
        self.writer.add_text("alerts", _alert_line(alert), step)

    def on_run_end(self, run_dir, summary: dict) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _cell(value: Any) -> str:
    """A markdown table cell: its pipes escaped, its lines joined by <br>."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("", "0", "false", "no", "off")


class WandbTracker(Tracker):
    """A wandb run in ``<run_dir>/wandb`` (offline unless WANDB_MODE says otherwise); its id
    is kept in the run directory so that a resumed run continues the same wandb run."""

    name = "wandb"

    def __init__(self):
        import wandb

        self._wandb = wandb
        self._run = None
        self._alerts: list[list] = []

    @property
    def run(self):
        if self._run is None:
            raise RuntimeError("on_run_start was not called")
        return self._run

    def on_run_start(self, run_dir, recipe: dict) -> None:
        wandb, run_dir = self._wandb, Path(run_dir)
        self.on_run_end(run_dir, {"status": "stopped"})  # a second start: end the first
        id_file = run_dir / WANDB_ID_FILE
        run_id = _read_json(id_file).get("id")
        if not isinstance(run_id, str) or not run_id:
            run_id = secrets.token_hex(6)  # wandb's own generator moved between versions
            write_file(id_file, json.dumps({"id": run_id}) + "\n")
        settings = wandb.Settings(
            silent=_env_flag("WANDB_SILENT", True),
            # no capture of the run's stdout and stderr unless asked: the progress bar and the
            # launcher's own redirections stay as they are
            console=os.environ.get("WANDB_CONSOLE", "off"),
        )
        self._run = wandb.init(
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            project=os.environ.get("WANDB_PROJECT", "grpo-ensemble"),
            config=recipe,
            allow_val_change=True,  # a resumed run's recipe may change a few values
            name=run_dir.name,
            id=run_id,
            resume="allow",
            # a run of its own, logged through its object: another active run (the user's, or
            # one of an earlier training run in this process) is neither finished nor used
            reinit="create_new",
            settings=settings,
        )
        # the x-axis is our step, a value of each row, not wandb's own row counter: a resumed
        # run logs again the steps after its checkpoint, and wandb ignores (and warns about)
        # any row whose own step is not above the last one
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step", step_sync=True)
        self._alerts = []

    def _log(self, step: int, values: Mapping[str, Any]) -> None:
        self.run.log({**values, "step": step})

    def on_step_end(self, step: int, metrics: dict) -> None:
        self._log(step, dict(numeric_items(metrics)))

    def on_eval(self, step: int, results: dict) -> None:
        self._log(step, dict(numeric_items(results, "eval/")))

    def on_completions(self, step: int, rows: list) -> None:
        columns, data = completion_table(rows)
        self._log(step, {"completions": self._wandb.Table(columns=columns, data=data)})

    def on_alert(self, alert: dict) -> None:
        step = int(alert.get("step") or 0)
        self._alerts.append([step, str(alert.get("rule")), _alert_line(alert)])
        # every alert so far, in one table: offline there is no other place for the text
        table = self._wandb.Table(columns=["step", "rule", "message"], data=list(self._alerts))
        self._log(step, {"alerts": len(self._alerts), "alert_messages": table})
        if not self.run.offline and self.run.settings.mode != "disabled":
            self.run.alert(
                title=f"grpo-ensemble: {alert.get('rule')}",
                text=_alert_line(alert),
                level=self._wandb.AlertLevel.WARN,
            )

    def on_run_end(self, run_dir, summary: dict) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        run.summary.update({"status": summary.get("status"), **dict(numeric_items(summary))})
        run.finish(exit_code=0 if _completed(summary) else 1)


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A nested recipe as (dotted key, leaf value): mappings by key, lists by index."""
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(value, list | tuple) and value:
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), value


def _is_file_store(uri: str) -> bool:
    """A file: URI or a plain path (a one-letter scheme: a Windows drive), not mlflow's
    scheme-less ``databricks``."""
    plain = len(urlparse(uri).scheme) <= 1 and not uri.startswith("databricks")
    return plain or uri.startswith("file:")


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class MlflowTracker(Tracker):
    """An mlflow run per training run, in MLFLOW_TRACKING_URI or a file store at
    ``<run_dir>/mlruns``; a resumed run continues the run whose id the run directory keeps.
    In a file store (a ``file:`` URI or a path) metric names take ``.`` for ``/``.
    It logs through its own client, never the fluent API's process-wide active run."""

    name = "mlflow"

    def __init__(self):
        import mlflow  # noqa: F401 — the package's own name in the ImportError
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as max_len
        except ImportError:  # older mlflow: its smallest limit
            max_len = 250
        self._client_cls, self._metric, self._param = MlflowClient, Metric, Param
        self._max_len = int(max_len)
        self._client = None
        self.run_id: str | None = None
        self._alerts: list[dict] = []
        self._slash = "/"

    @property
    def client(self):
        if self._client is None or self.run_id is None:
            raise RuntimeError("on_run_start was not called")
        return self._client

    def on_run_start(self, run_dir, recipe: dict) -> None:
        run_dir = Path(run_dir)
        self.on_run_end(run_dir, {"status": "stopped"})  # a second start: end the first
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        file_store = _is_file_store(uri)
        if file_store:
            # mlflow 3 refuses a file store unless told, but its database store needs
            # sqlalchemy, which mlflow-skinny lacks
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = self._client_cls(tracking_uri=uri)
        id_file = run_dir / MLFLOW_ID_FILE
        kept = _read_json(id_file)
        run_id = kept.get("run_id") if kept.get("tracking_uri") == uri else None
        if run_id and self._continue(client, run_id):
            params = client.get_run(run_id).data.params
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "grpo-ensemble")
            run = client.create_run(self._experiment(client, experiment), run_name=run_dir.name)
            run_id, params = run.info.run_id, {}
            write_file(id_file, json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n")
        self._client, self.run_id, self._alerts = client, run_id, []
        # a file store keeps each metric in a file named by it: `reward` and
        # `reward/exact_match` cannot both be files there, so its names take `.` for `/`
        self._slash = "." if file_store else "/"
        self._log_params(recipe, params)

    @staticmethod
    def _continue(client, run_id: str) -> bool:
        """Mark a kept run running again; False when the store no longer has it (or has it
        deleted: what it logged would be out of sight)."""
        try:
            if client.get_run(run_id).info.lifecycle_stage == "deleted":
                return False
            client.update_run(run_id, status="RUNNING")
        except Exception:  # noqa: BLE001 — gone from the store: a new run then
            return False
        return True

    @staticmethod
    def _experiment(client, name: str) -> str:
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client.create_experiment(name)
            except Exception:  # noqa: BLE001 — created meanwhile by another run
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def _log_params(self, recipe: dict, logged: Mapping[str, str]) -> None:
        """The recipe as params, dotted keys, values cut to mlflow's limit. A resumed run
        keeps the values it has: mlflow refuses to change a logged param."""
        params = []
        for key, value in _flatten(recipe):
            key = metric_key(key.replace("/", "."))[:250]
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if key not in logged:
                params.append(self._param(key, text[: self._max_len]))
        for chunk in _chunks(params, 100):  # mlflow's limit per batch
            self.client.log_batch(self.run_id, params=chunk)

    def _log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [
            self._metric(k.replace("/", self._slash), v, now, step) for k, v in values.items()
        ]
        for chunk in _chunks(metrics, 1000):  # mlflow's limit per batch
            self.client.log_batch(self.run_id, metrics=chunk)

    def on_step_end(self, step: int, metrics: dict) -> None:
        self._log_metrics(step, dict(numeric_items(metrics)))

    def on_eval(self, step: int, results: dict) -> None:
        self._log_metrics(step, dict(numeric_items(results, "eval/")))

    def on_completions(self, step: int, rows: list) -> None:
        # one file per step, in the layout of mlflow's tables ("split": columns, data), never
        # `log_table`: that needs pandas, downloads the table to append to it (with a progress
        # bar) and adds to a tag that mlflow caps at 8000 characters; and a resumed run
        # rewrites the files of its later steps instead of appending to them
        columns, data = completion_table(rows)
        text = json.dumps({"columns": columns, "data": data}, ensure_ascii=False)
        self.client.log_text(self.run_id, text, f"completions/step_{step:06d}.json")

    def on_alert(self, alert: dict) -> None:
        step = int(alert.get("step") or 0)
        self._alerts.append(dict(alert))
        self._log_metrics(step, {"alerts": float(len(self._alerts))})
        at_step = [a for a in self._alerts if a.get("step") == alert.get("step")]
        text = "".join(json.dumps(a, default=str, ensure_ascii=False) + "\n" for a in at_step)
        self.client.log_text(self.run_id, text, f"alerts/step_{step:06d}.jsonl")

    def on_run_end(self, run_dir, summary: dict) -> None:
        client, run_id = self._client, self.run_id
        self._client = self.run_id = None
        if client is None or run_id is None:
            return
        status = summary.get("status")
        done = {"completed": "FINISHED", "stopped": "KILLED"}.get(str(status), "FAILED")
        client.set_tag(run_id, "grpo_ensemble.status", str(status))
        client.set_terminated(run_id, status=done)


@hookimpl
def register_trackers(register):
    for cls in (TensorBoardTracker, WandbTracker, MlflowTracker):
        register(cls)
