"""Parameters that ZeRO-3 partitions: each rank holds a shard, marked by DeepSpeed with a ds_id.

Sampling, log-probs and saving all need to know whether a module is partitioned and, where
they need whole weights, to gather them for a block."""

from __future__ import annotations

import contextlib

import torch


def zero3_managed(module: torch.nn.Module) -> bool:
    """True when ZeRO-3 manages the module's weights (DeepSpeed marks them with a ds_id)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered_params(module: torch.nn.Module):
    """Whole parameters for the duration of the block: under ZeRO-3 each rank holds only a
    shard, and generation or saving needs all of it. A no-op for unpartitioned modules."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
