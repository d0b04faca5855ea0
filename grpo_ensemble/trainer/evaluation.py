"""Held-out accuracy: greedy completions of held-out prompts, judged by a reward scorer.

The judging scorer is any registered reward scorer (default `exact_match`); a prompt counts as
solved when its score is ≥ 0.5. The summary is computed by an offline `evaluate.Metric`, so it
composes with the rest of the Hugging Face `evaluate` tooling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .. import dist
from ..plugins.interfaces import Generator, RewardScorer, SamplingParams, mix64
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
    mean_reward: float | None = None  # the judging scorer's mean score of the greedy completions
    k: int = 1
    pass_at_k: float | None = None  # share of prompts with a solved one among k samples (k > 1)

    def row(self, step: int, when: str) -> dict:
        """The row eval.json holds for this evaluation."""
        out = {"step": step, "when": when, "accuracy": self.accuracy, "ci95": self.ci95}
        out |= {"n": self.n, "mean_reward": self.mean_reward}
        if self.pass_at_k is not None:
            out[f"pass@{self.k}"] = self.pass_at_k
        return out


@dataclass
class HeldOut:
    """One rank's share of an evaluation: the greedy completions' scores, and per prompt
    whether any of k samples was solved (k > 1)."""

    scores: list[float]
    any_solved: list[bool] | None = None


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


def sampled_solved(
    generator: Generator,
    prompts: Sequence[Prompt],
    scorer: RewardScorer,
    sampling: SamplingParams,
    k: int,
) -> list[bool]:
    """Per prompt: whether any of `k` completions sampled with `sampling` (the policy's own
    parameters, seeded per prompt) is judged solved (score ≥ 0.5)."""
    if not prompts:
        return []
    groups = generator.generate(prompts, k, sampling)
    samples = [Sample(p, c) for p, cs in zip(prompts, groups, strict=True) for c in cs]
    scores = checked_scores(scorer, samples, "the evaluation's scorer (eval.scorer)")
    return [any(x >= SOLVED for x in scores[i * k : (i + 1) * k]) for i in range(len(prompts))]


SOLVED = 0.5  # a score at least this solves a prompt


def accuracy_of(scores: Sequence[float], any_solved: Sequence[bool] | None = None, k: int = 1):
    """Share of scores ≥ 0.5, with its 95% half-width, the mean score, and pass@k from
    `any_solved` (per prompt: one of k samples solved it) when given."""
    metric = _metric_class()(keep_in_memory=True)
    out = metric.compute(predictions=list(scores), references=[SOLVED] * len(scores))
    mean = sum(scores) / len(scores) if scores else None
    passed = None
    if any_solved is not None:
        passed = sum(any_solved) / len(any_solved) if any_solved else 0.0
    return EvalResult(out["accuracy"], out["n"], out["ci95"], mean, k, passed)


def heldout_accuracy(
    generator: Generator,
    prompts: Sequence[Prompt],
    scorer: RewardScorer,
    max_new_tokens: int,
) -> EvalResult:
    """Greedy-decode each prompt once and judge the completions with `scorer`."""
    return accuracy_of(heldout_scores(generator, prompts, scorer, max_new_tokens))


def evaluate_policy(run) -> EvalResult | None:
    """Held-out accuracy of the policy, greedy, sampled through the policy's own generator and
    judged by the recipe's eval scorer; each rank decodes its share of the prompts and the
    scores are gathered. `run`: the trainer's `Run`."""
    from .build import eval_max_new_tokens

    if not run.held_out:
        return None
    e = run.recipe.eval
    max_new = eval_max_new_tokens(run.recipe)
    gen = run.policy_generator
    prompts = run.held_out[: e.max_prompts]
    shard = dist.shard(len(prompts))
    mine = [prompts[i] for i in shard]
    scores = dist.agree(lambda: heldout_scores(gen, mine, run.eval_scorer, max_new))
    solved = None
    if e.k > 1:  # pass@k: k samples per prompt at the policy's own sampling parameters
        own = run.ensemble.members[0].sampling
        # seeded per held-out prompt, so that every evaluation draws the same way
        seeds = tuple(mix64(run.recipe.seed * 7919 + 104729 + i) for i in shard)
        how = SamplingParams(own.temperature, own.top_p, own.top_k, max_new, 0, seeds)
        solved = dist.agree(lambda: sampled_solved(gen, mine, run.eval_scorer, how, e.k))
        solved = [x for part in dist.all_gather_objects(solved) for x in part]
    flat = [x for part in dist.all_gather_objects(scores) for x in part]
    if hasattr(run.eval_scorer, "take_metrics"):  # what it logged belongs to no step
        run.eval_scorer.take_metrics()
    return accuracy_of(flat, solved, e.k)
