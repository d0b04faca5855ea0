"""One GRPO step, read top to bottom as its phases: the policy samples → its candidates are
scored → the prompts that need peers are chosen → the peers sample → their candidates are
scored → group advantages → micro-batches → the update → the policy's generator takes the new
weights → the step's metrics.

Each phase is a function of plain values (the step's `StepSettings`, the components, the
previous phase's output); this function is the only place that hands them on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from .. import dist
from ..plugins.interfaces import FollowsSteps, Progress, mix64
from ..rollout.ensemble import Sampled
from ..rollout.groups import batch_scaled, evaluate_groups
from ..rollout.injection import peers_wanted
from ..rollout.scoring import Known, score_groups
from .batching import attach_traces, filler_batch, left_out, micro_batches
from .memory import MicroBatchTooLarge
from .metrics import scorer_metrics, step_metrics
from .setup import Run
from .update import NO_UPDATE, Update, update


def prompt_seed(seed: int, step: int, slot: int) -> int:
    """The sampling seed of the prompt in place `slot` of step `step`'s global batch: the same
    whichever rank holds the prompt, so results do not depend on the number of ranks."""
    return mix64(mix64(mix64(seed) + step) + slot)


class Clock:
    """Seconds per phase on this rank; a phase met twice adds up."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.last = dist.now()

    def lap(self, phase: str) -> None:
        now = dist.now()
        self.times[phase] = self.times.get(phase, 0.0) + now - self.last
        self.last = now


def train_on(run: Run, rollout, members: list[str]) -> dict[str, Any]:
    """The step's micro-batches of its rollout, and the update over them. With
    micro_batch_tokens auto, an update whose first pass ran out of memory (nothing stepped,
    its gradients cleared) is done again from the start with half the token budget."""
    # the pass that failed may have drawn random numbers (dropout): the retry draws them anew
    # from where the step's update began, as a run with the smaller budget would
    cuda = torch.cuda.is_available()
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
    while True:
        how = run.budget.batching(run.settings.batching)
        try:
            return _update_with(run, rollout, how, members)
        except MicroBatchTooLarge as exc:
            run.budget.halve(exc.positions, least=exc.widest)
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])


def _update_with(run: Run, rollout, how, members: list[str]) -> dict[str, Any]:
    s = run.settings
    batches = dist.agree(lambda: micro_batches(rollout, how, s.group.modes, run.prompt_ids))
    if run.replay is not None:  # where the policy's sampling products are, for the first pass
        attach_traces(batches, run.replay.take_traces(rollout.candidates))
    left = left_out(rollout, how, members)
    # ranks may hold different counts; candidates left out still take an optimizer step (of a
    # zero gradient: Adam's moments and weight decay move on as if they had been computed)
    n_batches = int(dist.all_max([len(batches) or int(left.sequences > 0)])[0])
    if not n_batches:
        return dict(NO_UPDATE)
    pad = run.tokenizer.pad_token_id
    batches += [filler_batch(pad)] * (n_batches - len(batches))
    batches = [b.to(run.engine.device) for b in batches]
    u = Update(run.engine, run.ref_model, run.replay, members)
    return update(u, s.update, batches, left)


def tell_progress(run: Run, step: int) -> None:
    """Scorers that follow the run learn where it stands before the step's scoring. `step` is
    the 1-based step about to run, its prompts not yet drawn."""
    mu, steps, sampler = run.settings.update.mu, run.recipe.train.steps, run.sampler
    progress = Progress(
        step=step - 1,
        steps=steps,
        optimizer_steps=(step - 1) * mu,
        max_optimizer_steps=steps * mu,
        epoch=sampler.epoch + sampler.pos / len(sampler.prompts),
    )
    for ws in run.scorers:
        if isinstance(ws.scorer, FollowsSteps):
            ws.scorer.begin_step(progress)


@dataclass
class Own:
    """What the policy sampled in a step, before the peers sample: this rank's prompts, their
    sampling seeds, the policy's groups and their scores."""

    prompts: list  # this rank's prompts (whole groups)
    slots: list[int]  # their places in the step's prompts
    seeds: list[int]  # one per prompt
    sampled: Sampled  # the policy's candidates, one group per prompt
    scores: Any  # their scores (`score_groups`)
    clock: Clock


def grpo_step(run: Run, step: int, on_rollout=None) -> dict[str, Any]:
    """One GRPO step; returns the metrics row written to metrics.jsonl. `on_rollout`: called
    with the step's scored rollout (this rank's groups), e.g. to log sample completions."""
    return finish_step(run, step, sample_own(run, step), on_rollout)


def sample_own(run: Run, step: int) -> Own:
    """The step's prompts drawn, the policy's candidates sampled and scored. (Co-training
    samples every policy so, with the weights of the step before, before any finishes.)"""
    s, ensemble = run.settings, run.ensemble
    clock = Clock()
    tell_progress(run, step)  # before this step's prompts are drawn
    prompts = run.sampler.next(s.prompts_per_step)  # global: the same on every rank
    mine = dist.shard(len(prompts))  # this rank's whole groups
    my_prompts = [prompts[i] for i in mine]
    seeds = [prompt_seed(s.seed, step, i) for i in mine]

    # the policy samples; where the update replays its forward, its generator keeps the products
    keeping = run.replay.recording() if run.replay is not None else contextlib.nullcontext()
    with keeping:
        own = dist.agree(lambda: ensemble.sample_policy(my_prompts, seeds))
    clock.lap("generate")
    # every candidate is scored once: the policy's now, the peers' after they sample
    own_scores = dist.agree(lambda: score_groups(own.groups, run.scorers))
    clock.lap("score")
    return Own(my_prompts, list(mine), seeds, own, own_scores, clock)


def finish_step(run: Run, step: int, o: Own, on_rollout=None) -> dict[str, Any]:
    """The rest of the step after `sample_own`: the peers, the advantages, the update, the
    weights synced, the metrics row."""
    s, ensemble, clock, own = run.settings, run.ensemble, o.clock, o.sampled
    clock.last = dist.now()  # co-training: the time the other policies took is not this one's
    wanted = peers_wanted(own.groups, o.scores, s.inject, s.success_reward)
    pooled = dist.agree(lambda: ensemble.sample_peers(own.groups, wanted, o.seeds))
    clock.lap("generate")
    known = Known([len(g.candidates) for g in own.groups], o.scores)
    scores = dist.agree(lambda: score_groups(pooled.groups, run.scorers, known))
    weights = {ws.name: ws.weight for ws in run.scorers}
    rollout = dist.agree(
        lambda: evaluate_groups(pooled.groups, scores, run.evaluator, s.group, weights)
    )
    rollout = batch_scaled(rollout, s.group)  # sums over ranks: outside `agree`
    if on_rollout is not None:
        on_rollout(rollout)
    clock.lap("score")

    members = [m.name for m in ensemble.members]
    upd = train_on(run, rollout, members)
    clock.lap("update")
    run.policy_generator.sync_weights(run.engine.module)  # the policy samples anew
    clock.lap("sync")
    for name, seconds in {**own.seconds, **pooled.seconds}.items():
        clock.times[f"generate/{name}"] = seconds
    faults = {**own.faults, **pooled.faults}
    row = step_metrics(
        step,
        rollout,
        upd,
        run.engine.get_lr()[0],
        clock.times,
        [ws.name for ws in run.scorers],
        members,
        faults,
    )
    if run.budget.auto and run.budget.tokens is not None:  # the size auto has settled on
        row["micro_batch_tokens"] = run.budget.tokens
    row.update(scorer_metrics(run.scorers, row))
    return row
