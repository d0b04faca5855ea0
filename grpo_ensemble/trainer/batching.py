"""A step's candidates cut into micro-batches for the update: sorted by length, at most
`train.micro_batch_size` candidates and (optionally) `train.micro_batch_tokens` token
positions each, padded to their own longest prompt and completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import PluginError
from ..models.logprobs import TokenBatch
from ..rollout.groups import Rollout
from ..types import Prompt
from .loss import MODES

if TYPE_CHECKING:
    from .step import Run


@dataclass
class MicroBatch:
    tokens: TokenBatch
    advantages: torch.Tensor  # (B,)
    index: list[int]  # flat candidate indices
    modes: torch.Tensor  # (B,) long, see loss.MODES
    sources: list[str]  # member of each candidate
    behaviour: torch.Tensor | None  # (B, C) sampling log-probs where mode is tis, else 0
    # per row, where the policy's sampling kept its products (replay.py; None for a row it
    # did not sample); None: no row
    traces: list | None = None

    def to(self, device) -> MicroBatch:
        """The same micro-batch with its tensors on `device` (the policy's)."""
        behaviour = None if self.behaviour is None else self.behaviour.to(device)
        return MicroBatch(
            self.tokens.to(device),
            self.advantages.to(device),
            self.index,
            self.modes.to(device),
            self.sources,
            behaviour,
            self.traces,
        )


@dataclass
class LeftOut:
    """A rank's candidates in the loss that the update does not compute (`zero_share`): what
    the loss's normaliser and the token metrics still count of them."""

    sequences: int = 0
    tokens: int = 0
    by_member: dict[str, int] = field(default_factory=dict)  # completion tokens per member


def zero_share(run: Run, rollout: Rollout) -> torch.Tensor:
    """(n_candidates,) bool: candidates in the loss whose share of it, and of its gradient, is
    exactly 0, so the update may leave them out (`train.skip_zero_advantage`). With beta 0
    every term of a candidate's loss (clipped, shaped and tis surrogates) is its advantage
    times something finite; with beta > 0 the KL term is not, and nothing is left out."""
    keep = rollout.keep
    if not run.recipe.train.skip_zero_advantage or run.recipe.loss.beta > 0:
        return torch.zeros_like(keep)
    return keep & (rollout.advantages == 0)


def left_out(run: Run, rollout: Rollout) -> LeftOut:
    """The tally of the candidates `micro_batches` leaves out (`zero_share`)."""
    by_member = {m.name: 0 for m in run.ensemble.members}
    rows = zero_share(run, rollout).nonzero().flatten().tolist()
    for i in rows:
        c = rollout.candidates[i]
        by_member[c.source] += len(c.token_ids)
    return LeftOut(len(rows), sum(by_member.values()), by_member)


def micro_batches(run: Run, rollout: Rollout) -> list[MicroBatch]:
    """Micro-batches of the candidates that enter the loss: at most `train.micro_batch_size`
    candidates each and, with `train.micro_batch_tokens`, at most that many token positions
    (see `plan_micro_batches`). When they take several, or with a token budget, the candidates
    are sorted by length first: a micro-batch is padded to its longest prompt and completion,
    so similar lengths together pad least (the loss is normalised over the whole step: the
    order changes no gradient beyond floating-point rounding). Otherwise one micro-batch keeps
    candidate order. Candidates whose share of the loss is exactly 0 are left out
    (`zero_share`; `left_out` counts them)."""
    keep = (rollout.keep & ~zero_share(run, rollout)).nonzero().flatten().tolist()
    prompt_of = rollout.candidate_prompt
    mb, budget = run.recipe.train.micro_batch_size, run.recipe.train.micro_batch_tokens

    def lengths(i: int) -> tuple[int, int]:  # (prompt, completion)
        return len(prompt_ids(run, prompt_of[i])), len(rollout.candidates[i].token_ids)

    if len(keep) > mb or budget is not None:
        keep.sort(key=lambda i: lengths(i)[::-1])
    plan = plan_micro_batches([lengths(i) for i in keep], mb, budget)
    mode = {m.name: m.mode for m in run.ensemble.members}
    out = []
    for part in plan:
        idx = [keep[k] for k in part]
        cands = [rollout.candidates[i] for i in idx]
        prompts = [prompt_ids(run, prompt_of[i]) for i in idx]
        batch = TokenBatch.build(prompts, [c.token_ids for c in cands], run.tokenizer.pad_token_id)
        modes = torch.tensor([MODES[mode[c.source]] for c in cands], dtype=torch.long)
        behaviour = None
        if (modes == MODES["tis"]).any():
            behaviour = torch.zeros(batch.completion_ids.shape)
            for row, c in enumerate(cands):
                if mode[c.source] == "tis":
                    if c.behaviour_logprobs is None:
                        raise PluginError(c.source, "tis needs the peer's token log-probs")
                    behaviour[row, : len(c.behaviour_logprobs)] = torch.tensor(c.behaviour_logprobs)
        sources = [c.source for c in cands]
        traces = [c.trace for c in cands]
        traces = traces if any(t is not None for t in traces) else None
        out.append(
            MicroBatch(batch, rollout.advantages[idx], idx, modes, sources, behaviour, traces)
        )
    for c in rollout.candidates:  # the micro-batches hold them now, until the first pass
        c.trace = None
    return [b.to(run.engine.device) for b in out]


def plan_micro_batches(
    lengths: list[tuple[int, int]], size: int, tokens: int | None = None
) -> list[list[int]]:
    """Candidates 0 … n−1, each (prompt length, completion length), in the order given, cut
    into consecutive micro-batches of at most `size` candidates and, when `tokens` is set, at
    most `tokens` padded positions: rows × (longest prompt + longest completion, at least 1),
    what the micro-batch's forward computes. A candidate longer than the budget alone makes a
    micro-batch."""
    out: list[list[int]] = []
    part: list[int] = []
    longest = (0, 0)
    for i, (p, c) in enumerate(lengths):
        grown = (max(longest[0], p), max(longest[1], c, 1))
        full = len(part) == size or (tokens is not None and (len(part) + 1) * sum(grown) > tokens)
        if part and full:
            out.append(part)
            part, grown = [], (p, max(c, 1))
        part.append(i)
        longest = grown
    if part:
        out.append(part)
    return out


def filler_batch(run: Run) -> MicroBatch:
    """A micro-batch that contributes nothing (no completion tokens, loss × 0). A rank with
    fewer micro-batches than another runs these, because under ZeRO every forward and backward
    takes part in collectives that all ranks must enter."""
    pad = run.tokenizer.pad_token_id
    tokens = TokenBatch.build([[pad]], [[pad]], pad)
    tokens.completion_mask.zero_()
    filler = MicroBatch(tokens, torch.zeros(1), [], torch.zeros(1, dtype=torch.long), [], None)
    return filler.to(run.engine.device)


def prompt_ids(run: Run, prompt: Prompt) -> list[int]:
    """The policy tokenizer's ids of a prompt, cached."""
    text = prompt.text
    if text not in run.prompt_ids:
        run.prompt_ids[text] = run.tokenizer(text)["input_ids"]
    return run.prompt_ids[text]
