"""Co-training on 2 CPU ranks (gloo), launched as a user launches them, against 1 rank.

`placement: shared`: both policies on both ranks, the 5 prompts split 3/2; `placement:
split`: each policy on a rank of its own, its engine's data parallelism that one rank. In
both, the rewards, candidate counts and win rates are equal exactly, the loss and gradient
norm within the tolerance of test_distributed.py (relative 1e-4; observed with split: 1e-7,
a rank's one thread against the lone process's two, which sum in another order). A split run
stopped after step 2 and resumed equals the unbroken one bitwise.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import subprocess_env
from safetensors.torch import load_file

from grpo_ensemble.recipe import recipe_from_dict
from grpo_ensemble.trainer.loop import train

pytestmark = pytest.mark.multirank

RECIPE = {
    "seed": 1,
    "policies": [
        {"name": "small", "model": "builtin:tiny-arith-small", "n": 3},
        {"name": "base", "model": "builtin:tiny-arith-base", "n": 2, "train": {"lr": 5e-4}},
    ],
    "group": {"inject": "on_failure"},
    "loss": {"mu": 2},
    "train": {"steps": 3, "prompts_per_step": 5, "micro_batch_size": 4, "lr": 1e-3,
              "adam_eps": 1e-5, "checkpoint_every": 2},
    "eval": {"max_prompts": 7},
    "log": {"progress": False},
}  # fmt: skip
for _p in RECIPE["policies"]:
    _p["sampling"] = {"max_new_tokens": 5}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "co.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), "-m", "grpo_ensemble", "train", str(recipe)]
    cmd += ["--set", f"output_dir={out}", *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        timeout=600,
        cwd=tmp_path,
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _weights(run_dir: Path, name: str) -> dict:
    return load_file(run_dir / "final" / name / "model.safetensors")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return train(recipe_from_dict({**RECIPE, "output_dir": str(out)}))


def _assert_matches(one, two: Path) -> None:
    for x, y in zip(one.metrics, _rows(two / "metrics.jsonl"), strict=True):
        for name, other in (("small", "base"), ("base", "small")):
            p = f"policy/{name}/"
            for key in ("reward", "candidates", "trained_candidates", f"member/{other}/candidates"):
                assert x.get(p + key) == y.get(p + key), (x["step"], p + key)
            for key in ("loss", "grad_norm"):
                assert y[p + key] == pytest.approx(x[p + key], rel=1e-4, abs=1e-6)
            pair = f"pair/{other}/{name}/win_rate"
            assert y.get(pair) == x.get(pair)
    for name in ("small", "base"):  # split: the rank that holds base (rank 1) wrote its model
        a, b = _weights(one.run_dir, name), _weights(two, name)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_shared_placement_on_two_ranks_matches_one_rank(tmp_path, one_rank):
    two = tmp_path / "two"
    proc = _two_ranks(tmp_path, two, "--set", "placement=shared")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 3 of 3") == 1  # only rank 0 speaks
    _assert_matches(one_rank, two)


def test_split_placement_on_two_ranks_matches_one_rank_and_resumes_bitwise(tmp_path, one_rank):
    split = tmp_path / "split"
    proc = _two_ranks(tmp_path, split, "--set", "placement=split")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 3 of 3") == 1

    _assert_matches(one_rank, split)
    for name in ("small", "base"):  # each policy's own rows, by rank 0
        rows = _rows(split / "policies" / name / "metrics.jsonl")
        assert [r["reward"] for r in rows] == [r["reward"] for r in one_rank.policies[name].metrics]
    # each policy's engine in its own folder of the one checkpoint, by the rank that holds it
    ckpt = split / "checkpoints" / "step-00000003"
    assert {p.name for p in (ckpt / "policies").iterdir()} == {"small", "base"}
    assert {"rng-rank0.json", "rng-rank1.json"} <= {p.name for p in ckpt.iterdir()}

    broken = tmp_path / "broken"
    proc = _two_ranks(tmp_path, broken, "--set", "placement=split", "--set", "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _two_ranks(tmp_path, broken, "--set", "placement=split", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout

    def no_times(rows):
        return [{k: v for k, v in r.items() if "time" not in k} for r in rows]

    assert no_times(_rows(broken / "metrics.jsonl")) == no_times(_rows(split / "metrics.jsonl"))
    for name in ("small", "base"):
        a, b = _weights(split, name), _weights(broken, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_split_that_does_not_divide_the_ranks_is_one_line_and_exit_2(tmp_path):
    data = {**RECIPE, "placement": "split"}
    data["policies"] = [*RECIPE["policies"], {"name": "third", "model": "builtin:tiny-arith-small"}]
    recipe = tmp_path / "co.yaml"
    recipe.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), "-m", "grpo_ensemble", "train", str(recipe)]
    cmd += ["--set", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"),
        timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1  # rank 0's, naming the recipe's line of the field
    assert errors[0] == (
        f"error: {recipe}:{yaml.safe_dump(data).splitlines().index('placement: split') + 1}: "
        "placement: split puts each of the 3 policies on an equal share of the ranks, and 2 "
        "ranks cannot be shared 3 ways: run on a multiple of 3 ranks, or use placement: shared"
    )
    # each rank left with exit code 2, no traceback of its own (torchrun prints its own)
    assert proc.stderr.count("exitcode  : 2") == 2
    assert "grpo_ensemble/" not in proc.stderr


def test_a_failure_on_one_policys_ranks_stops_every_rank_in_one_line(tmp_path):
    """split: the policy on rank 1 cannot be built (its adapters name no layer of its model)
    while rank 0's is; rank 0 does not wait for rank 1 in the next collective, both leave with
    exit code 2, and rank 0 prints rank 1's message, naming the co-training recipe's field."""
    data = {**RECIPE, "placement": "split"}
    bad = {**RECIPE["policies"][1], "lora": {"target_modules": ["nope"]}}
    data["policies"] = [RECIPE["policies"][0], bad]
    recipe = tmp_path / "co.yaml"
    recipe.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), "-m", "grpo_ensemble", "train", str(recipe)]
    cmd += ["--set", f"output_dir={tmp_path / 'run'}", "--set", "train.dist_timeout_s=120"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"),
        timeout=600, cwd=tmp_path,
    )  # fmt: skip
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: rank 1: "), errors[0]
    assert "policies.1.lora.target_modules.0: 'nope' matches no module" in errors[0]
    assert proc.stderr.count("exitcode  : 2") == 2
