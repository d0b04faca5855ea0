"""The training run. `grpo_step` reads top to bottom: sample prompts, generate, score, evaluate
groups, old/ref log-probs, μ passes of micro-batched updates, sync, metrics.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..data.prompts import DataReport, PromptSampler, too_long
from ..engine.hf import HFGenerator, recording
from ..engine.recording import BufferPool, count_update
from ..engine.replay import replay_logprobs, replayable
from ..errors import RecipeError, UserError
from ..models.loading import load_model
from ..models.logprobs import completion_logprobs
from ..plugins.interfaces import Generator, GroupEvaluator, RewardScorer, mix64
from ..recipe import Recipe
from ..rollout.ensemble import EnsembleGenerator, Member
from ..rollout.groups import PolicyFailed, Rollout, evaluate_groups  # noqa: F401 — re-exported
from ..types import POLICY, Prompt
from .batching import LeftOut, MicroBatch, filler_batch, left_out, micro_batches
from .build import (
    TIS_TOKENIZER,
    WeightedScorer,
    build_eval_scorer,
    build_evaluator,
    build_peer_generator,
    build_scorers,
    check_policy_generator,
    cleaning_of,
    load_data,
    member_fields,
    prompt_token_limit,
    sampling_of,
)
from .deepspeed import build_engine, init_distributed, resolve_dtype, shard_frozen
from .loss import MODES, BatchSize, OffPolicy, grpo_loss
from .metrics import WEIGHT_KEYS, step_metrics, tokens_by_member, update_metrics


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
    data_reports: list[DataReport] = field(default_factory=list)
    # the policy keeps its decode products for the update's first pass (see `reuse_applies`)
    reuse_sampling: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(
    recipe: Recipe,
    run_dir: Path,
    generators: Mapping[str, Generator] | None = None,
    reward_scorers: Sequence[tuple] | None = None,
    group_evaluator: GroupEvaluator | None = None,
) -> Run:
    """Load models, build components and the DeepSpeed engine. Python objects win over names."""
    generators = dict(generators or {})
    given = set(generators)  # generator objects from the caller stay where they are
    init_distributed(recipe.train.dist_timeout_s)
    dtype = resolve_dtype(recipe)

    reports: list[DataReport] = []
    loaded = dist.agree(  # every rank checks and loads; a failure on any rank stops all
        lambda: _load(recipe, dtype, generators, reward_scorers, group_evaluator, reports)
    )
    scorers, evaluator, eval_scorer, (train_prompts, held_out), policy, tok, ref, peers = loaded
    check_world(recipe.train.prompts_per_step, dist.world_size())
    engine = build_engine(recipe, policy, dtype)
    gather = recipe.train.generation_weights == "gather"
    if recipe.train.frozen_models == "shard":  # ZeRO-3 inference engines, 1/world each
        ref = shard_frozen(ref, dtype) if ref is not None else None
        for gen in peers.values():
            if isinstance(gen, HFGenerator):
                gen.model, gen.gather = shard_frozen(gen.model, dtype), gather
    else:  # whole copies, on the device the policy trains on (DeepSpeed moved it there)
        ref = ref.to(engine.device) if ref is not None else None
        for name, gen in peers.items():  # and in its precision, as the sharded copies are
            if isinstance(gen, HFGenerator) and name not in given:
                gen.model = gen.model.to(engine.device, dtype)
    members = []
    for name, _, m in member_fields(recipe):
        if name == POLICY:  # shares the module being trained: always current weights
            gen = generators.pop(POLICY, None) or HFGenerator(
                engine.module, tok, **{"gather": gather, **m.params}
            )
        else:
            gen = peers[name]
        mode, on_error = getattr(m, "mode", "on_policy"), getattr(m, "on_error", "fail")
        members.append(Member(name, gen, m.n, sampling_of(m), mode, on_error))
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
        data_reports=reports,
        reuse_sampling=reuse_applies(recipe, engine, members),
    )


def _load(recipe: Recipe, dtype, generators: dict, reward_scorers, group_evaluator, reports):
    """Components, data, the policy (and reference) and the peers, checked and loaded."""
    scorers = build_scorers(recipe, reward_scorers)
    evaluator = build_evaluator(recipe, group_evaluator)
    eval_scorer = build_eval_scorer(recipe)
    if POLICY not in generators:
        check_policy_generator(recipe)
    train_prompts, held_out = load_data(recipe, scorers, reports, eval_scorer)
    p = recipe.policy
    policy, tok = load_model(p.model, "policy.model", dtype, p.trust_remote_code)
    how = cleaning_of(recipe, scorers)
    limit, held_out_limit = prompt_token_limit(recipe, policy)
    if limit is not None:  # prompts that cannot fit the context with their completion
        train_prompts = too_long(train_prompts, tok, limit, how, reports[0])
        if held_out:
            budget = "eval.max_new_tokens" if recipe.eval.max_new_tokens else None
            held_out = too_long(held_out, tok, held_out_limit, how, reports[1], budget)
    data = train_prompts, held_out
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


def reuse_applies(recipe: Recipe, engine, members: list[Member]) -> bool:
    """True when the policy should keep its sampling products for the update's first pass
    (replay.py): the option is on, the weights are whole (not ZeRO-3), no layer is
    recomputed (checkpointing), the model computes the same in training and eval mode, and
    every candidate a rank can hold in a step fits one micro-batch (so the update holds no
    more than one micro-batch's worth; a peer's candidates in it are computed, the policy's
    replayed). Only for our own generator over the module being trained."""
    policy = members[0].generator
    if not isinstance(policy, HFGenerator) or policy.model is not engine.module:
        return False
    t = recipe.train
    if not t.reuse_sampling_forward or t.zero_stage == 3 or t.gradient_checkpointing:
        return False
    if t.micro_batch_tokens is not None or not train_mode_is_eval_mode(engine.module):
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


@torch.no_grad()
def frozen_logprobs(model: torch.nn.Module, batches, temperature: float) -> list[torch.Tensor]:
    """Log-probs that stay fixed during the update (old policy or reference), per micro-batch."""
    was_training = model.training
    model.eval()
    out = [completion_logprobs(model, b.tokens, temperature) for b in batches]
    model.train(was_training)
    return out


def train_mode_is_eval_mode(model: torch.nn.Module) -> bool:
    """True when the model computes the same in training mode as in eval mode: no dropout
    module with p > 0, and no dropout, drop-path or router-noise setting above 0 in its config.
    Then the first update pass's log-probs are the old policy's (see `update`)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return False
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return False  # not a transformers model: assume it may differ

    def noisy(d: Mapping) -> bool:
        for k, v in d.items():
            if isinstance(v, Mapping) and noisy(v):
                return True
            hit = any(w in str(k) for w in ("dropout", "pdrop", "drop_path", "jitter"))
            if hit and isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
                return True
        return False

    return not noisy(config.to_dict())


def batch_size_of(run: Run, batches, left: LeftOut | None = None) -> BatchSize:
    """Sizes of the whole step's batch over all ranks, the candidates `left` out of the
    micro-batches included: every micro-batch's loss is normalised by them, so the gradients
    summed over ranks are those of one rank computing everything."""
    left = left or LeftOut()
    tokens = sum(b.tokens.completion_mask.sum() for b in batches)  # 0 when there are none
    mine = [sum(len(b.index) for b in batches) + left.sequences, float(tokens) + left.tokens]
    sequences, tokens = dist.all_sum(mine)
    return BatchSize(
        sequences=int(sequences),
        tokens=int(tokens),
        # the longest completion any member may write: Dr. GRPO's constant normaliser
        max_new_tokens=max(m.sampling.max_new_tokens for m in run.ensemble.members),
    )


def policy_logprobs(engine, mbatch: MicroBatch, temperature: float, reuse: bool):
    """(B, C) log-probs of a micro-batch under the policy, with the graph for its backward,
    and the (B,) rows whose forward's products came from sampling (`reuse` and still valid:
    see replay.py), or None. A micro-batch that mixes the policy's samples with peers' replays
    the policy's rows and runs the others through the plain forward, as two sub-batches of
    its rows. The micro-batch's traces are dropped: stale after this pass."""
    batch, traces = mbatch.tokens, mbatch.traces
    traced = [i for i, t in enumerate(traces or ()) if t is not None] if reuse else []
    rows = len(batch.input_ids)
    mine = batch if len(traced) == rows or not traced else batch.select(traced)
    reused = None
    if traced and replayable(engine, mine, [traces[i] for i in traced]):
        reused = torch.zeros(rows, dtype=torch.bool, device=batch.input_ids.device)
        reused[traced] = True
    if reused is None:
        logp = completion_logprobs(engine, batch, temperature)
    elif len(traced) == rows:
        logp = replay_logprobs(engine, batch, traces, temperature)
    else:
        mine_rows = set(traced)
        others = [i for i in range(rows) if i not in mine_rows]  # no per-row read of a tensor
        both = torch.cat(
            [
                replay_logprobs(engine, mine, [traces[i] for i in traced], temperature),
                completion_logprobs(engine, batch.select(others), temperature),
            ]
        )
        order = torch.empty(rows, dtype=torch.long, device=both.device)
        order[traced + others] = torch.arange(rows, device=both.device)
        logp = both.index_select(0, order)  # back in the micro-batch's row order
    mbatch.traces = None  # frees sampling's products once the graph no longer needs them
    return logp, reused


def metric_parts(out, mbatch: MicroBatch, reused) -> dict[str, torch.Tensor]:
    """A micro-batch's sums for the step's metrics, as tensors on its device."""
    mask = mbatch.tokens.completion_mask
    parts = {
        "loss": out.loss.detach(),
        "kl_sum": (out.kl.detach() * mask).sum(),
        "clipped": out.clipped.sum(),
        "tokens": mask.sum(),
        "reused": mask.sum() * 0.0 if reused is None else (mask * reused.unsqueeze(1)).sum(),
    }
    if out.tis_clamped is not None:
        parts["w/tis_clamped/weight"] = out.tis_clamped.sum()
    for name, k in MODES.items():
        rows = mask * (mbatch.modes == k).unsqueeze(1)
        parts[f"w/{name}/weight"] = (out.weight.detach() * rows).sum()
        parts[f"w/{name}/tokens"] = rows.sum()
    return parts


def accumulate(
    run: Run, batches, size: BatchSize, old, ref, keep=None, reuse=False
) -> dict[str, float]:
    """Forward/backward over every micro-batch into one accumulated gradient (no step).
    Returns this rank's sums for the metrics. `old` None: each micro-batch's own log-probs,
    detached, are the old ones (ratio 1); they are appended to the list `keep` when given.
    `reuse`: a micro-batch of the policy's own samples takes its forward's products from
    sampling where they are still valid (replay.py); its traces are dropped either way."""
    r, engine = run.recipe, run.engine
    # DeepSpeed averages gradients over ranks; each rank's loss is already its share of the
    # global batch, so scaling by the number of ranks turns that average into the sum
    scale = float(dist.world_size())
    sums = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0.0, "tokens": 0.0, "reused": 0.0}
    sums.update({f"w/{k}/{x}": 0.0 for k in WEIGHT_KEYS for x in ("weight", "tokens")})
    off = OffPolicy(r.loss.shaped_gamma, r.loss.tis_low, r.loss.tis_high)
    on_device: dict[str, torch.Tensor] = {}
    for j, mbatch in enumerate(batches):
        batch, adv = mbatch.tokens, mbatch.advantages
        engine.set_gradient_accumulation_boundary(j == len(batches) - 1)
        logp, reused = policy_logprobs(engine, mbatch, r.policy.sampling.temperature, reuse)
        if old is None and keep is not None:
            keep.append(logp.detach())
        out = grpo_loss(
            logp,
            old[j] if old is not None else logp.detach(),  # ratio exactly 1
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
        # on the device: no wait for it per micro-batch
        for k, v in metric_parts(out, mbatch, reused).items():
            on_device[k] = on_device[k] + v.double() if k in on_device else v.double()
    if on_device:  # one transfer for every micro-batch's metrics
        names = list(on_device)
        sums.update(zip(names, torch.stack([on_device[k] for k in names]).tolist(), strict=True))
    return sums


def update(
    run: Run, batches: list[MicroBatch], n_batches: int | None = None, left: LeftOut | None = None
) -> dict[str, float]:
    """μ optimizer steps over the step's micro-batches; returns loss, KL, clip metrics.
    `n_batches` is the most micro-batches any rank has; this rank fills up to it. `left`: the
    candidates in the loss that the micro-batches leave out (their share is 0)."""
    r, engine = run.recipe, run.engine
    left = left or LeftOut()
    n_batches = len(batches) if n_batches is None else n_batches
    batches = batches + [filler_batch(run)] * (n_batches - len(batches))
    temp = r.policy.sampling.temperature
    size = batch_size_of(run, batches, left)
    start = dist.now()
    # μ > 1: the old log-probs are the policy's before this step's first optimizer step. The
    # first pass computes exactly those (the weights move only after its last micro-batch), so
    # it keeps them, unless training mode (dropout) would make them differ from a no-grad pass
    same = train_mode_is_eval_mode(engine.module)  # no dropout: training mode is eval mode
    reuse = r.loss.mu > 1 and same
    old = frozen_logprobs(engine.module, batches, temp) if r.loss.mu > 1 and not reuse else None
    ref = frozen_logprobs(run.ref_model, batches, temp) if run.ref_model is not None else None
    logprob_seconds = dist.all_max([dist.now() - start])[0]  # the slowest rank's
    total: dict[str, float] = {}
    first: dict[str, float] = {}
    grad_norms: list[float] = []
    lrs: list[float] = []
    bad = False
    # the first pass may reuse sampling's products (replay.py): sampling ran in eval mode
    reuse_sampling = r.train.reuse_sampling_forward and same
    for i in range(r.loss.mu):
        if i == 1:  # a pass of its own activations: the recordings' pages not kept beside
            release_recording_buffers(run)
        keep: list[torch.Tensor] | None = [] if old is None and r.loss.mu > 1 else None
        sums = accumulate(run, batches, size, old, ref, keep, reuse_sampling and i == 0)
        old = keep if keep is not None else old
        if i == 0:  # per-mode weights and token shares: of the first pass
            first = {k: v for k, v in sums.items() if k.startswith("w/")}
            first["tokens/first"] = sums["tokens"]
            first["reused/first"] = sums["reused"]
            first["left_out/first"] = float(left.tokens)
        for k in ("loss", "kl_sum", "clipped", "tokens"):
            total[k] = total.get(k, 0.0) + sums[k]
        lrs.append(float(engine.get_lr()[0]))  # the rate this optimizer step uses
        norm = optimizer_step(engine)
        if norm is None:
            bad = True
            break
        grad_norms.append(norm)
    by_member = {f"member/{k}": v for k, v in tokens_by_member(run, batches, left).items()}
    sums = dist.sum_dict({**total, **first, **by_member})
    if bad:  # the weights did not move: report the step, count it
        return {**NO_UPDATE, "loss": sums["loss"], "nonfinite_update": 1}
    lr = sum(lrs) / len(lrs)
    return {**update_metrics(run, sums, grad_norms), "lr": lr, "time/logprobs": logprob_seconds}


def release_recording_buffers(run: Run) -> None:
    """Free the buffers the policy's generator keeps for its next recordings (recording.BufferPool):
    beside a pass that computes its own forward they would add to the peak memory."""
    pool = getattr(run.ensemble.members[0].generator, "buffers", None)
    if isinstance(pool, BufferPool):
        pool.free.clear()


def _global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of `grads` together, computed in fp32 also for bf16 gradients."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


def optimizer_step(engine) -> float | None:
    """Step the optimizer unless the accumulated gradient holds NaN or inf. Returns the
    gradient's global norm before clipping, or None if the step was skipped.

    ZeRO stages 1-3 check the gradient norm themselves and skip such a step (counted in
    `engine.skipped_steps`, the LR schedule not advanced), and report the norm. Stage 0 does
    neither (its `get_global_grad_norm` stays 0), so we take the norm of the (already
    all-reduced, hence identical on every rank) gradients first.
    """
    norm = None
    if engine.zero_optimization_stage() == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        # a norm is NaN or inf when its gradient holds a NaN or an inf, or is so large that
        # the norm overflows: no usable update either way (clipping would divide by it)
        norm = _global_norm(grads) if grads else 0.0
        norm = float(norm)
        if not math.isfinite(norm):
            engine.zero_grad()
            return None
    skipped = engine.skipped_steps
    engine.step()
    count_update(engine.module)  # recordings of its sampling are stale (replay.py)
    if engine.skipped_steps != skipped:
        return None
    return norm if norm is not None else float(engine.get_global_grad_norm() or 0.0)


# metrics of a step whose groups were all dropped (no learning signal): no optimizer step
NO_UPDATE = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "skipped_update": 1}


def prompt_seed(seed: int, step: int, slot: int) -> int:
    """The sampling seed of the prompt in place `slot` of step `step`'s global batch: the same
    whichever rank holds the prompt, so results do not depend on the number of ranks."""
    return mix64(mix64(mix64(seed) + step) + slot)


def grpo_step(run: Run, step: int) -> dict[str, Any]:
    """One GRPO step; returns the metrics row written to metrics.jsonl."""
    t = {"start": dist.now()}
    prompts = run.sampler.next(run.recipe.train.prompts_per_step)  # global: same on every rank
    mine = dist.shard(len(prompts))  # this rank's whole groups
    seeds = [prompt_seed(run.recipe.seed, step, i) for i in mine]
    inject = PolicyFailed(run) if run.recipe.group.inject == "on_failure" else None
    policy = run.ensemble.members[0].generator
    with recording(policy, run.reuse_sampling):  # this step's samples only (not evaluation's)
        groups = dist.agree(  # members sample, groups pooled per prompt
            lambda: run.ensemble.generate([prompts[i] for i in mine], inject, seeds)
        )
    t["generate"] = dist.now()
    known = inject.known if inject is not None else None  # the policy's, scored already
    rollout = dist.agree(lambda: evaluate_groups(run, groups, known))  # rewards, advantages
    t["score"] = dist.now()
    batches = dist.agree(lambda: micro_batches(run, rollout))
    left = left_out(run, rollout)
    # ranks may hold different counts; candidates left out still take an optimizer step (of a
    # zero gradient: Adam's moments and weight decay move on as if they had been computed)
    n_batches = int(dist.all_max([len(batches) or int(left.sequences > 0)])[0])
    upd = update(run, batches, n_batches, left) if n_batches else dict(NO_UPDATE)
    t["update"] = dist.now()
    run.ensemble.members[0].generator.sync_weights(run.engine.module)  # policy samples anew
    t["sync"] = dist.now()
    return step_metrics(run, step, rollout, upd, t)
