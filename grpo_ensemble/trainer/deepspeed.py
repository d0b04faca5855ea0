"""Everything DeepSpeed: process group, config from the recipe, optimizer, schedule, engine.

The update runs through `deepspeed.initialize` even in one CPU process, so that the code path
a user scales out on is the one the tests run. We hand DeepSpeed our own torch AdamW and LR
schedule (no compiled optimizer ops needed on a CPU) and own the accumulation boundary, since
the number of micro-batches per step may vary.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import io
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from .. import dist
from ..errors import InputFileError, RecipeError
from ..recipe import Recipe, read_yaml


class _ChoseTheCPU(logging.Filter):
    """Drops DeepSpeed's note that it runs on the CPU (printed on every CPU run, also before a
    one-line error); its other warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


logging.getLogger("DeepSpeed").addFilter(_ChoseTheCPU())  # DeepSpeed's logger, when it exists


STORE_PREFIX = "grpo-ensemble-"  # + pid + "-": a lone process's rendezvous folder in /tmp


def remove_stale_stores(root: Path | None = None) -> list[Path]:
    """Remove the rendezvous folders of processes that no longer run (a run killed with
    SIGKILL cannot remove its own); returns them."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{STORE_PREFIX}*-*"):
        pid = folder.name.removeprefix(STORE_PREFIX).split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # no signal: does it run?
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except OSError:  # it runs, under another user
            pass
    return removed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> None:
    """Join the process group (gloo on CPU, nccl on GPU); a lone process becomes rank 0 of 1.

    Under `torchrun` or the `deepspeed` launcher the environment names the rank and world;
    a collective that waits longer than `timeout_s` fails the run instead of hanging it.
    """
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    init_method, lone = None, {}
    if "RANK" not in os.environ:  # a lone process: rank 0 of 1, reachable from nowhere
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # rendezvous through a file, not a TCP store (which listens on every interface), and
        # keep gloo's own socket on the loopback interface
        remove_stale_stores()
        store = Path(tempfile.mkdtemp(prefix=f"{STORE_PREFIX}{os.getpid()}-")) / "store"
        atexit.register(shutil.rmtree, store.parent, ignore_errors=True)
        init_method, lone = f"file://{store}", {"rank": 0, "world_size": 1}
        loopback = _loopback_interface()
        if loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # on a CPU: a line that it built an op
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                verbose=False,
                timeout=datetime.timedelta(seconds=timeout_s),
                init_method=init_method,
                **lone,
            )
    finally:
        for line in printed.getvalue().splitlines():
            if not (line.startswith("DeepSpeed ") and line.endswith(" built successfully")):
                print(line)
    _unlink_shm_workspace()
    if not lone and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        atexit.register(_let_collectives_finish)


# the shared memory file DeepSpeed's CPU all-reduce maps per rank (its shm.cpp: the prefix, uid,
# MASTER_ADDR, MASTER_PORT and rank, joined by "_"), under Linux's POSIX shared memory folder
SHM_WORKSPACE = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
SHM_DIR = Path("/dev/shm")


def _unlink_shm_workspace() -> None:
    """Remove this rank's name of DeepSpeed's all-reduce workspace.

    When the ranks run on one machine under DeepSpeed's launcher (it sets LOCAL_SIZE; a lone
    rank included), each rank creates a shared memory file while joining the process group,
    maps every other rank's, and never removes its own: left alone, each such run would leave
    one file per rank in /dev/shm, which is memory, until the machine restarts (see
    docs/distributed.md). Once every rank has passed
    this barrier, all of them have mapped all the files (inside `deepspeed.init_distributed`),
    so the names are no longer needed; the memory stays mapped and goes when the last rank
    exits, however it exits."""
    torch.distributed.barrier()
    getuid = getattr(os, "getuid", None)
    if getuid is None or not SHM_DIR.is_dir():
        return
    name = SHM_WORKSPACE.format(
        uid=getuid(),
        addr=os.environ.get("MASTER_ADDR", ""),
        port=os.environ.get("MASTER_PORT", ""),
        rank=torch.distributed.get_rank(),
    )
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / name).unlink()


# how long a rank waits at exit for the process group's threads (see _let_collectives_finish)
EXIT_GRACE_S = 0.05


def _let_collectives_finish() -> None:
    """An exit handler of every rank of a multi-process run: wait `EXIT_GRACE_S` with the
    GIL released. A gloo worker thread frees the tensors of the collective it ran just after
    the collective ends, and takes the GIL to do so; once the interpreter is finalizing, that
    kills the thread and the process ends with SIGABRT ("terminate called without an active
    exception") instead of its exit code. A rank that exits right after a collective (an error
    every rank agreed on, raised out of `train`) meets that; exit handlers run before
    finalization, so the threads finish here. (The `grpo-ensemble` command also leaves with
    `os._exit`, see `cli._exit_rank`.)"""
    time.sleep(EXIT_GRACE_S)


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in ("lo", "lo0") if n in names), None)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config key at INFO; keep warnings only."""
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


BF16_ON_CPU = (
    "train.precision: bf16 without a GPU: matrix products run far slower than in fp32 "
    "on most CPUs, and the final model is saved in bf16; use auto or fp32 for a CPU run"
)


def resolve_dtype(recipe: Recipe) -> torch.dtype:
    """The precision the run's models take. bf16 asked for on a machine without a GPU is
    honoured (a test of a bf16 path may want it) but said on stderr, once, by rank 0."""
    want = recipe.train.precision
    if want == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if want == "bf16" and not torch.cuda.is_available():
        dist.warn_once("bf16 without a GPU", BF16_ON_CPU)
    return torch.bfloat16 if want == "bf16" else torch.float32


def deepspeed_config(recipe: Recipe, micro_batch: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config the recipe implies, merged with the recipe's raw `train.deepspeed`."""
    t = recipe.train
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    implied = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,  # we mark the boundary ourselves
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # offload with our torch AdamW (DeepSpeedCPUAdam would need a compiled op)
        "zero_force_ds_cpu_optimizer": False,
        # bf16: skip a step whose gradient norm is NaN/inf, as fp32 ZeRO does by itself
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True}
        if dtype == torch.bfloat16
        else {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.deepspeed is None:
        return implied
    merged = merge_config(implied, raw_deepspeed_config(t.deepspeed))
    check_with_deepspeed(merged)
    if (merged.get("checkpoint") or {}).get("load_universal"):
        # a universal checkpoint is for changing the number of ranks, which a resume refuses;
        # and the checkpoints a run writes are DeepSpeed's own, never converted to one
        raise RecipeError(
            "train.deepspeed",
            "checkpoint.load_universal is not supported: a run resumes from its own "
            "checkpoints, with the number of ranks that wrote them",
        )
    return merged


def check_with_deepspeed(config: dict) -> None:
    """DeepSpeed's own check of a config (its pydantic models: unknown keys, wrong types), as
    a recipe error on `train.deepspeed`, before anything is loaded."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        DeepSpeedConfig(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise RecipeError(
            "train.deepspeed", f"DeepSpeed's {exc.title} rejects {where}: {err['msg']}"
        ) from None
    except (AssertionError, ValueError, TypeError, KeyError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise RecipeError("train.deepspeed", f"DeepSpeed rejects it: {text[:300]}") from None


# Keys a raw DeepSpeed config may not set: the recipe owns them, with the field to use instead.
OWNED = {
    "optimizer": "train.lr, train.adam_betas, train.adam_eps, train.weight_decay (we build AdamW)",
    "scheduler": "train.warmup_steps and train.schedule",
    "train_batch_size": "train.micro_batch_size (the step's batch is the step's candidates)",
    "fp16": "train.precision (fp16 is not supported; use bf16)",
}

# Where a raw config key comes from in the recipe, to name it in a conflict.
SOURCE = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "the trainer (one optimizer step per GRPO pass)",
    "gradient_clipping": "train.max_grad_norm",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "zero_optimization.offload_param.device": "train.offload_params",
    "bf16.enabled": "train.precision",
}


def raw_deepspeed_config(raw: str | dict) -> dict:
    """The user's DeepSpeed config: a mapping, or a JSON/YAML file (read with a safe loader)."""
    if isinstance(raw, dict):
        return raw
    path = Path(raw).expanduser()
    if not path.is_file():
        why = "it is a directory" if path.is_dir() else "no such file"
        raise RecipeError("train.deepspeed", f"cannot read {raw!r}: {why}")
    data, _ = read_yaml(path, "the DeepSpeed config")  # JSON is YAML too
    if not isinstance(data, dict):
        raise InputFileError(raw, "a DeepSpeed config must be a mapping")
    return data


def merge_config(implied: dict, raw: dict, prefix: str = "") -> dict:
    """`implied` with `raw`'s keys added; a key both set to different values is an error."""
    out = dict(implied)
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if not prefix and key in OWNED:
            raise RecipeError("train.deepspeed", f"{key}: set by the recipe; use {OWNED[key]}")
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_config(out[key], value, f"{path}.")
        elif out[key] != value:
            raise RecipeError(
                "train.deepspeed",
                f"{path} is {value!r} there but {out[key]!r} from "
                f"{SOURCE.get(path, 'the recipe')}; make them agree or drop the key",
            )
    return out


def lr_lambda(recipe: Recipe):
    """Linear warmup, then constant or cosine decay to 0 over the remaining optimizer steps."""
    t = recipe.train
    total = t.steps * recipe.loss.mu

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient checkpointing (non-reentrant), on for the training forwards.

    transformers checkpoints only in training mode, and a loaded model is in eval mode, which
    is how GRPO trains it (no dropout). So the model goes to training mode with every dropout
    probability set to 0: the same arithmetic as eval mode, with checkpointing. Sampling and
    the log-prob passes switch to eval mode themselves and keep their KV cache.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RecipeError(
            "train.gradient_checkpointing",
            f"{type(model).__name__} does not support gradient checkpointing",
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # functional dropout rates
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    model.train()


def fastest_adamw(params: list[torch.nn.Parameter]) -> dict:
    """AdamW's implementation option: the fused kernel (one pass over all parameters) where
    torch has it for the parameters' device and dtype, else `foreach` (a few ops over lists).
    torch's default on a CPU is a Python loop over the parameters."""
    devices = {p.device.type for p in params}
    dtypes = {p.dtype for p in params}
    fused_devices = {"cpu", "cuda"}
    fused_dtypes = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    if params and devices <= fused_devices and dtypes <= fused_dtypes:
        return {"fused": True}
    return {"foreach": True}


class GroupMPU:
    """DeepSpeed's (Megatron-style) "model parallel unit", naming the ranks an engine's data
    parallelism spans: co-training's `placement: split` puts each policy's engine on its own
    group of ranks, which is its data-parallel group; no model parallelism (one rank each)."""

    def __init__(self, data_parallel, model_parallel):
        self.dp, self.mp = data_parallel, model_parallel

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return torch.distributed.get_rank(self.dp)

    def get_data_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(self.dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return torch.distributed.get_process_group_ranks(self.dp)

    def get_model_parallel_group(self):
        return self.mp

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


# this process's engines' groups of ranks (None: every rank); DeepSpeed keeps the first `mpu`
# it is given for the whole process, so every engine of the process must be given the same
_mpu: GroupMPU | None = None


def place_engines(mpu: GroupMPU | None) -> None:
    """Every engine this process builds from now on spans `mpu`'s data-parallel group."""
    global _mpu
    _mpu = mpu


def build_engine(recipe: Recipe, model: torch.nn.Module, dtype: torch.dtype):
    """A DeepSpeed engine over `model` with AdamW and the recipe's schedule."""
    import deepspeed

    init_distributed(recipe.train.dist_timeout_s)
    quiet_deepspeed()
    t = recipe.train
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=t.lr,
        betas=t.adam_betas,
        weight_decay=t.weight_decay,
        eps=t.adam_eps,
        **fastest_adamw(params),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    config = deepspeed_config(recipe, t.micro_batch_size, dtype)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, mpu=_mpu
    )
    fresh_optimizer_state(engine)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # alone, DeepSpeed's all-reduce of stage 0 only flattens the gradients and copies
        # them back; stages 1-3 move gradients into their optimizer's buffers there: kept
        engine.enable_backward_allreduce = False
    return engine


def fresh_optimizer_state(engine) -> None:
    """Undo the optimizer step DeepSpeed's bf16 optimizer without ZeRO (`FP16_UnfusedOptimizer`)
    takes with zero gradients when it is built, to create AdamW's state: that step leaves
    AdamW's step count at 1, so bias correction would make the first real updates about 0.74×
    as large as fp32's, and weight decay would shrink the fp32 master weights once. AdamW starts
    again from no state (it creates it at its first step) and the master weights from the
    model's."""
    masters, weights = (getattr(engine.optimizer, k, None) for k in ("fp32_groups", "fp16_groups"))
    if masters is None or weights is None:
        return
    engine.optimizer.optimizer.state.clear()
    with torch.no_grad():
        for m_group, w_group in zip(masters, weights, strict=True):
            for master, weight in zip(m_group, w_group, strict=True):
                master.copy_(weight)


def shard_frozen(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen model (reference, peer) partitioned across ranks as a ZeRO-3 inference engine:
    each rank keeps 1/world of its weights; every forward gathers them layer by layer, so every
    rank must run the same forwards. Returns the partitioned module."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, mpu=_mpu)
    engine.module.eval()
    return engine.module
