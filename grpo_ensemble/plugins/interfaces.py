"""The three kinds of pluggable component. Subclass one (or just match its shape) and register it.

Every component class has a `name`, the string a recipe uses to pick it, and is built from the
recipe's `params` mapping as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..types import Candidate, Prompt, Sample


@dataclass(frozen=True)
class SamplingParams:
    """How a member samples: the usual knobs of `generate`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # no EOS before this many tokens
    # One seed per prompt, set by the trainer from (recipe seed, step, the prompt's place in the
    # global batch), so that a prompt's candidates do not depend on its batch or on the number
    # of ranks. Candidate j of a prompt uses `candidate_seed(seed, j)`. A generator may ignore
    # them (e.g. a remote API) at the cost of that reproducibility.
    seeds: tuple[int, ...] | None = None


def candidate_seed(prompt_seed: int, j: int) -> int:
    """The seed of a prompt's j-th candidate (splitmix64 of the pair)."""
    return mix64(prompt_seed * 1_000_003 + j)


def mix64(x: int) -> int:
    """splitmix64's finalizer: a well-mixed 64-bit value from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class Generator:
    """Samples completions for prompts.

    A generator that wraps a model exposes its `tokenizer` (or None for text-only sources such as
    an API); the ensemble re-tokenizes a candidate with the policy's tokenizer when they differ.
    """

    name: ClassVar[str] = ""
    tokenizer: Any = None

    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams
    ) -> list[list[Candidate]]:
        """Return, for each prompt, `n` candidates (their `source` is set by the ensemble)."""
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Take the policy's current weights. Only called on the policy member's generator."""


class RewardScorer:
    """Scores each candidate. Returns one float per sample, in order."""

    name: ClassVar[str] = ""

    def score(self, samples: Sequence[Sample]) -> Sequence[float]:
        raise NotImplementedError


class GroupEvaluator:
    """Turns the rewards of each group into advantages.

    `rewards`, `valid` and `stats` are (n_prompts, group_size); `valid` marks real candidates
    (groups may be ragged), `stats` the candidates that count in the group statistics (a subset
    of `valid`). Returns advantages (n_prompts, group_size), 0 where not valid, never NaN.
    """

    name: ClassVar[str] = ""

    def advantages(
        self, rewards: torch.Tensor, valid: torch.Tensor, stats: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError
