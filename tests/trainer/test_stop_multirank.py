"""Stop signals on 2 ranks under torchrun: a SIGTERM stops every rank, rank 0 alone says so in
one line, and the checkpoint it names is complete and resumes to the uninterrupted run.

How the signal arrives, as schedulers send it: torchrun starts each rank in a session of its
own, so a signal to torchrun's process group never reaches the ranks by itself. A scheduler that
signals every process of the job (Slurm with proctrack/cgroup, on `scancel` or at the time
limit) reaches torchrun and each rank, and torchrun sends each rank a second SIGTERM; one that
signals the container's first process (Kubernetes, torchrun as the entry point) reaches torchrun
alone, which sends SIGTERM on to each rank's session and SIGKILLs what still runs 30 s later
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT). Both are tested. Either way torchrun itself ends with status 1
and a traceback of its own (SignalException); how each rank ended is what the tests check.
"""

from __future__ import annotations

import json
import os
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

from grpo_ensemble.stopping import GRACE_S
from grpo_ensemble.trainer import manifest

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc"),
]

TRAIN = {
    "steps": 3,
    "prompts_per_step": 4,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "adam_eps": 1e-5,
    "zero_stage": 2,
    "checkpoint_every": 0,
}

# A reward scorer that counts its calls per rank (in a file of the rank's own) and, on rank 1
# only, hangs at call HANG_AT, telling the test so. Call 0 is the probe before training; then
# each step calls it twice on every rank (the policy's candidates, then the peers': inject is
# "always"), so call 6 is step 3's second. The counter goes on in a resumed run: no hang then.
HANGS = """\
import os, pathlib, time

RANK = os.environ["RANK"]
COUNT = pathlib.Path(f"calls-rank{RANK}")
HANG_AT = int(os.environ.get("HANG_AT", "-1"))


def score(samples):
    n = int(COUNT.read_text()) if COUNT.exists() else 0
    COUNT.write_text(str(n + 1))
    if RANK == "1" and n == HANG_AT:
        pathlib.Path("hanging-rank1").write_text("")
        while True:
            time.sleep(1)
    return [float(len(s.completion) % 3 == 0) for s in samples]
"""
HANG_AT = 6  # rank 1's call in step 3, scoring the peers' candidates

# each rank is the CLI's own `main`, which ends a rank of several with `os._exit(code)`
# (cli._exit_rank); the code is written down on its way out, so that the test sees how each rank
# ended (torchrun's own exit status, once it has been signalled, says nothing of them)
RANK_SCRIPT = """\
import os, sys
from grpo_ensemble.cli import main

leave = os._exit


def record(code):
    with open(f"exit-rank{os.environ['RANK']}", "w") as fh:
        fh.write(str(code))
    leave(code)


os._exit = record
sys.exit(main())
"""

# what a complete checkpoint of 2 ranks holds besides DeepSpeed's engine folder
CHECKPOINT_FILES = {"trainer_state.json", "rng-rank0.json", "rng-rank1.json", manifest.NAME}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp_path: Path, **train) -> Path:
    rewards = [{"name": "python", "params": {"function": "hangs:score"}, "timeout_s": None}]
    return write_recipe(
        tmp_path / "recipe.yaml",
        seed=3,
        rewards=rewards,
        group={"inject": "always"},
        train={**TRAIN, **train},
        eval={"before": False, "after": False},
    )


class Launch:
    """`torchrun --nproc_per_node 2 rank.py train RECIPE` into `out`, run from `cwd` (where the
    scorer module, its call counters and the ranks' exit codes are), each rank's output in a
    log folder."""

    def __init__(self, cwd: Path, recipe: Path, out: Path, *more: str, **env: str):
        cwd.mkdir(exist_ok=True)
        (cwd / "hangs.py").write_text(HANGS)
        (cwd / "rank.py").write_text(RANK_SCRIPT)
        for old in cwd.glob("exit-rank*"):
            old.unlink()
        self.cwd = cwd
        self.logs = cwd / f"logs-{len(list(cwd.glob('logs-*')))}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(_port()), "--log-dir", str(self.logs), "--redirects", "3"]
        cmd += [str(cwd / "rank.py"), "train", str(recipe), "--set", f"output_dir={out}"]
        self.proc = subprocess.Popen(
            cmd + list(more),
            cwd=cwd,  # (the python scorer imports from the current directory)
            env=subprocess_env(OMP_NUM_THREADS="1", **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.torchrun_err = ""

    def wait(self, timeout: float) -> int:
        """torchrun's exit status; a run still going after `timeout` seconds is killed (all its
        processes) and fails the test with what each rank wrote."""
        try:
            _, self.torchrun_err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = process_tree(self.proc.pid)
            for pid in tree:
                _signal(pid, signal.SIGKILL)
            _, self.torchrun_err = self.proc.communicate()
            hung = f"the run hung: still running after {timeout} s\n{self.said()}"
            raise AssertionError(hung) from None
        return self.proc.returncode

    def exit_codes(self) -> list[str | None]:
        """How each rank left: the code it passed to os._exit, None if it never did (killed)."""
        files = [self.cwd / f"exit-rank{r}" for r in (0, 1)]
        return [f.read_text() if f.is_file() else None for f in files]

    def rank_err(self, rank: int) -> str:
        return self._log(rank, "stderr")

    def rank_out(self, rank: int) -> str:
        return self._log(rank, "stdout")

    def _log(self, rank: int, stream: str) -> str:
        files = sorted(self.logs.glob(f"*/attempt_*/{rank}/{stream}.log"))
        return "".join(f.read_text() for f in files)

    def said(self) -> str:
        """Every process's stderr, for assertion messages."""
        parts = [f"--- rank {r} stderr:\n{self.rank_err(r)[-3000:]}" for r in (0, 1)]
        parts.append(f"--- torchrun stderr:\n{self.torchrun_err[-3000:]}")
        return "\n".join([f"ranks' exit codes: {self.exit_codes()}", *parts])

    def ranks(self) -> list[int]:
        """The pids of the rank processes (torchrun's children)."""
        return [p for p in process_tree(self.proc.pid) if p != self.proc.pid]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _sigterm(run: Launch, to: str) -> None:
    """SIGTERM as a scheduler sends it: to torchrun and every rank ("every process"), or to
    torchrun alone ("torchrun")."""
    ranks = run.ranks()
    assert len(ranks) == 2, (ranks, run.said())
    for pid in [run.proc.pid, *(ranks if to == "every process" else [])]:
        _signal(pid, signal.SIGTERM)


def _wait_for(run: Launch, done, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if run.proc.poll() is not None:
            run.wait(10)
            raise AssertionError(f"the run ended early\n{run.said()}")
        assert time.monotonic() < deadline, f"timed out waiting for the run\n{run.said()}"
        time.sleep(0.02)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_complete(ckpt: Path, step: int) -> None:
    """`ckpt` is a whole checkpoint of `step`: every file of both ranks, as its manifest says."""
    assert ckpt.is_dir(), sorted(p.name for p in ckpt.parent.iterdir())
    assert {p.name for p in ckpt.iterdir() if p.is_file()} >= CHECKPOINT_FILES
    assert (ckpt / "engine").is_dir()
    assert manifest.problem(ckpt) is None, manifest.problem(ckpt)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert [r["step"] for r in _rows(ckpt)] == list(range(1, step + 1))
    # no temporary checkpoint left behind
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]


def _assert_stopped(run: Launch, line: str) -> None:
    """torchrun ended non-zero and each rank with 128 + SIGTERM; rank 0's last line is `line`,
    said once; rank 1 said nothing of it; no traceback from either."""
    assert run.proc.returncode != 0, run.said()
    assert run.exit_codes() == [str(128 + signal.SIGTERM)] * 2, run.said()
    err0, err1 = run.rank_err(0), run.rank_err(1)
    assert err0.strip().splitlines()[-1] == line, run.said()
    assert err0.count("stopped by") == 1, run.said()
    assert "stopped by" not in err1, run.said()
    assert "Traceback" not in err0 + err1, run.said()


def test_a_scorer_hung_on_rank_1_is_abandoned_on_sigterm_and_both_ranks_keep_the_step_before(
    tmp_path,
):
    """Rank 1's scorer (timeout_s: null) hangs in step 3 while rank 0 waits for it in the next
    collective; SIGTERM to every process: rank 1 abandons the call after the grace period, both
    ranks write the checkpoint of step 2 (from the state as step 3 began) and stop; resumed on 2
    ranks, the run ends bitwise equal to a 2-rank run that never hung."""
    recipe = _recipe(tmp_path)
    out, cwd = tmp_path / "run", tmp_path / "stopped"
    run = Launch(cwd, recipe, out, HANG_AT=str(HANG_AT))
    _wait_for(run, (cwd / "hanging-rank1").exists)
    _sigterm(run, "every process")
    # the grace period, a checkpoint, and the way out; a rank that hangs fails here
    run.wait(timeout=GRACE_S + 120)
    ckpt = out / "checkpoints" / "step-00000002"
    _assert_stopped(
        run,
        f"stopped by SIGTERM during step 3 (the reward scorer 'python' had not returned "
        f"{GRACE_S:g} s after it; it was abandoned and the step left out); checkpoint {ckpt}; "
        f"continue with: grpo-ensemble train {recipe} --set output_dir={out} --resume auto",
    )
    _assert_complete(ckpt, 2)
    assert [r["step"] for r in _rows(out)] == [1, 2]
    calls = [int((cwd / f"calls-rank{r}").read_text()) for r in (0, 1)]
    # both ranks made step 3's calls (rank 0's returned); rank 1's second one hung
    assert calls == [HANG_AT + 1, HANG_AT + 1]

    resumed = Launch(cwd, recipe, out, "--resume", "auto", HANG_AT=str(HANG_AT))
    assert resumed.wait(timeout=300) == 0, resumed.said()
    assert resumed.exit_codes() == ["0", "0"], resumed.said()
    assert f"resumed from {ckpt} (step 2)" in resumed.rank_out(0), resumed.said()
    whole = tmp_path / "whole"
    uninterrupted = Launch(tmp_path / "uninterrupted", recipe, whole)
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.said()

    a = load_file(out / "final" / "model.safetensors")
    b = load_file(whole / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:3]
    untimed = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _rows(whole)]
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert [{k: r[k] for k in u} for r, u in zip(_rows(out), untimed, strict=True)] == untimed


@pytest.mark.parametrize("to", ["every process", "torchrun"])
def test_sigterm_between_steps_stops_both_ranks_after_the_step_with_a_checkpoint(tmp_path, to):
    """Steps run normally (no scorer hangs): SIGTERM, to every process or to torchrun alone
    (which sends it on to the ranks), stops both ranks after the step under way, with a
    checkpoint of it."""
    recipe = _recipe(tmp_path, steps=500)
    out = tmp_path / "run"
    run = Launch(tmp_path / "cwd", recipe, out)
    metrics = out / "metrics.jsonl"
    _wait_for(run, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 1)
    _sigterm(run, to)
    run.wait(timeout=120)
    found = re.search(r"stopped by SIGTERM after step (\d+);", run.rank_err(0))
    assert found, run.said()
    step = int(found[1])
    ckpt = out / "checkpoints" / f"step-{step:08d}"
    _assert_stopped(
        run,
        f"stopped by SIGTERM after step {step}; checkpoint {ckpt}; "
        f"continue with: grpo-ensemble train {recipe} --set output_dir={out} --resume auto",
    )
    _assert_complete(ckpt, step)
    assert [r["step"] for r in _rows(out)] == list(range(1, step + 1))
