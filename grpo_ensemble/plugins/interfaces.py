"""The three kinds of pluggable component. Subclass one (or just match its shape) and register it.

Every component class has a `name`, the string a recipe uses to pick it, and is built from the
recipe's `params` mapping as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

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

    Beyond `generate`, a generator may offer optional capabilities, each a method (or
    attribute) that the trainer looks for, never a class it tests for:

    - `sync_weights(model)` (`SyncsWeights`): take the policy's current weights. The policy's
      generator must offer it; it is called after every update and once before the first step.
    - `behaviour_logprobs` on each `Candidate`: the log-probability of each token under the
      distribution it was sampled from. A `tis` peer must fill them.
    - `collective` (attribute, True): generating takes part in collectives across ranks, so
      every rank calls `generate` at the same points, even with no prompts.
    - `place_model(place)` (`PlacesModel`): a peer holding a frozen torch model lets the run put
      it on its device and precision, or shard it (`train.frozen_models: shard`).
    - forward replay (`ReplaysForward`): the policy's generator keeps what its forward computed
      while sampling, and the update's first pass reuses it instead of computing it again.
    """

    name: ClassVar[str] = ""
    tokenizer: Any = None

    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams
    ) -> list[list[Candidate]]:
        """Return, for each prompt, `n` candidates (their `source` is set by the ensemble)."""
        raise NotImplementedError


@runtime_checkable
class SyncsWeights(Protocol):
    """Takes the policy's current weights (the policy's generator must offer this)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample with `model`'s current weights from now on (share it, or copy its weights)."""


@runtime_checkable
class PlacesModel(Protocol):
    """Holds a frozen torch model that the run may place (device, precision, ZeRO-3 shards)."""

    def place_model(self, place: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Replace the held model by `place(model)`."""


@runtime_checkable
class ReplaysForward(Protocol):
    """Keeps the products of sampling's forward so that the update's first pass over the
    policy's own candidates can take them instead of computing them again. Offered by the
    built-in `hf` generator; the trainer uses it only where its results equal a plain forward
    (same weights, no dropout, no ZeRO-3), and falls back to the plain forward otherwise."""

    def recording(self) -> AbstractContextManager[None]:
        """Keep the products of the samples drawn inside the block."""

    def take_traces(self, candidates: Sequence[Candidate]) -> list[Any]:
        """Where each candidate's products are (None where none were kept); the generator
        forgets them, so they live as long as the caller keeps them."""

    def replays_for(self, model: torch.nn.Module) -> bool:
        """True when the recordings are of `model` (the generator samples with it)."""

    def replay_logprobs(
        self, model: Any, batch: Any, traces: Sequence[Any], temperature: float, entropy=None
    ) -> Any:
        """(B, C) completion log-probs of `batch` under `model` with the graph for the
        backward, from the traces; None where they cannot serve this batch. `entropy` "value"
        (detached) or "grad": the pair (log-probs, (B, C) entropy of each position's
        distribution at `temperature`) from the same logits."""

    def release_buffers(self) -> None:
        """Free memory kept for the next recordings."""


class RewardScorer:
    """Scores each candidate. Returns one float per sample, in order, or None for a sample it
    cannot score (left out of the combined reward; a candidate no scorer scored leaves its
    group's statistics and gets no gradient)."""

    name: ClassVar[str] = ""

    def score(self, samples: Sequence[Sample]) -> Sequence[float]:
        raise NotImplementedError


@dataclass(frozen=True)
class Progress:
    """Where a run stands when a step begins, as a scorer that follows the run is told."""

    step: int  # GRPO steps finished (0 at the first step)
    steps: int  # train.steps
    optimizer_steps: int  # optimizer steps taken: step × loss.mu
    max_optimizer_steps: int  # train.steps × loss.mu (TRL's max_steps)
    epoch: float  # passes over the training prompts drawn so far (1.5: one and a half)


@runtime_checkable
class FollowsSteps(Protocol):
    """A scorer that wants to know the run's progress (a curriculum, a reward that anneals):
    `begin_step` is called before each step's scoring, on every rank, after a resume too."""

    def begin_step(self, progress: Progress) -> None:
        """Take note of `progress`; the step's `score` calls follow."""


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


@dataclass(frozen=True)
class RunContext:
    """What every observer hook is also given as `context` (take it by naming it): the run
    it observes, read-only."""

    run_dir: Any  # pathlib.Path of the run directory
    recipe: Any  # the resolved recipe, a read-only mapping (lists as tuples)
    rank: int  # this process's rank (observers run on rank 0)
    world_size: int
    step: int  # the last training step finished (0 before the first)


class Tracker:
    """Receives a run's records as the run goes: named in `log.report_to`, built with no
    arguments (configure it through its own environment variables), called on rank 0 only.

    Each method is optional and is also an observer hook of the same name and arguments
    (`grpo_ensemble.plugins.hookspecs`), so the same code can observe every run as a plain
    plugin; a method that names a `context` argument gets the `RunContext`. The values are
    plain JSON-able objects. One that raises is left out from then on, named in one line; the
    run goes on. A tracker whose package is missing raises
    `ImportError` in `__init__`: `validate` and `train` then say so (exit code 2).
    """

    name: ClassVar[str] = ""

    def on_run_start(self, run_dir, recipe: dict) -> None: ...

    def on_step_end(self, step: int, metrics: dict) -> None: ...

    def on_eval(self, step: int, results: dict) -> None: ...

    def on_completions(self, step: int, rows: list) -> None: ...

    def on_alert(self, alert: dict) -> None: ...

    def on_run_end(self, run_dir, summary: dict) -> None: ...
