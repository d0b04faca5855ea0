"""Built-in reward scorers and their combination, by hand."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

from grpo_ensemble.errors import PluginError, UserError
from grpo_ensemble.plugins.builtin.rewards import (
    ExactMatch,
    LengthPenalty,
    NumericMatch,
    PythonFunction,
    RegexFormat,
)
from grpo_ensemble.rollout.scoring import WeightedScorer, score_groups
from grpo_ensemble.types import Candidate, Group, Prompt, Sample


def _samples(*completions, answer="82", ids=None):
    p = Prompt("37+45=", {"prompt": "37+45=", "answer": answer})
    return [Sample(p, Candidate(c, ids or [1] * len(c), "policy")) for c in completions]


def test_exact_match():
    assert ExactMatch().score(_samples("82", " 82 ", "8", "820")) == [1.0, 1.0, 0.0, 0.0]
    assert ExactMatch(ignore_case=True).score(_samples("ABC", answer="abc")) == [1.0]


def test_numeric_match_takes_last_number():
    got = NumericMatch().score(_samples("the sum is 82", "80 then 82.0", "82 no 81", "none"))
    assert got == [1.0, 1.0, 0.0, 0.0]


def test_regex_format():
    assert RegexFormat(r"\d+").score(_samples("82", "8a2")) == [1.0, 0.0]
    assert RegexFormat(r"\d", fullmatch=False).score(_samples("a8", "ab")) == [1.0, 0.0]
    with pytest.raises(UserError, match="bad pattern"):
        RegexFormat("(")


def test_length_penalty_counts_tokens_over_budget():
    samples = _samples("82", "123456")  # 2 and 6 tokens
    assert LengthPenalty(max_tokens=3, per_token=0.5).score(samples) == [0.0, -1.5]


def test_python_function(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def reward(samples):\n    return [len(s.completion) for s in samples]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_reward", None)
    assert PythonFunction("my_reward:reward").score(_samples("a", "abc")) == [1.0, 3.0]
    with pytest.raises(UserError, match="no function"):
        PythonFunction("my_reward:missing")
    with pytest.raises(UserError, match="module:name"):
        PythonFunction("my_reward")


def test_python_function_module_errors_are_user_errors(tmp_path, monkeypatch):
    (tmp_path / "raises_on_import.py").write_text('raise RuntimeError("boom at import")\n')
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "raises_on_import:f": "importing 'raises_on_import' failed: RuntimeError: boom at import",
        "bad_syntax:f": "importing 'bad_syntax' failed: SyntaxError: invalid syntax",
        3: "function must be 'module:name', got 3",
    }
    for function, message in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            PythonFunction(function)
    with pytest.raises(TypeError, match=re.escape("field must be the name of a prompt field")):
        ExactMatch(field=[1])  # construct() turns it into an error on rewards[i].params


def test_python_function_from_the_current_directory_with_the_console_script(tmp_path):
    # the installed `grpo-ensemble` script does not put the current directory on sys.path
    # (python -m does): the scorer's module must still be found there, as the docs say
    script = Path(sys.executable).parent / "grpo-ensemble"
    (tmp_path / "my_cwd_reward.py").write_text("def f(samples):\n    return [1.0] * len(samples)\n")
    recipe = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
    rewards = "rewards=[{name: python, params: {function: my_cwd_reward:f}}]"
    done = subprocess.run(
        [str(script), "validate", str(recipe), "--set", rewards],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": ok (group size 8, 1000 steps)")


def test_weighted_combination_and_per_scorer():
    p = Prompt("1+1=", {"answer": "2"})
    groups = [Group(p, [Candidate("2", [1, 2], "policy"), Candidate("3", [1, 2, 3, 4], "s")])]
    scorers = [
        WeightedScorer("exact_match", ExactMatch(), 2.0),
        WeightedScorer("length_penalty", LengthPenalty(max_tokens=2, per_token=0.25), 1.0),
    ]
    combined, per = score_groups(groups, scorers)
    # candidate 0: 2·1 + 0; candidate 1: 2·0 − 0.25·2
    assert combined.tolist() == [2.0, -0.5]
    assert per["exact_match"].tolist() == [1.0, 0.0]
    assert per["length_penalty"].tolist() == [0.0, -0.5]


class _Bad:
    name = "bad"

    def __init__(self, result):
        self.result = result

    def score(self, samples):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    "result, message",
    [
        ([1.0], "returned 1 scores for 2"),
        ([0.0, float("nan")], "returned nan"),
        (RuntimeError("boom"), "raised RuntimeError: boom"),
    ],
)
def test_misbehaving_scorer_is_named(result, message):
    p = Prompt("1+1=", {"answer": "2"})
    groups = [Group(p, [Candidate("2", [1], "policy"), Candidate("3", [1], "policy")])]
    with pytest.raises(PluginError, match=message) as info:
        score_groups(groups, [WeightedScorer("bad", _Bad(result), 1.0)])
    assert info.value.plugin == "bad"
