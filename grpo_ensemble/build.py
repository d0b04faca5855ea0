"""Turn a validated recipe (plus any Python objects the caller passes) into live components.

Every check that needs the outside world (plugin names, model paths, prompt files, component
parameters) happens here, so `grpo-ensemble validate` can run it without training.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import plugins
from .components import Generator, GroupEvaluator, RewardScorer, SamplingParams
from .data import load_prompts
from .errors import RecipeError, UserError
from .models import resolve_model
from .recipe import MemberConfig, Recipe
from .types import POLICY, Prompt


@dataclass
class WeightedScorer:
    name: str  # used in metrics: reward/<name>
    scorer: RewardScorer
    weight: float


def construct(kind: str, name: str, params: Mapping, field: str, **extra) -> object:
    """Instantiate a registered component; bad parameters are a recipe error on `field`."""
    cls = plugins.get_component(kind, name, field)
    try:
        return cls(**extra, **params)
    except TypeError as exc:
        try:
            inspect.signature(cls).bind(**extra, **params)
        except TypeError as bind_exc:  # the parameters do not fit the constructor
            raise RecipeError(f"{field.rsplit('.', 1)[0]}.params", str(bind_exc)) from None
        raise RecipeError(field, f"{name!r} failed to start: {exc}") from exc
    except UserError as exc:
        raise RecipeError(f"{field.rsplit('.', 1)[0]}.params", str(exc)) from None


def build_scorers(
    recipe: Recipe, given: Sequence[tuple[RewardScorer, float]] | None = None
) -> list[WeightedScorer]:
    """The recipe's weighted scorers, or the caller's `(scorer, weight)` pairs."""
    if given is not None:
        return [WeightedScorer(getattr(s, "name", "") or type(s).__name__, s, w) for s, w in given]
    out = []
    for i, r in enumerate(recipe.rewards):
        scorer = construct("reward_scorer", r.name, r.params, f"rewards.{i}.name")
        names = [w.name for w in out]
        label = r.name if r.name not in names else f"{r.name}_{i}"
        out.append(WeightedScorer(label, scorer, r.weight))
    return out


def build_evaluator(recipe: Recipe, given: GroupEvaluator | None = None) -> GroupEvaluator:
    if given is not None:
        return given
    g = recipe.group
    return construct("group_evaluator", g.evaluator, g.params, "group.evaluator")


def sampling_of(member: MemberConfig) -> SamplingParams:
    s = member.sampling
    return SamplingParams(s.temperature, s.top_p, s.top_k, s.max_new_tokens)


def member_fields(recipe: Recipe) -> list[tuple[str, str, MemberConfig]]:
    """(member name, recipe field prefix, config) for the policy and each peer."""
    out = [(POLICY, "policy", recipe.policy)]
    out += [(p.name, f"peers.{i}", p) for i, p in enumerate(recipe.peers)]
    return out


def build_peer_generator(prefix: str, member: MemberConfig) -> Generator:
    """A peer's generator from its recipe entry (the model is loaded and frozen)."""
    if member.model is None:
        raise RecipeError(f"{prefix}.model", "required (or pass a generator object from Python)")
    path = resolve_model(member.model, f"{prefix}.model")
    extra = {"model": path}
    if member.trust_remote_code:
        extra["trust_remote_code"] = True
    try:
        return construct(
            "generator", member.generator, member.params, f"{prefix}.generator", **extra
        )
    except RecipeError as exc:
        if exc.field.endswith(".params") and "cannot load model" in str(exc):
            raise RecipeError(f"{prefix}.model", str(exc).split(": ", 1)[-1]) from None
        raise


def load_data(recipe: Recipe) -> tuple[list[Prompt], list[Prompt] | None]:
    d = recipe.data
    train = load_prompts(d.train, d.prompt_field, "data.train")
    held_out = load_prompts(d.eval, d.prompt_field, "data.eval") if d.eval else None
    return train, held_out


def check_recipe(recipe: Recipe) -> None:
    """Everything `validate` checks beyond the schema: plugins, parameters, models, data."""
    build_scorers(recipe)
    build_evaluator(recipe)
    plugins.get_component("reward_scorer", recipe.eval.scorer, "eval.scorer")
    for name, prefix, m in member_fields(recipe):
        plugins.get_component("generator", m.generator, f"{prefix}.generator")
        if m.model is not None:
            resolve_model(m.model, f"{prefix}.model")
        elif name == POLICY:
            raise RecipeError("policy.model", "required")
    load_data(recipe)
