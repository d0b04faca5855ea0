"""The run directory trusts nothing that is in it: links at the names a run writes are refused
(and never written through), files a run did not write are never replaced, and output_dir may
not be the root, the home directory or the current directory or an ancestor of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_recipe

from grpo_ensemble.cli import main
from grpo_ensemble.rundir import write_file

FAST = ["--set", "train.steps=1", "--set", "eval.before=false", "--set", "eval.after=false"]


@pytest.mark.parametrize(
    "name", ["recipe.yaml", "data_report.json", "metrics.jsonl", "checkpoints", "final"]
)
def test_a_link_at_a_name_the_run_writes_is_refused_and_its_target_untouched(
    tmp_path, capsys, name
):
    recipe = write_recipe(tmp_path / "r.yaml")
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir() if name in ("checkpoints", "final") else elsewhere.write_text("mine")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(elsewhere)
    assert main(["train", str(recipe), "--set", f"output_dir={out}", *FAST]) == 2
    assert capsys.readouterr().err == (
        f"error: output_dir: {str(out / name)!r} is a symbolic link; a run never writes "
        "through one: remove it or choose another output_dir\n"
    )
    if elsewhere.is_file():
        assert elsewhere.read_text() == "mine"
    else:
        assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["recipe.yaml", "data_report.json"])
def test_a_file_no_run_wrote_is_never_replaced(tmp_path, capsys, name):
    recipe = write_recipe(tmp_path / "r.yaml")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("notes: mine\n")
    assert main(["train", str(recipe), "--set", f"output_dir={out}", *FAST]) == 2
    assert capsys.readouterr().err == (
        f"error: output_dir: {str(out / name)!r} exists and was not written by a run (a run "
        "would replace it): move it or choose another output_dir\n"
    )
    assert (out / name).read_text() == "notes: mine\n"


def test_a_run_that_stopped_before_its_first_step_is_started_again(tmp_path):
    # its recipe.yaml and data_report.json are a run's own: a new run replaces them
    recipe = write_recipe(tmp_path / "r.yaml")
    out = tmp_path / "run"
    args = ["train", str(recipe), "--set", f"output_dir={out}", *FAST]
    assert main([*args, "--set", "train.lr=-1"]) == 2  # refused after nothing was written
    assert main([*args, "--set", f"data.train={tmp_path / 'none.jsonl'}"]) == 2  # after recipe.yaml
    assert (out / "recipe.yaml").is_file()
    assert main(args) == 0
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["/", "~/", ".", "..", "../.."])  # (YAML reads ~ as null)
def test_output_dir_may_not_be_the_root_home_or_an_ancestor_of_here(tmp_path, capsys, where):
    recipe = write_recipe(tmp_path / "r.yaml")
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(here)
    try:
        assert main(["train", str(recipe), "--set", f"output_dir={where}", *FAST]) == 2
    finally:
        os.chdir(cwd)
    what = {
        "/": "the root directory",
        "~/": "your home directory",
        ".": "the current directory",
        "..": "an ancestor of the current directory",
        "../..": "an ancestor of the current directory",
    }[where]
    assert capsys.readouterr().err == (
        f"error: output_dir: {str(Path(where).expanduser())!r} is {what}; a run writes "
        "recipe.yaml, metrics.jsonl, checkpoints/ and final/ there: choose a folder of its own "
        "(e.g. runs/name)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "r.yaml"]


def test_write_file_replaces_a_link_instead_of_writing_through_it(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    write_file(link, "new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert target.read_text() == "keep"
    mask = os.umask(0)
    os.umask(mask)
    assert link.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would create it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "target"]


def test_a_planted_link_at_the_temporary_name_is_not_followed(tmp_path):
    # the temporary file's name is random and created exclusively: a link planted at any
    # name in the folder is neither followed nor replaced
    target = tmp_path / "target"
    target.write_text("keep")
    for i in range(20):
        (tmp_path / f".out.txt.{i:012x}.tmp").symlink_to(target)
    write_file(tmp_path / "out.txt", "new")
    assert (tmp_path / "out.txt").read_text() == "new"
    assert target.read_text() == "keep"
    assert Path(tmp_path / ".out.txt.000000000000.tmp").is_symlink()
