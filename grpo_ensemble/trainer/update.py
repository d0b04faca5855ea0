"""The update: μ optimizer steps over a step's micro-batches, each pass a forward and backward
of every micro-batch into one accumulated gradient.

Log-probs are taken at the temperature the policy sampled at (`UpdateSettings.temperature`).
The first pass over the policy's own candidates may take its forward's products from sampling
when the policy's generator offers forward replay (`ReplaysForward`); every other forward is
the model's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import dist
from ..models.adapters import adapters_off
from ..models.logprobs import completion_logprobs, completion_logprobs_entropy
from ..plugins.interfaces import ReplaysForward
from ..types import POLICY
from .batching import LeftOut, MicroBatch
from .loss import MODES, BatchSize, LossSettings, entropy_mask, grpo_loss
from .memory import MicroBatchTooLarge
from .metrics import WEIGHT_KEYS, tokens_by_member, update_metrics


@dataclass(frozen=True)
class UpdateSettings:
    """What the update reads, resolved once from the recipe."""

    loss: LossSettings
    mu: int = 1  # optimizer steps per training step, each over every micro-batch
    temperature: float = 1.0  # the policy's sampling temperature: its log-probs divide by it
    max_new_tokens: int = 32  # the longest completion any member may write (`constant` norm)
    # the model computes the same in training as in eval mode (no dropout): the first pass's
    # log-probs are then the old policy's, and sampling's products can stand for its forward
    train_is_eval: bool = True
    # micro_batch_tokens auto in one process: a first pass out of memory is given up, its
    # gradients cleared, for the step to try again with a smaller budget (memory.py)
    back_off: bool = False


@dataclass
class Update:
    """The update's inputs beyond the micro-batches: the engine, the frozen reference, the
    policy's generator where it replays sampling's forward, and the members' names."""

    engine: object  # deepspeed.DeepSpeedEngine wrapping the policy
    ref_model: torch.nn.Module | None
    replay: ReplaysForward | None
    members: Sequence[str]


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


def _own_rows(mbatch: MicroBatch, device) -> torch.Tensor | None:
    """(B,) bool: the rows the policy sampled (None for a filler batch, which has no rows of
    any member)."""
    if not mbatch.sources:
        return None
    return torch.tensor([m == POLICY for m in mbatch.sources], device=device)


def batch_size_of(batches, max_new_tokens: int, left: LeftOut | None = None) -> BatchSize:
    """Sizes of the whole step's batch over all ranks, the candidates `left` out of the
    micro-batches included: every micro-batch's loss is normalised by them, so the gradients
    summed over ranks are those of one rank computing everything."""
    left = left or LeftOut()
    tokens = sum(b.tokens.completion_mask.sum() for b in batches)  # 0 when there are none
    mine = [sum(len(b.index) for b in batches) + left.sequences, float(tokens) + left.tokens]
    sequences, tokens = dist.all_sum(mine)
    return BatchSize(sequences=int(sequences), tokens=int(tokens), max_new_tokens=max_new_tokens)


def policy_logprobs(engine, mbatch: MicroBatch, temperature: float, replay, entropy="value"):
    """(B, C) log-probs of a micro-batch under the policy, with the graph for its backward,
    the (B,) rows whose forward's products came from sampling, or None, and the (B, C)
    entropy of the policy at each completion position from the same logits (`entropy`:
    "value" or "grad", see `logprobs_and_entropy`). `replay`: the policy's generator where it
    replays sampling's forward (`ReplaysForward`), else None. A micro-batch that mixes the
    policy's samples with peers' replays the policy's rows and runs the others through the
    plain forward, as two sub-batches of its rows. The micro-batch's traces are dropped:
    stale after this pass."""
    batch, traces = mbatch.tokens, mbatch.traces
    traced = [i for i, t in enumerate(traces or ()) if t is not None] if replay else []
    rows = len(batch.input_ids)
    mine = batch if len(traced) == rows or not traced else batch.select(traced)
    replayed = None  # (log-probs, entropy) of the rows `traced`
    if traced:
        replayed = replay.replay_logprobs(
            engine, mine, [traces[i] for i in traced], temperature, entropy=entropy
        )
    reused = None
    if replayed is None:
        logp, ent = completion_logprobs_entropy(engine, batch, temperature, entropy=entropy)
    else:
        reused = torch.zeros(rows, dtype=torch.bool, device=batch.input_ids.device)
        reused[traced] = True
        if len(traced) == rows:
            logp, ent = replayed
        else:
            mine_rows = set(traced)
            others = [i for i in range(rows) if i not in mine_rows]  # no per-row tensor read
            rest = completion_logprobs_entropy(
                engine, batch.select(others), temperature, entropy=entropy
            )
            order = torch.empty(rows, dtype=torch.long, device=replayed[0].device)
            order[traced + others] = torch.arange(rows, device=order.device)
            # back in the micro-batch's row order
            logp = torch.cat([replayed[0], rest[0]]).index_select(0, order)
            ent = torch.cat([replayed[1], rest[1]]).index_select(0, order)
    mbatch.traces = None  # frees sampling's products once the graph no longer needs them
    return logp, reused, ent


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> float:
    """The entropy at the (1 − quantile) quantile of the micro-batch's real tokens on every
    rank (linear interpolation, as torch.quantile): tokens at or above it keep their policy
    gradient (top_entropy_quantile). Every rank calls this for each of its micro-batches (a
    filler one included: ranks hold the same number)."""
    mine = entropy.detach()[mask.bool()].double().cpu()
    values = mine if dist.world_size() == 1 else torch.cat(dist.all_gather_objects(mine))
    if values.numel() == 0:
        return float("inf")
    ordered = values.sort().values
    pos = (len(ordered) - 1) * (1 - quantile)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo]))


def metric_parts(out, mbatch: MicroBatch, reused, entropy, members) -> dict[str, torch.Tensor]:
    """A micro-batch's sums for the step's metrics, as tensors on its device."""
    mask = mbatch.tokens.completion_mask
    parts = {
        "loss": out.loss.detach(),
        "kl_sum": (out.kl.detach() * mask).sum(),
        "clipped": out.clipped.sum(),
        "tokens": mask.sum(),
        "reused": mask.sum() * 0.0 if reused is None else (mask * reused.unsqueeze(1)).sum(),
        "sequences": mask.new_tensor(float(len(mbatch.index))),
    }
    if out.dropped is not None:
        parts["off_policy_dropped"] = out.dropped.sum()
    per_row = (entropy.detach() * mask).sum(1)  # (B,)
    for name in members:
        rows = torch.tensor([src == name for src in mbatch.sources], device=mask.device)
        parts[f"H/{name}"] = (per_row * rows).sum()
        parts[f"Ht/{name}"] = (mask.sum(1) * rows).sum()
    if out.tis_clamped is not None:
        parts["w/tis_clamped/weight"] = out.tis_clamped.sum()
    for name, k in MODES.items():
        rows = mask * (mbatch.modes == k).unsqueeze(1)
        parts[f"w/{name}/weight"] = (out.weight.detach() * rows).sum()
        parts[f"w/{name}/tokens"] = rows.sum()
    return parts


def accumulate(
    u: Update, s: UpdateSettings, batches, size: BatchSize, old, ref, keep=None, replay=None
) -> dict[str, float]:
    """Forward/backward over every micro-batch into one accumulated gradient (no step).
    Returns this rank's sums for the metrics. `old` None: each micro-batch's own log-probs,
    detached, are the old ones (ratio 1); they are appended to the list `keep` when given.
    `replay`: a micro-batch of the policy's own samples takes its forward's products from
    sampling where they are still valid; its traces are dropped either way."""
    engine = u.engine
    # DeepSpeed averages gradients over ranks; each rank's loss is already its share of the
    # global batch, so scaling by the number of ranks turns that average into the sum
    scale = float(dist.world_size())
    sums = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0.0, "tokens": 0.0, "reused": 0.0}
    sums.update({"sequences": 0.0, "off_policy_dropped": 0.0})
    sums.update({f"w/{k}/{x}": 0.0 for k in WEIGHT_KEYS for x in ("weight", "tokens")})
    sums.update({f"{h}/{m}": 0.0 for m in u.members for h in ("H", "Ht")})
    on_device: dict[str, torch.Tensor] = {}
    c = s.loss
    for j, mbatch in enumerate(batches):
        batch, adv = mbatch.tokens, mbatch.advantages
        engine.set_gradient_accumulation_boundary(j == len(batches) - 1)
        entropy = "grad" if c.entropy_coef != 0 else "value"  # always logged
        logp, reused, ent = policy_logprobs(engine, mbatch, s.temperature, replay, entropy)
        if old is None and keep is not None:
            keep.append(logp.detach())
        mask = batch.completion_mask
        keep_tokens = None
        if c.top_entropy_quantile < 1:  # every rank, every micro-batch: a collective
            cut = entropy_threshold(ent, mask, c.top_entropy_quantile)
            keep_tokens = entropy_mask(ent.detach(), mask, cut)
        out = grpo_loss(
            logp,
            old[j] if old is not None else logp.detach(),  # ratio exactly 1
            ref[j] if ref is not None else None,
            adv,
            batch.completion_mask,
            size,
            s.loss,
            mbatch.modes,
            mbatch.behaviour,
            own=_own_rows(mbatch, logp.device),
            entropy=ent,
            keep_tokens=keep_tokens,
        )
        filler = not mbatch.index
        # the loss is already this micro-batch's share of the step: no 1/accumulation scaling
        engine.backward(out.loss * (0.0 if filler else scale), scale_wrt_gas=False)
        if filler:
            continue
        # on the device: no wait for it per micro-batch
        for k, v in metric_parts(out, mbatch, reused, ent, u.members).items():
            on_device[k] = on_device[k] + v.double() if k in on_device else v.double()
    if on_device:  # one transfer for every micro-batch's metrics
        names = list(on_device)
        sums.update(zip(names, torch.stack([on_device[k] for k in names]).tolist(), strict=True))
    return sums


def update(
    u: Update, s: UpdateSettings, batches: list[MicroBatch], left: LeftOut | None = None
) -> dict[str, float]:
    """μ optimizer steps over the step's micro-batches (already filled up to the most any rank
    has); returns loss, KL, clip metrics. `left`: the candidates in the loss that the
    micro-batches leave out (their share is 0)."""
    engine = u.engine
    left = left or LeftOut()
    size = batch_size_of(batches, s.max_new_tokens, left)
    start = dist.now()
    # μ > 1: the old log-probs are the policy's before this step's first optimizer step. The
    # first pass computes exactly those (the weights move only after its last micro-batch), so
    # it keeps them, unless training mode (dropout) would make them differ from a no-grad pass
    keep_first = s.mu > 1 and s.train_is_eval
    try:
        old = (
            frozen_logprobs(engine.module, batches, s.temperature)
            if s.mu > 1 and not keep_first
            else None
        )
        ref = None
        if u.ref_model is not None:  # with adapters the reference is the policy's own base
            with adapters_off(u.ref_model):
                ref = frozen_logprobs(u.ref_model, batches, s.temperature)
    except torch.OutOfMemoryError:  # no gradient exists yet: smaller micro-batches may fit
        if not s.back_off:
            raise
        raise MicroBatchTooLarge.of(batches) from None
    logprob_seconds = dist.all_max([dist.now() - start])[0]  # the slowest rank's
    total: dict[str, float] = {}
    first: dict[str, float] = {}
    grad_norms: list[float] = []
    lrs: list[float] = []
    bad = False
    for i in range(s.mu):
        if i == 1 and u.replay is not None:  # a pass of its own activations: no pages kept beside
            u.replay.release_buffers()
        keep: list[torch.Tensor] | None = [] if old is None and s.mu > 1 else None
        try:
            sums = accumulate(u, s, batches, size, old, ref, keep, u.replay if i == 0 else None)
        except torch.OutOfMemoryError:
            if i > 0 or not s.back_off:  # a later pass follows an optimizer step: no retry
                raise
            clear_gradients(engine)
            raise MicroBatchTooLarge.of(batches) from None
        old = keep if keep is not None else old
        if i == 0:  # per-mode weights, token shares, entropy: of the first pass
            first = {k: v for k, v in sums.items() if k.startswith(("w/", "H/", "Ht/"))}
            first["sequences/first"] = sums["sequences"]
            first["off_policy_dropped/first"] = sums["off_policy_dropped"]
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
    by_member = {f"member/{k}": v for k, v in tokens_by_member(u.members, batches, left).items()}
    sums = dist.sum_dict({**total, **first, **by_member})
    if bad:  # the weights did not move: report the step, count it
        return {**NO_UPDATE, "loss": sums["loss"], "nonfinite_update": 1}
    lr = sum(lrs) / len(lrs)
    return {**update_metrics(sums, grad_norms, s.mu), "lr": lr, "time/logprobs": logprob_seconds}


def clear_gradients(engine) -> None:
    """Drop every gradient accumulated so far in the step (ZeRO stage 0 or 1: they are in the
    parameters' .grad until the step's last micro-batch) and the memory they held."""
    engine.zero_grad()
    for p in engine.module.parameters():
        p.grad = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    if engine.skipped_steps != skipped:
        return None
    return norm if norm is not None else float(engine.get_global_grad_norm() or 0.0)


# metrics of a step whose groups were all dropped (no learning signal): no optimizer step
NO_UPDATE = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "skipped_update": 1}
