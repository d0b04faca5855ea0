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
def on_step_end(step: int, metrics: dict) -> None:
    """Observe a finished training step: `metrics` is the object written to metrics.jsonl."""
