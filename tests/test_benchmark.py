"""The step benchmark runs end to end (ours; TRL is an optional extra) and reports every field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_reports_phases_rates_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "grpo_step.py"), "--configs", "tiny"]
    cmd += ["--frameworks", "ours", "--variants", "0.04:2", "--steps", "1", "--warmup", "1"]
    cmd += ["--threads", "1", "--json", str(out), "--repeats", "2", "--gradient-checkpointing"]
    cmd += ["--precision", "bf16"]  # reaches the recipe (train.precision), also on a CPU
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert (r["framework"], r["config"], r["beta"], r["mu"]) == ("ours", "tiny", 0.04, 2)
    assert set(r["phases"]) == {"generate", "score", "logprobs", "update", "sync"}
    assert r["phases"]["logprobs"] > 0  # beta > 0: the reference pass ran
    assert r["completion_len"] == 32.0  # fixed length: EOS forbidden before max_new_tokens
    assert r["gen_tokens_per_s"] * r["phases"]["generate"] == pytest.approx(8 * 32)
    assert r["peak_rss_mb"] > 0 and r["matmul_gflops"] > 0
    assert r["train_fraction_of_matmul"] == pytest.approx(r["train_gflops"] / r["matmul_gflops"])
    assert "ours tiny" in proc.stdout
    assert r["gradient_checkpointing"] is True
    assert len(r["repeats_step_s"]) == 2 and r["step_s"] in r["repeats_step_s"]
    assert (r["precision"], r["device"], r["peak_gpu_mb"]) == ("bf16", "cpu", None)
    assert r["tuning"] == "full"  # the default: every weight trains


def test_flops_count_the_passes_and_positions_each_framework_computes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import grpo_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    tiny, medium = grpo_step.model_dir("tiny"), grpo_step.model_dir("medium")
    # tiny: 8 rows × (8 prompt + 32 new); below the sharing threshold; no dropout: no old pass
    assert grpo_step.work_of("ours", "tiny", tiny, False) == {
        "train": 320,
        "frozen": 320,
        "old_pass": False,
    }
    # medium: 32 rows × (8 + 64), 4 prompts of 8 rows; each prompt once: 32·64 + 4·8
    whole, shared = 32 * 72, 32 * 64 + 4 * 8
    ours = grpo_step.work_of("ours", "medium", medium, False)
    assert ours == {"train": shared, "frozen": shared, "old_pass": False}
    # checkpointed: the update runs whole rows (no cache), the no-grad passes still share
    ours_gc = grpo_step.work_of("ours", "medium", medium, True)
    assert ours_gc == {"train": whole, "frozen": shared, "old_pass": False}
    trl = grpo_step.work_of("trl", "medium", medium, False)
    assert trl == {"train": whole, "frozen": whole, "old_pass": True}
    n = 1000
    assert grpo_step.flops(n, ours, 0.04, 2) == n * (6 * 2 * shared + 2 * shared)
    assert grpo_step.flops(n, trl, 0.04, 2) == n * (6 * 2 * whole + (2 + 2) * whole)
    assert grpo_step.flops(n, trl, 0.0, 1) == n * 6 * whole


def test_sampling_benchmark_compares_the_static_step_with_the_usual_one():
    # benchmarks/sampling.py on a CPU: the static step (no graph there) samples the same tokens
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sampling.py"), "--config", "tiny"]
    cmd += ["--rounds", "1", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tiny fp32 on cpu: tokens the same 1.0000, max |Δ logp| ")
    timed = [line.split(" median ")[0].strip() for line in lines if " median " in line]
    assert timed == [
        "lean",
        "lean + recording",
        "static (no graph)",
        "static (no graph) + recording",
    ]
    assert all("(8 rows × 32 tokens)" in line for line in lines if " median " in line)


def test_benchmark_runs_lora_adapters_and_says_so(tmp_path):
    # --tuning lora: ours trains policy.lora adapters; the row says which tuning it used
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "grpo_step.py"), "--configs", "tiny"]
    cmd += ["--frameworks", "ours", "--variants", "0.04:1", "--steps", "1", "--warmup", "1"]
    cmd += ["--threads", "1", "--json", str(out), "--tuning", "lora"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert (r["framework"], r["config"], r["beta"], r["mu"]) == ("ours", "tiny", 0.04, 1)
    assert r["tuning"] == "lora"
    assert set(r["phases"]) == {"generate", "score", "logprobs", "update", "sync"}
    assert r["phases"]["logprobs"] > 0  # beta > 0: the reference pass (adapters off) ran
    assert r["completion_len"] == 32.0
    assert r["reused_sampling_fraction"] == 0.0  # sampling records the base layers' products
    assert r["step_s"] > 0 and r["peak_rss_mb"] > 0 and r["train_gflops"] > 0
    assert "ours tiny   lora beta=0.04 mu=1" in proc.stdout
