"""A co-training run from start to end (`policies:` in the recipe; `train` comes here).

The run directory holds the co-training recipe, `metrics.jsonl` (each policy's row under
`policy/<name>/`, and `pair/<A>/<B>/win_rate`), `checkpoints/` (every policy in one
checkpoint per step), `final/<name>/` per policy and `summary.json`; and `policies/<name>/`,
each policy's own run directory (its recipe, metrics, evaluations, alerts, completions and
data report), which `grpo-ensemble report` shows as one run per policy.

Observers (plugins' hooks and trackers) hear of the run once: the merged row at each step,
and each evaluation, alert and completion tagged with its `policy`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .. import dist, stopping
from ..errors import Interrupted, RunError
from ..recipe.cotraining import POLICIES_DIR
from ..rundir import MetricsWriter, StepProgress, write_file, write_recipe
from ..types import POLICY
from .around import (
    TrainResult,
    Where,
    check_disk_space,
    checkpoint_or_stop,
    history,
    resume_from,
    save_final,
    step_or_stop,
    write_data_report,
)
from .console import say, say_row
from .cotrain import Team, TeamStep, build_team, team_step
from .evaluation import EvalResult, evaluate_policy
from .heap import kept_between_steps
from .observers import Observers, Silent
from .records import SUMMARY, Records, completion_rows


def train_team(
    recipe, run_dir: Path, observers: Observers, given: dict, resume, console, where: Where, t0
) -> TrainResult:
    """Build every policy's run, resume, step them together, save and evaluate each."""
    main = dist.is_main()
    note = (lambda line: say(console, f"{line} …")) if console is not None else None
    team = build_team(recipe, run_dir, given, note)
    team.each(lambda name, run: dist.agree(lambda: _prepare(run, console)))
    result = TrainResult(run_dir=run_dir, model_dir=run_dir / "final", metrics=[])
    for name in team.names:
        own = run_dir / POLICIES_DIR / name
        result.policies[name] = TrainResult(own, run_dir / "final" / name, [])
    start = resume_from(team, resume, result, console, where) if resume is not None else 0
    records = {}
    for name, r in team.recipes.items():  # every rank holds every policy's records
        members = [POLICY, *(p.name for p in r.peers)]
        records[name] = Records(
            result.policies[name].run_dir, r, Silent(), members, main, start, t0
        )
    top = _Told(run_dir, observers, main, t0)
    with _end_recorded(team, records, top, result, start, console):
        _run(team, start, result, console, where, records, top)
    return result


def _prepare(run, console) -> None:
    """The policy's own run directory, by the first of its ranks; its disk space checked."""
    if dist.is_main():
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_recipe(run.run_dir, run.recipe)
        write_data_report(run, console)
        check_disk_space(run)


class _Told:
    """The observers, told once for the whole run; the run's own metrics.jsonl and summary."""

    def __init__(self, run_dir: Path, observers: Observers, main: bool, t0: float):
        self.run_dir, self.observers, self.main, self.t0 = run_dir, observers, main, t0

    def emit(self, hook: str, **kwargs) -> None:
        if self.main:
            self.observers.emit(hook, **kwargs)

    def started(self, recipe_data: dict, start: int) -> None:
        self.observers.start(self.run_dir, recipe_data, start)
        self.emit("on_run_start", run_dir=self.run_dir, recipe=recipe_data)

    def evaluated(self, name: str, step: int, row: dict | None) -> None:
        if row is not None:
            self.emit("on_eval", step=step, results={**row, "policy": name})


def _run(team: Team, start: int, result: TrainResult, console, where, records, top) -> None:
    """The evaluations before training, the steps, each final model, the evaluations after."""
    for name, r in team.recipes.items():
        records[name].run_started(
            r.model_dump(mode="json"), history(where, start, f"{POLICIES_DIR}/{name}")
        )
    top.started(team.recipe.model_dump(mode="json"), start)
    if team.recipe.eval.before and start == 0:
        where.during = "the evaluations before training"
        for name, res in team.each(lambda name, run: evaluate_policy(run)).items():
            result.policies[name].before = res
            _evaluated(name, 0, "before", res, records, top, console)
    elif start:
        for name in team.names:
            earlier = records[name].earliest("before")
            if earlier is not None:
                say_row(console, f"of {name} before training (from the run directory)", earlier)
    with kept_between_steps(on=not torch.cuda.is_available()):
        _steps(team, start, result, console, where, records, top)
    where.during = "the saving of the final models"
    team.each(lambda name, run: save_final(run, result.policies[name].model_dir))
    if team.recipe.eval.after:
        where.during = "the evaluations after training"
        where.kept = f"the trained models are in {result.model_dir}"
        where.checkpoint = None
        steps = team.recipe.train.steps
        for name, res in team.each(lambda name, run: evaluate_policy(run)).items():
            result.policies[name].after = res
            _evaluated(name, steps, "after", res, records, top, console)


def _evaluated(name, step, when, res: EvalResult | None, records, top, console) -> None:
    row = records[name].evaluated(step, when, res)
    top.evaluated(name, step, row)
    if row is not None:
        what = f"of {name} {when} training" if when != "during" else f"of {name} at step {step}"
        say_row(console, what, row)


def _steps(team: Team, start: int, result: TrainResult, console, where, records, top) -> None:
    """Steps start+1 … train.steps of every policy together, with checkpoints, bad-update
    accounting, alerts (each policy's rules on its own row), evaluations and stop requests."""
    t, main = team.recipe.train, dist.is_main()
    writers = _writers(team, start, where.checkpoint) if main else {}
    on = main and team.recipe.log.progress
    progress = StepProgress(t.steps, team.recipe.log, on, console, start)
    # a resumed run goes on counting where each policy's metrics left off (rank 0 reads them)
    kept = [writers[f"{POLICIES_DIR}/{n}"].bad_in_a_row if main else 0 for n in team.names]
    bad = dict(zip(team.names, (int(x) for x in dist.all_max(kept)), strict=True))
    saved = start
    if where.checkpoint is None:
        where.kept = "no checkpoint was written"
    for run in team.runs.values():  # the weights each policy samples with are its engine's
        run.policy_generator.sync_weights(run.engine.module)
    with stopping.after_steps(), contextlib.ExitStack() as cleanup:
        cleanup.callback(progress.close)
        for w in writers.values():
            cleanup.callback(w.close)
        for step in range(start + 1, t.steps + 1):
            where.during = f"step {step}"
            on_rollout = _completions(team, step)
            done = step_or_stop(team, step, saved, where, on_rollout, stepper=team_step)
            result.metrics.append(done.merged)
            fired = _recorded(done, step, result, records, top, writers, console)
            for name, row in done.rows.items():
                bad[name] = bad[name] + 1 if row.get("nonfinite_update") else 0
            progress.update(_status(done.rows), fired[-1].rule if fired else None)
            _stop_if_bad(bad, t.max_bad_updates, step, saved)
            _evaluate_during(team, step, records, top, console)
            saved = checkpoint_or_stop(team, step, fired, where, saved)


def _writers(team: Team, start: int, ckpt: Path | None) -> dict[str, MetricsWriter]:
    """The run's metrics.jsonl and each policy's, keeping the rows up to `start` (from the
    checkpoint's copies, where resumed)."""
    writers = {}
    for part in ["", *(f"{POLICIES_DIR}/{n}" for n in team.names)]:
        saved_rows = ckpt / part / "metrics.jsonl" if ckpt is not None else None
        writers[part] = MetricsWriter(team.run_dir / part / "metrics.jsonl", start, saved_rows)
    return writers


def _recorded(done: TeamStep, step: int, result, records, top, writers, console) -> list:
    """The step's rows written, its completions kept, the observers told, each policy's alert
    rules run on its own row; returns the alerts fired."""
    for name, lines in done.logged.items():
        if lines:
            records[name].completions(step, lines)
            tagged = [{**x, "policy": name} for x in lines]
            top.emit("on_completions", step=step, rows=tagged)
    if writers:
        writers[""].write(done.merged)
    top.observers.at(step)
    top.emit("on_step_end", step=step, metrics=done.merged)
    fired = []
    for name, row in done.rows.items():
        result.policies[name].metrics.append(row)
        if writers:
            writers[f"{POLICIES_DIR}/{name}"].write(row)
        for alert in records[name].stepped(row):
            say(console, f"alert: {name}: {alert.message} (step {step}: {alert.action})")
            top.emit("on_alert", alert={**alert.row(), "policy": name})
            fired.append(alert)
    return fired


def _status(rows: dict[str, dict]) -> dict:
    """The progress line's figures: the policies' mean reward, and each policy's."""
    rewards = {n: r.get("reward", float("nan")) for n, r in rows.items()}
    out = {f"member/{n}/reward": v for n, v in rewards.items()}
    return {"reward": sum(rewards.values()) / len(rewards), **out}


def _stop_if_bad(bad: dict[str, int], most: int, step: int, saved: int) -> None:
    for name, count in bad.items():
        if count >= most:
            good = f"; the last checkpoint is step {saved}" if saved else ""
            raise RunError(
                f"{count} updates in a row of policy {name!r} had a NaN or inf loss or "
                f"gradient (steps {step - count + 1}-{step}), so the run stopped{good}"
            )


def _completions(team: Team, step: int):
    """What each policy's step hands its rollout to, where `log.completions` asks: the rows
    of its sample completions (written once every policy's step is done)."""
    how = team.recipe.log.completions
    if how is None or step % how.every:
        return None
    return lambda name, rollout: completion_rows(rollout, step, how)


def _evaluate_during(team: Team, step: int, records, top, console) -> None:
    e = team.recipe.eval
    if not e.every or step % e.every or step == team.recipe.train.steps:
        return
    for name, res in team.each(lambda name, run: evaluate_policy(run)).items():
        _evaluated(name, step, "during", res, records, top, console)


@contextlib.contextmanager
def _end_recorded(team: Team, records, top: _Told, result: TrainResult, start: int, console):
    """Each policy's summary.json and the run's (status, steps, each policy's figures),
    however the run ends; the summary lines on the console when it completed."""
    status = "failed"
    try:
        yield
        status = "completed"
    except (Interrupted, stopping.Stop):
        status = "stopped"
        raise
    finally:
        steps = result.metrics[-1]["step"] if result.metrics else start
        summaries = {}
        for name in team.names:
            res = result.policies[name]
            before = res.before.row(0, "before") if res.before else None
            before = before or records[name].earliest("before")
            after = res.after.row(steps, "after") if res.after else None
            try:
                summaries[name] = records[name].finished(status, steps, before, after)
            except Exception as exc:  # noqa: BLE001 — never hides why the run ended
                say(console, f"warning: {name}'s summary.json not written: {exc}")
        summary = _summary(top, status, steps, summaries)
        if status == "completed":
            _say_summary(console, summary)


def _summary(top: _Told, status: str, steps: int, summaries: dict) -> dict:
    import time

    summary = {
        "status": status,
        "steps": steps,
        "seconds": round(time.time() - top.t0, 1),
        "policies": summaries,
        "run_dir": str(top.run_dir),
        "report": f"grpo-ensemble report {top.run_dir} -o {top.run_dir / 'report.html'}",
    }
    if top.main:
        write_file(top.run_dir / SUMMARY, json.dumps(summary, indent=1, default=str) + "\n")
    top.emit("on_run_end", run_dir=top.run_dir, summary=summary)
    return summary


def _say_summary(console, summary: dict) -> None:
    seconds = summary["seconds"]
    took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    say(
        console,
        f"summary: {summary['steps']} steps of {len(summary['policies'])} policies in {took}",
    )
    for name, s in summary["policies"].items():
        line = f"  {name}:"
        if s["before"] and s["after"]:
            b, a = 100 * s["before"]["accuracy"], 100 * s["after"]["accuracy"]
            line += f" held-out accuracy {b:.1f}% → {a:.1f}% ({a - b:+.1f} points);"
        say(console, f"{line} alerts: {s['alerts']}")
    say(console, f"  run directory: {summary['run_dir']}; report: {summary['report']}")
