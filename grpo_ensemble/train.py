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

from . import plugins
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
from .components import Generator, GroupEvaluator, RewardScorer
from .data import PromptSampler
from .engine import build_engine, gathered_params, resolve_dtype
from .errors import PluginError, RecipeError, UserError
from .evaluation import EvalResult, heldout_accuracy
from .generation import EnsembleGenerator, HFGenerator, Member
from .logprobs import TokenBatch, completion_logprobs
from .loss import MODES, BatchSize, OffPolicy, grpo_loss
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
    scorers = build_scorers(recipe, reward_scorers)
    evaluator = build_evaluator(recipe, group_evaluator)
    eval_scorer = build_eval_scorer(recipe)
    if POLICY not in generators:
        check_policy_generator(recipe)
    train_prompts, held_out = load_data(recipe)
    dtype = resolve_dtype(recipe)
    p = recipe.policy
    policy, tok = load_model(p.model, "policy.model", dtype, p.trust_remote_code)
    ref = None
    if recipe.loss.beta > 0:  # no reference model at all when the KL term is off
        ref, _ = load_model(p.model, "policy.model", dtype, p.trust_remote_code)
        ref.requires_grad_(False).eval()
    engine = build_engine(recipe, policy, dtype)
    members = []
    for name, prefix, m in member_fields(recipe):
        if name in generators:
            gen = generators.pop(name)
        elif name == POLICY:  # shares the module being trained: always current weights
            gen = HFGenerator(engine.module, tok, **m.params)
        else:
            gen = build_peer_generator(prefix, m)
        members.append(Member(name, gen, m.n, sampling_of(m), getattr(m, "mode", "on_policy")))
    if generators:
        raise UserError(f"generators given for members not in the recipe: {sorted(generators)}")
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
    """Sizes of the whole step's batch: every micro-batch's loss is normalised by them."""
    return BatchSize(
        sequences=sum(len(b.index) for b in batches),
        tokens=int(sum(b.tokens.completion_mask.sum() for b in batches)),
        # the longest completion any member may write: Dr. GRPO's constant normaliser
        max_new_tokens=max(m.sampling.max_new_tokens for m in run.ensemble.members),
    )


def accumulate(run: Run, batches, size: BatchSize, old, ref) -> dict[str, float]:
    """Forward/backward over every micro-batch into one accumulated gradient (no step)."""
    r, engine = run.recipe, run.engine
    total, kl_sum, clipped, tokens = 0.0, 0.0, 0.0, 0.0
    off = OffPolicy(r.loss.shaped_gamma, r.loss.tis_low, r.loss.tis_high)
    weights = {k: [0.0, 0.0] for k in (*MODES, "tis_clamped")}  # → [Σ weight, tokens]
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
        # the loss is already this micro-batch's share of the step: no 1/accumulation scaling
        engine.backward(out.loss, scale_wrt_gas=False)
        total += out.loss.item()
        kl_sum += float((out.kl * batch.completion_mask).sum())
        clipped += float(out.clipped.sum())
        tokens += float(batch.completion_mask.sum())
        if out.tis_clamped is not None:
            weights["tis_clamped"][0] += float(out.tis_clamped.sum())
        for name, k in MODES.items():
            rows = batch.completion_mask * (mbatch.modes == k).unsqueeze(1)
            weights[name][0] += float((out.weight * rows).sum())
            weights[name][1] += float(rows.sum())
    return {"loss": total, "kl_sum": kl_sum, "clipped": clipped, "tokens": tokens, "w": weights}


def update(run: Run, batches) -> dict[str, float]:
    """μ optimizer steps over the step's micro-batches; returns loss, KL, clip metrics."""
    r, engine = run.recipe, run.engine
    temp = r.policy.sampling.temperature
    size = batch_size_of(run, batches)
    old = frozen_logprobs(engine.module, batches, temp) if r.loss.mu > 1 else None
    ref = frozen_logprobs(run.ref_model, batches, temp) if run.ref_model is not None else None
    passes, grad_norms = [], []
    for _ in range(r.loss.mu):
        passes.append(accumulate(run, batches, size, old, ref))
        engine.step()
        grad_norms.append(float(engine.get_global_grad_norm() or 0.0))
    tokens = sum(p["tokens"] for p in passes)
    w = passes[0]["w"]
    mode_metrics = {
        f"{name}/weight_mean": w[name][0] / w[name][1] for name in ("shaped", "tis") if w[name][1]
    }
    if w["tis"][1]:
        mode_metrics["tis/clamped_fraction"] = w["tis_clamped"][0] / w["tis"][1]
    by_member = tokens_by_member(batches)
    total = max(passes[0]["tokens"], 1)
    shares = {f"member/{k}/token_fraction": v / total for k, v in by_member.items()}
    return {
        **mode_metrics,
        **shares,
        "offpolicy_token_fraction": sum(v for k, v in by_member.items() if k != POLICY) / total,
        "loss": sum(p["loss"] for p in passes) / len(passes),
        "kl": sum(p["kl_sum"] for p in passes) / max(tokens, 1),
        "clip_fraction": sum(p["clipped"] for p in passes) / max(tokens, 1),
        "grad_norm": sum(grad_norms) / len(grad_norms),
    }


def tokens_by_member(batches: list[MicroBatch]) -> dict[str, float]:
    """Completion tokens in the loss, per member that produced them."""
    out: dict[str, float] = {}
    for b in batches:
        per_row = b.tokens.completion_mask.sum(dim=1).tolist()  # (B,)
        for source, n in zip(b.sources, per_row, strict=True):
            out[source] = out.get(source, 0.0) + n
    return out


def policy_failed(run: Run, groups: list[Group]) -> list[bool]:
    """On-failure injection: True for prompts where no policy candidate reached success."""
    rewards, _ = score_groups(groups, run.scorers)  # only the policy's candidates so far
    out, k = [], 0
    for g in groups:
        n = len(g.candidates)
        out.append(n == 0 or float(rewards[k : k + n].max()) < run.recipe.group.success_reward)
        k += n
    return out


# metrics of a step whose groups were all dropped (no learning signal): no optimizer step
NO_UPDATE = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "skipped_update": 1}


def grpo_step(run: Run, step: int) -> dict[str, Any]:
    """One GRPO step; returns the metrics row written to metrics.jsonl."""
    t = {"start": time.perf_counter()}
    prompts = run.sampler.next(run.recipe.train.prompts_per_step)
    inject = partial(policy_failed, run) if run.recipe.group.inject == "on_failure" else None
    groups = run.ensemble.generate(prompts, inject)  # members sample, groups pooled per prompt
    t["generate"] = time.perf_counter()
    rollout = evaluate_groups(run, groups)  # rewards (n_candidates,), advantages, keep mask
    t["score"] = time.perf_counter()
    batches = micro_batches(run, rollout)
    upd = update(run, batches) if batches else dict(NO_UPDATE)
    t["update"] = time.perf_counter()
    run.ensemble.members[0].generator.sync_weights(run.engine.module)  # policy samples anew
    t["sync"] = time.perf_counter()
    return step_metrics(run, step, rollout, upd, t)


def step_metrics(run: Run, step: int, ro: Rollout, upd: dict, t: dict) -> dict[str, Any]:
    """Rewards (combined, per scorer, per member), advantages, lengths, timings."""
    lengths = torch.tensor([len(c.token_ids) for c in ro.candidates], dtype=torch.float)
    m: dict[str, Any] = {
        "step": step,
        "reward": float(ro.rewards.mean()),
        "reward_std": float(ro.rewards.std()) if len(ro.rewards) > 1 else 0.0,
        **{f"reward/{k}": float(v.mean()) for k, v in ro.per_scorer.items()},
        "advantage_abs_mean": float(ro.advantages.abs().mean()),
        "equal_reward_groups": ro.equal_groups,
        "candidates": len(ro.candidates),
        "trained_candidates": int(ro.keep.sum()),
        "completion_len": float(lengths.mean()),
        **upd,
        "lr": run.engine.get_lr()[0],
    }
    sources = [c.source for c in ro.candidates]
    best = best_candidates(ro)  # (n_candidates,) bool: ties for the top reward of their group
    for member in run.ensemble.members:
        idx = [i for i, s in enumerate(sources) if s == member.name]
        if idx:
            m[f"member/{member.name}/best_share"] = float(best[idx].sum() / best.sum())
            m[f"member/{member.name}/reward"] = float(ro.rewards[idx].mean())
            m[f"member/{member.name}/candidates"] = len(idx)
            m[f"member/{member.name}/completion_len"] = float(lengths[idx].mean())
        if member.name in run.ensemble.seconds:
            m[f"time/generate/{member.name}"] = run.ensemble.seconds[member.name]
    for a, b in (
        ("start", "generate"),
        ("generate", "score"),
        ("score", "update"),
        ("update", "sync"),
    ):
        m[f"time/{b}"] = t[b] - t[a]
    m["time/step"] = t["sync"] - t["start"]
    return m


def best_candidates(ro: Rollout) -> torch.Tensor:
    """(n_candidates,) bool: the candidates that tie for their group's highest reward."""
    grid = ro.layout.to_grid(ro.rewards, fill=float("-inf"))  # (n_prompts, group_size)
    top = grid.max(dim=1, keepdim=True).values
    return ro.layout.to_flat(grid == top)


def evaluate_policy(run: Run) -> EvalResult | None:
    """Held-out accuracy of the policy, greedy, judged by the recipe's eval scorer."""
    if not run.held_out:
        return None
    e = run.recipe.eval
    max_new = e.max_new_tokens or run.recipe.policy.sampling.max_new_tokens
    gen = HFGenerator(run.engine.module, run.tokenizer)
    return heldout_accuracy(gen, run.held_out[: e.max_prompts], run.eval_scorer, max_new)


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
    run_dir = prepare_run_dir(recipe)
    run = build_run(recipe, run_dir, generators, reward_scorers, group_evaluator)
    result = TrainResult(run_dir=run_dir, model_dir=run_dir / "final", metrics=[])
    if recipe.eval.before:
        result.before = evaluate_policy(run)
        _say(console, "before", result.before)
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    progress = StepProgress(recipe.train.steps, recipe.log.progress, console)
    hook = plugins.get_plugin_manager().hook
    try:
        for step in range(1, recipe.train.steps + 1):
            metrics = grpo_step(run, step)
            writer.write(metrics)
            result.metrics.append(metrics)
            hook.on_step_end(step=step, metrics=metrics)
            progress.update(metrics["reward"])
    finally:
        progress.close()
        writer.close()
    if recipe.eval.after:
        result.after = evaluate_policy(run)
        _say(console, "after", result.after)
    with gathered_params(run.engine.module):  # ZeRO-3 holds shards; save whole weights
        run.engine.module.save_pretrained(result.model_dir, safe_serialization=True)
    run.tokenizer.save_pretrained(result.model_dir)
    return result


def _say(console, when: str, res: EvalResult | None) -> None:
    if console is not None and res is not None:
        console.print(
            f"held-out accuracy {when} training: {100 * res.accuracy:.1f}% "
            f"(±{100 * res.ci95:.1f}, n={res.n})"
        )
