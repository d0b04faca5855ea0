"""Built-in reward scorers. Each returns one float per sample, in order."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Sequence

from ...errors import UserError
from ...types import Sample
from ..hookspecs import hookimpl
from ..interfaces import Progress, RewardScorer

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _field_name(field) -> str:
    if not isinstance(field, str):
        raise TypeError(f"field must be the name of a prompt field, got {field!r}")
    return field


def _answer(sample: Sample, field: str) -> str:
    if field not in sample.row:
        raise UserError(f"prompt {sample.prompt.index}: no {field!r} field for the reward")
    return str(sample.row[field])


class ExactMatch(RewardScorer):
    """1.0 when the completion, stripped, equals the answer field (optionally case-folded)."""

    name = "exact_match"

    def __init__(self, field: str = "answer", ignore_case: bool = False):
        self.field = _field_name(field)
        self.ignore_case = bool(ignore_case)

    def _norm(self, text: str) -> str:
        text = text.strip()
        return text.casefold() if self.ignore_case else text

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [
            float(self._norm(s.completion) == self._norm(_answer(s, self.field))) for s in samples
        ]


class NumericMatch(RewardScorer):
    """1.0 when the last number in the completion equals the numeric answer within `tolerance`."""

    name = "numeric_match"

    def __init__(self, field: str = "answer", tolerance: float = 1e-6):
        self.field = _field_name(field)
        self.tolerance = float(tolerance)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        out = []
        for s in samples:
            found = _NUMBER.findall(s.completion)
            try:
                got, want = float(found[-1]), float(_answer(s, self.field))
            except (IndexError, ValueError):
                out.append(0.0)
                continue
            out.append(float(math.isfinite(got) and abs(got - want) <= self.tolerance))
        return out


class RegexFormat(RewardScorer):
    """1.0 when the completion matches `pattern` (whole text with `fullmatch`, else anywhere)."""

    name = "regex_format"

    def __init__(self, pattern: str, fullmatch: bool = True):
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as exc:
            raise UserError(f"regex_format: bad pattern {pattern!r}: {exc}") from None
        self.fullmatch = bool(fullmatch)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        match = self.pattern.fullmatch if self.fullmatch else self.pattern.search
        return [float(match(s.completion.strip()) is not None) for s in samples]


class LengthPenalty(RewardScorer):
    """−per_token × (completion tokens beyond `max_tokens`): 0 for completions within budget."""

    name = "length_penalty"

    def __init__(self, max_tokens: int = 0, per_token: float = 0.01):
        self.max_tokens = int(max_tokens)
        self.per_token = float(per_token)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [
            -self.per_token * max(0, len(s.candidate.token_ids) - self.max_tokens) for s in samples
        ]


# what TRL hands a reward function besides the data set's other columns
TRL_ARGUMENTS = (
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_metric",
    "log_extra",
)


def trl_style(fn) -> bool:
    """True when `fn` takes TRL's reward arguments (`completions`, `prompts`, or any keyword
    via **kwargs) rather than the project's one list of samples."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the project's own convention
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD or p.name in TRL_ARGUMENTS[:2] for p in params
    )


class TrlFunction(RewardScorer):
    """A reward function with TRL's signature, `fn(prompts, completions, **kwargs)`, as TRL's
    GRPOTrainer calls it: one list entry per candidate for `prompts` (a conversation's
    messages), `completions` (for a conversation, `[{"role": "assistant", "content": ...}]`),
    `completion_ids` (in the policy's tokenizer) and every other field of the prompt's row
    (e.g. `answer`), and `trainer_state`: a `transformers.TrainerState` whose `global_step`,
    `max_steps` and `epoch` count as TRL's do (optimizer steps: GRPO steps × μ; None outside a
    run, e.g. a held-out evaluation before training). `log_metric(name, value)` adds to the
    step's metrics (the mean of the step's values), `log_extra(column, values)` a column to
    the candidates' rows in completions.jsonl. A function without **kwargs gets only the
    arguments it names. It returns a float, or None for a sample it cannot score, per
    candidate."""

    name = "trl_function"

    def __init__(self, fn, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        params = inspect.signature(fn).parameters
        any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.accepts = None if any_keyword else set(params)  # None: every keyword
        self.state = None  # the TrainerState handed as `trainer_state`, set by begin_step
        self.logged: dict[str, list[float]] = {}  # log_metric's values since take_metrics

    def take_metrics(self) -> dict[str, list[float]]:
        """The values `log_metric` was given since the last call, by name."""
        out, self.logged = self.logged, {}
        return out

    def begin_step(self, progress: Progress) -> None:
        from transformers import TrainerState

        self.state = TrainerState(
            global_step=progress.optimizer_steps,
            max_steps=progress.max_optimizer_steps,
            epoch=progress.epoch,
        )

    def score(self, samples: Sequence[Sample]) -> list:
        columns: dict[str, list] = {}
        for s in samples:  # the rows' fields, in order of first appearance
            for key in s.row:
                if key not in TRL_ARGUMENTS and key not in ("prompt", "completion"):
                    columns.setdefault(key, [])
        for key, values in columns.items():
            values.extend(s.row.get(key) for s in samples)
        logged: list[tuple[str, float]] = []  # this call's log_metric values
        kwargs = {  # conversations in TRL's shapes: messages, and the reply as one message
            "prompts": [list(s.prompt.messages or ()) or s.prompt.text for s in samples],
            "completions": [
                [{"role": "assistant", "content": s.completion}]
                if s.prompt.messages
                else s.completion
                for s in samples
            ],
            "completion_ids": [list(s.candidate.token_ids) for s in samples],
            "trainer_state": self.state,
            "log_metric": lambda name, value: logged.append((str(name), float(value))),
            "log_extra": lambda column, values: _add_column(samples, column, values),
            **columns,
        }
        if self.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        out = list(self.fn(**kwargs))
        # a call that raised logs nothing: the groups it is retried on log their own
        for name, value in logged:
            self.logged.setdefault(name, []).append(value)
        return out


def _add_column(samples: Sequence[Sample], column: str, values) -> None:
    """TRL's `log_extra`: one value per sample, kept with its candidate for completions.jsonl."""
    values = list(values)
    if len(values) != len(samples):
        raise ValueError(f"log_extra({column!r}): {len(values)} values for {len(samples)} samples")
    for s, v in zip(samples, values, strict=True):
        s.candidate.extra[str(column)] = v


class SamplesFunction(RewardScorer):
    """A function of the list of samples (the project's convention), named after it."""

    def __init__(self, fn):
        self.fn, self.name = fn, getattr(fn, "__name__", type(fn).__name__)

    def score(self, samples: Sequence[Sample]) -> list:
        return list(self.fn(list(samples)))


def function_scorer(fn) -> RewardScorer:
    """A plain reward function as a scorer, by its signature: TRL's or the project's."""
    return TrlFunction(fn) if trl_style(fn) else SamplesFunction(fn)


class PythonFunction(RewardScorer):
    """Calls `function: "module:name"`. Either the project's convention, a function of the
    list of samples, or TRL's, `fn(prompts, completions, **kwargs)` (see `TrlFunction`); each
    returns one float (or None: no score) per sample.

    The module is imported by name (from the current directory or an installed package); the
    recipe's text is never evaluated.
    """

    name = "python"

    def __init__(self, function: str):
        module_name, sep, attr = str(function).partition(":")
        if not isinstance(function, str) or not sep or not module_name or not attr:
            raise UserError(f"python reward: function must be 'module:name', got {function!r}")
        here = os.getcwd()  # the current directory, also where a console script runs
        added = here not in sys.path and "" not in sys.path
        if added:
            sys.path.insert(0, here)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"python reward: cannot import module {module_name!r}: {exc}") from None
        except Exception as exc:  # the module itself failed: a syntax error, an error it raised
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise UserError(f"python reward: importing {module_name!r} failed: {msg}") from None
        finally:
            if added:
                sys.path.remove(here)
        self.fn = getattr(module, attr, None)
        if not callable(self.fn):
            raise UserError(f"python reward: {module_name!r} has no function {attr!r}")
        self.scorer = function_scorer(self.fn)

    def begin_step(self, progress: Progress) -> None:
        if isinstance(self.scorer, TrlFunction):
            self.scorer.begin_step(progress)

    def take_metrics(self) -> dict[str, list[float]]:
        return self.scorer.take_metrics() if isinstance(self.scorer, TrlFunction) else {}

    def score(self, samples: Sequence[Sample]) -> list:
        return self.scorer.score(samples)


@hookimpl
def register_reward_scorers(register):
    from .answer_check import MathVerify
    from .evaluate_metric import EvaluateMetric
    from .reward_model import RewardModel

    for cls in (ExactMatch, NumericMatch, RegexFormat, LengthPenalty, PythonFunction):
        register(cls)
    register(RewardModel)
    register(MathVerify)
    register(EvaluateMetric)
