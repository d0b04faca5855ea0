"""Everything DeepSpeed: process group, config from the recipe, optimizer, schedule, engine.

The update runs through `deepspeed.initialize` even in one CPU process, so that the code path
a user scales out on is the one the tests run. We hand DeepSpeed our own torch AdamW and LR
schedule (no compiled optimizer ops needed on a CPU) and own the accumulation boundary, since
the number of micro-batches per step may vary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket

import torch

from .recipe import Recipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group (gloo on CPU, nccl on GPU); a lone process becomes rank 0 of 1."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config key at INFO; keep warnings only."""
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_dtype(recipe: Recipe) -> torch.dtype:
    want = recipe.train.precision
    if want == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return torch.bfloat16 if want == "bf16" else torch.float32


def deepspeed_config(recipe: Recipe, micro_batch: int, dtype: torch.dtype) -> dict:
    t = recipe.train
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,  # we mark the boundary ourselves
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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


def build_engine(recipe: Recipe, model: torch.nn.Module, dtype: torch.dtype):
    """A DeepSpeed engine over `model` with AdamW and the recipe's schedule."""
    import deepspeed

    init_distributed()
    quiet_deepspeed()
    t = recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    config = deepspeed_config(recipe, t.micro_batch_size, dtype)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine


def gathered_params(module: torch.nn.Module):
    """Whole parameters for the duration of the block: under ZeRO-3 each rank holds only a
    shard, and generation or saving needs all of it. A no-op for unpartitioned modules."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
