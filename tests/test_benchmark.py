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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert (r["framework"], r["config"], r["beta"], r["mu"]) == ("ours", "tiny", 0.04, 2)
    assert set(r["phases"]) == {"generate", "score", "logprobs", "update", "sync"}
    assert r["phases"]["logprobs"] > 0  # beta > 0 and mu = 2: reference and old passes ran
    assert r["completion_len"] == 32.0  # fixed length: EOS forbidden before max_new_tokens
    assert r["gen_tokens_per_s"] * r["phases"]["generate"] == pytest.approx(8 * 32)
    assert r["peak_rss_mb"] > 0 and r["matmul_gflops"] > 0
    assert r["train_fraction_of_matmul"] == pytest.approx(r["train_gflops"] / r["matmul_gflops"])
    assert "ours tiny" in proc.stdout
    assert r["gradient_checkpointing"] is True
    assert len(r["repeats_step_s"]) == 2 and r["step_s"] in r["repeats_step_s"]
