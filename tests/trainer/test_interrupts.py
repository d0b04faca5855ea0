"""Interrupted runs never exit 0: a stop signal at any moment, twice in a row, or a reward
scorer that hangs or raises KeyboardInterrupt ends with 128 + signal (or 1 for a scorer's own
fault) and one line that says what was kept."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import subprocess_env, write_recipe
from safetensors.torch import load_file

from grpo_ensemble.rundir import read_metrics
from grpo_ensemble.stopping import GRACE_S

TRAIN = {
    "steps": 4,
    "prompts_per_step": 4,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "zero_stage": 0,
    "checkpoint_every": 0,
    "threads": 1,
}

# a reward scorer that hangs at its call number HANG_AT (counted across processes in a file),
# telling the test so; a deterministic score of the completion otherwise
HANGS = """\
import os, pathlib, time

COUNT = pathlib.Path("calls")
HANG_AT = int(os.environ.get("HANG_AT", "-1"))


def score(samples):
    n = int(COUNT.read_text()) if COUNT.exists() else 0
    COUNT.write_text(str(n + 1))
    if n == HANG_AT:
        pathlib.Path("hanging").write_text("")
        while True:
            time.sleep(1)
    return [float(len(s.completion) % 3 == 0) for s in samples]
"""

RAISES_INTERRUPT = """\
def score(samples):
    raise KeyboardInterrupt
"""


def _recipe(tmp_path: Path, scorer: str, **train) -> Path:
    (tmp_path / f"{scorer}.py").write_text({"hangs": HANGS, "raises": RAISES_INTERRUPT}[scorer])
    rewards = [{"name": "python", "params": {"function": f"{scorer}:score"}, "timeout_s": None}]
    return write_recipe(
        tmp_path / "r.yaml",
        seed=3,
        rewards=rewards,
        train={**TRAIN, **train},
        eval={"before": False, "after": False},
    )


def _train(tmp_path: Path, recipe: Path, out: Path, *more: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grpo_ensemble", "train", str(recipe), "--set", f"output_dir={out}"]
        + list(more),
        cwd=tmp_path,  # (the python scorer imports from the current directory)
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, done, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def test_a_hung_scorer_is_abandoned_on_sigterm_and_the_step_before_is_kept(tmp_path):
    """The scorer (timeout_s: null) hangs in step 3: SIGTERM abandons it after the grace period,
    the run writes the checkpoint of step 2 (its files as they were when step 3 began) and
    exits 143; resumed, the run ends bitwise equal to one that never hung."""
    recipe = _recipe(tmp_path, "hangs")
    out = tmp_path / "run"
    # call 0 is the probe before training, then 2 a step (the policy's candidates, then the
    # peers'): call 5 is step 3's first
    proc = _train(tmp_path, recipe, out, HANG_AT="5")
    _wait_for(proc, (tmp_path / "hanging").exists)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=GRACE_S + 120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpt = out / "checkpoints" / "step-00000002"
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM during step 3 (the reward scorer 'python' had not returned "
        f"{GRACE_S:g} s after it; it was abandoned and the step left out); checkpoint {ckpt}; "
        f"continue with: grpo-ensemble train {recipe} --set output_dir={out} --resume auto"
    )
    assert "Traceback" not in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]

    resumed = _train(tmp_path, recipe, out, "--resume", "auto")
    assert resumed.wait(timeout=600) == 0, resumed.communicate()[1][-2000:]
    (tmp_path / "calls").unlink()
    whole = tmp_path / "whole"
    uninterrupted = _train(tmp_path, recipe, whole)
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.communicate()[1][-2000:]
    a = load_file(out / "final" / "model.safetensors")
    b = load_file(whole / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    same = [k for k in read_metrics(whole / "metrics.jsonl")[0] if not k.startswith("time/")]
    rows = [[r[k] for k in same] for r in read_metrics(out / "metrics.jsonl")]
    assert rows == [[r[k] for k in same] for r in read_metrics(whole / "metrics.jsonl")]


def test_sigint_twice_stops_at_once_with_exit_130_and_one_line(tmp_path):
    recipe = _recipe(tmp_path, "hangs", steps=500, checkpoint_every=2)
    out = tmp_path / "run"
    proc = _train(tmp_path, recipe, out)
    metrics = out / "metrics.jsonl"
    _wait_for(proc, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGINT during step ") or line.startswith(
        "stopped by SIGINT after step "
    ), line
    assert "checkpoint" in line


def test_sigint_during_start_up_exits_130_saying_nothing_was_trained(tmp_path):
    recipe = _recipe(tmp_path, "hangs")
    out = tmp_path / "run"
    proc = _train(tmp_path, recipe, out)
    # the run has begun (it printed its directory) and is building its models
    _wait_for(proc, lambda: (out / "recipe.yaml").exists())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "stopped by SIGINT during start-up; nothing was trained"
    assert "Traceback" not in err


def test_a_scorer_that_raises_keyboardinterrupt_is_a_failed_run_not_a_success(tmp_path):
    recipe = _recipe(tmp_path, "raises")
    proc = _train(tmp_path, recipe, tmp_path / "run")
    _, err = proc.communicate(timeout=300)
    # the probe before training calls it first: a reward function that cannot run is bad input
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "error: rewards.0: 'python' failed on the first training row (line 1): reward scorer "
        "raised KeyboardInterrupt"
    )
    assert "Traceback" not in err


RAISES_INTERRUPT_LATER = """\
import pathlib

COUNT = pathlib.Path("calls")


def score(samples):  # the probe before training passes; the run's calls raise
    n = int(COUNT.read_text()) if COUNT.exists() else 0
    COUNT.write_text(str(n + 1))
    if n >= 1:
        raise KeyboardInterrupt
    return [0.0 for _ in samples]
"""


def test_a_scorer_that_raises_keyboardinterrupt_in_the_run_fails_it(tmp_path):
    recipe = _recipe(tmp_path, "raises")
    (tmp_path / "raises.py").write_text(RAISES_INTERRUPT_LATER)
    proc = _train(tmp_path, recipe, tmp_path / "run")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("run failed: plugin 'python': reward scorer raised KeyboardInterrupt")
    ), err[-2000:]
    assert "Traceback" not in err
