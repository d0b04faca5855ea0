"""Security: nothing in a recipe or checkpoint runs as code; nothing listens beyond loopback."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from grpo_ensemble.cli import main
from grpo_ensemble.recipe import PolicyConfig
from grpo_ensemble.trainer.loop import train

MARKER = "pwned-by-checkpoint"


class Payload:
    """What a malicious checkpoint would hold: unpickling it runs a command."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_checkpoint_with_code_in_it_is_refused_and_never_run(tmp_path, small_recipe, capsys):
    out = tmp_path / "run"
    r = small_recipe(output_dir=str(out), train__steps=1, eval__before=False, eval__after=False)
    train(r)
    (ckpt,) = (out / "checkpoints").iterdir()
    states = ckpt / "engine" / "state" / "mp_rank_00_model_states.pt"
    marker = tmp_path / MARKER
    torch.save({"module": Payload(marker)}, states)
    _reseal(ckpt)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(r.model_dump(mode="json")))
    assert main(["train", str(recipe), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"error: --resume: refused to load {ckpt}: it holds objects other than tensors" in err
    assert not marker.exists()


def _reseal(ckpt: Path) -> None:
    """The manifest rewritten over the changed files, as whoever planted them could."""
    from grpo_ensemble.trainer import manifest

    (ckpt / manifest.NAME).unlink()
    manifest.write_manifest(ckpt)


LOADERS = {
    "default": {},
    "elastic": {"zero_optimization": {"elastic_checkpoint": True}},
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_no_file_of_a_checkpoint_runs_code_under_any_stage_or_loader(tmp_path, small_recipe, stage):
    """A payload planted in each file a checkpoint holds, in turn, under each ZeRO stage and
    loader option: the resume is refused and the payload never runs. (DeepSpeed's universal
    loader is refused in the recipe, below.)"""
    out = tmp_path / "run"
    r = small_recipe(
        output_dir=str(out),
        train__steps=1,
        train__zero_stage=stage,
        eval__before=False,
        eval__after=False,
    )
    train(r)
    (ckpt,) = (out / "checkpoints").iterdir()
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    recipe = tmp_path / "r.yaml"
    marker = tmp_path / MARKER
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    files = [f for f in files if f != "manifest.json"]
    assert any(f.endswith("model_states.pt") for f in files)
    for loader, raw in LOADERS.items():
        data = r.model_dump(mode="json")
        data["train"]["deepspeed"] = raw
        recipe.write_text(yaml.safe_dump(data))
        for name in files:
            shutil.rmtree(ckpt)
            shutil.copytree(pristine, ckpt)
            (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": Payload(marker)}, ckpt / name)
            _reseal(ckpt)
            code = main(["train", str(recipe), "--resume", str(ckpt)])
            assert not marker.exists(), (loader, name)
            # (zero_to_fp32.py and zero_to_torch.py, DeepSpeed's scripts to merge shards by hand,
            # are never read)
            assert code == (0 if name.endswith(".py") else 2), (loader, name, code)


def test_the_universal_loader_is_refused(tmp_path, small_recipe, capsys):
    # it would read files a checkpoint of the run never holds (zero/optimizer_state.pt, …)
    r = small_recipe(output_dir=str(tmp_path / "run"), train__zero_stage=2)
    data = r.model_dump(mode="json")
    data["train"]["deepspeed"] = {"checkpoint": {"load_universal": True}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["validate", str(recipe)]) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"error: {recipe}:") and line.endswith(
        ": train.deepspeed: checkpoint.load_universal is not supported: a run resumes from its "
        "own checkpoints, with the number of ranks that wrote them\n"
    )


def test_yaml_tags_that_build_objects_are_rejected(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        'policy: {model: "builtin:tiny-arith-small"}\n'
        f"seed: !!python/object/apply:os.system ['touch {tmp_path / MARKER}']\n"
    )
    assert main(["validate", str(recipe)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert not (tmp_path / MARKER).exists()


def test_remote_code_is_off_unless_a_recipe_turns_it_on():
    assert PolicyConfig(model="x").trust_remote_code is False


def _listening_sockets_of_this_process() -> list[str]:
    """Local addresses (hex ip:port from /proc/net/tcp*) of this process's LISTEN sockets."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # state LISTEN, owned by us
                out.append(cols[1])
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_single_process_run_listens_on_loopback_only(small_recipe, tmp_path):
    from grpo_ensemble.trainer.setup import build_run

    build_run(small_recipe(), tmp_path)  # joins the (single-process) process group
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    found = _listening_sockets_of_this_process()
    assert all(addr.split(":")[0] in loopback for addr in found), found
    # one per gloo process group: the default group's and the one DeepSpeed's engine builds
    # (docs/security.md says so)
    assert len(found) == 2, found
