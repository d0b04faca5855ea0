"""A run built from its recipe: components, data, models, the DeepSpeed engine, the ensemble
and the step's settings, loaded and checked once (`build_run`). Python objects given by the
caller win over the recipe's named components."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..data.prompts import DataReport, PromptSampler, too_long
from ..errors import RecipeError, UserError
from ..models.adapters import (
    add_lora,
    is_peft_model,
    load_adapter,
    lora_layers,
    not_plain_lora,
    quantized,
)
from ..models.loading import load_field_tokenizer, load_model, resolve_model
from ..plugins.interfaces import (
    Generator,
    GroupEvaluator,
    PlacesModel,
    ReplaysForward,
    RewardScorer,
    SyncsWeights,
)
from ..recipe import Recipe
from ..rollout.ensemble import Ensemble, Member
from ..rollout.scoring import WeightedScorer
from ..types import POLICY, Prompt
from .batching import PromptIds
from .build import (
    TIS_TOKENIZER,
    build_eval_scorer,
    build_evaluator,
    build_peer_generator,
    build_policy_generator,
    build_scorers,
    check_chat_templates,
    check_policy_generator,
    cleaning_of,
    load_data,
    member_fields,
    probe_functions,
    prompt_token_limit,
    sampling_of,
    scorer_tokenizers,
    set_chat_template,
    shared_base_generator,
)
from .deepspeed import build_engine, init_distributed, resolve_dtype, shard_frozen
from .memory import TokenBudget, restore_budget, token_budget
from .settings import StepSettings, loss_settings, resolve
from .update import train_mode_is_eval_mode


@dataclass
class Run:
    """Everything a run needs, built once from the recipe. Only the step and the loop read it;
    the phases they call take plain values."""

    recipe: Recipe
    settings: StepSettings
    engine: Any  # deepspeed.DeepSpeedEngine wrapping the policy
    tokenizer: Any
    ref_model: torch.nn.Module | None
    ensemble: Ensemble
    scorers: list[WeightedScorer]
    evaluator: GroupEvaluator
    sampler: PromptSampler
    held_out: list[Prompt] | None
    eval_scorer: RewardScorer
    run_dir: Path
    prompt_ids: PromptIds
    data_reports: list[DataReport] = field(default_factory=list)
    # the policy's generator, where the update's first pass replays its sampling's forward
    replay: ReplaysForward | None = None
    # with adapters: the PEFT model around the policy's module, which saves the adapter folder
    adapter: Any = None
    # the micro-batches' token budget (train.micro_batch_tokens; auto sets it as it goes)
    budget: TokenBudget = field(default_factory=lambda: TokenBudget(None))

    @property
    def policy_generator(self) -> Generator:
        return self.ensemble.policy.generator

    def restored(self, checkpoint: Path, step: int) -> None:
        """After a resume loaded the engine, sampler and RNGs: the rest of the run's state."""
        restore_budget(self.budget, checkpoint, step)


@dataclass
class Loaded:
    """What every rank checks and loads before the engine is built."""

    scorers: list[WeightedScorer]
    evaluator: GroupEvaluator
    eval_scorer: RewardScorer
    train_prompts: list[Prompt]
    held_out: list[Prompt] | None
    policy: torch.nn.Module
    tokenizer: Any
    ref: torch.nn.Module | None
    peers: dict[str, Generator]
    adapter: Any = None  # the PeftModel around `policy`, with adapters
    shared: tuple[str, ...] = ()  # peers whose model is the policy's base (built later)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Given:
    """The caller's Python objects, which replace what the recipe names."""

    generators: dict[str, Generator] = field(default_factory=dict)  # member name → generator
    reward_scorers: Sequence[tuple] | None = None  # (scorer or function, weight[, options])
    group_evaluator: GroupEvaluator | None = None
    data: Mapping = field(default_factory=dict)  # "train" / "eval" → Dataset or list of dicts
    eval_scorer: object | None = None  # a RewardScorer or a reward function
    model: torch.nn.Module | None = None  # the policy: a causal LM or a PEFT model


def build_run(
    recipe: Recipe,
    run_dir: Path,
    generators: Mapping[str, Generator] | None = None,
    reward_scorers: Sequence[tuple] | None = None,
    group_evaluator: GroupEvaluator | None = None,
    data: Mapping | None = None,
    note=None,
    eval_scorer=None,
    model: torch.nn.Module | None = None,
) -> Run:
    """Load models, build components and the DeepSpeed engine. Python objects win over names:
    `data` maps "train" and "eval" to a `datasets.Dataset` or a list of dicts. `note`: told
    a line before each slow part (loading data and models, starting DeepSpeed)."""
    note = note or (lambda line: None)
    objects = Given(
        dict(generators or {}),
        reward_scorers,
        group_evaluator,
        dict(data or {}),
        eval_scorer,
        model,
    )
    generators = objects.generators
    given = set(generators)  # generator objects from the caller stay where they are
    init_distributed(recipe.train.dist_timeout_s)
    dtype = resolve_dtype(recipe)
    gather = recipe.train.generation_weights == "gather"
    loss = loss_settings(recipe)
    reference = loss.beta > 0  # no reference model at all when the KL term is off
    reports: list[DataReport] = []
    loaded = dist.agree(  # every rank checks and loads; a failure on any rank stops all
        lambda: _load(recipe, dtype, gather, reference, objects, reports, note)
    )
    check_world(recipe.train.prompts_per_step, dist.world_size())
    # the first run on a machine compiles DeepSpeed's optimizer op here (a minute or more)
    note(f"starting DeepSpeed (ZeRO stage {recipe.train.zero_stage})")
    engine = build_engine(recipe, loaded.policy, dtype)
    ref = _place_frozen(recipe, engine, dtype, loaded, given)
    if loaded.adapter is not None and reference:  # the base: the policy, its adapters off
        ref = engine.module
    _place_scorers(loaded.scorers, engine, dtype, recipe.train.frozen_models == "shard")
    policy_gen = _policy_generator(
        recipe, engine, loaded.tokenizer, gather, generators.pop(POLICY, None)
    )
    members = _members(recipe, policy_gen, engine, loaded, gather)
    ensemble = Ensemble(members, loaded.tokenizer)
    _check_members(recipe, ensemble, reports, loaded)
    same = train_mode_is_eval_mode(engine.module)
    ids = PromptIds(loaded.tokenizer)
    return Run(
        recipe=recipe,
        settings=resolve(recipe, members, loss, same),
        engine=engine,
        tokenizer=loaded.tokenizer,
        ref_model=ref,
        ensemble=ensemble,
        scorers=loaded.scorers,
        evaluator=loaded.evaluator,
        sampler=PromptSampler(loaded.train_prompts, recipe.seed, recipe.data.shuffle),
        held_out=loaded.held_out,
        eval_scorer=loaded.eval_scorer,
        run_dir=run_dir,
        prompt_ids=ids,
        data_reports=reports,
        replay=policy_gen if reuse_applies(recipe, engine, members, same) else None,
        adapter=loaded.adapter,
        budget=token_budget(
            recipe,
            engine.module,
            lambda: longest(loaded.train_prompts, ids),
            held_models(ref, members, loaded.scorers),
        ),
    )


def held_models(ref, members: list[Member], scorers: list[WeightedScorer]) -> list:
    """The frozen models the process holds beside the policy: the reference, the peers' and
    the scorers' models (a shared base among them is the policy's own weights)."""
    held = [ref] if ref is not None else []
    for holder in [m.generator for m in members[1:]] + [ws.scorer for ws in scorers]:
        model = getattr(holder, "model", None)
        if isinstance(model, torch.nn.Module):
            held.append(model)
    return held


def _members(recipe: Recipe, policy_gen: Generator, engine, loaded: Loaded, gather: bool):
    """The ensemble's members in recipe order: the policy, then each peer (one that shares the
    policy's base is built now, over the module being trained)."""
    members = []
    for name, prefix, m in member_fields(recipe):
        if name in loaded.shared:
            gen = shared_base_generator(prefix, m, engine.module, loaded.tokenizer, gather)
        else:
            gen = policy_gen if name == POLICY else loaded.peers[name]
        mode, on_error = getattr(m, "mode", "on_policy"), getattr(m, "on_error", "fail")
        members.append(Member(name, gen, m.n, sampling_of(m), mode, on_error))
    return members


def shares_base(recipe: Recipe, prefix: str, member, adapters: bool) -> bool:
    """Whether a peer samples from the policy's base weights: the policy trains adapters and
    the peer's model is the policy's (`policy_base` or the same path)."""
    p = recipe.policy
    if not adapters or member.model is None:
        return False
    same = resolve_model(member.model, f"{prefix}.model") == resolve_model(p.model, "policy.model")
    if same and member.dtype is not None:
        raise RecipeError(
            f"{prefix}.dtype",
            "this peer samples from the policy's own base weights, in train.precision; drop "
            "its dtype (or give it a model of its own)",
        )
    return same


def _policy_generator(
    recipe: Recipe, engine, tokenizer, gather: bool, given: Generator | None
) -> Generator:
    """The recipe's policy generator, built over the module being trained, or the caller's,
    which must take the trained weights (it is handed them now: it may hold its own copy)."""
    if given is None:
        return build_policy_generator(recipe, engine.module, tokenizer, gather)
    if not isinstance(given, SyncsWeights):
        raise UserError(f"generators['policy']: {NO_SYNC}")
    given.sync_weights(engine.module)
    return given


NO_SYNC = (
    "the policy's generator must take the trained weights after each update: give it a "
    "sync_weights(model) method"
)


def _check_members(recipe: Recipe, ensemble: Ensemble, reports: list, loaded: Loaded):
    """Every member that renders conversations can render every prompt (see build), and a
    tis peer shares the policy's tokens."""
    members = ensemble.members
    prompts = (loaded.train_prompts, loaded.held_out)
    sources = [(r.source, ps) for r, ps in zip(reports, prompts, strict=False)]
    prefixes = [prefix for _, prefix, _ in member_fields(recipe)]
    named = [(x, m.generator.tokenizer) for x, m in zip(prefixes, members, strict=True)]
    check_chat_templates(named + scorer_tokenizers(loaded.scorers), sources)
    for i, peer in enumerate(recipe.peers):
        if peer.mode == "tis" and not ensemble.shares_tokens[peer.name]:
            raise RecipeError(f"peers.{i}.mode", TIS_TOKENIZER)


def _place_frozen(recipe: Recipe, engine, dtype, loaded: Loaded, given: set[str]):
    """The reference model and the peers' frozen models where the run keeps its models:
    ZeRO-3 shards (1/world each), or whole copies on the device the policy trains on (DeepSpeed
    moved it there) and in its precision, as the sharded copies are. A peer offers this
    through `place_model`; a peer object the caller gave keeps its own placement unless
    sharding was asked for. Returns the reference model."""
    ref = loaded.ref
    frozen = {name: frozen_dtype(m, dtype) for name, _, m in member_fields(recipe)}
    if recipe.train.frozen_models == "shard":
        ref = shard_frozen(ref, frozen[POLICY]) if ref is not None else None
        for name, gen in loaded.peers.items():
            if isinstance(gen, PlacesModel):
                gen.place_model(lambda m, d=frozen[name]: shard_frozen(m, d))
        return ref
    for name, gen in loaded.peers.items():
        if isinstance(gen, PlacesModel) and name not in given:
            gen.place_model(lambda m, d=frozen[name]: m.to(engine.device, d))
    return ref.to(engine.device) if ref is not None else None


def frozen_dtype(member, run_dtype: torch.dtype) -> torch.dtype:
    """The precision of a member's frozen weights: its own `dtype`, else the run's."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(member.dtype, run_dtype)


def _place_scorers(scorers: list[WeightedScorer], engine, dtype, shard: bool) -> None:
    """A scorer holding a model (a reward model) goes where the run keeps its frozen models:
    whole, on the policy's device and in its precision, or sharded (`frozen_models: shard`;
    the scorer then runs its forwards on every rank alike)."""
    for ws in scorers:
        if isinstance(ws.scorer, PlacesModel):
            if shard:
                ws.scorer.place_model(lambda m: shard_frozen(m, dtype))
            else:
                ws.scorer.place_model(lambda m: m.to(engine.device, dtype))


def _load(
    recipe: Recipe, dtype, gather: bool, reference: bool, objects: Given, reports: list, note
) -> Loaded:
    """Components, data, the policy (and, with `reference`, its frozen copy) and the peers,
    checked and loaded; the caller's `objects` win over the recipe's names."""
    scorers = build_scorers(recipe, objects.reward_scorers)
    evaluator = build_evaluator(recipe, objects.group_evaluator)
    eval_scorer = build_eval_scorer(recipe, objects.eval_scorer)
    generators = objects.generators
    if POLICY not in generators:
        check_policy_generator(recipe)
    note("loading the prompts")
    train_prompts, held_out = load_data(recipe, scorers, reports, eval_scorer, objects.data)
    probe_functions(scorers, train_prompts[0], given=objects.reward_scorers is not None)
    p = recipe.policy
    policy, tok, adapter, copy = _load_policy(recipe, objects.model, dtype, reference, note)
    set_chat_template(tok, p, "policy")
    how = cleaning_of(recipe, scorers)
    limit, held_out_limit = prompt_token_limit(recipe, policy)
    if limit is not None:  # prompts that cannot fit the context with their completion
        train_prompts = too_long(train_prompts, tok, limit, how, reports[0])
        if held_out:
            budget = "eval.max_new_tokens" if recipe.eval.max_new_tokens else None
            held_out = too_long(held_out, tok, held_out_limit, how, reports[1], budget)
    ref = _reference(recipe, policy, dtype, given=objects.model is not None) if copy else None
    peers, shared = _load_peers(recipe, generators, adapter is not None, gather, note)
    return Loaded(
        scorers,
        evaluator,
        eval_scorer,
        train_prompts,
        held_out,
        policy,
        tok,
        ref,
        peers,
        adapter,
        shared,
    )


def _load_peers(recipe: Recipe, generators: dict, adapters: bool, gather: bool, note):
    """The peers' generators: the caller's objects, else built from the recipe; a peer that
    shares the policy's base (with `adapters`) is only named (built with the engine)."""
    if recipe.peers:
        note("loading the peers: " + ", ".join(f"{m.name} ({m.model})" for m in recipe.peers))
    shared = tuple(
        name
        for name, prefix, m in member_fields(recipe)
        if name != POLICY and name not in generators and shares_base(recipe, prefix, m, adapters)
    )
    peers = {
        name: generators.pop(name)
        if name in generators
        else build_peer_generator(prefix, m, gather=gather)
        for name, prefix, m in member_fields(recipe)
        if name != POLICY and name not in shared
    }
    if set(generators) - {POLICY}:
        extra = sorted(set(generators) - {POLICY})
        raise UserError(f"generators given for members not in the recipe: {extra}")
    for name, prefix, m in member_fields(recipe):  # a member's own template wins
        set_chat_template(getattr(peers.get(name), "tokenizer", None), m, prefix)
    return peers, shared


def _load_policy(recipe: Recipe, model, dtype, reference: bool, note):
    """(the policy's causal LM, its tokenizer, the PEFT model around it or None, whether the
    reference is a copy of its own): loaded from policy.model, or the caller's `model`."""
    p = recipe.policy
    adapters = p.lora is not None or p.adapter is not None
    if model is not None:
        policy, tok, adapter = given_policy(recipe, model, dtype)
    else:
        copy = reference and not adapters  # with adapters, the base is the reference
        note(f"loading the policy {p.model}" + (" and its reference copy" if copy else ""))
        policy, tok = load_model(p.model, "policy.model", dtype, p.trust_remote_code)
        adapter = with_adapters(recipe, policy) if adapters else None
    if adapter is not None:
        policy = adapter.get_base_model()  # the causal LM, PEFT's layers inside
    return policy, tok, adapter, reference and adapter is None


def _reference(recipe: Recipe, policy: torch.nn.Module, dtype, given: bool) -> torch.nn.Module:
    """The frozen reference model: a copy of the policy's weights as they start."""
    p = recipe.policy
    if given:  # the caller's weights, frozen as they start
        ref = deepcopy(policy).to(frozen_dtype(p, dtype))
    else:
        ref, _ = load_model(p.model, "policy.model", frozen_dtype(p, dtype), p.trust_remote_code)
    return ref.requires_grad_(False).eval()


def given_policy(recipe: Recipe, module, dtype):
    """The caller's policy module: (the causal LM, its tokenizer from policy.model, the PEFT
    model around it or None). A PEFT model brings its adapters; a plain one takes the
    recipe's policy.lora or policy.adapter, if any."""
    p = recipe.policy
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "config"):
        raise UserError(
            f"model: give a transformers causal LM or a PEFT model, not {type(module).__name__}"
        )
    tok = load_field_tokenizer(p.model, "policy.model", p.trust_remote_code)
    module = module.to(dtype)
    if not is_peft_model(module):
        if p.lora or p.adapter:
            return module, tok, with_adapters(recipe, module)
        if not any(param.requires_grad for param in module.parameters()):
            raise UserError("model: every weight of the module is frozen: nothing would train")
        return module, tok, None
    if p.lora is not None or p.adapter is not None:
        raise UserError("model: a PEFT model brings its own adapters; drop policy.lora/adapter")
    for name, config in module.peft_config.items():
        problem = not_plain_lora(config)
        if problem:
            raise UserError(f"model: adapter {name!r}: {problem}")
    if not any(param.requires_grad for param in module.parameters()):
        raise UserError(
            "model: the PEFT model's adapters are frozen; load it with is_trainable=True"
        )
    return module, tok, module


def with_adapters(recipe: Recipe, policy: torch.nn.Module):
    """The PeftModel of the policy's adapters: new LoRA ones, or the adapter folder's."""
    p = recipe.policy
    if recipe.train.save_merged and quantized(policy):
        raise RecipeError(
            "train.save_merged",
            "the base model is quantized: adapters merged into it would lose precision; "
            "save the adapter alone (drop save_merged)",
        )
    if p.lora is not None:
        return add_lora(policy, p.lora)
    return load_adapter(policy, p.adapter, resolve_model(p.model, "policy.model"))


def longest(prompts: list[Prompt], ids: PromptIds) -> int:
    """The tokens of the longest prompt."""
    return max(len(ids(p)) for p in prompts)


def reuse_applies(recipe: Recipe, engine, members: list[Member], train_is_eval: bool) -> bool:
    """True when the update's first pass should take the policy's sampling products instead
    of computing its forward again: the policy's generator offers forward replay of the very
    module being trained, the option is on, the weights are whole (not ZeRO-3), no layer is
    recomputed (checkpointing), the model computes the same in training and eval mode, and
    every candidate a rank can hold in a step fits one micro-batch (so the update holds no
    more than one micro-batch's worth; a peer's candidates in it are computed, the policy's
    replayed)."""
    policy = members[0].generator
    if not isinstance(policy, ReplaysForward) or not policy.replays_for(engine.module):
        return False
    t = recipe.train
    if not t.reuse_sampling_forward or t.zero_stage == 3 or t.gradient_checkpointing:
        return False
    if t.micro_batch_tokens is not None or not train_is_eval:
        return False
    if lora_layers(engine.module):  # sampling's recorded products are the base layers' only
        return False
    peers = sum(m.n for m in members[1:])
    per_rank = -(-t.prompts_per_step // dist.world_size())
    return per_rank * (members[0].n + peers) <= t.micro_batch_size


def check_world(prompts_per_step: int, world: int) -> None:
    """Each rank holds whole groups, so a step needs at least one prompt per rank."""
    if prompts_per_step < world:
        raise RecipeError(
            "train.prompts_per_step",
            f"{prompts_per_step} prompt per step cannot be shared by {world} ranks; "
            f"use at least {world} (one group per rank)",
        )
