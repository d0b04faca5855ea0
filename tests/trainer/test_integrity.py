"""Checkpoint integrity: every file is checked against the checkpoint's manifest before
anything loads; metrics rows a crash cut come back from the checkpoint; a full disk is one line
naming the intact checkpoint."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env, write_recipe

from grpo_ensemble.cli import main
from grpo_ensemble.rundir import read_metrics
from grpo_ensemble.trainer.loop import train

TRAIN = {
    "steps": 2,
    "prompts_per_step": 4,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "zero_stage": 2,
    "checkpoint_every": 1,
    "keep_checkpoints": 5,
    "threads": 1,
}


def _recipe(tmp_path: Path, **train_changes) -> Path:
    return write_recipe(
        tmp_path / "recipe.yaml",
        seed=5,
        train={**TRAIN, **train_changes},
        eval={"before": False, "after": False},
    )


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    recipe = _recipe(tmp_path, steps=1)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    ckpt = out / "checkpoints" / "step-00000001"
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    files = [f for f in _files(ckpt) if f != "manifest.json"]
    assert sorted(listed) == files
    assert {"trainer_state.json", "rng-rank0.json", "metrics.jsonl"} <= set(files)
    for name in files:
        data = (ckpt / name).read_bytes()
        assert listed[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_changed_file_is_refused_naming_it_and_the_newest_intact_checkpoint(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    newest = out / "checkpoints" / "step-00000002"
    older = out / "checkpoints" / "step-00000001"
    pristine = tmp_path / "pristine"
    shutil.copytree(newest, pristine)
    args = ["train", str(recipe), "--set", f"output_dir={out}", "--resume", "auto"]
    for name in [f for f in _files(newest) if f != "manifest.json"]:
        path = newest / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit flipped, the size unchanged
        path.write_bytes(bytes(data))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err == (
            f"error: --resume: the checkpoint {newest} is damaged or incomplete ({name} is not "
            f"what was written (its SHA-256 differs)); the newest intact checkpoint is {older}: "
            f"resume with --resume {older}\n"
        )
        shutil.rmtree(newest)
        shutil.copytree(pristine, newest)
    # cut short, removed, added: each named
    (newest / "rng-rank0.json").write_text("{}")
    assert main(args) == 2
    assert "(rng-rank0.json has 2 bytes, " in capsys.readouterr().err
    shutil.copy(pristine / "rng-rank0.json", newest / "rng-rank0.json")
    (newest / "metrics.jsonl").unlink()
    assert main(args) == 2
    assert "(metrics.jsonl is missing)" in capsys.readouterr().err
    shutil.copy(pristine / "metrics.jsonl", newest / "metrics.jsonl")
    (newest / "engine" / "extra.pt").write_bytes(b"x")
    assert main(args) == 2
    assert "(engine/extra.pt is not in manifest.json" in capsys.readouterr().err
    (newest / "engine" / "extra.pt").unlink()
    # the older checkpoint named in the message resumes, and so does the intact newest
    resumed = train(recipe, overrides=[f"output_dir={out}"], resume=str(older))
    assert [m["step"] for m in resumed.metrics] == [2]


def test_no_intact_checkpoint_left_says_so(tmp_path, capsys):
    recipe = _recipe(tmp_path, steps=1)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    ckpt = out / "checkpoints" / "step-00000001"
    (ckpt / "trainer_state.json").write_text((ckpt / "trainer_state.json").read_text() + " ")
    assert main(["train", str(recipe), "--set", f"output_dir={out}", "--resume", "auto"]) == 2
    assert capsys.readouterr().err.endswith(
        "no intact checkpoint of the run is left: start a new run in another output_dir\n"
    )


def test_a_metrics_row_a_crash_cut_comes_back_from_the_checkpoint(tmp_path):
    """The page cache lost the row of step 2 (it was flushed, not on the disk) when the
    machine went down after checkpoint 2 was written: the resumed run's metrics.jsonl has it
    again, as it was."""
    recipe = _recipe(tmp_path, steps=4, checkpoint_every=2)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    whole = read_metrics(out / "metrics.jsonl")
    (out / "metrics.jsonl").write_text(json.dumps(whole[0]) + "\n")  # rows 2-4 lost
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    resumed = train(recipe, overrides=[f"output_dir={out}"], resume="auto")
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == whole[:2]


# applies a file size limit, then becomes the command after it (a small launcher process
# rather than a preexec_fn: forking the test process itself may fail on a loaded machine)
LIMITED = """\
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not kills
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_checkpoint_that_does_not_fit_is_one_line_naming_the_intact_one(tmp_path):
    """The disk fills while torch.save writes a checkpoint (a file size limit makes its write
    fail as a full disk does): exit 1, one line naming the last complete checkpoint, which
    stays intact and resumes."""
    recipe = _recipe(tmp_path, steps=1)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    intact = out / "checkpoints" / "step-00000001"
    biggest = max((p for p in intact.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED, str(biggest.stat().st_size // 2)]
        + ["-m", "grpo_ensemble", "train", str(recipe)]
        + ["--set", f"output_dir={out}", "--set", "train.steps=2", "--resume", "auto"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert line.startswith(
        f"run failed: cannot write a checkpoint in {out / 'checkpoints'}: writing a file failed"
    ), line
    assert line.endswith(f"; the last complete checkpoint is {intact}")
    assert "Traceback" not in proc.stderr and len(line.splitlines()) == 1
    resumed = train(recipe, overrides=[f"output_dir={out}", "train.steps=2"], resume="auto")
    assert resumed.resumed_from == intact
