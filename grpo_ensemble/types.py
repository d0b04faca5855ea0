"""The data that flows through one GRPO step, as explicit types.

A step holds `n_prompts` groups. Groups may differ in size (peers can be injected only where
the policy failed), so the tensor view of a step, `GroupLayout`, is padded to the largest
group with a `valid` mask rather than implied by `view(-1, G)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

POLICY = "policy"  # the member name of the policy being trained
POLICY_BASE = "policy_base"  # a peer's model: the policy's base model (shared with LoRA)


@dataclass(frozen=True)
class Prompt:
    """One prompt row: a string or a conversation, plus every other field (e.g. `answer`).

    A conversation is `messages`, a sequence of `{"role": ..., "content": ...}` that the model
    completes with the next assistant turn; each member renders it with its own tokenizer's
    chat template (`grpo_ensemble.render_prompt`). Its `text` is then the messages as
    canonical JSON: one string per conversation, for messages, deduplication and caches.
    """

    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    index: int = -1  # position in the data set, for error messages
    messages: tuple[Mapping[str, str], ...] | None = None


@dataclass
class Candidate:
    """One completion of a prompt, tagged with the ensemble member that produced it."""

    text: str
    token_ids: list[int]  # completion tokens in the *policy's* tokenizer, EOS included if emitted
    source: str  # member name: "policy" or a peer's name
    behaviour_logprobs: list[float] | None = None  # per token, from the sampling model
    finished: bool = True  # stopped at EOS (False: cut at max_new_tokens)
    prompt_text: str | None = None  # the prompt as its generator rendered it, where it says
    # columns a reward function added for completions.jsonl (TRL's `log_extra`)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """What a reward scorer sees: one candidate with its prompt."""

    prompt: Prompt
    candidate: Candidate

    @property
    def completion(self) -> str:
        return self.candidate.text

    @property
    def row(self) -> Mapping[str, Any]:
        return self.prompt.fields


@dataclass
class Group:
    """One prompt and its pooled candidates."""

    prompt: Prompt
    candidates: list[Candidate]


@dataclass
class GroupLayout:
    """Padded tensor view of a step's groups.

    `flat_index[p, g]` is the position of candidate g of prompt p in the flat candidate list
    (−1 where the group is shorter than `group_size`).
    """

    valid: torch.Tensor  # (n_prompts, group_size) bool
    flat_index: torch.Tensor  # (n_prompts, group_size) long

    @classmethod
    def from_groups(cls, groups: Sequence[Group]) -> GroupLayout:
        size = max((len(g.candidates) for g in groups), default=0)
        valid = torch.zeros(len(groups), size, dtype=torch.bool)
        flat = torch.full((len(groups), size), -1, dtype=torch.long)
        k = 0
        for p, g in enumerate(groups):
            n = len(g.candidates)
            valid[p, :n] = True
            flat[p, :n] = torch.arange(k, k + n)
            k += n
        return cls(valid=valid, flat_index=flat)

    @property
    def n_candidates(self) -> int:
        return int(self.valid.sum())

    def to_grid(self, flat_values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(n_candidates,) → (n_prompts, group_size), `fill` where invalid."""
        grid = torch.full(self.valid.shape, fill, dtype=flat_values.dtype)
        grid[self.valid] = flat_values
        return grid

    def to_flat(self, grid: torch.Tensor) -> torch.Tensor:
        """(n_prompts, group_size) → (n_candidates,), in flat candidate order."""
        return grid[self.valid]
