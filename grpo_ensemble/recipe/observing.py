"""The recipe's sections on watching a run: `log` (trackers, sample completions, progress
lines) and `alerts` (docs/monitoring.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .base import _Config


class CompletionsConfig(_Config):
    every: int = Field(10, ge=1, description="Log sample completions every this many steps.")
    prompts: int = Field(2, ge=1, description="Prompts (groups) logged each time.")
    per_member: int = Field(2, ge=1, description="Completions logged per member and prompt.")


class LogConfig(_Config):
    progress: bool = Field(True, description="Show a progress bar.")
    report_to: list[str] = Field(
        [],
        description="Trackers besides metrics.jsonl (always written): tensorboard, wandb "
        "(offline unless WANDB_MODE says otherwise), mlflow (a local file store unless "
        "MLFLOW_TRACKING_URI says otherwise), or a plugin's tracker by name.",
    )
    completions: CompletionsConfig | None = Field(
        CompletionsConfig(),
        description="Sample completions (prompt, each member's completions, rewards per "
        "scorer, advantages, whether injected) to completions.jsonl and the trackers "
        "(null: none).",
    )
    line_every_s: float = Field(
        30.0,
        gt=0,
        description="When the output is not a terminal (a log file, CI, a scheduler): a plain "
        "progress line at most this often, in place of the progress bar.",
    )


AlertAction = Literal["warn", "checkpoint", "stop"]


class AlertRule(_Config):
    enabled: bool = Field(True, description="Check this rule.")
    threshold: float = Field(..., description="The rule's threshold (see docs/monitoring.md).")
    window: int = Field(
        10, ge=1, description="Steps of history the rule compares against or requires."
    )
    action: AlertAction = Field(
        "warn",
        description="warn: a line and a row in alerts.jsonl; checkpoint: also save a "
        "checkpoint; stop: save a checkpoint and stop the run (exit code 3).",
    )


def _rule(threshold: float, window: int = 10, action: str = "warn") -> AlertRule:
    return AlertRule(threshold=threshold, window=window, action=action)


class AlertsConfig(_Config):
    @model_validator(mode="before")
    @classmethod
    def _over_the_defaults(cls, data: Any) -> Any:
        """A rule written in part keeps its defaults for the rest (`{action: stop}`)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is not None and isinstance(value, dict) and field.default is not None:
                out[name] = {**field.default.model_dump(), **value}
        return out

    nonfinite: AlertRule = Field(
        _rule(0.5, 1), description="A NaN or inf loss or gradient (the update was skipped)."
    )
    kl_spike: AlertRule = Field(
        _rule(5.0), description="kl above threshold × its median over the last window steps."
    )
    reward_collapse: AlertRule = Field(
        _rule(0.5, 5),
        description="The mean reward of the last window steps below threshold × the best "
        "such mean of the run.",
    )
    zero_variance_groups: AlertRule = Field(
        _rule(0.9, 5),
        description="More than this share of the groups had equal rewards (no learning "
        "signal), in each of the last window steps.",
    )
    entropy_collapse: AlertRule = Field(
        _rule(0.05, 3), description="entropy below threshold in each of the last window steps."
    )
    length_blowup: AlertRule = Field(
        _rule(2.0),
        description="completion_len above threshold × its median over the last window steps.",
    )
    truncation: AlertRule = Field(
        _rule(0.5, 3),
        description="More than this share of the completions cut at max_new_tokens, in each of "
        "the last window steps.",
    )
    clip_fraction: AlertRule = Field(
        _rule(0.3, 3), description="clip_fraction above threshold in each of the last window steps."
    )
    grad_norm_spike: AlertRule = Field(
        _rule(10.0),
        description="grad_norm above threshold × its median over the last window steps.",
    )
    member_reward_drift: AlertRule = Field(
        _rule(0.3, 10),
        description="A peer's mean reward over the last window steps differs by more than "
        "threshold from its mean over the first window steps (peers do not train: a drift "
        "means the data or a scorer changed).",
    )
    scorer_failures: AlertRule = Field(
        _rule(0.0, 1),
        description="More than threshold groups in a step lost to a failing scorer, evaluator "
        "or generator (skipped_groups, scorer_faults/*, member/*/generator_faults).",
    )
