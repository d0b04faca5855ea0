"""The CLI as a user runs it: a real subprocess that trains 3 steps and leaves a loadable model."""

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_ensemble.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_cli_trains_three_steps_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "GRPO_ENSEMBLE_LOAD_PLUGINS": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_ensemble",
            "train",
            str(ROOT / "recipes" / "quickstart.yaml"),
            "--set",
            "train.steps=3",
            "--set",
            f"output_dir={out}",
            "--set",
            "seed=1",
            "--set",
            "eval.max_prompts=20",
            "--set",
            "train.prompts_per_step=4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy before training" in proc.stdout
    assert "held-out accuracy after training" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # 4 prompts × 4 policy candidates, plus 4 peer candidates per prompt the policy failed
    assert all(r["member/policy/candidates"] == 16 for r in rows)
    assert all(r["candidates"] == 16 + r.get("member/strong/candidates", 0) for r in rows)
    assert all(r.get("member/strong/candidates", 0) % 4 == 0 for r in rows)
    assert "seed: 1" in (out / "recipe.yaml").read_text()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("12+7=", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok)


def test_cli_bad_recipe_is_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  model: builtin:tiny-arith-small\n  n: two\n")
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_ensemble", "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}:3: policy.n: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


def test_cli_run_failure_is_exit_1(tmp_path):
    # a reward function that raises once the run has begun (on a completion that is not
    # empty: the check before training, on an empty one, passes): the run fails (1), the
    # message names the scorer
    (tmp_path / "boom.py").write_text(
        "def reward(samples):\n"
        "    if any(s.completion for s in samples):\n"
        "        raise RuntimeError('kaput')\n"
        "    return [0.0] * len(samples)\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_ensemble",
            "train",
            str(ROOT / "recipes" / "quickstart.yaml"),
            "--set",
            f"output_dir={tmp_path / 'run'}",
            "--set",
            "eval.before=false",
            "--set",
            "rewards=[{name: python, params: {function: 'boom:reward'}}]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "GRPO_ENSEMBLE_LOAD_PLUGINS": ""},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "plugin 'python': reward scorer raised RuntimeError: kaput" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_option_is_a_usage_error_exit_2(capsys):
    from grpo_ensemble.cli import main

    assert main(["train", "--bogus", "x"]) == 2
    assert capsys.readouterr().err == (
        "error: No such option: --bogus (see grpo-ensemble train --help)\n"
    )
    assert main(["train"]) == 2  # one line, like every other error (click printed four)
    assert capsys.readouterr().err == (
        "error: Missing argument 'recipe'. (see grpo-ensemble train --help)\n"
    )
    assert main([]) == 2  # the help, and no empty error line after it
    assert "error" not in capsys.readouterr().err
    assert main(["trian", "r.yaml"]) == 2
    assert capsys.readouterr().err == (
        "error: No such command 'trian'. Did you mean 'train'? (see grpo-ensemble --help)\n"
    )


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(capsys, monkeypatch):
    from grpo_ensemble.cli import _launcher_args

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _launcher_args(["--local_rank=1", "train", "r.yaml"]) == ["train", "r.yaml"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _launcher_args(["--local_rank", "0", "plugins"]) == ["plugins"]


def test_a_model_cache_that_cannot_be_a_directory_is_exit_2(tmp_path, capsys, monkeypatch):
    # built-in models are built into $GRPO_ENSEMBLE_CACHE: a file there is the user's setting
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    monkeypatch.setenv("GRPO_ENSEMBLE_CACHE", str(blocker))
    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot build the built-in model 'tiny-arith-small' under '{blocker}' "
        "($GRPO_ENSEMBLE_CACHE or ~/.cache/grpo_ensemble): Not a directory"
    )
