"""A kit for plugin authors' own tests: contract checks for each kind of component, and a
few real training steps on the built-in tiny models with the plugin registered (no install
needed). Each check raises AssertionError naming what broke the contract.

    from grpo_ensemble.testing import check_scorer, run_steps

    def test_my_scorer():
        check_scorer(MyScorer())

    def test_a_run(tmp_path):
        result = run_steps(tmp_path, plugins=[my_plugin_module], rewards=[{"name": "mine"}])
        assert result.metrics[-1]["reward/mine"] >= 0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .plugins.interfaces import Generator, GroupEvaluator, RewardScorer, SamplingParams
from .types import Candidate, Prompt, Sample

# prompts of the built-in arithmetic task: what the tiny models were trained on
PROMPTS = [Prompt("12+30=", {"answer": "42"}, 0), Prompt("7+8=", {"answer": "15"}, 1)]


def samples(completions: Sequence[str] = ("42", "41", "", "42 and more")) -> list[Sample]:
    """Samples of the first prompt with these completions (an empty one included)."""
    return [Sample(PROMPTS[0], Candidate(c, [], "policy")) for c in completions]


def check_scorer(scorer: RewardScorer, batch: Sequence[Sample] | None = None) -> list:
    """One score per sample, in order, each a finite number or None; the same scores when
    called again (a scorer is called once per candidate, but may be called in any grouping).
    Returns the scores."""
    batch = list(batch) if batch is not None else samples()
    scores = list(scorer.score(batch))
    assert len(scores) == len(batch), f"{len(scores)} scores for {len(batch)} samples"
    for i, s in enumerate(scores):
        assert s is None or (
            isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s)
        ), f"score {i} is {s!r}: give a finite number or None"
    one_by_one = [list(scorer.score([x]))[0] for x in batch]
    assert one_by_one == scores, "scores differ when the samples come one at a time"
    return scores


def check_evaluator(evaluator: GroupEvaluator, seed: int = 0) -> None:
    """Advantages of the grid's shape, finite, 0 where a candidate is not valid, and 0 for a
    group whose statistics rewards are all equal; ragged groups included."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(3, 4, generator=g, dtype=torch.float64)
    rewards[1] = 0.5  # all equal
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2, 3] = False  # a ragged group
    adv = evaluator.advantages(rewards, valid, valid.clone())
    assert isinstance(adv, torch.Tensor), "advantages must be a tensor"
    assert adv.shape == rewards.shape, f"advantages of shape {tuple(adv.shape)}"
    assert torch.isfinite(adv).all(), "advantages hold NaN or inf"
    assert (adv[~valid] == 0).all(), "a candidate that is not valid must get 0"
    assert (adv[1] == 0).all(), "a group whose rewards are all equal must get 0"


def check_generator(generator: Generator, n: int = 2, max_new_tokens: int = 4) -> list:
    """n candidates per prompt, each a Candidate with text; with the same seeds, the same
    candidates (a generator that ignores seeds fails this: say so in its docs and skip it).
    Returns the candidates."""
    how = SamplingParams(max_new_tokens=max_new_tokens, seeds=(11, 12))
    out = generator.generate(PROMPTS, n, how)
    assert len(out) == len(PROMPTS), f"{len(out)} lists for {len(PROMPTS)} prompts"
    for i, cands in enumerate(out):
        assert len(cands) == n, f"prompt {i}: {len(cands)} candidates, asked for {n}"
        for c in cands:
            assert isinstance(c, Candidate), f"prompt {i}: {c!r} is not a Candidate"
            assert isinstance(c.text, str), f"prompt {i}: a candidate's text is {c.text!r}"
    again = generator.generate(PROMPTS, n, how)
    texts = [[c.text for c in cs] for cs in out]
    assert texts == [[c.text for c in cs] for cs in again], "the same seeds sampled otherwise"
    return out


def run_steps(tmp_path: Path, plugins: Sequence = (), steps: int = 2, **sections):
    """`steps` real GRPO steps of a tiny recipe (the built-in policy and peer), with
    `plugins` (modules or objects with hook implementations) registered for the run and
    `sections` (top-level recipe keys, e.g. `rewards=[{"name": "mine"}]`) merged over it.
    Returns the `TrainResult`."""
    from .recipe import recipe_from_dict
    from .trainer.loop import train

    data = {
        "seed": 0,
        "output_dir": str(Path(tmp_path) / "run"),
        "policy": {"model": "builtin:tiny-arith-small", "n": 2, "sampling": {"max_new_tokens": 5}},
        "peers": [
            {
                "name": "strong",
                "model": "builtin:tiny-arith-base",
                "n": 2,
                "sampling": {"max_new_tokens": 5},
            }
        ],
        "train": {"steps": steps, "prompts_per_step": 4, "micro_batch_size": 8},
        "eval": {"max_prompts": 8},
        "log": {"progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return train(recipe_from_dict(data), plugins=list(plugins))
