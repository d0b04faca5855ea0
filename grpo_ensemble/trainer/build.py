"""Turn a validated recipe (plus any Python objects the caller passes) into live components.

Every check that needs the outside world (plugin names, model paths, prompt files, component
parameters) happens here, so `grpo-ensemble validate` can run it without training.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ..data.prompts import Cleaning, DataReport, load_prompts
from ..errors import RecipeError, UserError
from ..models.adapters import check_adapter_settings
from ..models.loading import load_field_tokenizer, resolve_model, same_tokenizer
from ..plugins import registry as plugins
from ..plugins.builtin.rewards import PythonFunction, SamplesFunction, TrlFunction, function_scorer
from ..plugins.interfaces import Generator, GroupEvaluator, RewardScorer, SamplingParams
from ..recipe import MemberConfig, Recipe
from ..rollout.scoring import ScorerFault, WeightedScorer, call_with_timeout
from ..types import POLICY, Prompt
from .components import check_params, construct

if TYPE_CHECKING:
    import torch


def build_scorers(
    recipe: Recipe, given: Sequence[tuple[RewardScorer, float]] | None = None
) -> list[WeightedScorer]:
    """The recipe's weighted scorers, or the caller's `(scorer, weight)` pairs, or
    `(scorer, weight, {"on_error": …, "timeout_s": …})` triples (the recipe's fields)."""
    if given is not None:
        return [_given_scorer(i, item) for i, item in enumerate(given)]
    out = []
    for i, r in enumerate(recipe.rewards):
        scorer = construct("reward_scorer", r.name, r.params, f"rewards.{i}.name")
        names = [w.name for w in out]
        label = r.name if r.name not in names else f"{r.name}_{i}"
        out.append(WeightedScorer(label, scorer, r.weight, r.on_error, r.timeout_s))
    return out


def _given_scorer(i: int, item) -> WeightedScorer:
    """One of the caller's `reward_scorers`, checked as the recipe's `rewards[i]` would be."""

    from ..recipe import RewardConfig

    where = f"reward_scorers[{i}]"
    if not isinstance(item, tuple | list) or len(item) not in (2, 3):
        raise UserError(f"{where}: give (scorer, weight) or (scorer, weight, options)")
    scorer, weight, options = (*item, {}) if len(item) == 2 else item
    if not hasattr(scorer, "score"):  # a plain function: TRL's convention or the project's
        if not callable(scorer):
            raise UserError(f"{where}: give a reward scorer or a function, not {scorer!r}")
        scorer = function_scorer(scorer)
    if not isinstance(options, Mapping):
        raise UserError(f"{where}: options must be a mapping of on_error and timeout_s")
    unknown = sorted(set(options) - {"on_error", "timeout_s"})
    if unknown:
        raise UserError(f"{where}: unknown option {unknown[0]!r} (on_error, timeout_s)")
    name = getattr(scorer, "name", "") or type(scorer).__name__
    try:
        c = RewardConfig(name=name, weight=weight, **options)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise UserError(f"{where}.{field}: {err['msg']}") from None
    return WeightedScorer(name, scorer, c.weight, c.on_error, c.timeout_s)


def probe_functions(scorers: Sequence[WeightedScorer], first: Prompt, given: bool) -> None:
    """Call each reward *function* (the `python` scorer's, or a function given from Python)
    once, on the first training row with an empty completion, so that a signature that does
    not fit (a TRL function asking for a column the data lacks), a raise, a wrong count or a
    value that is not a number is named before any model trains."""
    import math

    from ..types import Candidate, Sample

    sample = Sample(first, Candidate("", [], POLICY))
    for i, ws in enumerate(scorers):
        if not isinstance(ws.scorer, PythonFunction | TrlFunction | SamplesFunction):
            continue
        where = f"reward_scorers[{i}]" if given else f"rewards.{i}"
        row = f"the first training row (line {first.index})"
        try:  # in a thread of its own, as the run calls it: a hang or a stop ends it
            call = lambda f=ws.scorer: f.score([sample])  # noqa: E731
            out = list(call_with_timeout(call, ws.timeout_s, ws.name))
            if hasattr(ws.scorer, "take_metrics"):  # what it logged here is no step's
                ws.scorer.take_metrics()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 — the user's function, named
            text = str(exc) if isinstance(exc, ScorerFault) else f"{type(exc).__name__}: {exc}"
            msg = " ".join(text.split())[:300]
            raise UserError(f"{where}: {ws.name!r} failed on {row}: {msg}") from None
        if len(out) != 1:
            raise UserError(f"{where}: {ws.name!r} returned {len(out)} scores for 1 sample")
        value = out[0]
        try:  # as the run reads a score: anything float() takes, or None
            ok = value is None or math.isfinite(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{where}: {ws.name!r} returned {value!r}, not a number or None")


def build_evaluator(recipe: Recipe, given: GroupEvaluator | None = None) -> GroupEvaluator:
    """The recipe's group evaluator (or the caller's), set for `group.scale_rewards`: grpo
    divides by its group's std with group, and not with none and batch (whose division by the
    batch's std comes after the evaluator); the others never divide, so group is refused."""
    import copy

    from ..plugins.builtin.evaluators import GRPO

    g = recipe.group
    scale = None if g.scale_rewards is None else "group" if g.scale_rewards == "group" else "none"
    if given is not None:
        name, is_grpo = getattr(given, "name", "") or type(given).__name__, isinstance(given, GRPO)
    else:
        cls = plugins.get_component("group_evaluator", g.evaluator, "group.evaluator")
        name, is_grpo = g.evaluator, isinstance(cls, type) and issubclass(cls, GRPO)
    if scale == "group" and not is_grpo:
        raise RecipeError(
            "group.scale_rewards",
            f"group needs the grpo evaluator, not {name!r} (dr_grpo and rloo never divide by "
            "a std)",
        )
    if given is not None:
        if scale is None or not is_grpo:
            return given
        given = copy.copy(given)  # the caller's object is left as it is
        given.scale = scale
        return given
    params = dict(g.params)
    if scale is not None and is_grpo:
        if "scale" in params:
            raise RecipeError("group.params", "scale: set group.scale_rewards instead")
        params["scale"] = scale
    return construct("group_evaluator", g.evaluator, params, "group.evaluator")


def sampling_of(member: MemberConfig) -> SamplingParams:
    s = member.sampling
    return SamplingParams(s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.min_new_tokens)


def member_fields(recipe: Recipe) -> list[tuple[str, str, MemberConfig]]:
    """(member name, recipe field prefix, config) for the policy and each peer."""
    out = [(POLICY, "policy", recipe.policy)]
    out += [(p.name, f"peers.{i}", p) for i, p in enumerate(recipe.peers)]
    return out


def build_peer_generator(prefix: str, member: MemberConfig, gather: bool = True) -> Generator:
    """A peer's generator from its recipe entry: built with `model=` the resolved model path
    when the entry names a model (a text-only generator, e.g. an API, may need none), and
    `gather` (the recipe's `train.generation_weights`) where its constructor takes it."""
    extra = {}
    if member.model is not None:
        extra["model"] = resolve_model(member.model, f"{prefix}.model")
    if member.trust_remote_code:
        extra["trust_remote_code"] = True
    cls = plugins.get_component("generator", member.generator, f"{prefix}.generator")
    if "model" not in extra and "model" in _required_params(cls):
        raise RecipeError(f"{prefix}.model", f"{member.generator!r} needs a model")
    if "gather" in _params(cls) and "gather" not in member.params:
        extra["gather"] = gather
    try:
        return construct(
            "generator", member.generator, member.params, f"{prefix}.generator", **extra
        )
    except RecipeError as exc:
        if "cannot load model" in str(exc):
            reason = str(exc).split("cannot load model", 1)[1]
            raise RecipeError(f"{prefix}.model", f"cannot load model{reason}") from None
        raise


def build_policy_generator(
    recipe: Recipe, module: torch.nn.Module, tokenizer, gather: bool = True
) -> Generator:
    """The policy's generator: the recipe's `policy.generator`, built with `model=` the module
    being trained and, where its constructor takes them, `tokenizer=` the policy's tokenizer
    and `gather` (the recipe's `train.generation_weights`)."""
    p = recipe.policy
    cls = plugins.get_component("generator", p.generator, "policy.generator")
    extra: dict = {"model": module}
    for name, value in (("tokenizer", tokenizer), ("gather", gather)):
        if name in _params(cls) and name not in p.params:
            extra[name] = value
    return construct("generator", p.generator, p.params, "policy.generator", **extra)


def shared_base_generator(prefix: str, member, module, tokenizer, gather: bool):
    """A peer whose model is the policy's base, sampling from the policy's own module with its
    adapters off (no second copy of the weights): its generator must take `adapters`."""
    if member.chat_template is not None:  # it renders with the policy's very tokenizer
        raise RecipeError(
            f"{prefix}.chat_template",
            "this peer shares the policy's module and tokenizer, so it renders with the "
            "policy's template: set policy.chat_template instead",
        )
    cls = plugins.get_component("generator", member.generator, f"{prefix}.generator")
    if "adapters" not in _params(cls):
        raise RecipeError(
            f"{prefix}.generator",
            f"{member.generator!r} cannot sample the policy's base from the policy's module "
            "(it takes no adapters= setting); use the hf generator for this peer",
        )
    extra = {"model": module, "adapters": False}
    for name, value in (("tokenizer", tokenizer), ("gather", gather)):
        if name in _params(cls) and name not in member.params:
            extra[name] = value
    return construct("generator", member.generator, member.params, f"{prefix}.generator", **extra)


def cleaning_of(recipe: Recipe, scorers: Sequence[WeightedScorer] = ()) -> Cleaning:
    """The data section's row checks; a scorer that reads a field (e.g. `answer`) makes it
    required, so a row without it is reported at load time, not mid-run."""
    d = recipe.data
    read = [getattr(ws.scorer, "field", None) for ws in scorers]
    required = dict.fromkeys([*d.required_fields, *(f for f in read if isinstance(f, str))])
    return Cleaning(
        d.on_bad_row,
        tuple(required),
        d.normalize,
        d.strip_control,
        d.dedupe,
        tuple(d.rename.items()),
        d.on_long_prompt,
        d.system_prompt,
        recipe.limits.row_bytes,
        recipe.limits.row_depth,
    )


def load_data(
    recipe: Recipe,
    scorers: Sequence[WeightedScorer] = (),
    reports: list | None = None,
    eval_scorer: RewardScorer | None = None,
    given: Mapping | None = None,
) -> tuple[list[Prompt], list[Prompt] | None]:
    """Training and held-out prompts; each source's DataReport is appended to `reports`. The
    fields the training scorers read are required of the training rows, the one the
    evaluation's scorer reads of the held-out rows (so that a row without it is reported at
    load time, not by the evaluation after training). `given`: Python objects (a
    `datasets.Dataset` or a list of dicts) under "train" and "eval", which replace the
    recipe's sources."""
    d = recipe.data
    given = given or {}
    how = cleaning_of(recipe, scorers)
    reports = reports if reports is not None else []
    train_source, train_field = _source(given, "train", d.train)
    reports.append(DataReport(train_source if isinstance(train_source, str) else train_field))
    train = load_prompts(
        train_source, d.prompt_field, train_field, how, reports[-1], d.train_split, d.train_config
    )
    held_out = None
    eval_source, eval_field = _source(given, "eval", d.eval)
    if eval_source is not None:  # scored by the evaluation's scorer alone
        how = cleaning_of(recipe)
        field = getattr(eval_scorer, "field", None)
        if isinstance(field, str) and field not in how.required_fields:
            how = dataclasses.replace(how, required_fields=(*how.required_fields, field))
        reports.append(DataReport(eval_source if isinstance(eval_source, str) else eval_field))
        held_out = load_prompts(
            eval_source, d.prompt_field, eval_field, how, reports[-1], d.eval_split, d.eval_config
        )
    return train, held_out


def _source(given: Mapping, which: str, recipe_source):
    """(source, the name messages give it): the caller's object, else the recipe's field."""
    if given.get(which) is not None:
        return given[which], f"{which}_data"
    return recipe_source, f"data.{which}"


def chat_template_of(member: MemberConfig, prefix: str) -> str | None:
    """The member's `chat_template`: inline Jinja, or read from the file it names."""
    from ..models.chat import read_chat_template

    return read_chat_template(member.chat_template, f"{prefix}.chat_template")


def set_chat_template(tokenizer, member: MemberConfig, prefix: str) -> None:
    """Give `tokenizer` the member's recipe `chat_template`, where it has one (it wins over
    the tokenizer's own). A text-only generator's None tokenizer is left alone."""
    template = chat_template_of(member, prefix)
    if template and tokenizer is not None:
        tokenizer.chat_template = template


def scorer_tokenizers(scorers: Sequence[WeightedScorer]) -> list[tuple[str, object]]:
    """(recipe prefix, tokenizer) of each reward model, which renders conversations too."""
    from ..plugins.builtin.reward_model import RewardModel

    return [
        (f"rewards.{i}.params", ws.scorer.tokenizer)
        for i, ws in enumerate(scorers)
        if isinstance(ws.scorer, RewardModel)
    ]


def check_chat_templates(members: Sequence[tuple[str, object]], sources: Sequence) -> None:
    """Where the prompts hold conversations, every member with a tokenizer renders each of
    them: one without a template, or whose template fails on a prompt, is named here, before
    any model trains. `members`: (recipe prefix, tokenizer or None); `sources`: (name, prompts)."""
    from ..errors import InputFileError
    from ..models.chat import render_prompt

    talks = [(name, p) for name, prompts in sources for p in prompts or () if p.messages]
    if not talks:
        return
    for prefix, tok in members:
        if tok is None:  # a text-only generator renders as it likes
            continue
        if not getattr(tok, "chat_template", None):
            raise RecipeError(
                f"{prefix}.chat_template",
                "the prompts are conversations and this model's tokenizer has no chat "
                "template: give one (inline Jinja or a file)",
            )
        for name, p in talks:
            try:
                render_prompt(p, tok)
            except UserError as exc:
                raise InputFileError(name, f"{prefix}: {exc}", line=p.index) from None


def check_recipe(recipe: Recipe, note=None) -> None:
    """Everything `validate` checks beyond the schema: plugins, parameters, models, data.
    `note`: told a line before each slow part (a built-in model is built on first use)."""
    from .observers import build_trackers  # of build.py, only validate builds the trackers

    note = note or (lambda line: None)
    build_scorers(recipe)
    build_evaluator(recipe)
    build_trackers(recipe)  # an unknown name or a missing package (before slow checks)
    eval_scorer = build_eval_scorer(recipe)
    for name, prefix, m in member_fields(recipe):
        cls = plugins.get_component("generator", m.generator, f"{prefix}.generator")
        if m.model:
            note(f"checking {prefix}.model {m.model}")
        extra = {"model": resolve_model(m.model, f"{prefix}.model")} if m.model else {}
        if name == POLICY:
            check_policy_generator(recipe)
        elif not extra and "model" in _required_params(cls):
            raise RecipeError(f"{prefix}.model", f"{m.generator!r} needs a model")
        check_params(cls, m.params, f"{prefix}.params", **extra)
    check_tis_tokenizers(recipe)
    p = recipe.policy
    if p.lora is not None or p.adapter is not None:
        check_adapter_settings(p, resolve_model(p.model, "policy.model"))
    reports: list = []
    scorers = build_scorers(recipe)
    note("checking the prompts")
    train, held_out = load_data(recipe, scorers, reports, eval_scorer=eval_scorer)
    probe_functions(scorers, train[0], given=False)
    if any(p.messages for p in train) or any(p.messages for p in held_out or ()):
        tokenizers = []
        for _, prefix, m in member_fields(recipe):
            tok = load_field_tokenizer(m.model, f"{prefix}.model") if m.model else None
            set_chat_template(tok, m, prefix)
            tokenizers.append((prefix, tok))
        tokenizers += scorer_tokenizers(scorers)
        sources = [(r.source, ps) for r, ps in zip(reports, (train, held_out), strict=False)]
        check_chat_templates(tokenizers, sources)
    if recipe.train.deepspeed is not None:  # the merged config: conflicts are recipe errors
        from .deepspeed import deepspeed_config, resolve_dtype

        deepspeed_config(recipe, recipe.train.micro_batch_size, resolve_dtype(recipe))


TIS_TOKENIZER = (
    "tis needs the peer's own token log-probs over the policy's tokens, but this peer's "
    "tokenizer differs from the policy's; use mode shaped or on_policy"
)


def check_tis_tokenizers(recipe: Recipe) -> None:
    """A `tis` peer must share the policy's tokenizer (checked by loading both tokenizers)."""
    tis = [(i, p) for i, p in enumerate(recipe.peers) if p.mode == "tis" and p.model]
    if not tis:
        return
    policy_tok = load_field_tokenizer(recipe.policy.model, "policy.model")
    for i, p in tis:
        peer_tok = load_field_tokenizer(p.model, f"peers.{i}.model")
        if not same_tokenizer(policy_tok, peer_tok):
            raise RecipeError(f"peers.{i}.mode", TIS_TOKENIZER)


def _params(cls: type) -> set[str]:
    """The keyword parameters of a component's constructor (all of them where it takes
    **kwargs is not knowable: then none)."""
    try:
        return set(inspect.signature(cls).parameters)
    except ValueError:
        return set()


def _required_params(cls: type) -> set[str]:
    try:
        sig = inspect.signature(cls)
    except ValueError:
        return set()
    return {n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty}


def check_policy_generator(recipe: Recipe) -> None:
    """The policy's generator samples with the module being trained: its class must take that
    module as `model` and the trained weights after each update (`sync_weights`)."""
    name = recipe.policy.generator
    cls = plugins.get_component("generator", name, "policy.generator")
    if not callable(getattr(cls, "sync_weights", None)):
        raise RecipeError(
            "policy.generator",
            f"{name!r} cannot sample for the policy: it has no sync_weights(model) method to "
            "take the trained weights after each update",
        )
    if "model" not in _params(cls):
        raise RecipeError(
            "policy.generator",
            f"{name!r} cannot sample for the policy: its constructor takes no `model` "
            "(the module being trained is passed as model=)",
        )


def build_eval_scorer(recipe: Recipe, given=None) -> RewardScorer:
    """The scorer that judges the held-out evaluation: the caller's object (a reward scorer
    or a reward function, as `reward_scorers` take), else the recipe's `eval.scorer`."""
    if given is not None:
        if hasattr(given, "score"):
            return given
        if not callable(given):
            raise UserError(f"eval_scorer: give a reward scorer or a function, not {given!r}")
        return function_scorer(given)
    e = recipe.eval
    return construct("reward_scorer", e.scorer, e.params, "eval.scorer")


def eval_max_new_tokens(recipe: Recipe) -> int:
    """The longest completion the evaluation decodes: `eval.max_new_tokens`, or the policy's."""
    return recipe.eval.max_new_tokens or recipe.policy.sampling.max_new_tokens


def prompt_token_limit(recipe: Recipe, model: torch.nn.Module) -> tuple[int | None, int | None]:
    """The longest prompt, in tokens, that leaves room in the policy's context for the longest
    completion: for training prompts, any member may write; for held-out prompts, the
    evaluation (None, None when the model states no context length)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int):
        return None, None
    fields = {"policy.sampling.max_new_tokens": recipe.policy.sampling.max_new_tokens}
    for i, p in enumerate(recipe.peers):
        fields[f"peers.{i}.sampling.max_new_tokens"] = p.sampling.max_new_tokens
    field, longest = max(fields.items(), key=lambda kv: kv[1])  # the first of the longest
    e = recipe.eval
    held_out = longest  # held-out prompts that are never evaluated: as the training prompts
    if recipe.data.eval and (e.before or e.after):
        held_out = eval_max_new_tokens(recipe)
        if e.max_new_tokens:
            fields["eval.max_new_tokens"] = e.max_new_tokens
    for name, tokens in fields.items():
        if tokens >= context:
            raise RecipeError(
                name, f"{tokens} new tokens do not fit the policy's context of {context} tokens"
            )
    return context - longest, context - held_out
