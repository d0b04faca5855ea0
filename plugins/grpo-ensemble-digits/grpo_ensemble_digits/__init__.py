"""An example third-party plugin: `digit_match`, partial credit for numeric answers.

Installed with pip, it is found through the `grpo_ensemble` entry point declared in its
pyproject.toml; a recipe then uses it by name:

    rewards:
      - name: digit_match
        weight: 0.5
"""

from __future__ import annotations

from collections.abc import Sequence

from grpo_ensemble import RewardScorer, Sample, hookimpl


class DigitMatch(RewardScorer):
    """Share of the answer's characters that the completion has in the same place, counted
    from the right (so "81" for "82" earns 0.5), minus nothing for extra characters."""

    name = "digit_match"

    def __init__(self, field: str = "answer"):
        self.field = field

    def score(self, samples: Sequence[Sample]) -> list[float]:
        out = []
        for s in samples:
            want, got = str(s.row[self.field]).strip(), s.completion.strip()
            hits = sum(a == b for a, b in zip(reversed(want), reversed(got), strict=False))
            out.append(hits / max(len(want), len(got), 1))
        return out


@hookimpl
def register_reward_scorers(register):
    register(DigitMatch)
