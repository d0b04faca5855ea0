"""Reward scoring: every weighted scorer over every candidate, checked, then combined."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .build import WeightedScorer
from .errors import PluginError, UserError
from .types import Group, Sample


def score_groups(
    groups: Sequence[Group], scorers: Sequence[WeightedScorer]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Combined reward Σ wᵢ·rᵢ (n_candidates,) and each scorer's raw rewards, by name.

    A scorer that raises, returns the wrong number of scores or a non-finite score is reported
    by name with the first offending prompt.
    """
    samples = [Sample(g.prompt, c) for g in groups for c in g.candidates]
    combined = torch.zeros(len(samples), dtype=torch.float32)
    per_scorer: dict[str, torch.Tensor] = {}
    for ws in scorers:
        try:
            raw = list(ws.scorer.score(samples))
        except UserError:
            raise
        except Exception as exc:
            raise PluginError(ws.name, f"reward scorer raised {type(exc).__name__}: {exc}") from exc
        if len(raw) != len(samples):
            raise PluginError(ws.name, f"returned {len(raw)} scores for {len(samples)} candidates")
        try:
            values = torch.tensor([float(x) for x in raw], dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise PluginError(ws.name, f"returned a score that is not a number: {exc}") from None
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i = int(bad[0])
            prompt = samples[i].prompt.text
            raise PluginError(ws.name, f"returned {values[i].item()} for prompt {prompt!r}")
        per_scorer[ws.name] = values
        combined += ws.weight * values
    return combined, per_scorer
