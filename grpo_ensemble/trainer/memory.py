"""`train.micro_batch_tokens: auto`: the token budget of a micro-batch, sized to memory.

On a GPU the budget starts unlimited (micro_batch_size alone) and is found by the run: a
first update pass that runs out of memory is abandoned before any optimizer step, its
gradients cleared, and the step's update done again from its first micro-batch with half the
positions of the largest micro-batch that failed. Each retry computes exactly what a run
with the smaller budget computes, so no step is lost or counted twice; the size is kept for
the later steps. On a CPU (where running out of memory ends the process instead of raising
an error) the budget comes from `train.memory_limit_gb` by the estimate in `cpu_budget`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import dist
from ..errors import RecipeError, RunError
from .batching import BatchSettings

GIB = 2**30


class MicroBatchTooLarge(Exception):
    """A first update pass ran out of memory; nothing was stepped, the gradients are cleared.
    `positions`: the token positions (rows × width) of the step's largest micro-batch;
    `widest`: the widest row of the step's micro-batches, the least a budget can go to."""

    def __init__(self, positions: int, widest: int):
        super().__init__(f"out of memory with {positions} token positions in a micro-batch")
        self.positions, self.widest = positions, widest

    @classmethod
    def of(cls, batches) -> MicroBatchTooLarge:
        shapes = [b.tokens.input_ids.shape for b in batches]
        return cls(max(r * w for r, w in shapes), max(w for _, w in shapes))


@dataclass
class TokenBudget:
    """The micro-batch token budget the run uses now; `auto` backs off on out-of-memory."""

    tokens: int | None  # None: no token limit
    auto: bool = False

    def batching(self, how: BatchSettings) -> BatchSettings:
        return replace(how, micro_batch_tokens=self.tokens)

    def halve(self, positions: int, least: int) -> None:
        """Half the positions of the micro-batch that did not fit; `least`: the positions of
        the longest single candidate, below which no budget can go."""
        if positions <= least:
            raise RunError(
                f"out of memory with a micro-batch of one candidate ({positions} token "
                "positions): lower train.micro_batch_size or the completion length, or use "
                "train.gradient_checkpointing"
            )
        self.tokens = max(positions // 2, least)
        _say(
            f"train.micro_batch_tokens auto: out of memory at {positions} token positions in "
            f"a micro-batch; now at most {self.tokens}",
        )


def token_budget(
    recipe, model: torch.nn.Module, prompt_tokens, frozen: Sequence[torch.nn.Module] = ()
) -> TokenBudget:
    """The run's starting budget: the recipe's number, or for auto none (GPU: found by
    backing off) or the CPU estimate from memory_limit_gb. `prompt_tokens()`: the tokens of
    the longest training prompt (counted only for the estimate)."""
    t = recipe.train
    if t.micro_batch_tokens != "auto":
        return TokenBudget(t.micro_batch_tokens)
    if dist.world_size() > 1 and t.memory_limit_gb is None:
        raise RecipeError(
            "train.micro_batch_tokens",
            "auto backs off after an out-of-memory error in one process only (on several ranks "
            "the others would wait on the one that failed): give a number, or "
            "train.memory_limit_gb",
        )
    if t.memory_limit_gb is None:
        return TokenBudget(None, auto=True)
    longest = prompt_tokens() + max_new_tokens(recipe)
    tokens = cpu_budget(model, t.memory_limit_gb * GIB, longest, frozen)
    if tokens < longest:
        need = t.memory_limit_gb * GIB + (longest - tokens) * bytes_per_position(model, longest)
        raise RecipeError(
            "train.memory_limit_gb",
            f"{t.memory_limit_gb:g} GiB does not hold the model, its optimizer state and one "
            f"candidate of {longest} tokens (about {need / GIB:.2f} GiB by the estimate)",
        )
    _say(
        f"train.micro_batch_tokens auto: at most {tokens} token positions per micro-batch "
        f"(from train.memory_limit_gb {t.memory_limit_gb:g})",
    )
    return TokenBudget(tokens, auto=True)


def _say(line: str) -> None:
    """The size chosen, on stderr by rank 0 (metrics.jsonl has it too, as micro_batch_tokens)."""
    if dist.is_main():
        sys.stderr.write(f"note: {line}\n")


def max_new_tokens(recipe) -> int:
    members = [recipe.policy, *recipe.peers]
    return max(m.sampling.max_new_tokens for m in members)


def bytes_per_position(model: torch.nn.Module, width: int) -> int:
    """Estimated bytes one token position of a micro-batch takes in the update's forward and
    backward, for rows `width` tokens wide: per layer the activations kept for the backward
    (about 12 hidden-wide and 3 MLP-wide vectors, and the attention's weights over the row),
    and the logits with their log-softmax and gradient."""
    c = model.config.get_text_config()
    size = next(model.parameters()).element_size()
    hidden, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    inner = getattr(c, "intermediate_size", None) or 4 * hidden
    heads = c.num_attention_heads
    per_layer = 12 * hidden + 3 * inner + 2 * heads * width
    return size * (layers * per_layer + 3 * vocab)


def fixed_bytes(model: torch.nn.Module, frozen: Sequence[torch.nn.Module] = ()) -> int:
    """The model's weights, the gradients and AdamW's two moments of what trains, and the
    weights of the `frozen` models the process holds beside it (reference, peers, reward
    models). Whole sizes, also where ZeRO partitions them (`ds_numel`): an estimate that errs
    towards a smaller budget."""
    total, seen = 0, set()
    for m in (model, *frozen):
        for p in m.parameters():
            if id(p) in seen:  # a module that shares the policy's weights (its base)
                continue
            seen.add(id(p))
            n = getattr(p, "ds_numel", p.numel())
            total += n * p.element_size()
            if p.requires_grad:
                total += n * (p.element_size() + 8)  # gradient; fp32 exp_avg, exp_avg_sq
    return total


def cpu_budget(
    model: torch.nn.Module, limit_bytes: float, width: int, frozen: Sequence[torch.nn.Module] = ()
) -> int:
    """The token positions a micro-batch may hold within `limit_bytes`, by the estimate."""
    free = limit_bytes - fixed_bytes(model, frozen)
    return max(int(free // bytes_per_position(model, width)), 0)


def restore_budget(budget: TokenBudget, checkpoint: Path, step: int) -> None:
    """On resume with `auto`: the budget the run had backed off to by the checkpoint's step
    (its metrics rows say: `micro_batch_tokens`), so that the resumed steps are cut as they
    would have been without the break."""
    if not budget.auto:
        return
    from ..rundir import rows_up_to

    rows: list[dict] = []
    source = checkpoint / "metrics.jsonl"
    if dist.is_main() and source.is_file():
        rows = [json.loads(line) for line in rows_up_to(source, step)]
    rows = dist.all_gather_objects(rows)[0]  # rank 0's
    sizes = [r["micro_batch_tokens"] for r in rows if "micro_batch_tokens" in r]
    if sizes:
        budget.tokens = sizes[-1]
