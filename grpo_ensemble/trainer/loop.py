"""A run from start to end: resume, the steps, checkpoints, interruption, evaluation, final model.

`train()` is the public entry point (the CLI's `train` calls it). The step itself is
`step.grpo_step`; this module is what happens around it over hours or days.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from .. import dist, stopping
from ..errors import GrpoEnsembleError, Interrupted, RunError, UserError
from ..plugins.interfaces import Generator, GroupEvaluator
from ..recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from ..rundir import (
    MetricsWriter,
    StepProgress,
    prepare_run_dir,
    write_file,
)
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
from .console import say, say_eval, say_row, say_summary
from .deepspeed import init_distributed
from .evaluation import EvalResult, evaluate_policy
from .heap import kept_between_steps
from .observers import Observers, build_trackers
from .records import Records, completion_rows
from .setup import Run, build_run, seed_everything


def train(
    recipe: Recipe | str | Path,
    *,
    generators: Mapping[str, Generator] | None = None,
    reward_scorers: Sequence[tuple] | None = None,
    group_evaluator: GroupEvaluator | None = None,
    train_data=None,
    eval_data=None,
    overrides: Sequence[str] = (),
    resume: str | None = None,
    console=None,
    source: str | Path | None = None,
    plugins: Sequence = (),
    eval_scorer=None,
    model: torch.nn.Module | None = None,
) -> TrainResult:
    """Run a recipe end to end. Components given as objects replace the recipe's named ones:
    `generators` maps member names ("policy" or a peer's name) to Generator instances,
    `reward_scorers` is a list of (scorer, weight) or (scorer, weight, {"on_error": …,
    "timeout_s": …}) where a scorer may be a plain function (TRL's signature or a function of
    the samples), `group_evaluator` an evaluator instance; `train_data` and `eval_data` (a
    `datasets.Dataset` or a list of dicts) replace `data.train` and `data.eval`.
    `resume` is "auto" (the newest checkpoint in the run directory, if any) or a checkpoint
    directory. `source`: the file a `Recipe` object was read from, if any. `plugins`:
    modules or objects with hook implementations, registered for this run only (as an
    installed plugin's, without an entry point). `eval_scorer`: a reward scorer or function
    that judges the held-out evaluation in place of `eval.scorer`. `model`: the policy's
    weights as a module, a transformers causal LM or a PEFT model whose adapters train
    (`policy.model` still names its tokenizer and, with adapters, its base).

    Under `torchrun` or `deepspeed` every rank calls this with the same recipe; rank 0 alone
    writes the run directory, the progress bar and the final model. Every rank returns the
    same (global) metrics.
    """
    where, t0 = Where(), time.time()
    with _stops_reported(where), run_plugins(plugins):
        recipe, source = _resolved(recipe, overrides, source)
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        seed_everything(recipe.seed)
        hf_logging.disable_progress_bar()  # weight loading/saving bars are noise in a run log
        init_distributed(recipe.train.dist_timeout_s)
        main = dist.is_main()
        run_dir = dist.agree(
            lambda: prepare_run_dir(recipe, write=main, resuming=resume is not None, source=source)
        )
        # a tracker whose package is missing stops the run before anything is built
        observers = Observers(dist.agree(lambda: build_trackers(recipe) if main else []))
        data = {"train": train_data, "eval": eval_data}
        console = console if main else None
        if recipe.policies is not None:
            from .coloop import train_team

            given = dict(generators=generators, model=model, reward_scorers=reward_scorers)
            given |= dict(group_evaluator=group_evaluator, data=data, eval_scorer=eval_scorer)
            return train_team(recipe, run_dir, observers, given, resume, console, where, t0)
        note = (lambda line: say(console, f"{line} …")) if console is not None else None
        run = build_run(
            recipe,
            run_dir,
            generators,
            reward_scorers,
            group_evaluator,
            data,
            note,
            eval_scorer,
            model,
        )
        if main:
            write_data_report(run, console)
        dist.agree(lambda: check_disk_space(run) if main else None)
        result = TrainResult(run_dir=run_dir, model_dir=run_dir / "final", metrics=[])
        start = resume_from(run, resume, result, console, where) if resume is not None else 0
        members = [m.name for m in run.ensemble.members]
        records = Records(run_dir, recipe, observers, members, main, start, t0)
        with _end_recorded(records, result, start, console):
            _run_steps(run, start, result, console, where, records)
        return result


def _run_steps(run: Run, start: int, result: TrainResult, console, where, records) -> None:
    """The evaluation before training (a resumed run shows the one its directory holds), the
    steps, the final model and the evaluation after training."""
    records.run_started(run.recipe.model_dump(mode="json"), history(where, start))
    if run.recipe.eval.before and start == 0:
        where.during = "the evaluation before training"
        result.before = evaluate_policy(run)
        records.evaluated(0, "before", result.before)
        say_eval(console, "before", result.before)
    elif start:
        earlier = records.earliest("before")
        if earlier is not None:
            say_row(console, "before training (from the run directory)", earlier)
    # a CPU step reuses the memory the step before it freed (heap.py); a GPU's is torch's own
    with kept_between_steps(on=not torch.cuda.is_available()):
        _steps(run, start, result, console, where, records)
    _finish(run, result, console, where, records)


@contextlib.contextmanager
def run_plugins(given: Sequence):
    """The caller's plugin objects registered for the run, and gone after it. One whose hooks
    cannot work is a user error naming it (given in code, it is fixed in code)."""
    from ..plugins.registry import get_plugin_manager, hook_problem

    pm, names = get_plugin_manager(), []
    try:
        for i, plugin in enumerate(given):
            if pm.is_registered(plugin):  # installed too: its entry point registered it
                continue
            problem = hook_problem(plugin)
            if problem is not None:
                raise UserError(f"plugins[{i}]: {problem}")
            name = f"plugins[{i}] {getattr(plugin, '__name__', type(plugin).__name__)}"
            pm.register(plugin, name=name)
            names.append(name)
        yield
    finally:
        for name in names:
            pm.unregister(name=name)


@contextlib.contextmanager
def _end_recorded(records: Records, result: TrainResult, start: int, console):
    """summary.json and the observers' on_run_end, however the run ends (its status:
    completed, stopped or failed); the summary lines on the console when it completed."""
    status = "failed"
    try:
        yield
        status = "completed"
    except (Interrupted, stopping.Stop):
        status = "stopped"
        raise
    finally:
        steps = result.metrics[-1]["step"] if result.metrics else start
        before = _row_of(result.before, 0, "before") or records.earliest("before")
        after = _row_of(result.after, steps, "after")
        try:
            summary = records.finished(status, steps, before, after)
        except Exception as exc:  # noqa: BLE001 — never hides why the run ended
            say(console, f"warning: summary.json not written: {exc}")
        else:
            if status == "completed":
                say_summary(console, summary)


def _row_of(res: EvalResult | None, step: int, when: str) -> dict | None:
    return None if res is None else res.row(step, when)


def _finish(run: Run, result: TrainResult, console, where: Where, records: Records) -> None:
    """The final model, then the evaluation after training: one that fails or is stopped does
    not lose the model."""
    where.during = "the saving of the final model"
    save_final(run, result.model_dir)
    if run.recipe.eval.after:
        where.during = "the evaluation after training"
        where.kept = f"the trained model is in {result.model_dir}"
        where.checkpoint = None  # the training is done: nothing to continue
        result.after = _evaluate_after(run, result.model_dir, console)
        records.evaluated(run.recipe.train.steps, "after", result.after)


@contextlib.contextmanager
def _stops_reported(where: Where):
    """Stop signals handled as `stopping` says inside the block; one that stops the run at
    once becomes `Interrupted` (exit code 128 + signal), saying where the run was and what it
    kept."""
    with stopping.handling():
        try:
            yield
        except stopping.Stop as stop:
            exc = Interrupted(
                f"stopped by {stop.name} during {where.during}; {where.kept}",
                exit_code=128 + stop.signum,
                resumable=where.checkpoint is not None,
            )
            exc.agreed = True  # every rank gets the signal from its launcher; rank 0 prints it
            raise exc from None


def _resolved(recipe: Recipe | str | Path, overrides: Sequence[str], source):
    """The Recipe to run, `overrides` applied, and the file it was read from (the run
    directory's copy never replaces it)."""
    if not isinstance(recipe, Recipe):
        return load_recipe(recipe, list(overrides)), recipe
    if overrides:
        data = recipe.model_dump(mode="json")
        recipe = recipe_from_dict(data, overridden=apply_overrides(data, list(overrides)))
    return recipe, source


def _evaluate_after(run: Run, model_dir: Path, console) -> EvalResult | None:
    """The evaluation after training; if it fails, the line says where the (already saved)
    model is (a stop signal says so in its own line)."""
    try:
        after = evaluate_policy(run)
    except GrpoEnsembleError:
        say(console, f"the evaluation after training failed; the trained model is in {model_dir}")
        raise
    say_eval(console, "after", after)
    return after


def _steps(run: Run, start: int, result: TrainResult, console, where: Where, records) -> None:
    """Steps start+1 … train.steps, with checkpoints, bad-update accounting, alerts,
    evaluations during training and stop requests."""
    t = run.recipe.train
    main = dist.is_main()
    saved_rows = where.checkpoint / "metrics.jsonl" if where.checkpoint is not None else None
    metrics_path = run.run_dir / "metrics.jsonl"
    writer = MetricsWriter(metrics_path, keep_until=start, saved=saved_rows) if main else None
    progress = StepProgress(
        t.steps, run.recipe.log, main and run.recipe.log.progress, console, start
    )
    # a resumed run goes on counting where its metrics left off (rank 0 reads them)
    bad_in_a_row = int(dist.all_max([writer.bad_in_a_row if writer is not None else 0])[0])
    saved = start
    if where.checkpoint is None:
        where.kept = "no checkpoint was written"
    # the weights the policy samples with are the engine's, also after a resume
    run.policy_generator.sync_weights(run.engine.module)
    with stopping.after_steps(), contextlib.ExitStack() as cleanup:
        cleanup.callback(progress.close)
        if writer is not None:
            cleanup.callback(writer.close)
        for step in range(start + 1, t.steps + 1):
            where.during = f"step {step}"
            metrics = step_or_stop(run, step, saved, where, _sampler_of(run, step, records))
            result.metrics.append(metrics)
            if writer is not None:
                writer.write(metrics)
            fired = records.stepped(metrics)
            for alert in fired:
                say(console, f"alert: {alert.message} (step {alert.step}: {alert.action})")
            progress.update(metrics, fired[-1].rule if fired else None)
            bad_in_a_row = bad_in_a_row + 1 if metrics.get("nonfinite_update") else 0
            if bad_in_a_row >= t.max_bad_updates:
                good = f"; the last checkpoint is step {saved}" if saved else ""
                raise RunError(
                    f"{bad_in_a_row} updates in a row had a NaN or inf loss or gradient "
                    f"(steps {step - bad_in_a_row + 1}-{step}), so the run stopped{good}"
                )
            _evaluate_during(run, step, records, console)
            saved = checkpoint_or_stop(run, step, fired, where, saved)


def _sampler_of(run: Run, step: int, records: Records):
    """What the step hands its rollout to: the sample completions `log.completions` asks for
    at this step, or None."""
    how = run.recipe.log.completions
    if how is None or step % how.every:
        return None
    return lambda rollout: records.completions(step, completion_rows(rollout, step, how))


def _evaluate_during(run: Run, step: int, records: Records, console) -> None:
    """The held-out evaluation every `eval.every` steps (the last step's is the evaluation
    after training); with `eval.keep_best` the best model so far in best/."""
    e = run.recipe.eval
    if not e.every or step % e.every or step == run.recipe.train.steps:
        return
    res = evaluate_policy(run)
    if res is None:
        return
    earlier = [r["accuracy"] for r in records.evals if r.get("when") == "during"]
    records.evaluated(step, "during", res)
    say_eval(console, f"at step {step} of", res)
    if e.keep_best and (not earlier or res.accuracy > max(earlier)):
        best = run.run_dir / "best"
        save_final(run, best)
        if dist.is_main():
            write_file(best / "best.json", json.dumps(res.row(step, "during"), indent=1) + "\n")
        say(console, f"best model so far (step {step}) in {best}")
