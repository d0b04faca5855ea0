"""Several ranks: 2 CPU processes (gloo) against 1, launched as a user launches them.

The recipe is built so that the ranks disagree in every way a real run makes them: 5 prompts
split 3/2, peers injected only where the policy failed (so each rank has its own number of
candidates and micro-batches), a reference model (beta > 0), μ = 2, and 7 held-out prompts.

Tolerance, stated once: the rewards and candidate counts of every step are equal exactly (a
prompt's candidates depend only on its seed, never on its rank); the loss, KL and gradient norm
agree to a relative 1e-4, and the final weights to 1e-4 absolute (observed: about 3e-6). The
only source of difference is the order of floating-point sums: over ranks instead of within
one process. AdamW's epsilon is 1e-5 here: at 1e-8, its first step moves every weight whose
gradient is rounding noise of that order by about ±lr, so a change of rounding anywhere (not
a bug) moved the second pass's loss by 0.3% (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_reward_model, subprocess_env, write_recipe
from safetensors.torch import load_file

from grpo_ensemble.dist import shard
from grpo_ensemble.errors import RecipeError
from grpo_ensemble.trainer import manifest
from grpo_ensemble.trainer.deepspeed import SHM_DIR, deepspeed_config, merge_config
from grpo_ensemble.trainer.loop import train

pytestmark = pytest.mark.multirank

TRAIN = {"steps": 3, "prompts_per_step": 5, "micro_batch_size": 3, "lr": 1e-3, "adam_eps": 1e-5}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return subprocess_env(OMP_NUM_THREADS="1")


def _recipe_file(tmp_path: Path, train_changes: dict) -> Path:
    return write_recipe(
        tmp_path / "recipe.yaml", seed=3, train={**TRAIN, **train_changes}, eval={"max_prompts": 7}
    )


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(one: Path, two: Path, steps: int = 3, weights: bool = True) -> None:
    a, b = _rows(one)[:steps], _rows(two)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        for key in ("reward", "candidates", "trained_candidates", "member/strong/candidates"):
            assert x.get(key) == y.get(key), (x["step"], key, x.get(key), y.get(key))
        for key in ("loss", "kl", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    if not weights:
        return
    wa, wb = load_file(one / "final/model.safetensors"), load_file(two / "final/model.safetensors")
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff < 1e-4, diff
    base = load_file(Path(_base_model_dir()) / "model.safetensors")
    assert any(not torch.equal(wa[k], base[k]) for k in wa)  # the runs did train


def _base_model_dir() -> str:
    from grpo_ensemble.models.loading import resolve_model

    return resolve_model("builtin:tiny-arith-small", "policy.model")


def _launch(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _two_ranks_of_script(tmp_path: Path, script_text: str, recipe: Path) -> Path:
    """`grpo-ensemble train RECIPE` for 3 steps on 2 ranks under torchrun, through a script
    that patches the package first (`script_text`, ending in the CLI's main); its run dir."""
    script = tmp_path / "launch.py"
    script.write_text(script_text)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), str(script), "train", str(recipe)]
    proc = _launch([*cmd, "--set", f"output_dir={two}"], tmp_path)
    assert proc.stdout.count("done: step 3 of 3") == 1  # only rank 0 speaks
    return two


@pytest.mark.parametrize(
    "launcher, train_changes",
    [
        ("torchrun", {"zero_stage": 2}),
        # ZeRO-3 with everything sharded: policy weights kept sharded while generating,
        # reference and peer as ZeRO-3 inference engines. Generation batches of 4 rows give
        # rank 0 (9 rows) 3 batches and rank 1 (6 rows) 2: rank 1 runs a filler batch
        (
            "deepspeed",
            {"zero_stage": 3, "generation_weights": "sharded", "frozen_models": "shard"},
        ),
    ],
)
def test_two_ranks_match_one_rank(tmp_path, launcher, train_changes):
    recipe = _recipe_file(tmp_path, train_changes)
    if train_changes.get("generation_weights") == "sharded":
        data = yaml.safe_load(recipe.read_text())
        data["policy"]["params"] = {"batch_size": 4}
        recipe.write_text(yaml.safe_dump(data))
    one = train(recipe, overrides=[f"output_dir={tmp_path / 'one'}", "train.steps=4"])
    two = tmp_path / "two"

    ports = []

    def launch(*extra: str) -> subprocess.CompletedProcess:
        args = ["train", str(recipe), "--set", f"output_dir={two}", *extra]
        ports.append(_port())
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            cmd += ["--master_port", str(ports[-1]), "-m", "grpo_ensemble", *args]
        else:
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
            cmd += ["--master_port", str(ports[-1]), "--module", "grpo_ensemble", *args]
        return _launch(cmd, tmp_path)

    proc = launch()
    assert proc.stdout.count("done: step 3 of 3") == 1  # only rank 0 speaks
    _assert_same_run(one.run_dir, two, steps=3, weights=False)
    recipe_written = yaml.safe_load((two / "recipe.yaml").read_text())
    assert recipe_written["train"]["zero_stage"] == train_changes["zero_stage"]
    # every rank wrote its part of the checkpoint after the last step
    ckpt = two / "checkpoints" / "step-00000003"
    assert {p.name for p in ckpt.iterdir()} >= {"rng-rank0.json", "rng-rank1.json", "engine"}
    optim = sorted(p.name for p in (ckpt / "engine" / "state").glob("*optim_states.pt"))
    assert optim == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    # resumed on 2 ranks for a 4th step: as if one rank had run 4 steps without a break
    proc = launch("--set", "train.steps=4", "--resume", "auto")
    assert "resumed from" in proc.stdout and proc.stdout.count("done: step 4 of 4") == 1
    _assert_same_run(one.run_dir, two, steps=4)
    # DeepSpeed's launcher made both runs' ranks share an all-reduce workspace in /dev/shm;
    # none of its files outlives the run
    assert [_shm_workspaces(port) for port in ports] == [[], []]
    if launcher == "torchrun":  # rank 1's part of the checkpoint damaged: both ranks stop
        ckpt = two / "checkpoints" / "step-00000004"
        # a file without the states, then one whose states do not restore (found later)
        damaged = {"{}": "rng-rank1.json lacks a generator's state"}
        damaged['{"python": 0, "numpy": 0, "torch": 0}'] = (
            "TypeError: cannot unpack non-iterable int object"
        )
        for text, why in damaged.items():
            (ckpt / "rng-rank1.json").write_text(text)
            # the manifest rewritten over it: what rank 1 finds in its own file is checked
            (ckpt / manifest.NAME).unlink()
            manifest.write_manifest(ckpt)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            cmd += ["--master_port", str(_port()), "-m", "grpo_ensemble", "train", str(recipe)]
            cmd += ["--set", f"output_dir={two}", "--set", "train.steps=5", "--resume", "auto"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
            assert proc.returncode != 0
            line = f"rank 1: --resume: the checkpoint {ckpt} is damaged or incomplete ({why})"
            assert proc.stderr.count(f"error: {line}") == 1, proc.stderr[-3000:]


def _shm_workspaces(port: int) -> list[str]:
    """The files of DeepSpeed's CPU all-reduce workspace under MASTER_PORT `port`."""
    return sorted(p.name for p in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


SHM_PROBE = """
import os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
if sys.argv[1] == "ours":
    from grpo_ensemble.trainer.deepspeed import init_distributed
    init_distributed()
else:
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
"""


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory is not under /dev/shm")
def test_the_shared_memory_of_deepspeeds_cpu_all_reduce_is_not_left_behind(tmp_path):
    """Under DeepSpeed's launcher (LOCAL_SIZE set) each rank's `deepspeed.init_distributed`
    creates a 66 MB file in /dev/shm that DeepSpeed never removes; ours removes it once every
    rank has mapped it."""
    probe = tmp_path / "probe.py"
    probe.write_text(SHM_PROBE)
    plain, ours = _port(), _port()
    for who, port in (("deepspeed", plain), ("ours", ours)):
        subprocess.run([sys.executable, str(probe), who, str(port)], check=True, env=_env())
    left = _shm_workspaces(plain)
    for name in left:
        (SHM_DIR / name).unlink()
    assert left == [f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{plain}_0"]
    assert _shm_workspaces(ours) == []


SHARING_RANKS = """
import os, sys
import grpo_ensemble.models.logprobs
import grpo_ensemble.engine.decode
from grpo_ensemble.cli import main

grpo_ensemble.models.logprobs.SHARE_MIN = {"cpu": 0, "cuda": 0}  # the tiny models are below it
built = grpo_ensemble.engine.decode.LeanDecoder.__init__

def init(self, *args, **kwargs):  # a file per rank that decoded ZeRO-3 weights with the lean step
    built(self, *args, **kwargs)
    if any(hasattr(p, "ds_id") for p in self.model.parameters()):
        open("lean-zero3-rank" + os.environ["RANK"], "w").close()

grpo_ensemble.engine.decode.LeanDecoder.__init__ = init
sys.exit(main())
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_shared_prompt_forwards_on_two_ranks(tmp_path, monkeypatch, stage):
    # a group's prompt run once per forward, forced on: at ZeRO 2 each rank decides for its own
    # micro-batches (a rank's filler batch runs whole), at ZeRO 3 (every forward a collective)
    # no rank shares; both match one rank that shares, and no rank waits for another. ZeRO 3
    # here also generates with the weights gathered whole (the default), ranks decoding
    # different numbers of tokens: a decode step that calls the model's modules one by one hung
    # there (ZeRO-3's hooks); the lean step, which calls none, runs on both ranks
    import grpo_ensemble.models.logprobs as logprobs_module

    monkeypatch.setattr(logprobs_module, "SHARE_MIN", {"cpu": 0, "cuda": 0})
    recipe = _recipe_file(tmp_path, {"zero_stage": stage})
    one = train(recipe, overrides=[f"output_dir={tmp_path / 'one'}"])
    two = _two_ranks_of_script(tmp_path, SHARING_RANKS, recipe)
    lean = [(tmp_path / f"lean-zero3-rank{r}").exists() for r in (0, 1)]
    assert lean == ([True, True] if stage == 3 else [False, False])
    _assert_same_run(one.run_dir, two)


REPLAYING_RANKS = """
import sys
import grpo_ensemble.engine.recording
from grpo_ensemble.cli import main

grpo_ensemble.engine.recording.REPLAY_MIN = 0  # the tiny models are below it
sys.exit(main())
"""


def test_first_pass_reuses_sampling_on_two_ranks(tmp_path, monkeypatch):
    # the policy alone, a rank's candidates in one micro-batch (ranks hold 9 and 6): each
    # rank's first pass takes its forward's products from its own sampling (replay.py), with
    # ZeRO-2's gradient reduction, and the run matches one rank's
    import grpo_ensemble.engine.recording as recording_module

    monkeypatch.setattr(recording_module, "REPLAY_MIN", 0)
    recipe = _recipe_file(tmp_path, {"zero_stage": 2, "micro_batch_size": 16})
    data = yaml.safe_load(recipe.read_text())
    data["peers"] = []
    recipe.write_text(yaml.safe_dump(data))
    one = train(recipe, overrides=[f"output_dir={tmp_path / 'one'}"])
    two = _two_ranks_of_script(tmp_path, REPLAYING_RANKS, recipe)
    for run_dir in (one.run_dir, two):
        assert [r["reused_sampling_fraction"] for r in _rows(run_dir)] == [1.0, 1.0, 1.0]
    _assert_same_run(one.run_dir, two)


# step 2: every advantage 0 (every rank leaves all out); step 3: the last 2 of the 5 prompts'
# advantages 0, which on 2 ranks are all of rank 1's (3/2 split) and none of rank 0's
ZERO_ADVANTAGES = """
import torch

def wrap(evaluate):
    calls = []

    def evaluate_groups(*args):
        rollout = evaluate(*args)
        calls.append(1)
        if len(calls) == 2:
            rollout.advantages.zero_()
        elif len(calls) == 3:
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            k = sum(len(g.candidates) for g in rollout.groups[-2:])
            if world == 1 or rank == 1:
                rollout.advantages[len(rollout.advantages) - k :] = 0.0
        return rollout

    return evaluate_groups
"""

SKIPPING_RANKS = (
    ZERO_ADVANTAGES
    + """
import importlib, sys
from grpo_ensemble.cli import main

steps = importlib.import_module("grpo_ensemble.trainer.step")
steps.evaluate_groups = wrap(steps.evaluate_groups)
sys.exit(main())
"""
)


def test_zero_advantage_candidates_left_out_on_two_ranks(tmp_path, monkeypatch):
    # beta 0 at ZeRO-2: candidates of advantage 0 left out on each rank, a rank with all of its
    # candidates left out running a filler micro-batch while the other computes, and a step
    # with every candidate left out still stepping the optimizer: the run matches one rank's
    import importlib

    train_module = importlib.import_module("grpo_ensemble.trainer.step")
    namespace: dict = {}
    exec(ZERO_ADVANTAGES, namespace)
    monkeypatch.setattr(
        train_module, "evaluate_groups", namespace["wrap"](train_module.evaluate_groups)
    )
    recipe = _recipe_file(tmp_path, {"zero_stage": 2})
    data = yaml.safe_load(recipe.read_text())
    data["loss"]["beta"] = 0.0
    recipe.write_text(yaml.safe_dump(data))
    one = train(recipe, overrides=[f"output_dir={tmp_path / 'one'}"])
    two = _two_ranks_of_script(tmp_path, SKIPPING_RANKS, recipe)
    for run_dir in (one.run_dir, two):
        skipped = [r["zero_advantage_skipped_fraction"] for r in _rows(run_dir)]
        assert skipped[1] == 1.0 and 0.0 < skipped[2] < 1.0, skipped
    _assert_same_run(one.run_dir, two)


def test_step_wide_statistics_over_two_ranks(tmp_path):
    # the quantile of top_entropy_quantile (over a micro-batch's tokens on every rank) and
    # the std of group.scale_rewards: batch (over every rank's rewards) are gathered across
    # ranks: with one micro-batch per rank, 2 ranks train as 1 rank with one micro-batch
    recipe = _recipe_file(tmp_path, {"zero_stage": 2, "micro_batch_size": 32})
    data = yaml.safe_load(recipe.read_text())
    data["loss"].update(top_entropy_quantile=0.5, entropy_coef=0.01)
    data["group"] = {**data.get("group", {}), "scale_rewards": "batch"}
    recipe.write_text(yaml.safe_dump(data))
    one = train(recipe, overrides=[f"output_dir={tmp_path / 'one'}"])
    two = _two_ranks_of_script(tmp_path, "from grpo_ensemble.cli import entry\nentry()\n", recipe)
    _assert_same_run(one.run_dir, two)
    for run_dir in (one.run_dir, two):
        assert all(r["entropy"] > 0 for r in _rows(run_dir))


FAILING_RANK = """
import atexit, os, sys
from grpo_ensemble import RewardScorer, hookimpl
from grpo_ensemble.cli import main
from grpo_ensemble.plugins import get_plugin_manager

class FailsOnRankOne(RewardScorer):
    name = "fails_on_rank_one"
    def score(self, samples):
        if os.environ["RANK"] == "1":
            raise RuntimeError("scorer broke on purpose")
        return [0.0 for _ in samples]

class Plugin:
    @hookimpl
    def register_reward_scorers(self, register):
        register(FailsOnRankOne)

get_plugin_manager().register(Plugin(), name="fails-on-rank-one")
# a rank leaves without finalizing the interpreter (see cli._exit_rank): exit handlers still run
atexit.register(lambda: open("atexit-rank" + os.environ["RANK"], "w").close())
sys.exit(main())
"""


def _failing_run(tmp_path: Path, script_text: str, args: list[str]):
    """Both ranks of a ZeRO-3 run whose scorer fails on rank 1, started as torchrun would;
    their exit codes, stderr texts and a summary of both for assertion messages."""
    script = tmp_path / "launch.py"
    script.write_text(script_text)
    recipe = _recipe_file(tmp_path, {"zero_stage": 3})
    data = yaml.safe_load(recipe.read_text())
    data["rewards"] = [{"name": "fails_on_rank_one"}]
    data["eval"] = {"before": False, "after": False}
    data["output_dir"] = str(tmp_path / "run")
    recipe.write_text(yaml.safe_dump(data))
    port = str(_port())
    procs = []
    for rank in (0, 1):
        env = {
            **_env(),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        cmd = [sys.executable, str(script), *args, str(recipe)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    errs = [e.decode() for _, e in outs]
    tails = "\n".join(f"--- rank {r} stderr:\n{e[-2000:]}" for r, e in enumerate(errs))
    return [p.returncode for p in procs], errs, tails


FAILURE = "plugin 'fails_on_rank_one': reward scorer raised RuntimeError: scorer broke on purpose"


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path):
    """Rank 1's scorer raises in step 1 while rank 0 is fine: both ranks exit with code 1
    within the subprocess timeout (no deadlock), and rank 0 prints rank 1's message. The exit
    code is 1, not a SIGABRT from a gloo thread that frees the last collective's tensors as the
    interpreter finalizes (1 run in about 15 did that before ranks left with os._exit)."""
    codes, errs, tails = _failing_run(tmp_path, FAILING_RANK, ["train"])
    assert codes == [1, 1], tails
    assert f"run failed: rank 1: {FAILURE}" in errs[0], errs[0]
    assert "Traceback" not in errs[0] and "Traceback" not in errs[1]
    assert "run failed" not in errs[1]  # the same error is printed once, by rank 0
    assert not (tmp_path / "run" / "final").exists()
    assert (tmp_path / "atexit-rank0").exists() and (tmp_path / "atexit-rank1").exists()


FAILING_RANK_API = FAILING_RANK.replace("from grpo_ensemble.cli import main\n", "").replace(
    "sys.exit(main())",
    """import grpo_ensemble.trainer.deepspeed as engine
from grpo_ensemble import RunError, train

original = engine._let_collectives_finish
def grace():  # the exit handler init_distributed registers: a file per rank that ran it
    open("grace-rank" + os.environ["RANK"], "w").close()
    original()
engine._let_collectives_finish = grace
try:
    train(sys.argv[1])
except RunError as exc:
    print("caught:", exc, file=sys.stderr)
    sys.exit(1)
""",
)


def test_a_failing_rank_stops_every_rank_of_the_python_api(tmp_path):
    """The same failure through `train()` in a script of the user's: both ranks raise a
    RunError with rank 1's message, and exit with the script's code 1. Both ran the exit
    handler that lets gloo's threads finish before the interpreter finalizes (without it, 5 of
    80 such runs ended with SIGABRT)."""
    codes, errs, tails = _failing_run(tmp_path, FAILING_RANK_API, [])
    assert codes == [1, 1], tails
    for err in errs:
        assert f"caught: rank 1: {FAILURE}" in err, err
    assert (tmp_path / "grace-rank0").exists() and (tmp_path / "grace-rank1").exists()


def test_too_few_prompts_for_the_ranks_is_a_recipe_error():
    from grpo_ensemble.trainer.setup import check_world

    with pytest.raises(RecipeError, match="train.prompts_per_step: 1 prompt per step"):
        check_world(1, world=2)
    check_world(2, world=2)


@pytest.mark.parametrize(
    "n, world, expected",
    [
        (5, 2, [range(0, 3), range(3, 5)]),
        (4, 2, [range(0, 2), range(2, 4)]),
        (7, 3, [range(0, 3), range(3, 5), range(5, 7)]),
        (1, 2, [range(0, 1), range(1, 1)]),
    ],
)
def test_shards_are_contiguous_and_cover_every_item_once(n, world, expected):
    assert [shard(n, world, r) for r in range(world)] == expected


def test_raw_deepspeed_config_merges_and_conflicts_name_both_values(tmp_path, small_recipe):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2, "reduce_bucket_size": 500000},
                "gradient_clipping": 1.0,
            }
        )
    )
    r = small_recipe(train__zero_stage=2, train__deepspeed=str(ds))
    cfg = deepspeed_config(r, 8, torch.float32)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 500000}
    assert cfg["gradient_clipping"] == 1.0
    with pytest.raises(RecipeError) as info:
        deepspeed_config(small_recipe(train__deepspeed=str(ds)), 8, torch.float32)
    assert str(info.value) == (
        "train.deepspeed: zero_optimization.stage is 2 there but 0 from train.zero_stage; "
        "make them agree or drop the key"
    )
    assert merge_config({"a": {"b": 1}}, {"a": {"c": 2}, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


def test_the_engine_uses_the_merged_config(small_recipe, tmp_path):
    from grpo_ensemble.trainer.setup import build_run

    raw = {"zero_optimization": {"reduce_bucket_size": 123456}, "gradient_clipping": 0.5}
    r = small_recipe(train__zero_stage=2, train__max_grad_norm=0.5, train__deepspeed=raw)
    engine = build_run(r, tmp_path).engine
    assert engine.zero_reduce_bucket_size() == 123456
    assert engine.gradient_clipping() == 0.5
    assert engine.zero_optimization_stage() == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_on_two_ranks_matches_one_rank(tmp_path, stage):
    # adapters trained under ZeRO-2 and ZeRO-3, the reference (beta > 0) and a peer both the
    # policy's base with the adapters off, μ = 2: 2 ranks train as 1
    recipe = _recipe_file(tmp_path, {"zero_stage": stage, "lr": 1e-2})
    data = yaml.safe_load(recipe.read_text())
    data["policy"]["lora"] = {"r": 4, "alpha": 8}
    data["peers"].append({"name": "base", "model": "policy_base", "n": 2})
    recipe.write_text(yaml.safe_dump(data))
    one = train(recipe, overrides=[f"output_dir={tmp_path / 'one'}"])
    two = _two_ranks_of_script(tmp_path, "from grpo_ensemble.cli import entry\nentry()\n", recipe)
    _assert_same_run(one.run_dir, two, weights=False)
    a = load_file(one.run_dir / "final/adapter_model.safetensors")
    b = load_file(two / "final/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # trained
    assert all(r["member/base/candidates"] > 0 for r in _rows(two))


def test_a_sharded_reward_model_scores_on_two_ranks_as_on_one(tmp_path):
    # ZeRO-3 with the frozen models sharded, the reward model too: one text per forward, so
    # rank 0 (3 of the 5 groups) runs more forwards than rank 1, which runs fillers to keep
    # step with it; the rewards are those of the whole model on one rank
    rm = save_reward_model(tmp_path / "rm", intermediate_size=2048)  # its MLPs partitioned
    recipe = _recipe_file(tmp_path, {"zero_stage": 3, "frozen_models": "shard"})
    data = yaml.safe_load(recipe.read_text())
    data["rewards"] = [{"name": "reward_model", "params": {"model": str(rm), "batch_size": 1}}]
    recipe.write_text(yaml.safe_dump(data))
    one = train(recipe, overrides=[f"output_dir={tmp_path / 'one'}"])
    two = _two_ranks_of_script(tmp_path, "from grpo_ensemble.cli import entry\nentry()\n", recipe)
    # continuous rewards: the mean over two ranks adds in another order
    for x, y in zip(_rows(one.run_dir), _rows(two), strict=True):
        assert (x["candidates"], x["trained_candidates"]) == (
            y["candidates"],
            y["trained_candidates"],
        )
        for key in ("reward", "reward_std", "loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
        assert y["reward"] == y["reward/reward_model"] != 0
