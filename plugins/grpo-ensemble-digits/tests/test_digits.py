"""The plugin's own tests, with grpo-ensemble's kit (grpo_ensemble.testing)."""

import grpo_ensemble_digits as plugin

from grpo_ensemble.testing import check_scorer, run_steps, samples


def test_the_contract():
    # against the answer "42", counted from the right: "41" has one of two digits in place,
    # "142" two of three characters, "" none
    got = check_scorer(plugin.DigitMatch(), samples(["42", "41", "142", ""]))
    assert got == [1.0, 0.5, 2 / 3, 0.0]


def test_two_steps(tmp_path):
    rewards = [{"name": "exact_match"}, {"name": "digit_match", "weight": 0.5}]
    result = run_steps(tmp_path, plugins=[plugin], rewards=rewards)
    assert [m["step"] for m in result.metrics] == [1, 2]
    assert all(0 <= m["reward/digit_match"] <= 1 for m in result.metrics)
