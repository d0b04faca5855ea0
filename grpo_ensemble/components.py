"""The three kinds of pluggable component. Subclass one (or just match its shape) and register it.

Every component class has a `name`, the string a recipe uses to pick it, and is built from the
recipe's `params` mapping as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .types import Candidate, Prompt, Sample


@dataclass(frozen=True)
class SamplingParams:
    """How a member samples: the usual knobs of `generate`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    max_new_tokens: int = 32


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
