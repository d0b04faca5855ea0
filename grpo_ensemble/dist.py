"""Ranks: who we are, which prompts are ours, sums across ranks, and errors every rank agrees on.

Everything here is a no-op in a single process, so the training code reads the same for one
rank and for many. Collectives must be entered by every rank in the same order; the training
step is arranged so that they are (see `trainer/step.py`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .errors import GrpoEnsembleError, RunError, UserError
from .stopping import Stop

T = TypeVar("T")


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def now() -> float:
    """`time.perf_counter()` once this process's queued GPU work has finished, so that a phase
    timed between two calls holds its kernels (on a CPU: the plain clock)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


# the process group the functions here work over (None: every rank): a co-trained policy
# placed on its own share of the ranks (`placement: split`) runs its step `within` its group
_group = None


@contextlib.contextmanager
def within(group):
    """Inside the block, "the ranks" are `group`'s (a torch process group; None: all)."""
    global _group
    outer, _group = _group, group
    try:
        yield
    finally:
        _group = outer


def current_group():
    """The process group the ranks are (None: the default one, every rank)."""
    return _group


def world_size() -> int:
    d = _dist()
    return d.get_world_size(_group) if d else 1


def rank() -> int:
    d = _dist()
    return d.get_rank(_group) if d else 0


def global_rank() -> int:
    """This process's rank among every rank, whatever group the block is `within`."""
    d = _dist()
    return d.get_rank() if d else 0


def is_main() -> bool:
    """Rank 0 writes logs, the progress bar and the final model."""
    return rank() == 0


# warnings this process has written (`warn_once`)
warned: set[str] = set()


def warn_once(key: str, line: str) -> None:
    """`line` on stderr by rank 0, once per process for `key`: a setting the user should
    know about, said where every rank would otherwise repeat it at every load."""
    import sys

    if key in warned:
        return
    warned.add(key)
    if is_main():
        sys.stderr.write(f"warning: {line}\n")


def shard(n: int, world: int | None = None, r: int | None = None) -> range:
    """This rank's contiguous slice of `n` items; the first `n % world` ranks get one more.
    Concatenating the slices of ranks 0…world-1 gives 0…n-1 in order."""
    world = world_size() if world is None else world
    r = rank() if r is None else r
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def _device() -> torch.device:
    d = _dist()
    if d and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    d = _dist()
    if d is None or world_size() == 1:
        return t
    x = t.to(_device())
    d.all_reduce(x, op=op, group=_group)
    return x.to(t.device)


def all_max_tensor(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t.clone(), torch.distributed.ReduceOp.MAX) if _dist() else t


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (exact for counts)."""
    if _dist() is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return _reduce(t, torch.distributed.ReduceOp.SUM).tolist()


def all_max(values: Sequence[float]) -> list[float]:
    if _dist() is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return _reduce(t, torch.distributed.ReduceOp.MAX).tolist()


def sum_dict(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over ranks. Every rank must hold the same keys."""
    keys = sorted(values)
    return dict(zip(keys, all_sum([values[k] for k in keys]), strict=True))


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (picklable objects only)."""
    d = _dist()
    if d is None or world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    d.all_gather_object(out, obj, group=_group)
    return out


def barrier() -> None:
    d = _dist()
    if d is not None and world_size() > 1:
        d.barrier(group=_group)


def agree(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raises on any rank, raise on every rank.

    Without this, a rank whose reward scorer fails would leave the others waiting in the next
    collective. Every rank instead learns the first failing rank's message and raises it: a
    `UserError` stays one (exit code 2), anything else becomes a `RunError` (exit code 1).
    The error is marked `agreed`, so that only rank 0 prints it. A stop signal's `Stop` stays
    one on every rank. Inside `within(group)` the ranks are the group's, and an error agreed
    there is agreed again by an `agree` over more ranks (its message as it is).
    """
    err: BaseException | None = None
    result = None
    try:
        result = fn()
    except (Exception, Stop) as exc:  # noqa: BLE001 — reported on every rank below
        err = exc
    world = world_size()
    # an error agreed among these ranks (or all) is on every one of them already
    if world == 1 or getattr(err, "agreed", None) in (True, _group or True):
        if err is not None:
            raise err
        return result  # type: ignore[return-value]
    flag = torch.tensor([rank() if err is not None else world], dtype=torch.long)
    first = int(_reduce(flag, torch.distributed.ReduceOp.MIN))
    if first == world:
        return result  # type: ignore[return-value]
    payload: list = [None, None, None]  # the same length on every rank
    src = first if _group is None else torch.distributed.get_global_rank(_group, first)
    if rank() == first:  # one agreed among fewer ranks already names its rank
        payload = [_kind(err), _describe(err), bool(getattr(err, "agreed", None))]
    torch.distributed.broadcast_object_list(payload, src=src, group=_group)
    kind, message, named = payload
    if isinstance(kind, tuple):  # a stop signal: every rank stops the same way
        raise Stop(*kind) from err
    text = message if named else f"rank {src}: {message}"
    exc = (UserError if kind == "user" else RunError)(text)
    exc.agreed = True if _group is None else _group
    raise exc from err


def _kind(err: BaseException) -> str | tuple:
    if isinstance(err, Stop):
        return (err.signum, err.clean, err.waiting_on)
    return "user" if isinstance(err, UserError) else "run"


def _describe(err: BaseException | None) -> str:
    if isinstance(err, GrpoEnsembleError):
        return str(err)
    return f"{type(err).__name__}: {err}"
