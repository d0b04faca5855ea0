"""Checkpoints: everything the next step depends on, written atomically, the last K kept.

A checkpoint is a directory `RUN/checkpoints/step-00000012/` holding
- `engine/`: DeepSpeed's own checkpoint (weights, optimizer, LR schedule; every rank writes
  its shards, as DeepSpeed requires);
- `trainer_state.json`: the step, the prompt sampler's position, the recipe, the world size;
- `rng-rank{R}.json`: each rank's Python, NumPy and torch random states;
- `metrics.jsonl`: the rows of metrics.jsonl up to the step (a resume restores any row a crash
  cut from the run's own file);
- `manifest.json`: every other file with its size and SHA-256 (`manifest.py`), written last.

It is written under a temporary name and renamed when every rank has finished, so a directory
named `step-…` is always complete: a crash while writing leaves only a `.tmp` directory, which
the next checkpoint removes. Before loading, every file is checked against the manifest; then
every `torch.load` (DeepSpeed's universal and elastic loaders included) runs with
`weights_only=True`, which cannot run code from the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import dist
from ..errors import RunError, UserError
from ..recipe import Recipe
from ..recipe.cotraining import POLICIES_DIR
from ..rundir import rows_up_to
from . import manifest

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
    "policies",
    "placement",
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


def rng_state() -> dict[str, Any]:
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


def save_checkpoint(
    run_dir: Path, engine, sampler_state: dict, recipe: Recipe, step: int, rng: dict | None = None
) -> Path:
    """Write a checkpoint of the state after `step`: the DeepSpeed engine's, the prompt
    sampler's (`sampler_state`) and every rank's RNGs (`rng`: this rank's states as they were
    after the step, when they have moved on since; every rank calls this); keep the recipe's
    last K."""
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
        for where, e in engine_parts(engine).items():
            if e is not None:  # None: co-training's policy that other ranks hold
                e.save_checkpoint(str(tmp / where / "engine"), tag="state", save_latest=False)

    dist.agree(lambda: _disk_errors(write_engine, root))

    def write_own():
        (tmp / f"rng-rank{dist.rank()}.json").write_text(json.dumps(rng or rng_state()))
        if dist.is_main():
            state = {"step": step, "sampler": sampler_state, "world_size": dist.world_size()}
            state["recipe"] = recipe.model_dump(mode="json")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            _keep_all_metrics(run_dir, tmp, engine_parts(engine), step)

    dist.agree(lambda: _disk_errors(write_own, root))
    dist.barrier()
    dist.agree(lambda: _disk_errors(lambda: manifest.write_manifest(tmp), root))
    dist.agree(lambda: _disk_errors(lambda: sync_tree(tmp), root))  # before the rename
    dist.barrier()

    def commit():
        if dist.is_main():
            tmp.rename(final)  # atomic: the checkpoint exists whole or not at all
            _sync(root)  # the rename itself, before older checkpoints go
            for old in complete_checkpoints(run_dir)[: -recipe.train.keep_checkpoints]:
                # out of the `step-…` names first: a crash while deleting must not leave a
                # half-deleted folder under a name that promises a complete checkpoint
                doomed = old.with_name(f".{old.name}.old.tmp")
                old.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    dist.agree(lambda: _disk_errors(commit, root))
    return final


def engine_parts(engine) -> dict[str, Any]:
    """{folder in the checkpoint: engine}: one engine at the checkpoint's top, or, given a
    mapping of co-trained policies' engines, each in `policies/<name>/` (None: a policy whose
    engine other ranks hold, `placement: split`)."""
    if isinstance(engine, Mapping):
        return {f"{POLICIES_DIR}/{name}": e for name, e in engine.items()}
    return {"": engine}


def _keep_all_metrics(run_dir: Path, tmp: Path, parts, step: int) -> None:
    """The run's metrics rows up to `step`, and with co-training each policy's (`parts`)."""
    for where in {"", *parts}:
        (tmp / where).mkdir(parents=True, exist_ok=True)
        _keep_metrics(run_dir / where / "metrics.jsonl", tmp / where / "metrics.jsonl", step)


def _keep_metrics(source: Path, target: Path, step: int) -> None:
    """The rows of the run's metrics.jsonl up to `step`, into the checkpoint; the run's file is
    flushed to the disk first, so that no row the checkpoint covers is only in a cache."""
    if not source.is_file():
        return
    _sync(source)
    with target.open("x", encoding="utf-8") as fh:
        fh.writelines(rows_up_to(source, step))


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
        raise _not_written(root, exc.strerror or str(exc)) from None
    except RuntimeError as exc:
        # torch.save reports a failed write (a full disk, a file size limit) as a RuntimeError
        # of its zip writer, not an OSError
        text = str(exc)
        if not any(k in text for k in ("PytorchStreamWriter", "inline_container", "write")):
            raise
        free = shutil.disk_usage(root if root.exists() else root.parent).free
        why = "No space left on device" if free < 1 << 20 else "writing a file failed"
        raise _not_written(root, f"{why} ({' '.join(text.split())[:160]})") from None


def _not_written(root: Path, why: str) -> RunError:
    good = complete_checkpoints(root.parent)
    last = f"the last complete checkpoint is {good[-1]}" if good else "no checkpoint was kept"
    return RunError(f"cannot write a checkpoint in {root}: {why}; {last}")


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
BEFORE_THE_FIELD = {"train.adam_eps": 1e-8, "placement": "shared"}


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
    rank checks the files against the manifest and its own files' contents first, and agrees
    (a damaged file stops every rank with its message, before any of them waits in the
    engine's loading)."""
    dist.agree(lambda: check_intact(path, Path(recipe.output_dir).expanduser()))
    state, rng = dist.agree(lambda: _read_checked(path, sampler, recipe))

    def load_engine():
        try:
            with no_code_unpickling():
                loaded = [
                    e.load_checkpoint(str(path / where / "engine"), tag="state")[0]
                    for where, e in engine_parts(engine).items()
                    if e is not None
                ]
                return None if None in loaded else loaded
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


def check_intact(path: Path, run_dir: Path) -> None:
    """Refuse a checkpoint whose files differ from its manifest, naming the file and the
    newest intact checkpoint of the run in `run_dir` to resume from instead."""
    why = manifest.problem(path)
    if why is None:
        return
    if why == f"no {manifest.NAME}":
        dist.warn_once(
            f"unverified {path}",
            f"warning: the checkpoint {path} has no {manifest.NAME} (written by a version "
            "without one); its files are loaded unverified",
        )
        return
    intact = _newest_intact(path, run_dir)
    instead = (
        f"the newest intact checkpoint is {intact}: resume with --resume {intact}"
        if intact is not None
        else "no intact checkpoint of the run is left: start a new run in another output_dir"
    )
    raise _damaged(path, why, instead)


def _newest_intact(damaged: Path, run_dir: Path) -> Path | None:
    others = [p for p in complete_checkpoints(run_dir) if p.resolve() != damaged.resolve()]
    return next((p for p in reversed(others) if manifest.problem(p) is None), None)


def _read_checked(path: Path, sampler, recipe: Recipe) -> tuple[dict, dict]:
    """This rank's view of the checkpoint `path`: its trainer state and RNG states, checked
    against the run's sampler and recipe."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        rng = json.loads((path / f"rng-rank{dist.rank()}.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: cannot read the checkpoint {path}: {exc}") from None
    why = _bad_state(state, path)
    if why:
        raise _damaged(path, f"trainer_state.json: {why}")
    why = _bad_rows(path / "metrics.jsonl", state["step"])
    if why:
        raise _damaged(path, f"metrics.jsonl: {why}")
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        raise _damaged(path, f"rng-rank{dist.rank()}.json lacks a generator's state")
    check_compatible(state, recipe.model_dump(mode="json"), path)
    why = sampler.differs(state["sampler"])
    if why:  # the sampler's position would pick other prompts than the run went on with
        raise UserError(
            f"--resume: the training prompts are not those of the checkpoint {path} ({why}): "
            "data.train's file or the data cleaning (data.*) changed; resume with the data of "
            "that run, or start a new run in another output_dir"
        )
    return state, rng


def _bad_state(state, path: Path) -> str | None:
    """What is wrong with the values of a trainer_state.json (None: nothing)."""

    def count(v, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if not isinstance(state, dict):
        return "not an object"
    if not isinstance(state.get("recipe"), dict):
        return "no recipe"
    if not count(state.get("world_size"), 1):
        return f"world_size {state.get('world_size')!r} is not a count of ranks"
    step = state.get("step")
    if not count(step, 0):
        return f"step {step!r} is not a step number"
    named = path.name.removeprefix(PREFIX)
    if path.name.startswith(PREFIX) and named.isdigit() and int(named) != step:
        return f"step {step} in the checkpoint of step {int(named)}"
    sampler = state.get("sampler")
    if not isinstance(sampler, dict):
        return "no sampler"
    for key in ("epoch", "pos", "prompts"):
        if key in sampler and not count(sampler[key], 0):
            return f"sampler.{key} {sampler[key]!r} is not a count"
    if sampler.get("pos", 0) > sampler.get("prompts", sampler.get("pos", 0)):
        return f"sampler.pos {sampler['pos']} is past its {sampler['prompts']} prompts"
    return None


def _bad_rows(path: Path, step: int) -> str | None:
    """What is wrong with a checkpoint's copy of the metrics rows (None: nothing, or no copy:
    a checkpoint written before it kept one)."""
    if not path.exists():
        return None
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot be read ({type(exc).__name__})"
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            return f"line {i} is not a metrics row"
        if not 1 <= row["step"] <= step:
            return f"line {i} is a row of step {row['step']}, not of steps 1-{step}"
    return None


def _damaged(path: Path, what: str, instead: str = "") -> UserError:
    what = " ".join(what.split())[:300]
    then = f"; {instead}" if instead else ""
    return UserError(f"--resume: the checkpoint {path} is damaged or incomplete ({what}){then}")


@contextlib.contextmanager
def no_code_unpickling():
    """Every `torch.load` inside the block reads with `weights_only=True`, whatever its caller
    asks: DeepSpeed's loaders (its own engine, the universal and elastic ones) call
    `torch.load(..., weights_only=False)`, which would run code planted in a checkpoint."""
    real = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kw):
        with torch.serialization.safe_globals(_safe_globals()):
            return real(f, map_location=map_location, weights_only=True, mmap=mmap)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


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
