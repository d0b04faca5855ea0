"""Chaos: a 2-rank run under torchrun, killed with SIGKILL at random moments (several of them
while a checkpoint is being written) and relaunched with `--resume auto` after each kill, ends
as if it had never been interrupted: final weights bitwise equal, and exactly one metrics row
per step with the same values (the time/* fields aside: they measure seconds). The recipe is
the ensemble one of helpers.py (a peer injected where the policy failed, a reference model,
μ = 2) with a checkpoint after every step, at ZeRO 2 and at ZeRO 3 (every rank its shards).

The kill moments come from a seeded random.Random (GRPO_ENSEMBLE_TEST_SEED=N picks another
sequence; a failure names the seed and where every kill landed). Each kill first waits until
the launch has written a checkpoint of its own, so start-up is over whatever the machine's
speed, then either waits a random 0–1.5 s ("anywhere") or until the next checkpoint is being
written (its temporary `.step-….tmp` directory appears, docs/reliability.md) and a random 0–30 ms
more ("during a write"). A kill reaches every process of the run: torchrun starts each rank in
a session of its own, so a signal to torchrun's process group alone would leave the ranks
training on.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import process_tree, subprocess_env, write_recipe
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc"),
]

STEPS = 16
KILLS = 3
TRAIN = {
    "steps": STEPS,
    "prompts_per_step": 5,
    "micro_batch_size": 3,
    "lr": 1e-3,
    "adam_eps": 1e-5,
    "warmup_steps": 2,
    "schedule": "cosine",
    "checkpoint_every": 1,
}
COMPLETE, TEMPORARY = re.compile(r"step-(\d+)"), re.compile(r"\.step-(\d+)\.tmp")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe: Path, out: Path, log: Path, resume: bool) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m grpo_ensemble train RECIPE` into `out`, in a session
    of its own, its output to `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), "-m", "grpo_ensemble", "train", str(recipe)]
    cmd += ["--set", f"output_dir={out}", *(["--resume", "auto"] if resume else [])]
    with log.open("w") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=subprocess_env(OMP_NUM_THREADS="1"),
            cwd=out.parent,
            start_new_session=True,
        )


def _checkpoints(out: Path) -> tuple[list[int], list[int]]:
    """The steps of the complete (`step-N`) and of the temporary (`.step-N.tmp`) checkpoints."""
    try:
        names = os.listdir(out / "checkpoints")
    except FileNotFoundError:
        return [], []
    steps = [
        [int(m[1]) for n in names if (m := kind.fullmatch(n))] for kind in (COMPLETE, TEMPORARY)
    ]
    return sorted(steps[0]), sorted(steps[1])


def _newest(out: Path) -> int:
    return max(_checkpoints(out)[0], default=0)


def _wait(proc: subprocess.Popen, condition, timeout: float = 300) -> bool:
    """Poll until `condition()` holds (True) or the run ends by itself (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the run")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds no file


def _kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of torchrun and of every process it started; returns
    once none of them runs."""
    tree = process_tree(proc.pid)
    groups = set()
    for pid in tree:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in tree[1:]):
        assert time.monotonic() < deadline, f"ranks still running after SIGKILL: {tree}"
        time.sleep(0.01)


def _kill_at_random(proc: subprocess.Popen, out: Path, rng: random.Random) -> dict | None:
    """Kill the run at a moment drawn from `rng`, after it wrote a checkpoint of its own; where
    the kill landed, or None when the run ended first."""
    during_write = rng.random() < 0.5  # (both drawn every time: the sequence stays the same)
    delay = rng.uniform(0, 0.03) if during_write else rng.uniform(0, 1.5)
    resumed_at = _newest(out)
    if not _wait(proc, lambda: _newest(out) > resumed_at):
        return None
    if during_write:
        seen = _newest(out)
        if not _wait(proc, lambda: any(s > seen for s in _checkpoints(out)[1])):
            return None
    time.sleep(delay)
    if proc.poll() is not None:
        return None
    _kill_everything(proc)
    if proc.returncode == 0:  # it had finished by itself after all
        return None
    complete, temporary = _checkpoints(out)
    newest = max(complete, default=0)
    metrics = out / "metrics.jsonl"
    return {
        "aimed": f"{'during a write' if during_write else 'anywhere'}, +{delay:.3f} s",
        "resumed_at": resumed_at,
        "landed": (
            f"while writing checkpoint {max(temporary)}"
            if any(s > newest for s in temporary)
            else f"after checkpoint {newest}"
        ),
        "newest_checkpoint": newest,
        "metrics_rows": len(metrics.read_bytes().splitlines()) if metrics.is_file() else 0,
        "final": (out / "final").exists(),
    }


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def _incomplete_checkpoints(out: Path) -> list[str]:
    complete = _checkpoints(out)[0]
    root = out / "checkpoints"
    return [
        f"step-{s:08d}"
        for s in complete
        if not (root / f"step-{s:08d}/trainer_state.json").is_file()
    ]


@pytest.mark.parametrize("stage", [2, 3])
def test_killed_at_random_moments_and_resumed_ends_as_the_uninterrupted_run(tmp_path, stage):
    train = {**TRAIN, "zero_stage": stage}
    recipe = write_recipe(
        tmp_path / "recipe.yaml", seed=3, train=train, eval={"before": False, "after": False}
    )
    whole, chaos = tmp_path / "whole", tmp_path / "chaos"
    proc = _launch(recipe, whole, tmp_path / "whole.log", resume=False)
    assert proc.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]

    seed = int(os.environ.get("GRPO_ENSEMBLE_TEST_SEED", "0"))
    rng = random.Random(seed)
    kills: list[dict] = []
    launches = 0
    while True:
        log = tmp_path / f"chaos-{launches}.log"
        proc = _launch(recipe, chaos, log, resume=launches > 0)
        launches += 1
        landing = _kill_at_random(proc, chaos, rng) if len(kills) < KILLS else None
        if landing is None:
            break
        kills.append(landing)
        broken = _incomplete_checkpoints(chaos)
        assert not broken, (seed, kills, f"incomplete checkpoints after the kill: {broken}")
    said = f"seed {seed}, kills {kills}"
    print(said)  # (pytest -s shows where the kills landed)
    assert proc.wait(timeout=600) == 0, (said, log.read_text()[-3000:])
    last = log.read_text()
    assert "resumed from" in last and f"done: step {STEPS} of {STEPS}" in last, said
    # the chaos happened: a kill after a checkpoint existed and before the run had finished
    assert any(k["newest_checkpoint"] >= 1 and not k["final"] for k in kills), said

    wa = load_file(whole / "final" / "model.safetensors")
    wb = load_file(chaos / "final" / "model.safetensors")
    assert wa.keys() == wb.keys(), said
    unequal = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not unequal, (said, unequal[:3])
    ra, rb = _rows(whole), _rows(chaos)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1)), said  # none lost or repeated
    for a, b in zip(ra, rb, strict=True):
        assert _untimed(a) == _untimed(b), (said, a["step"])
    assert not _incomplete_checkpoints(chaos), said
