"""The run's observers: every plugin's observer hooks and the trackers `log.report_to` names.

Rank 0 alone calls them. An observer that raises is left out from then on and named in one
line: a failing logger must not end a training run.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from .. import dist
from ..errors import RecipeError
from ..plugins import registry as plugins
from ..plugins.interfaces import RunContext, Tracker
from ..recipe import Recipe

HOOKS = ("on_run_start", "on_step_end", "on_eval", "on_completions", "on_alert", "on_run_end")
ALWAYS = "jsonl"  # metrics.jsonl, written by the run itself: a name report_to may hold


def build_trackers(recipe: Recipe) -> list[Tracker]:
    """The trackers `log.report_to` names, built (a missing package or an unknown name is a
    recipe error on the entry)."""
    out = []
    for i, name in enumerate(recipe.log.report_to):
        if name == ALWAYS:
            continue
        field = f"log.report_to.{i}"
        cls = plugins.get_component("tracker", name, field)
        try:
            out.append(cls())
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)
            raise RecipeError(
                field, f"the {name} tracker needs the package {missing!r}: pip install {missing}"
            ) from None
        except Exception as exc:  # noqa: BLE001 — a plugin's constructor, named
            raise RecipeError(field, f"the {name} tracker failed to start: {exc}") from None
    return out


def frozen(value):
    """`value` read-only: mappings as MappingProxyType, lists as tuples, all the way down."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(frozen(v) for v in value)
    return value


class Observers:
    """Calls each observer hook on every plugin that implements it, then on each tracker,
    with the run's `RunContext` once the run has started (`start`)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)
        self.left_out: set[str] = set()
        self.context: RunContext | None = None

    def start(self, run_dir, recipe: Mapping, step: int = 0) -> None:
        self.context = RunContext(run_dir, frozen(recipe), dist.rank(), dist.world_size(), step)

    def at(self, step: int) -> None:
        """The step the run has finished."""
        if self.context is not None:
            self.context = replace(self.context, step=step)

    def emit(self, hook: str, **kwargs) -> None:
        assert hook in HOOKS, hook
        kwargs = {**kwargs, "context": self.context}
        plugins.call_each(hook, **kwargs)
        for tracker in self.trackers:
            name = tracker.name or type(tracker).__name__
            method = getattr(tracker, hook, None)  # every method of a tracker is optional
            if name in self.left_out or method is None:
                continue
            try:
                method(**_accepted(method, kwargs))
            except Exception as exc:  # noqa: BLE001 — named and left out
                self.left_out.add(name)
                line = " ".join(f"{type(exc).__name__}: {exc}".split())
                sys.stderr.write(f"warning: tracker {name!r} left out: its {hook} raised {line}\n")


class Silent(Observers):
    """No one told: a co-trained policy's records, whose run tells the observers once for all
    its policies."""

    def emit(self, hook: str, **kwargs) -> None:
        pass


def _accepted(method, kwargs: dict) -> dict:
    """The arguments `method` names (as pluggy passes a hook's): `context` only to those that
    ask for it."""
    params = inspect.signature(method).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}
