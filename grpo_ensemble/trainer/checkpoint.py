"""Checkpoints: everything the next step depends on, written atomically, the last K kept.

A checkpoint is a directory `RUN/checkpoints/step-00000012/` holding
- `engine/`: DeepSpeed's own checkpoint (weights, optimizer, LR schedule; every rank writes
  its shards, as DeepSpeed requires);
- `trainer_state.json`: the step, the prompt sampler's position, the recipe, the world size;
- `rng-rank{R}.json`: each rank's Python, NumPy and torch random states.

It is written under a temporary name and renamed when every rank has finished, so a directory
named `step-…` is always complete: a crash while writing leaves only a `.tmp` directory, which
the next checkpoint removes. Checkpoints are read with `torch.load(weights_only=True)`, which
cannot run code from the file.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import dist
from ..errors import RunError, UserError
from ..recipe import Recipe

PREFIX = "step-"

# Fields whose change makes a checkpoint meaningless for the recipe (the data order, the groups,
# the optimizer's shards), or that the checkpoint would silently override (the optimizer's and
# the LR schedule's settings come back from it). Others (steps, eval, logging) may change.
MUST_MATCH = [
    "seed",
    "policy.model",
    "policy.n",
    "peers",
    "data.train",
    "data.prompt_field",
    "data.shuffle",
    "train.prompts_per_step",
    "train.zero_stage",
    "train.lr",
    "train.adam_betas",
    "train.adam_eps",
    "train.weight_decay",
    "train.warmup_steps",
    "train.schedule",
]


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name.removeprefix(PREFIX).isdigit()
    ]  # not another name of the user's, e.g. step-00000004-backup
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def set_aside_later(run_dir: Path, step: int) -> list[Path]:
    """Rename the complete checkpoints after `step` to `abandoned-step-…` (rank 0): a run
    resumed from an earlier checkpoint goes another way from there, and `--resume auto` or
    pruning must not take a checkpoint of the way it left. Returns their new paths."""
    moved = []
    for ckpt in complete_checkpoints(run_dir):
        if int(ckpt.name.removeprefix(PREFIX)) > step:
            target = ckpt.with_name(f"abandoned-{ckpt.name}")
            n = 1
            while target.exists():
                n += 1
                target = ckpt.with_name(f"abandoned-{ckpt.name}-{n}")
            ckpt.rename(target)
            moved.append(target)
    return moved


def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_checkpoint(run_dir: Path, engine, sampler, recipe: Recipe, step: int) -> Path:
    """Write a checkpoint of the state after `step`: the DeepSpeed engine's, the prompt
    sampler's and every rank's RNGs (every rank calls this); keep the recipe's last K."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"

    def prepare():
        if dist.is_main():
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".*.tmp"):  # left by a crash while writing
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # a rerun of this step after a resume
                shutil.rmtree(final)
            tmp.mkdir()

    dist.agree(lambda: _disk_errors(prepare, root))
    dist.barrier()

    def write_engine():  # DeepSpeed's part: every rank writes its shards
        engine.save_checkpoint(str(tmp / "engine"), tag="state", save_latest=False)

    dist.agree(lambda: _disk_errors(write_engine, root))

    def write_own():
        (tmp / f"rng-rank{dist.rank()}.json").write_text(json.dumps(_rng_state()))
        if dist.is_main():
            state = {
                "step": step,
                "sampler": sampler.state(),
                "world_size": dist.world_size(),
                "recipe": recipe.model_dump(mode="json"),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        sync_tree(tmp)  # on the disk before the rename makes the checkpoint count

    dist.agree(lambda: _disk_errors(write_own, root))
    dist.barrier()

    def commit():
        if dist.is_main():
            tmp.rename(final)  # atomic: the checkpoint exists whole or not at all
            _sync(root)  # the rename itself, before older checkpoints go
            for old in complete_checkpoints(run_dir)[: -recipe.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    dist.agree(lambda: _disk_errors(commit, root))
    return final


def sync_tree(path: Path) -> None:
    """Flush every file and folder under `path` to the disk: after a power cut, a checkpoint
    renamed into place must not hold files that never reached it (empty or cut short)."""
    for folder, _, files in os.walk(path):
        for name in files:
            _sync(Path(folder) / name)
        _sync(Path(folder))


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # some network and FUSE file systems cannot flush a folder (as PostgreSQL and SQLite,
        # let those go); a file that cannot be flushed is an error
        if not (
            path.is_dir() and exc.errno in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.ENOTSUP)
        ):
            raise
    finally:
        os.close(fd)


def _disk_errors(fn, root: Path):
    try:
        return fn()
    except OSError as exc:
        good = complete_checkpoints(root.parent)
        last = f"the last complete checkpoint is {good[-1]}" if good else "no checkpoint was kept"
        raise RunError(
            f"cannot write a checkpoint in {root}: {exc.strerror or exc}; {last}"
        ) from None


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest complete checkpoint of the run, or None; else the given directory."""
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume: {resume!r} is not a complete checkpoint directory")
    return path


def _get(data: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


# fields an older checkpoint's recipe may lack, with the value such a checkpoint ran with
BEFORE_THE_FIELD = {"train.adam_eps": 1e-8}


def check_compatible(state: dict, recipe_now: dict, path: Path) -> None:
    """Refuse a resume whose recipe changed in a way that matters, naming the difference."""
    then = state["recipe"]
    for field in MUST_MATCH:
        a, b = _get(then, field), _get(recipe_now, field)
        if a is None and field in BEFORE_THE_FIELD:
            a = BEFORE_THE_FIELD[field]
        if a != b:
            raise UserError(
                f"--resume: {field} was {_show(a)} in the checkpoint {path} but is {_show(b)} "
                "now; resume with the recipe of that run, or start a new run in another output_dir"
            )
    if state["world_size"] != dist.world_size():
        raise UserError(
            f"--resume: the checkpoint {path} was written by {state['world_size']} ranks, this "
            f"run has {dist.world_size()}; resume with {state['world_size']} ranks"
        )


def _show(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").strip()


# what a damaged or incomplete checkpoint makes the loading raise (a missing key or file, a
# value of the wrong shape, a truncated file); a bad input, not a failed run
DAMAGED = (KeyError, TypeError, ValueError, IndexError, AssertionError, EOFError, RuntimeError)


def load_checkpoint(path: Path, engine, sampler, recipe: Recipe) -> int:
    """Restore the engine, sampler and RNG states; returns the step the checkpoint ends. Every
    rank checks its files first and agrees (a rank whose file is damaged stops every rank with
    its message, before any of them waits in the engine's loading)."""
    state, rng = dist.agree(lambda: _read_checked(path, sampler, recipe))

    def load_engine():
        try:
            return engine.load_checkpoint(str(path / "engine"), tag="state")[0]
        except pickle.UnpicklingError as exc:  # weights_only refused something in the file
            raise UserError(
                f"--resume: refused to load {path}: it holds objects other than tensors and "
                f"plain data ({str(exc).splitlines()[-1][:200]})"
            ) from None
        except DAMAGED as exc:
            raise _damaged(path, f"{type(exc).__name__}: {exc}") from None

    if dist.agree(load_engine) is None:
        raise UserError(f"--resume: DeepSpeed found no checkpoint in {path / 'engine'}")

    def restore():
        try:
            sampler.restore(state["sampler"])
            _set_rng_state(rng)
        except DAMAGED as exc:
            raise _damaged(path, f"{type(exc).__name__}: {exc}") from None

    dist.agree(restore)
    return int(state["step"])


def _read_checked(path: Path, sampler, recipe: Recipe) -> tuple[dict, dict]:
    """This rank's view of the checkpoint `path`: its trainer state and RNG states, checked
    against the run's sampler and recipe."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        rng = json.loads((path / f"rng-rank{dist.rank()}.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: cannot read the checkpoint {path}: {exc}") from None
    wanted = {"recipe": dict, "world_size": int, "step": int, "sampler": object}
    for name, kind in wanted.items():
        if not isinstance(state, dict) or not isinstance(state.get(name), kind):
            raise _damaged(path, f"trainer_state.json has no {name}")
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        raise _damaged(path, f"rng-rank{dist.rank()}.json lacks a generator's state")
    check_compatible(state, recipe.model_dump(mode="json"), path)
    why = sampler.differs(state["sampler"]) if isinstance(state["sampler"], dict) else None
    if why:  # the sampler's position would pick other prompts than the run went on with
        raise UserError(
            f"--resume: the training prompts are not those of the checkpoint {path} ({why}): "
            "data.train's file or the data cleaning (data.*) changed; resume with the data of "
            "that run, or start a new run in another output_dir"
        )
    return state, rng


def _damaged(path: Path, what: str) -> UserError:
    what = " ".join(what.split())[:300]
    return UserError(f"--resume: the checkpoint {path} is damaged or incomplete ({what})")


def use_safe_loading(engine) -> None:
    """Make the engine read its checkpoints with `torch.load(weights_only=True)`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:
        return  # another engine (e.g. a fast writer) chosen in the DeepSpeed config

    class Safe(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = Safe.__new__(Safe)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


def _safe_globals() -> list:
    """Plain-data classes that DeepSpeed puts in its checkpoint files."""
    import collections

    out: list = [collections.OrderedDict, torch.Size]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler

        out.append(LossScaler)
    except ImportError:
        pass
    return out
