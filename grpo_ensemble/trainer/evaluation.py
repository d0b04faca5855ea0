"""Held-out accuracy: greedy completions of held-out prompts, judged by a reward scorer.

The judging scorer is any registered reward scorer (default `exact_match`); a prompt counts as
solved when its score is ≥ 0.5. The summary is computed by an offline `evaluate.Metric`, so it
composes with the rest of the Hugging Face `evaluate` tooling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..plugins.interfaces import Generator, RewardScorer, SamplingParams
from ..rollout.scoring import checked_scores
from ..types import Prompt, Sample


def _metric_class():
    import datasets
    import evaluate

    class HeldOutAccuracy(evaluate.Metric):
        """Share of solved prompts, with a 95% normal-approximation half-width."""

        def _info(self):
            return evaluate.MetricInfo(
                description="Share of held-out prompts whose greedy completion is judged correct.",
                citation="",
                inputs_description="predictions: per-prompt scores; references: thresholds",
                features=datasets.Features(
                    {
                        "predictions": datasets.Value("float64"),
                        "references": datasets.Value("float64"),
                    }
                ),
            )

        def _compute(self, predictions, references):
            solved = [float(p >= r) for p, r in zip(predictions, references, strict=True)]
            n = len(solved)
            acc = sum(solved) / n if n else 0.0
            return {"accuracy": acc, "n": n, "ci95": 1.96 * math.sqrt(acc * (1 - acc) / max(n, 1))}

    return HeldOutAccuracy


@dataclass
class EvalResult:
    accuracy: float
    n: int
    ci95: float


def heldout_scores(
    generator: Generator, prompts: Sequence[Prompt], scorer: RewardScorer, max_new_tokens: int
) -> list[float]:
    """Greedy-decode each prompt once; the judging scorer's score of each completion."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    completions = [c[0] for c in generator.generate(prompts, 1, greedy)]
    if not prompts:
        return []
    samples = [Sample(p, c) for p, c in zip(prompts, completions, strict=True)]
    return checked_scores(scorer, samples, "the evaluation's scorer (eval.scorer)")


def accuracy_of(scores: Sequence[float]) -> EvalResult:
    """Share of scores ≥ 0.5, with its 95% half-width."""
    metric = _metric_class()(keep_in_memory=True)
    out = metric.compute(predictions=list(scores), references=[0.5] * len(scores))
    return EvalResult(accuracy=out["accuracy"], n=out["n"], ci95=out["ci95"])


def heldout_accuracy(
    generator: Generator,
    prompts: Sequence[Prompt],
    scorer: RewardScorer,
    max_new_tokens: int,
) -> EvalResult:
    """Greedy-decode each prompt once and judge the completions with `scorer`."""
    return accuracy_of(heldout_scores(generator, prompts, scorer, max_new_tokens))
