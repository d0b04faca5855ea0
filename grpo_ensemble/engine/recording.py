"""What the sampling loop keeps for the update: every projection's output of the lean decode
step (decode.py), per layer and token, so that the update's first forward can take them instead
of computing them again (replay.py); the buffers it keeps from one step to the next; and the
count of optimizer steps that makes a recording stale."""

from __future__ import annotations

import weakref

import torch

# a Recording is kept, and replayed, only where the products it saves, rows × tokens × the
# decoder layers' parameters (multiply-adds), reach this: below it the replay's own fixed costs
# (a forward call for the prompt, the layer loop) exceed the products it saves, see
# docs/performance.md. The same bound on a GPU, where it is not tuned (the replay launches
# fewer kernels than the forward it replaces)
REPLAY_MIN = 1e9


def replay_pays(model: torch.nn.Module, rows: int, tokens: int) -> bool:
    """True when replaying `tokens` completion tokens of `rows` rows saves enough products."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.model.layers.parameters())
    return rows * tokens * params >= REPLAY_MIN


class BufferPool:
    """Buffers of recordings that ended, for the next ones of the same shape. A fresh buffer's
    pages are mapped and zeroed by the OS at first touch, in every step's sampling (see
    docs/performance.md); a buffer used before costs none of that. A recording
    ends (and gives its buffers back) when nothing refers to it any more: in training, once
    the update's first pass has run its forward; the next sampling, which takes them again,
    comes after that pass's backward. Only the buffers that pass's graph keeps until its
    backward anyway are kept (the MLP's gate and up products, which its activation's backward
    needs): the others, kept here, would add to the update's peak memory.
    With μ > 1 the update frees them before its second pass, which computes its own forward:
    kept beside its activations they would raise the peak."""

    KEPT = {"gate_up", "gate", "up"}  # the recorded products the update's backward holds

    KEYS_MAX = 16  # distinct shapes kept; the oldest go first

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (shape, like.dtype, like.device)
        kept = self.free.get(key)
        if not kept:
            return like.new_empty(shape)
        if len(kept) == 1:
            del self.free[key]
        return kept.pop()

    def give(self, buffers: list[torch.Tensor]) -> None:
        for b in buffers:
            key = (tuple(b.shape), b.dtype, b.device)
            self.free.setdefault(key, []).append(b)
            self.free[key] = self.free.pop(key)  # the newest last
        while len(self.free) > self.KEYS_MAX:
            del self.free[next(iter(self.free))]


class Recording:
    """Every projection's output of the lean decode step, per layer and token, kept so that the
    update's first forward can use them instead of computing them again (replay.py).

    `layers[i]` maps a name ("qkv" or "q", "k", "v"; "o"; "gate_up" or "gate", "up"; "down")
    to a buffer of `steps_max` tokens: (out, tokens, B) in column layout, (tokens, B, out) in
    row layout, of which the first `steps` tokens are filled (one per token fed to the step:
    the completion's tokens but the last). Either way a buffer's first t tokens are an
    (out, t·B) or (t·B, out) matrix without a copy, tokens in the order (token, row), which
    is the layout the replay computes in. A product writes into its place directly (in column
    layout with a row stride: slower products than contiguous ones, but far less time than a
    copy afterwards, see docs/performance.md). `version` is the model's `weights_version` when
    it was filled: an optimizer step since makes it stale.
    """

    def __init__(self, steps_max: int, pool: BufferPool | None = None):
        self.steps_max = steps_max
        self.steps = 0
        self.pool = pool
        self.buffers: list[torch.Tensor] = []  # given back to `pool` when this one ends
        if pool is not None:
            weakref.finalize(self, pool.give, self.buffers)
        self.layers: list[dict[str, torch.Tensor]] = []
        self.columns = False
        self.rows = 0
        self.model: torch.nn.Module | None = None
        self.version = 0

    @property
    def filled(self) -> bool:
        return self.model is not None

    def start(self, model: torch.nn.Module, columns: bool, rows: int) -> None:
        self.model, self.columns, self.rows = model, columns, rows
        self.layers = [{} for _ in model.model.layers]
        self.version = weights_version(model)

    def slot(self, layer: int, name: str, out: int, like: torch.Tensor) -> torch.Tensor:
        """The buffer's place for this token's (out, B) or (B, out) product."""
        buf = self.buffer(layer, name, out, like)
        return buf[:, self.steps] if self.columns else buf[self.steps]

    def buffer(self, layer: int, name: str, out: int, like: torch.Tensor) -> torch.Tensor:
        """The buffer of a layer's product `name` with `out` outputs (made at the first ask)."""
        bufs = self.layers[layer]
        if name not in bufs:
            if self.columns:
                shape = (out, self.steps_max, self.rows)
            else:
                shape = (self.steps_max, self.rows, out)
            if self.pool is not None and name in BufferPool.KEPT:
                bufs[name] = self.pool.take(shape, like)
                self.buffers.append(bufs[name])
            else:
                bufs[name] = like.new_empty(shape)
        return bufs[name]


def weights_version(model: torch.nn.Module) -> int:
    """How many optimizer steps have changed `model`'s weights, as `count_update` counts them
    (the training loop, at each optimizer step). Tensors' own version counters do not see an
    optimizer's writes (fused kernels, DeepSpeed's flat buffers)."""
    return getattr(model, "_grpo_ensemble_updates", 0)


def count_update(model: torch.nn.Module) -> None:
    """Note that an optimizer step changed `model`'s weights: its recordings are stale."""
    model._grpo_ensemble_updates = weights_version(model) + 1
