"""Plugin hooks. A plugin is a module or object with functions marked `@hookimpl`.

Third-party packages expose one through the `grpo_ensemble` entry-point group:

    [project.entry-points.grpo_ensemble]
    my_plugin = "my_package.plugin_module"
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "grpo_ensemble"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def register_generators(register: Register) -> None:
    """Register generator classes: call ``register(MyGenerator)`` for each.

    A generator samples completions for prompts (see `grpo_ensemble.Generator`). A recipe picks
    it by its `name` in ``policy.generator`` or ``peers[i].generator``.
    """


@hookspec
def register_reward_scorers(register: Register) -> None:
    """Register reward scorer classes: call ``register(MyScorer)`` for each.

    A reward scorer returns one float (or None: no score) per candidate (see
    `grpo_ensemble.RewardScorer`). A recipe picks it by its `name` in ``rewards[i].name`` and
    weights it with ``rewards[i].weight``.
    """


@hookspec
def register_group_evaluators(register: Register) -> None:
    """Register group evaluator classes: call ``register(MyEvaluator)`` for each.

    A group evaluator turns a group's rewards into advantages (see
    `grpo_ensemble.GroupEvaluator`). A recipe picks it by its `name` in ``group.evaluator``.
    """


@hookspec
def register_commands(app) -> None:  # app: typer.Typer
    """Add commands to the ``grpo-ensemble`` CLI: decorate functions with ``@app.command()``."""


@hookspec
def register_trackers(register: Register) -> None:
    """Register tracker classes: call ``register(MyTracker)`` for each.

    A tracker receives a run's records (see `grpo_ensemble.Tracker`); a recipe turns it on by
    its `name` in ``log.report_to``.
    """


# Observer hooks: called on rank 0 while a run goes, with plain JSON-able values, and each
# with `context`, a read-only `RunContext` (run directory, recipe, rank, world size, step) that
# an implementation takes by naming it. A plugin implementing one observes every run; a
# tracker (above) has the same methods and observes the runs that name it. One that raises is
# left out from then on; the run goes on.


@hookspec
def on_run_start(run_dir, recipe: dict, context) -> None:
    """A run starts (or resumes) in `run_dir` (a Path) with the resolved `recipe` (the
    mapping written to recipe.yaml)."""


@hookspec
def on_step_end(step: int, metrics: dict, context) -> None:
    """Observe a finished training step: `metrics` is the object written to metrics.jsonl."""


@hookspec
def on_eval(step: int, results: dict, context) -> None:
    """A held-out evaluation at `step` (0: before training): the row written to eval.json
    (accuracy, ci95, n, mean_reward, pass@k, when)."""


@hookspec
def on_completions(step: int, rows: list, context) -> None:
    """Sample completions of `step` (`log.completions`): the rows written to
    completions.jsonl, one per completion."""


@hookspec
def on_alert(alert: dict, context) -> None:
    """An anomaly alert fired: the row written to alerts.jsonl (step, rule, metric, value,
    threshold, action, message)."""


@hookspec
def on_run_end(run_dir, summary: dict, context) -> None:
    """A run ended: `summary` is what summary.json holds (its `status`: completed, failed or
    stopped)."""
