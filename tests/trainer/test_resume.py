"""Checkpoints and resume: a run killed at a random step and resumed ends bitwise equal to one
that was never interrupted; SIGTERM stops cleanly with a checkpoint; nothing is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env, write_recipe
from safetensors.torch import load_file

from grpo_ensemble import GroupEvaluator, RunError, UserError, hookimpl
from grpo_ensemble.cli import main
from grpo_ensemble.plugins import get_plugin_manager
from grpo_ensemble.rundir import read_metrics
from grpo_ensemble.trainer.checkpoint import complete_checkpoints, find_checkpoint
from grpo_ensemble.trainer.loop import train

TRAIN = {
    "steps": 6,
    "prompts_per_step": 4,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 2,
    "schedule": "cosine",
    "zero_stage": 2,
    "checkpoint_every": 1,
    "threads": 1,
}


def _recipe(tmp_path: Path, name: str = "recipe.yaml", **train_changes) -> Path:
    return write_recipe(
        tmp_path / name,
        seed=5,
        train={**TRAIN, **train_changes},
        eval={"before": False, "after": False},
    )


def _env() -> dict:
    return subprocess_env()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_ensemble", *args]


def _wait_for_rows(proc: subprocess.Popen, metrics: Path, rows: int, timeout: float = 300):
    """Block until metrics.jsonl holds `rows` rows (the process is then inside a later step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def _same_rows(a: dict, b: dict) -> bool:
    keep = [k for k in a if not k.startswith("time/")]
    return [a[k] for k in keep] == [b.get(k) for k in keep]


def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(tmp_path):
    recipe = _recipe(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(
        _cli("train", str(recipe), "--set", f"output_dir={whole}"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    # rows written before the kill: a step drawn from a seed that a failure names, so it can
    # be rerun (GRPO_ENSEMBLE_TEST_SEED=N picks another)
    seed = int(os.environ.get("GRPO_ENSEMBLE_TEST_SEED", "0"))
    kill_after = random.Random(seed).randint(1, 4)
    proc = subprocess.Popen(
        _cli("train", str(recipe), "--set", f"output_dir={killed}"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for_rows(proc, killed / "metrics.jsonl", kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "final").exists()
    last = find_checkpoint(killed, "auto")
    assert last is not None, f"no checkpoint after {kill_after} rows"
    resumed_at = int(last.name.removeprefix("step-"))

    again = subprocess.run(
        _cli("train", str(recipe), "--set", f"output_dir={killed}", "--resume", "auto"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"(step {resumed_at})" in again.stdout
    wa = load_file(whole / "final" / "model.safetensors")
    wb = load_file(killed / "final" / "model.safetensors")
    unequal = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not unequal, (kill_after, resumed_at, unequal[:3])
    ra, rb = read_metrics(whole / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]  # no step lost, none repeated
    for a, b in zip(ra, rb, strict=True):
        assert _same_rows(a, b), (kill_after, resumed_at, a["step"])


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    recipe = _recipe(tmp_path, steps=500, checkpoint_every=0)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli("train", str(recipe), "--set", f"output_dir={out}"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for_rows(proc, out / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 128 + signal.SIGTERM, err
    rows = read_metrics(out / "metrics.jsonl")
    step = rows[-1]["step"]
    ckpt = out / "checkpoints" / f"step-{step:08d}"
    assert ckpt.is_dir()
    line = err.strip().splitlines()[-1]
    assert line == (
        f"stopped by SIGTERM after step {step}; checkpoint {ckpt}; continue with: "
        f"grpo-ensemble train {recipe} --set output_dir={out} --resume auto"
    )
    assert "Traceback" not in err
    resumed = train(
        recipe, overrides=[f"output_dir={out}", f"train.steps={step + 1}"], resume="auto"
    )
    assert resumed.resumed_from == ckpt
    assert [m["step"] for m in resumed.metrics] == [step + 1]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, step + 2))


KILLS_ITSELF = """\
import os, signal


def score(samples):  # the evaluation's scorer: as if the job were cancelled during it
    os.kill(os.getpid(), signal.SIGTERM)
    return [0.0 for _ in samples]
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigterm_during_an_evaluation_stops_with_one_line(tmp_path, when):
    (tmp_path / "kills_itself.py").write_text(KILLS_ITSELF)
    evaluation = {"before": when == "before", "after": when == "after", "max_prompts": 4}
    evaluation |= {"scorer": "python", "params": {"function": "kills_itself:score"}}
    recipe = write_recipe(tmp_path / "r.yaml", seed=5, train={**TRAIN, "steps": 1}, eval=evaluation)
    out = tmp_path / "run"
    proc = subprocess.run(
        _cli("train", str(recipe), "--set", f"output_dir={out}"),
        env=_env(),
        cwd=tmp_path,  # (the python scorer imports from the current directory)
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    state = f"the trained model is in {out / 'final'}" if when == "after" else "nothing was trained"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM during the evaluation {when} training; {state}"
    )
    assert "failed" not in proc.stdout  # one line: the stop is no failed evaluation
    assert (out / "final" / "model.safetensors").is_file() == (when == "after")
    # DeepSpeed's notes of every CPU run (that it chose the CPU, that it built an op) are gone
    assert "Setting accelerator" not in proc.stderr + proc.stdout
    assert "built successfully" not in proc.stdout
    assert (out / "metrics.jsonl").is_file() == (when == "after")


SHORT_SCORES = """\
def score(samples):  # one score for every two completions
    return [1.0] * (len(samples) // 2)
"""


def test_a_failing_evaluation_after_training_says_where_the_model_is(tmp_path, capsys, monkeypatch):
    """The evaluation's scorer is checked as the training's are (it returned too few scores,
    and the accuracy was computed over fewer prompts without a word)."""
    (tmp_path / "short_scores.py").write_text(SHORT_SCORES)
    monkeypatch.chdir(tmp_path)  # (the python scorer imports from the current directory)
    evaluation = {"before": False, "after": True, "max_prompts": 4, "scorer": "python"}
    evaluation["params"] = {"function": "short_scores:score"}
    recipe = write_recipe(tmp_path / "r.yaml", seed=5, train={**TRAIN, "steps": 1}, eval=evaluation)
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--set", f"output_dir={out}"]) == 1
    printed = capsys.readouterr()
    assert f"the evaluation after training failed; the trained model is in {out / 'final'}" in (
        printed.out
    )
    assert printed.err.strip().splitlines()[-1] == (
        "run failed: plugin 'python': the evaluation's scorer (eval.scorer): returned 2 scores "
        "for 4 candidates"
    )
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_refuses_a_recipe_that_changed_what_matters(tmp_path, capsys):
    recipe = _recipe(tmp_path, steps=2)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    args = ["train", str(recipe), "--set", f"output_dir={out}", "--resume", "auto"]
    assert main([*args, "--set", "policy.n=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --resume: policy.n was 3 in the checkpoint {out}/checkpoints/step-00000002 but "
        "is 4 now; resume with the recipe of that run, or start a new run in another output_dir"
    )
    # more steps, other eval settings: allowed
    result = train(recipe, overrides=[f"output_dir={out}", "train.steps=3"], resume="auto")
    assert [m["step"] for m in result.metrics] == [3]


def test_resume_refuses_other_training_prompts(tmp_path, capsys):
    """The checkpoint keeps the prompt sampler's position; with other prompts (the file edited,
    or other data cleaning) that position would pick prompts the run never went on with."""
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(1, 9)]
    rows.append(rows[0])  # a duplicate: `data.dedupe` changes the prompts
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(tmp_path, steps=2)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}", f"data.train={data}"])
    args = ["train", str(recipe), "--set", f"output_dir={out}", "--set", f"data.train={data}"]
    args += ["--resume", "auto", "--set", "train.steps=3"]
    ckpt = out / "checkpoints" / "step-00000002"
    assert main([*args, "--set", "data.dedupe=true"]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: the training prompts are not those of the checkpoint {ckpt} (9 "
        "prompts then, 8 now): data.train's file or the data cleaning (data.*) changed; resume "
        "with the data of that run, or start a new run in another output_dir\n"
    )
    data.write_text(data.read_text().replace('"answer": "4"', '"answer": "5"'))  # an answer
    assert main(args) == 2
    assert "(9 prompts, not the same): data.train's file" in capsys.readouterr().err
    data.write_text(data.read_text().replace('"answer": "5"', '"answer": "4"'))  # as it was
    assert main(args) == 0


@pytest.mark.parametrize("checkpoints", [True, False])
def test_a_fresh_run_never_overwrites_an_earlier_run(tmp_path, capsys, checkpoints):
    recipe = _recipe(tmp_path, steps=1, checkpoint_every=1 if checkpoints else 0)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    files = ["recipe.yaml", "metrics.jsonl", "final/model.safetensors"]
    before = {f: (out / f).read_bytes() for f in files}
    assert main(["train", str(recipe), "--set", f"output_dir={out}", "--set", "seed=7"]) == 2
    held = "checkpoints, metrics.jsonl, final/" if checkpoints else "metrics.jsonl, final/"
    assert capsys.readouterr().err == (
        f"error: output_dir: {str(out)!r} holds an earlier run ({held}); continue it with "
        "--resume auto, or choose another output_dir (e.g. --set output_dir=runs/new)\n"
    )
    assert {f: (out / f).read_bytes() for f in files} == before


def test_a_refused_resume_leaves_the_runs_recipe(tmp_path, capsys):
    recipe = _recipe(tmp_path, steps=1, checkpoint_every=1)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    before = (out / "recipe.yaml").read_text()
    args = ["train", str(recipe), "--set", f"output_dir={out}", "--resume", "auto"]
    assert main([*args, "--set", "seed=7"]) == 2
    assert "--resume: seed was 5 in the checkpoint" in capsys.readouterr().err
    assert (out / "recipe.yaml").read_text() == before
    # an accepted resume writes the recipe it runs with (here: more steps)
    assert main([*args, "--set", "train.steps=2"]) == 0
    assert "steps: 2" in (out / "recipe.yaml").read_text()


def test_the_run_directory_never_replaces_the_recipe_file_being_run(tmp_path, capsys):
    recipe = _recipe(tmp_path, steps=1)
    text = recipe.read_text()
    assert recipe.name == "recipe.yaml"
    assert main(["train", str(recipe), "--set", f"output_dir={recipe.parent}"]) == 2
    assert capsys.readouterr().err == (
        f"error: output_dir: {str(recipe.parent)!r} would get the resolved recipe as "
        f"recipe.yaml, replacing the recipe file being run ({recipe}); choose another output_dir\n"
    )
    assert recipe.read_text() == text


def _resealed(ckpt):
    """A checkpoint whose manifest was written after its files were changed: what is in the
    files themselves is then checked (the manifest only proves they are what was written)."""
    from grpo_ensemble.trainer import manifest

    (ckpt / manifest.NAME).unlink()
    manifest.write_manifest(ckpt)


def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, capsys):
    import json
    import shutil

    recipe = _recipe(tmp_path, steps=1, checkpoint_every=1)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    good = out / "checkpoints" / "step-00000001"
    state = json.loads((good / "trainer_state.json").read_text())
    past = state["sampler"]["prompts"] + 1

    def with_state(**changes):
        def damage(c):
            changed = {**state, **changes}
            if "sampler" in changes:
                changed["sampler"] = {**state["sampler"], **changes["sampler"]}
            (c / "trainer_state.json").write_text(json.dumps(changed))

        return damage

    damages = {
        "trainer_state.json: no recipe": lambda c: (c / "trainer_state.json").write_text("{}"),
        "trainer_state.json: not an object": lambda c: (c / "trainer_state.json").write_text("[1]"),
        "trainer_state.json: step -5 is not a step number": with_state(step=-5),
        "trainer_state.json: step 3 in the checkpoint of step 1": with_state(step=3),
        "trainer_state.json: world_size 0 is not a count of ranks": with_state(world_size=0),
        "trainer_state.json: sampler.pos -1 is not a count": with_state(sampler={"pos": -1}),
        "trainer_state.json: sampler.pos {past} is past its": with_state(sampler={"pos": past}),
        "rng-rank0.json lacks a generator's state": lambda c: (c / "rng-rank0.json").write_text(
            "{}"
        ),
        "AssertionError": lambda c: shutil.rmtree(c / "engine" / "state"),
    }
    pristine = tmp_path / "pristine"
    shutil.copytree(good, pristine)
    for what, damage in damages.items():
        ckpt = good
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        damage(ckpt)
        _resealed(ckpt)
        args = ["train", str(recipe), "--set", f"output_dir={out}", "--resume", str(ckpt)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"error: --resume: the checkpoint {ckpt} is damaged or incomplete "
            f"({what.format(past=past)}"
        ), err
        assert len(err.splitlines()) == 1
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    # the run goes another way from step 2: its old step 3-4 checkpoints must not be taken by
    # a later --resume auto (a step went missing from the metrics) nor pruned as its own
    recipe = _recipe(tmp_path, steps=4, keep_checkpoints=10)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    (out / "checkpoints" / "step-00000009-backup").mkdir()  # a name of the user's: ignored
    ckpts = out / "checkpoints"
    two = ckpts / "step-00000002"
    train(recipe, overrides=[f"output_dir={out}", "train.steps=3"], resume=str(two))
    assert [p.name for p in complete_checkpoints(out)] == [
        "step-00000001",
        "step-00000002",
        "step-00000003",
    ]
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("abandoned")) == [
        "abandoned-step-00000003",
        "abandoned-step-00000004",
    ]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert find_checkpoint(out, "auto").name == "step-00000003"


def test_resume_refuses_a_changed_optimizer_setting_the_checkpoint_would_override(tmp_path, capsys):
    recipe = _recipe(tmp_path, steps=1)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    args = ["train", str(recipe), "--set", f"output_dir={out}", "--resume", "auto"]
    for change, message in [
        ("train.lr=0.5", "train.lr was 0.001 in the checkpoint"),
        ("train.warmup_steps=0", "train.warmup_steps was 2 in the checkpoint"),
        ("train.adam_eps=1e-6", "train.adam_eps was 1.0e-08 in the checkpoint"),
    ]:
        assert main([*args, "--set", change, "--set", "train.steps=2"]) == 2
        assert message in capsys.readouterr().err


def test_a_row_cut_short_at_the_end_of_the_metrics_does_not_stop_a_resume(tmp_path):
    recipe = _recipe(tmp_path, steps=2)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "rew')  # a crash while the row was written
    resumed = train(recipe, overrides=[f"output_dir={out}", "train.steps=3"], resume="auto")
    assert [m["step"] for m in resumed.metrics] == [3]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_only_the_last_k_complete_checkpoints_are_kept_and_half_written_ones_ignored(tmp_path):
    recipe = _recipe(tmp_path, steps=4, keep_checkpoints=2)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000003", "step-00000004"]
    # a crash while writing step 5 leaves a .tmp directory: never taken for a checkpoint
    (out / "checkpoints" / ".step-00000005.tmp" / "engine").mkdir(parents=True)
    assert find_checkpoint(out, "auto").name == "step-00000004"
    with pytest.raises(UserError, match="is not a complete checkpoint directory"):
        find_checkpoint(out, str(out / "checkpoints" / ".step-00000005.tmp"))
    train(recipe, overrides=[f"output_dir={out}", "train.steps=5"], resume="auto")
    assert not (out / "checkpoints" / ".step-00000005.tmp").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004", "step-00000005"]


class Explodes(GroupEvaluator):
    """Finite but enormous advantages from step `start` on: the gradient overflows to inf."""

    name = "explodes"

    def __init__(self, start: int):
        self.calls, self.start = 0, start

    def advantages(self, rewards, valid, stats):
        self.calls += 1
        scale = 3e38 if self.calls >= self.start else 1.0
        sign = torch.where(torch.arange(rewards.shape[1]) % 2 == 0, 1.0, -1.0)
        return torch.where(valid, scale * sign.expand_as(rewards), torch.zeros_like(rewards))


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, stage):
    recipe = _recipe(tmp_path, steps=6, zero_stage=stage, max_bad_updates=2, checkpoint_every=1)
    out = tmp_path / "run"
    with pytest.raises(RunError) as info:
        train(
            recipe,
            overrides=[f"output_dir={out}", "loss.mu=1", "loss.beta=0"],
            group_evaluator=Explodes(start=3),
        )
    assert str(info.value) == (
        "2 updates in a row had a NaN or inf loss or gradient (steps 3-4), so the run stopped; "
        "the last checkpoint is step 3"
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert [r.get("nonfinite_update", 0) for r in rows] == [0, 0, 1, 1]
    # the skipped update of step 3 left the weights as step 2 wrote them
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002", "step-00000003"]
    states = [
        torch.load(
            out / f"checkpoints/step-0000000{s}/engine/state/mp_rank_00_model_states.pt",
            weights_only=True,
        )["module"]
        for s in (2, 3)
    ]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert all(torch.isfinite(v).all() for v in states[1].values())
    assert not (out / "final").exists()
    # resumed from step 3 (one bad update in a row): the count goes on from there
    with pytest.raises(RunError) as info:
        train(
            recipe,
            overrides=[f"output_dir={out}", "loss.mu=1", "loss.beta=0"],
            group_evaluator=Explodes(start=1),
            resume="auto",
        )
    assert str(info.value) == (
        "2 updates in a row had a NaN or inf loss or gradient (steps 3-4), so the run stopped; "
        "the last checkpoint is step 3"
    )


def test_not_enough_disk_for_the_checkpoints_is_refused_before_training(
    tmp_path, small_recipe, monkeypatch
):
    import grpo_ensemble.trainer.around as around
    from grpo_ensemble.models.loading import load_model

    monkeypatch.setattr(around, "free_bytes", lambda path: 10_000)  # a nearly full disk
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(small_recipe(output_dir=str(out)))
    n = sum(
        p.numel() for p in load_model("builtin:tiny-arith-small", "policy.model")[0].parameters()
    )
    need = n * 16 * 3  # bytes per parameter × (2 kept + 1 being written)
    assert str(info.value) == (
        f"output_dir: 0.00 GB free in {str(out)!r}, but 3 checkpoints of {n:,} parameters need "
        f"about {need / 1e9:.2f} GB; free space, lower train.keep_checkpoints, or choose "
        "another output_dir"
    )
    assert not (out / "metrics.jsonl").exists()
    # without periodic checkpoints, room for the one a stop signal writes is enough
    monkeypatch.setattr(around, "free_bytes", lambda path: n * 16 * 2)
    train(small_recipe(output_dir=str(tmp_path / "run2"), train__checkpoint_every=0))
    assert (tmp_path / "run2" / "final").is_dir()
    monkeypatch.setattr(around, "free_bytes", lambda path: n * 16 - 1)
    with pytest.raises(UserError) as info:
        train(small_recipe(output_dir=str(tmp_path / "run3"), train__checkpoint_every=0))
    assert str(info.value) == (
        f"output_dir: {(n * 16 - 1) / 1e9:.2f} GB free in {str(tmp_path / 'run3')!r}, but a "
        f"checkpoint of {n:,} parameters (written on a stop signal) needs about "
        f"{n * 16 / 1e9:.2f} GB; free space, or choose another output_dir"
    )


def test_a_checkpoint_is_on_the_disk_before_it_counts(tmp_path, small_recipe, monkeypatch):
    """Every file and folder of a checkpoint is flushed (fsync) before the rename that makes it
    complete, and the rename is flushed before older checkpoints are removed."""
    synced: list[Path] = []
    renamed: list[tuple[Path, int]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self, target):
        renamed.append((self, len(synced)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    out = tmp_path / "run"
    train(small_recipe(output_dir=str(out), train__steps=2, train__checkpoint_every=1))
    final = out / "checkpoints" / "step-00000002"
    ((tmp, n),) = [r for r in renamed if r[0].name == ".step-00000002.tmp"]
    written = {tmp / p.relative_to(final) for p in final.rglob("*")} | {tmp}
    assert len(written) > 5 and written <= set(synced[:n])
    assert final.parent in synced[n:]


def test_a_folder_that_cannot_be_flushed_is_let_go_a_file_is_not(tmp_path, monkeypatch):
    """Some network and FUSE file systems refuse to fsync a folder (EINVAL): the checkpoint
    stands; a file that cannot be flushed is an error."""
    import errno

    from grpo_ensemble.trainer.checkpoint import sync_tree

    (tmp_path / "ckpt" / "engine").mkdir(parents=True)
    (tmp_path / "ckpt" / "engine" / "w.pt").write_bytes(b"x")
    real_fsync = os.fsync
    refuse = ["folder"]

    def fsync(fd):
        is_dir = Path(os.readlink(f"/proc/self/fd/{fd}")).is_dir()
        if ("folder" if is_dir else "file") in refuse:
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sync_tree(tmp_path / "ckpt")
    refuse[0] = "file"
    with pytest.raises(OSError):
        sync_tree(tmp_path / "ckpt")


class BlocksCheckpoint:
    """Puts a file where step 2's checkpoint directory is about to be written."""

    def __init__(self, out: Path):
        self.out = out

    @hookimpl
    def on_step_end(self, step, metrics):
        if step == 2:  # (observers run before the step's checkpoint is written)
            (self.out / "checkpoints" / ".step-00000002.tmp").write_text("in the way")


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last(tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, steps=3)
    get_plugin_manager().register(BlocksCheckpoint(out), name="blocks")
    with pytest.raises(RunError) as info:
        train(recipe, overrides=[f"output_dir={out}"])
    root = out / "checkpoints"
    assert str(info.value) == (
        f"cannot write a checkpoint in {root}: File exists; "
        f"the last complete checkpoint is {root / 'step-00000001'}"
    )
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000001"]
    assert find_checkpoint(out, "auto") == root / "step-00000001"


def test_the_trained_model_is_saved_before_the_evaluation_after_training(tmp_path, monkeypatch):
    import grpo_ensemble.trainer.loop as loop

    def broken(run):
        if run.recipe.eval.after:
            raise RuntimeError("the evaluation broke")

    recipe = _recipe(tmp_path, steps=1, checkpoint_every=0)
    out = tmp_path / "run"
    monkeypatch.setattr(loop, "evaluate_policy", broken)
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        train(recipe, overrides=[f"output_dir={out}", "eval.after=true", "eval.before=false"])
    assert (out / "final" / "model.safetensors").is_file()


def test_a_checkpoint_from_before_adam_eps_resumes_with_the_epsilon_it_had(tmp_path, capsys):
    # checkpoints written before the field existed have no train.adam_eps: they ran with 1e-8
    recipe = _recipe(tmp_path, steps=1)
    out = tmp_path / "run"
    train(recipe, overrides=[f"output_dir={out}"])
    state_file = out / "checkpoints" / "step-00000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["recipe"]["train"]["adam_eps"]
    state_file.write_text(json.dumps(state))
    (state_file.parent / "manifest.json").unlink()  # nor a manifest
    args = ["train", str(recipe), "--set", f"output_dir={out}", "--resume", "auto"]
    assert main([*args, "--set", "train.adam_eps=1e-6", "--set", "train.steps=2"]) == 2
    assert "train.adam_eps was 1.0e-08 in the checkpoint" in capsys.readouterr().err
    resumed = train(recipe, overrides=[f"output_dir={out}", "train.steps=2"], resume="auto")
    assert [m["step"] for m in resumed.metrics] == [2]
