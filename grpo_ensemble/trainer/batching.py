"""A step's candidates cut into micro-batches for the update: sorted by length, at most
`train.micro_batch_size` candidates and (optionally) `train.micro_batch_tokens` token
positions each, padded to their own longest prompt and completion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import PluginError
from ..models.chat import prompt_token_ids
from ..models.logprobs import TokenBatch
from ..rollout.groups import Rollout
from ..types import Prompt
from .loss import MODES


@dataclass(frozen=True)
class BatchSettings:
    """How the update cuts a step's candidates (the recipe's `train` section)."""

    micro_batch_size: int
    micro_batch_tokens: int | None = None
    # leave out candidates whose share of the loss is exactly 0 (resolved False when beta > 0:
    # the KL term gives every candidate a share)
    skip_zero_advantage: bool = False


@dataclass
class MicroBatch:
    tokens: TokenBatch
    advantages: torch.Tensor  # (B,)
    index: list[int]  # flat candidate indices
    modes: torch.Tensor  # (B,) long, see loss.MODES
    sources: list[str]  # member of each candidate
    behaviour: torch.Tensor | None  # (B, C) sampling log-probs where mode is tis, else 0
    # per row, where the policy's generator kept its sampling's products (None for a row it
    # did not record); None: no row. Set by the update, dropped after its first pass.
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


class PromptIds:
    """The policy tokenizer's ids of each prompt, cached for the run."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, prompt: Prompt) -> list[int]:
        text = prompt.text
        if text not in self.cache:  # a conversation through the policy's chat template
            self.cache[text] = prompt_token_ids(prompt, self.tokenizer)
        return self.cache[text]


def zero_share(rollout: Rollout, how: BatchSettings) -> torch.Tensor:
    """(n_candidates,) bool: candidates in the loss whose share of it, and of its gradient, is
    exactly 0, so the update may leave them out (`train.skip_zero_advantage`). With beta 0
    every term of a candidate's loss (clipped, shaped and tis surrogates) is its advantage
    times something finite; with beta > 0 the KL term is not (the settings then say no)."""
    keep = rollout.keep
    if not how.skip_zero_advantage:
        return torch.zeros_like(keep)
    return keep & (rollout.advantages == 0)


def left_out(rollout: Rollout, how: BatchSettings, members: Sequence[str]) -> LeftOut:
    """The tally of the candidates `micro_batches` leaves out (`zero_share`)."""
    by_member = dict.fromkeys(members, 0)
    rows = zero_share(rollout, how).nonzero().flatten().tolist()
    for i in rows:
        c = rollout.candidates[i]
        by_member[c.source] += len(c.token_ids)
    return LeftOut(len(rows), sum(by_member.values()), by_member)


def micro_batches(
    rollout: Rollout,
    how: BatchSettings,
    modes: Mapping[str, str],
    prompt_ids: PromptIds,
) -> list[MicroBatch]:
    """Micro-batches of the candidates that enter the loss: at most `micro_batch_size`
    candidates each and, with `micro_batch_tokens`, at most that many token positions (see
    `plan_micro_batches`). When they take several, or with a token budget, the candidates are
    sorted by length first: a micro-batch is padded to its longest prompt and completion, so
    similar lengths together pad least (the loss is normalised over the whole step: the order
    changes no gradient beyond floating-point rounding). Otherwise one micro-batch keeps
    candidate order. Candidates whose share of the loss is exactly 0 are left out
    (`zero_share`; `left_out` counts them). `modes`: member name → mode."""
    keep = (rollout.keep & ~zero_share(rollout, how)).nonzero().flatten().tolist()
    prompt_of = rollout.candidate_prompt
    mb, budget = how.micro_batch_size, how.micro_batch_tokens

    def lengths(i: int) -> tuple[int, int]:  # (prompt, completion)
        return len(prompt_ids(prompt_of[i])), len(rollout.candidates[i].token_ids)

    if len(keep) > mb or budget is not None:
        keep.sort(key=lambda i: lengths(i)[::-1])
    plan = plan_micro_batches([lengths(i) for i in keep], mb, budget)
    pad = prompt_ids.tokenizer.pad_token_id
    out = []
    for part in plan:
        idx = [keep[k] for k in part]
        cands = [rollout.candidates[i] for i in idx]
        prompts = [prompt_ids(prompt_of[i]) for i in idx]
        batch = TokenBatch.build(prompts, [c.token_ids for c in cands], pad)
        kinds = torch.tensor([MODES[modes[c.source]] for c in cands], dtype=torch.long)
        behaviour = None
        if (kinds == MODES["tis"]).any():
            behaviour = torch.zeros(batch.completion_ids.shape)
            for row, c in enumerate(cands):
                if modes[c.source] == "tis":
                    if c.behaviour_logprobs is None:
                        raise PluginError(c.source, "tis needs the peer's token log-probs")
                    behaviour[row, : len(c.behaviour_logprobs)] = torch.tensor(c.behaviour_logprobs)
        sources = [c.source for c in cands]
        out.append(MicroBatch(batch, rollout.advantages[idx], idx, kinds, sources, behaviour))
    return out


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


def attach_traces(batches: Sequence[MicroBatch], traces: Sequence) -> None:
    """Give each micro-batch its rows' traces (`traces` in flat candidate order, None for a
    candidate whose sampling products were not kept)."""
    for b in batches:
        rows = [traces[i] for i in b.index]
        b.traces = rows if any(t is not None for t in rows) else None


def filler_batch(pad: int) -> MicroBatch:
    """A micro-batch that contributes nothing (no completion tokens, loss × 0). A rank with
    fewer micro-batches than another runs these, because under ZeRO every forward and backward
    takes part in collectives that all ranks must enter."""
    tokens = TokenBatch.build([[pad]], [[pad]], pad)
    tokens.completion_mask.zero_()
    return MicroBatch(tokens, torch.zeros(1), [], torch.zeros(1, dtype=torch.long), [], None)
