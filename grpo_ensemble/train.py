"""The training run. `grpo_step` reads top to bottom: sample prompts, generate, score, evaluate
groups, old/ref log-probs, μ passes of micro-batched updates, sync, metrics.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from . import dist, plugins
from .build import (
    TIS_TOKENIZER,
    WeightedScorer,
    build_eval_scorer,
    build_evaluator,
    build_peer_generator,
    build_scorers,
    check_policy_generator,
    load_data,
    member_fields,
    sampling_of,
)
from .components import Generator, GroupEvaluator, RewardScorer, mix64
from .data import PromptSampler
from .engine import (
    build_engine,
    gathered_params,
    init_distributed,
    resolve_dtype,
    shard_frozen,
)
from .errors import PluginError, RecipeError, UserError
from .evaluation import EvalResult, accuracy_of, heldout_scores
from .generation import EnsembleGenerator, HFGenerator, Member
from .logprobs import TokenBatch, completion_logprobs
from .loss import MODES, BatchSize, OffPolicy, grpo_loss
from .metrics import (  # noqa: F401 — best_candidates is re-exported
    WEIGHT_KEYS,
    best_candidates,
    step_metrics,
    tokens_by_member,
    update_metrics,
)
from .models import load_model
from .recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from .rundir import MetricsWriter, StepProgress, prepare_run_dir
from .scoring import score_groups
from .types import POLICY, Candidate, Group, GroupLayout, Prompt


@dataclass
class Run:
    """Everything a step needs, built once from the recipe."""

    recipe: Recipe
    engine: Any  # deepspeed.DeepSpeedEngine wrapping the policy
    tokenizer: Any
    ref_model: torch.nn.Module | None
    ensemble: EnsembleGenerator
    scorers: list[WeightedScorer]
    evaluator: GroupEvaluator
    sampler: PromptSampler
    held_out: list[Prompt] | None
    eval_scorer: RewardScorer
    run_dir: Path
    prompt_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    metrics: list[dict]
    before: EvalResult | None = None
    after: EvalResult | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(
    recipe: Recipe,
    run_dir: Path,
    generators: Mapping[str, Generator] | None = None,
    reward_scorers: Sequence[tuple[RewardScorer, float]] | None = None,
    group_evaluator: GroupEvaluator | None = None,
) -> Run:
    """Load models, build components and the DeepSpeed engine. Python objects win over names."""
    generators = dict(generators or {})
    init_distributed(recipe.train.dist_timeout_s)
    dtype = resolve_dtype(recipe)

    def load():  # every rank checks and loads; a failure on any rank stops all of them
        scorers = build_scorers(recipe, reward_scorers)
        evaluator = build_evaluator(recipe, group_evaluator)
        eval_scorer = build_eval_scorer(recipe)
        if POLICY not in generators:
            check_policy_generator(recipe)
        data = load_data(recipe)
        p = recipe.policy
        policy, tok = load_model(p.model, "policy.model", dtype, p.trust_remote_code)
        ref = None
        if recipe.loss.beta > 0:  # no reference model at all when the KL term is off
            ref, _ = load_model(p.model, "policy.model", dtype, p.trust_remote_code)
            ref.requires_grad_(False).eval()
        peers = {
            name: generators.pop(name) if name in generators else build_peer_generator(prefix, m)
            for name, prefix, m in member_fields(recipe)
            if name != POLICY
        }
        if set(generators) - {POLICY}:
            extra = sorted(set(generators) - {POLICY})
            raise UserError(f"generators given for members not in the recipe: {extra}")
        return scorers, evaluator, eval_scorer, data, policy, tok, ref, peers

    scorers, evaluator, eval_scorer, (train_prompts, held_out), policy, tok, ref, peers = (
        dist.agree(load)
    )
    check_world(recipe.train.prompts_per_step, dist.world_size())
    engine = build_engine(recipe, policy, dtype)
    gather = recipe.train.generation_weights == "gather"
    if recipe.train.frozen_models == "shard":  # ZeRO-3 inference engines, 1/world each
        ref = shard_frozen(ref, dtype) if ref is not None else None
        for gen in peers.values():
            if isinstance(gen, HFGenerator):
                gen.model, gen.gather = shard_frozen(gen.model, dtype), gather
    members = []
    for name, _, m in member_fields(recipe):
        if name == POLICY:  # shares the module being trained: always current weights
            gen = generators.pop(POLICY, None) or HFGenerator(
                engine.module, tok, **{"gather": gather, **m.params}
            )
        else:
            gen = peers[name]
        members.append(Member(name, gen, m.n, sampling_of(m), getattr(m, "mode", "on_policy")))
    ensemble = EnsembleGenerator(members, tok)
    for i, peer in enumerate(recipe.peers):
        if peer.mode == "tis" and not ensemble.shares_tokens[peer.name]:
            raise RecipeError(f"peers.{i}.mode", TIS_TOKENIZER)
    return Run(
        recipe=recipe,
        engine=engine,
        tokenizer=tok,
        ref_model=ref,
        ensemble=ensemble,
        scorers=scorers,
        evaluator=evaluator,
        sampler=PromptSampler(train_prompts, recipe.seed, recipe.data.shuffle),
        held_out=held_out,
        eval_scorer=eval_scorer,
        run_dir=run_dir,
    )


def check_world(prompts_per_step: int, world: int) -> None:
    """Each rank holds whole groups, so a step needs at least one prompt per rank."""
    if prompts_per_step < world:
        raise RecipeError(
            "train.prompts_per_step",
            f"{prompts_per_step} prompt per step cannot be shared by {world} ranks; "
            f"use at least {world} (one group per rank)",
        )


@dataclass
class Rollout:
    """One step's generations, rewards and advantages, flat in candidate order."""

    groups: list[Group]
    layout: GroupLayout
    candidates: list[Candidate]
    rewards: torch.Tensor  # (n_candidates,) combined
    per_scorer: dict[str, torch.Tensor]  # name → (n_candidates,)
    advantages: torch.Tensor  # (n_candidates,)
    keep: torch.Tensor  # (n_candidates,) bool: enters the loss
    equal_groups: int

    @property
    def candidate_prompt(self) -> list[Prompt]:
        """The prompt of each candidate, in flat order."""
        return [g.prompt for g in self.groups for _ in g.candidates]


def evaluate_groups(run: Run, groups: list[Group]) -> Rollout:
    """Score the candidates and turn each group's rewards into advantages."""
    layout = GroupLayout.from_groups(groups)
    candidates = [c for g in groups for c in g.candidates]
    rewards, per_scorer = score_groups(groups, run.scorers)
    grid = layout.to_grid(rewards)  # (n_prompts, group_size)
    name = getattr(run.evaluator, "name", "") or type(run.evaluator).__name__
    try:
        adv = run.evaluator.advantages(grid, layout.valid, stats_mask(run, groups, layout))
    except Exception as exc:
        raise PluginError(name, f"group evaluator raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(adv, torch.Tensor) or adv.shape != grid.shape:
        raise PluginError(name, f"advantages must be a tensor of shape {tuple(grid.shape)}")
    if not torch.isfinite(adv[layout.valid]).all():
        raise PluginError(name, "advantages are not finite")
    lo = grid.masked_fill(~layout.valid, float("inf")).min(dim=1).values
    hi = grid.masked_fill(~layout.valid, float("-inf")).max(dim=1).values
    equal = lo == hi  # (n_prompts,) groups with no learning signal
    mode = {m.name: m.mode for m in run.ensemble.members}
    trained = [mode[c.source] != "baseline_only" for c in candidates]
    keep = layout.valid & layout.to_grid(torch.tensor(trained), fill=False)
    if run.recipe.group.drop_equal_reward_groups:
        keep &= ~equal.unsqueeze(1)
    return Rollout(
        groups,
        layout,
        candidates,
        rewards,
        per_scorer,
        layout.to_flat(adv),
        layout.to_flat(keep),
        int(equal.sum()),
    )


def stats_mask(run: Run, groups: list[Group], layout: GroupLayout) -> torch.Tensor:
    """(n_prompts, group_size) candidates that count in the group statistics."""
    if run.recipe.group.stats == "group":
        return layout.valid
    own = torch.tensor([c.source == POLICY for g in groups for c in g.candidates])
    return layout.to_grid(own, fill=False)


@dataclass
class MicroBatch:
    tokens: TokenBatch
    advantages: torch.Tensor  # (B,)
    index: list[int]  # flat candidate indices
    modes: torch.Tensor  # (B,) long, see loss.MODES
    sources: list[str]  # member of each candidate
    behaviour: torch.Tensor | None  # (B, C) sampling log-probs where mode is tis, else 0


def micro_batches(run: Run, rollout: Rollout) -> list[MicroBatch]:
    """Micro-batches of the candidates that enter the loss, in candidate order."""
    keep = rollout.keep.nonzero().flatten().tolist()
    mode = {m.name: m.mode for m in run.ensemble.members}
    mb = run.recipe.train.micro_batch_size
    out = []
    for start in range(0, len(keep), mb):
        idx = keep[start : start + mb]
        cands = [rollout.candidates[i] for i in idx]
        prompts = [prompt_ids(run, rollout.candidate_prompt[i]) for i in idx]
        batch = TokenBatch.build(prompts, [c.token_ids for c in cands], run.tokenizer.pad_token_id)
        modes = torch.tensor([MODES[mode[c.source]] for c in cands], dtype=torch.long)
        behaviour = None
        if (modes == MODES["tis"]).any():
            behaviour = torch.zeros(batch.completion_ids.shape)
            for row, c in enumerate(cands):
                if mode[c.source] == "tis":
                    if c.behaviour_logprobs is None:
                        raise PluginError(c.source, "tis needs the peer's token log-probs")
                    behaviour[row, : len(c.behaviour_logprobs)] = torch.tensor(c.behaviour_logprobs)
        sources = [c.source for c in cands]
        out.append(MicroBatch(batch, rollout.advantages[idx], idx, modes, sources, behaviour))
    return out


def filler_batch(run: Run) -> MicroBatch:
    """A micro-batch that contributes nothing (no completion tokens, loss × 0). A rank with
    fewer micro-batches than another runs these, because under ZeRO every forward and backward
    takes part in collectives that all ranks must enter."""
    pad = run.tokenizer.pad_token_id
    tokens = TokenBatch.build([[pad]], [[pad]], pad)
    tokens.completion_mask.zero_()
    return MicroBatch(tokens, torch.zeros(1), [], torch.zeros(1, dtype=torch.long), [], None)


def prompt_ids(run: Run, prompt: Prompt) -> list[int]:
    """The policy tokenizer's ids of a prompt, cached."""
    text = prompt.text
    if text not in run.prompt_ids:
        run.prompt_ids[text] = run.tokenizer(text)["input_ids"]
    return run.prompt_ids[text]


@torch.no_grad()
def frozen_logprobs(model: torch.nn.Module, batches, temperature: float) -> list[torch.Tensor]:
    """Log-probs that stay fixed during the update (old policy or reference), per micro-batch."""
    was_training = model.training
    model.eval()
    out = [completion_logprobs(model, b.tokens, temperature) for b in batches]
    model.train(was_training)
    return out


def batch_size_of(run: Run, batches) -> BatchSize:
    """Sizes of the whole step's batch over all ranks: every micro-batch's loss is normalised
    by them, so the gradients summed over ranks are those of one rank holding everything."""
    mine = [
        sum(len(b.index) for b in batches),
        sum(float(b.tokens.completion_mask.sum()) for b in batches),
    ]
    sequences, tokens = dist.all_sum(mine)
    return BatchSize(
        sequences=int(sequences),
        tokens=int(tokens),
        # the longest completion any member may write: Dr. GRPO's constant normaliser
        max_new_tokens=max(m.sampling.max_new_tokens for m in run.ensemble.members),
    )


def accumulate(run: Run, batches, size: BatchSize, old, ref) -> dict[str, float]:
    """Forward/backward over every micro-batch into one accumulated gradient (no step).
    Returns this rank's sums for the metrics."""
    r, engine = run.recipe, run.engine
    # DeepSpeed averages gradients over ranks; each rank's loss is already its share of the
    # global batch, so scaling by the number of ranks turns that average into the sum
    scale = float(dist.world_size())
    sums = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0.0, "tokens": 0.0}
    sums.update({f"w/{k}/{x}": 0.0 for k in WEIGHT_KEYS for x in ("weight", "tokens")})
    off = OffPolicy(r.loss.shaped_gamma, r.loss.tis_low, r.loss.tis_high)
    for j, mbatch in enumerate(batches):
        batch, adv = mbatch.tokens, mbatch.advantages
        engine.set_gradient_accumulation_boundary(j == len(batches) - 1)
        logp = completion_logprobs(engine, batch, r.policy.sampling.temperature)  # (B, C)
        out = grpo_loss(
            logp,
            old[j] if old is not None else logp.detach(),  # μ = 1: ratio is exactly 1
            ref[j] if ref is not None else None,
            adv,
            batch.completion_mask,
            size,
            r.loss.clip_low,
            r.loss.clip_high,
            r.loss.beta,
            r.loss.aggregation,
            mbatch.modes,
            mbatch.behaviour,
            off,
        )
        filler = not mbatch.index
        # the loss is already this micro-batch's share of the step: no 1/accumulation scaling
        engine.backward(out.loss * (0.0 if filler else scale), scale_wrt_gas=False)
        if filler:
            continue
        mask = batch.completion_mask
        sums["loss"] += out.loss.item()
        sums["kl_sum"] += float((out.kl * mask).sum())
        sums["clipped"] += float(out.clipped.sum())
        sums["tokens"] += float(mask.sum())
        if out.tis_clamped is not None:
            sums["w/tis_clamped/weight"] += float(out.tis_clamped.sum())
        for name, k in MODES.items():
            rows = mask * (mbatch.modes == k).unsqueeze(1)
            sums[f"w/{name}/weight"] += float((out.weight * rows).sum())
            sums[f"w/{name}/tokens"] += float(rows.sum())
    return sums


def update(run: Run, batches: list[MicroBatch], n_batches: int | None = None) -> dict[str, float]:
    """μ optimizer steps over the step's micro-batches; returns loss, KL, clip metrics.
    `n_batches` is the most micro-batches any rank has; this rank fills up to it."""
    r, engine = run.recipe, run.engine
    n_batches = len(batches) if n_batches is None else n_batches
    batches = batches + [filler_batch(run)] * (n_batches - len(batches))
    temp = r.policy.sampling.temperature
    size = batch_size_of(run, batches)
    old = frozen_logprobs(engine.module, batches, temp) if r.loss.mu > 1 else None
    ref = frozen_logprobs(run.ref_model, batches, temp) if run.ref_model is not None else None
    total: dict[str, float] = {}
    first: dict[str, float] = {}
    grad_norms = []
    for i in range(r.loss.mu):
        sums = accumulate(run, batches, size, old, ref)
        if i == 0:  # per-mode weights and token shares: of the first pass
            first = {k: v for k, v in sums.items() if k.startswith("w/")}
            first["tokens/first"] = sums["tokens"]
        for k in ("loss", "kl_sum", "clipped", "tokens"):
            total[k] = total.get(k, 0.0) + sums[k]
        engine.step()
        grad_norms.append(float(engine.get_global_grad_norm() or 0.0))
    by_member = {f"member/{k}": v for k, v in tokens_by_member(run, batches).items()}
    return update_metrics(run, dist.sum_dict({**total, **first, **by_member}), grad_norms)


def policy_failed(run: Run, groups: list[Group]) -> list[bool]:
    """On-failure injection: True for prompts where no policy candidate reached success."""
    # only the policy's candidates so far; a scorer failing on any rank stops every rank
    rewards, _ = dist.agree(lambda: score_groups(groups, run.scorers))
    out, k = [], 0
    for g in groups:
        n = len(g.candidates)
        out.append(n == 0 or float(rewards[k : k + n].max()) < run.recipe.group.success_reward)
        k += n
    return out


# metrics of a step whose groups were all dropped (no learning signal): no optimizer step
NO_UPDATE = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "skipped_update": 1}


def prompt_seed(seed: int, step: int, slot: int) -> int:
    """The sampling seed of the prompt in place `slot` of step `step`'s global batch: the same
    whichever rank holds the prompt, so results do not depend on the number of ranks."""
    return mix64(mix64(mix64(seed) + step) + slot)


def grpo_step(run: Run, step: int) -> dict[str, Any]:
    """One GRPO step; returns the metrics row written to metrics.jsonl."""
    t = {"start": time.perf_counter()}
    prompts = run.sampler.next(run.recipe.train.prompts_per_step)  # global: same on every rank
    mine = dist.shard(len(prompts))  # this rank's whole groups
    seeds = [prompt_seed(run.recipe.seed, step, i) for i in mine]
    inject = partial(policy_failed, run) if run.recipe.group.inject == "on_failure" else None
    groups = dist.agree(  # members sample, groups pooled per prompt
        lambda: run.ensemble.generate([prompts[i] for i in mine], inject, seeds)
    )
    t["generate"] = time.perf_counter()
    rollout = dist.agree(lambda: evaluate_groups(run, groups))  # rewards, advantages, keep
    t["score"] = time.perf_counter()
    batches = dist.agree(lambda: micro_batches(run, rollout))
    n_batches = int(dist.all_max([len(batches)])[0])  # ranks may hold different counts
    upd = update(run, batches, n_batches) if n_batches else dict(NO_UPDATE)
    t["update"] = time.perf_counter()
    run.ensemble.members[0].generator.sync_weights(run.engine.module)  # policy samples anew
    t["sync"] = time.perf_counter()
    return step_metrics(run, step, rollout, upd, t)


def evaluate_policy(run: Run) -> EvalResult | None:
    """Held-out accuracy of the policy, greedy, judged by the recipe's eval scorer; each rank
    decodes its share of the prompts and the scores are gathered."""
    if not run.held_out:
        return None
    e = run.recipe.eval
    max_new = e.max_new_tokens or run.recipe.policy.sampling.max_new_tokens
    gather = run.recipe.train.generation_weights == "gather"
    gen = HFGenerator(run.engine.module, run.tokenizer, gather=gather)
    prompts = run.held_out[: e.max_prompts]
    mine = [prompts[i] for i in dist.shard(len(prompts))]
    scores = dist.agree(lambda: heldout_scores(gen, mine, run.eval_scorer, max_new))
    return accuracy_of([x for part in dist.all_gather_objects(scores) for x in part])


def train(
    recipe: Recipe | str | Path,
    *,
    generators: Mapping[str, Generator] | None = None,
    reward_scorers: Sequence[tuple[RewardScorer, float]] | None = None,
    group_evaluator: GroupEvaluator | None = None,
    overrides: Sequence[str] = (),
    console=None,
) -> TrainResult:
    """Run a recipe end to end. Components given as objects replace the recipe's named ones:
    `generators` maps member names ("policy" or a peer's name) to Generator instances,
    `reward_scorers` is a list of (scorer, weight), `group_evaluator` an evaluator instance.

    Under `torchrun` or `deepspeed` every rank calls this with the same recipe; rank 0 alone
    writes the run directory, the progress bar and the final model. Every rank returns the
    same (global) metrics.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    elif overrides:
        data = recipe.model_dump(mode="json")
        recipe = recipe_from_dict(data, overridden=apply_overrides(data, list(overrides)))
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed)
    hf_logging.disable_progress_bar()  # weight loading/saving bars are noise in a run log
    init_distributed(recipe.train.dist_timeout_s)
    main = dist.is_main()
    run_dir = dist.agree(lambda: prepare_run_dir(recipe, write=main))
    run = build_run(recipe, run_dir, generators, reward_scorers, group_evaluator)
    console = console if main else None
    result = TrainResult(run_dir=run_dir, model_dir=run_dir / "final", metrics=[])
    if recipe.eval.before:
        result.before = evaluate_policy(run)
        _say(console, "before", result.before)
    writer = MetricsWriter(run_dir / "metrics.jsonl") if main else None
    progress = StepProgress(recipe.train.steps, recipe.log.progress and main, console)
    hook = plugins.get_plugin_manager().hook
    try:
        for step in range(1, recipe.train.steps + 1):
            metrics = grpo_step(run, step)
            result.metrics.append(metrics)
            if writer is not None:
                writer.write(metrics)
                hook.on_step_end(step=step, metrics=metrics)  # observers run on rank 0 only
            progress.update(metrics["reward"])
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    if recipe.eval.after:
        result.after = evaluate_policy(run)
        _say(console, "after", result.after)
    with gathered_params(run.engine.module):  # ZeRO-3 holds shards; save whole weights
        if main:
            run.engine.module.save_pretrained(result.model_dir, safe_serialization=True)
            run.tokenizer.save_pretrained(result.model_dir)
    dist.barrier()  # no rank returns before the final model is on disk
    return result


def _say(console, when: str, res: EvalResult | None) -> None:
    if console is not None and res is not None:
        console.print(
            f"held-out accuracy {when} training: {100 * res.accuracy:.1f}% "
            f"(±{100 * res.ci95:.1f}, n={res.n})"
        )
