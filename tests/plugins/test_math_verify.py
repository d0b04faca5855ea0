"""The built-in `math_verify` scorer (the math-verify library, in the test extra): answers
equal by value in LaTeX or plain text, a checker that runs past its time gives no score."""

from __future__ import annotations

import pytest

from grpo_ensemble import Candidate, Prompt, Sample, UserError, train
from grpo_ensemble.plugins.builtin.answer_check import MathVerify


def _samples(answer: str, completions: list[str]) -> list[Sample]:
    p = Prompt("q", {"answer": answer})
    return [Sample(p, Candidate(c, [5], "policy")) for c in completions]


def test_answers_equal_by_value():
    scorer = MathVerify()
    half = ["$0.5$", "The answer is $\\frac{2}{4}$.", "$0.6$", "no idea"]
    assert scorer.score(_samples("$\\frac{1}{2}$", half)) == [1.0, 1.0, 0.0, 0.0]
    assert scorer.score(_samples("82", ["82", "so 82", "83", ""])) == [1.0, 1.0, 0.0, 0.0]


def test_a_sample_past_its_time_gets_no_score():
    # 9^(9^(9^9)) does not finish in a second: no score for it, the next sample is scored
    scorer = MathVerify(timeout_s=1)
    assert scorer.score(_samples("5", ["$9^{9^{9^{9}}}$", "$5$"])) == [None, 1.0]


def test_a_row_without_the_field_is_named():
    with pytest.raises(UserError, match=r"prompt -1: no 'solution' field"):
        MathVerify(field="solution").score(_samples("1", ["1"]))


def test_trains_from_a_recipe(small_recipe):
    rewards = [{"name": "math_verify", "params": {"timeout_s": 2}}]
    result = train(small_recipe(rewards=rewards, eval__before=False, eval__after=False))
    for m in result.metrics:
        assert 0.0 <= m["reward/math_verify"] <= 1.0 and m["reward"] == m["reward/math_verify"]
        assert "unscored_candidates" not in m  # additions do not time out
