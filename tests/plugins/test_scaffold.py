"""`grpo-ensemble new-plugin` round trip, and the kit (`grpo_ensemble.testing`) on the
built-in components and the example plugin."""

import json
import subprocess
import sys
import tomllib

import pytest
from helpers import subprocess_env

from grpo_ensemble.cli import main
from grpo_ensemble.engine.hf import HFGenerator
from grpo_ensemble.models.loading import load_model
from grpo_ensemble.plugins.builtin.evaluators import GRPO, RLOO, DrGRPO
from grpo_ensemble.plugins.builtin.rewards import ExactMatch, NumericMatch
from grpo_ensemble.testing import check_evaluator, check_generator, check_scorer, samples


@pytest.mark.parametrize("kind", ["reward", "evaluator", "generator", "tracker"])
def test_a_scaffold_passes_its_own_test_as_generated(tmp_path, capsys, kind):
    name = f"my_{kind}"
    assert main(["new-plugin", name, "--kind", kind, "--dir", str(tmp_path)]) == 0
    root = tmp_path / f"grpo-ensemble-my-{kind}"
    assert f"plugin package: {root}" in capsys.readouterr().out
    project = tomllib.loads((root / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["grpo_ensemble"]
    assert entry == {name: f"grpo_ensemble_my_{kind}.plugin"}
    assert (root / "README.md").is_file()
    # its test, as an author runs it (the package on the path, not installed: the kit
    # registers the plugin for the run)
    env = subprocess_env(PYTHONPATH=str(root / "src"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_new_plugin_refuses_a_bad_name_or_a_taken_folder(tmp_path, capsys):
    assert main(["new-plugin", "My-Judge", "--dir", str(tmp_path)]) == 2
    assert "'My-Judge' is no plugin name" in capsys.readouterr().err
    assert main(["new-plugin", "judge", "--kind", "critic", "--dir", str(tmp_path)]) == 2
    assert "--kind 'critic': give one of reward, evaluator, generator, tracker" in (
        capsys.readouterr().err
    )
    assert main(["new-plugin", "judge", "--dir", str(tmp_path)]) == 0
    assert main(["new-plugin", "judge", "--dir", str(tmp_path)]) == 2
    assert "exists; choose another name or --dir" in capsys.readouterr().err


def test_the_kit_on_built_in_components_and_the_example_plugin():
    from grpo_ensemble_digits import DigitMatch

    assert check_scorer(ExactMatch()) == [1.0, 0.0, 0.0, 0.0]
    assert check_scorer(NumericMatch()) == [1.0, 0.0, 0.0, 1.0]  # the last number counts
    # "42" against the answer "42": every digit in place; "41": one of two
    assert check_scorer(DigitMatch(), samples(["42", "41"])) == [1.0, 0.5]
    for evaluator in (GRPO(), RLOO(), DrGRPO()):
        check_evaluator(evaluator)
    model, tok = load_model("builtin:tiny-arith-small", "m")
    out = check_generator(HFGenerator(model, tok), n=2)
    assert all(len(c.token_ids) >= 1 for cs in out for c in cs)


def test_the_kit_catches_a_broken_contract():
    class Short:
        def score(self, samples):
            return [1.0]

    class NotANumber:
        def score(self, samples):
            return ["1"] * len(samples)

    class Uncentred:
        def advantages(self, rewards, valid, stats):
            return rewards  # not 0 for a group of equal rewards, nor where not valid

    with pytest.raises(AssertionError, match="1 scores for 4 samples"):
        check_scorer(Short())
    with pytest.raises(AssertionError, match="score 0 is '1'"):
        check_scorer(NotANumber())
    with pytest.raises(AssertionError, match="not valid must get 0"):
        check_evaluator(Uncentred())


def test_an_installed_scaffold_is_discovered_through_its_entry_point(tmp_path, capsys):
    # installed for real (pip, into a folder of its own: the test environment is left as
    # it is), then found through its entry point, as a user's `pip install` makes it
    assert main(["new-plugin", "my_judge", "--dir", str(tmp_path)]) == 0
    root, target = tmp_path / "grpo-ensemble-my-judge", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip, "--target", str(target), str(root)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    env = subprocess_env(PYTHONPATH=str(target))
    env["GRPO_ENSEMBLE_LOAD_PLUGINS"] = "my_judge"
    listed = subprocess.run(
        [sys.executable, "-m", "grpo_ensemble", "plugins", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    found = {p["name"]: p for p in json.loads(listed.stdout)}["my_judge"]
    assert found["distribution"] == "grpo-ensemble-my-judge" and found["version"] == "0.1.0"
    assert found["components"] == {"reward_scorer": ["my_judge"]} and found["left_out"] is None
