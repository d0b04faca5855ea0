"""The LoRA side of the step benchmark (`grpo_step.py --tuning lora`): the adapters both
frameworks train (rank 16, alpha 32, on every projection of a Llama block), and the FLOPs a
LoRA step computes (the frozen base's weights get no gradient).

Run as a script, it measures the memory that sharing the policy's base saves in real
`grpo-ensemble train` runs: a policy with a KL reference (beta > 0) and a peer of the same
model, fully fine-tuned (policy, reference and peer: three copies of the weights) against
LoRA with the peer `model: policy_base` (one copy); each run in its own subprocess, its peak
RSS read from the kernel (ru_maxrss of that child, from wait4).

    python benchmarks/lora_bench.py --config medium --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS}


def peft_config():
    """TRL's adapters: the same as ours (`policy.lora` = LORA)."""
    import peft

    return peft.LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )


def n_adapter_params(path: Path) -> int:
    """Weights of the adapters on a Llama model: r·(in + out) for each adapted projection."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    h, i, r = c.hidden_size, c.intermediate_size, LORA["r"]
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    attn = 2 * r * (h + h) + 2 * r * (h + kv)  # q, o; k, v
    return c.num_hidden_layers * (attn + 3 * r * (h + i))  # gate, up, down


def lora_flops(n_params: int, n_adapters: int, work: dict, beta: float, mu: int) -> float:
    """`grpo_step.flops` for LoRA: a training pass is the base's forward and its input
    gradients (4·N·T, no weight gradients) plus the adapters' 6·A·T; the reference and old
    passes run the base's forward (2·N·T; the adapters' share of the old pass is left out)."""
    frozen_passes = 2 * (beta > 0) + 2 * (mu > 1 and work["old_pass"])
    train = mu * work["train"] * (4 * n_params + 6 * n_adapters)
    return train + n_params * frozen_passes * work["frozen"]


# ----------------------------------------------------------------- memory of the shared base


def sharing_recipe(path: Path, lora: bool, steps: int, out: str, threads: int, mb: int) -> dict:
    """Policy `path` with beta 0.04 and one peer of the same model: full fine-tuning (three
    copies) or LoRA with the peer `policy_base` (one copy)."""
    sampling = {"max_new_tokens": 32, "min_new_tokens": 32}
    policy = {"model": str(path), "n": 4, "sampling": sampling}
    if lora:
        policy["lora"] = LORA
    return {
        "seed": 0,
        "output_dir": out,
        "policy": policy,
        "peers": [
            {
                "name": "base",
                "model": "policy_base" if lora else str(path),
                "n": 4,
                "sampling": sampling,
            }
        ],
        "data": {"train": "builtin:arithmetic/train", "eval": None},
        # graded (not exact match, 0 for a random model): every step updates, so the
        # optimizer's state exists as in a run that learns
        "rewards": [{"name": "python", "params": {"function": "grpo_step:digit_share_scorer"}}],
        "loss": {"beta": 0.04},
        "train": {
            "steps": steps,
            "prompts_per_step": 4,
            "micro_batch_size": mb,
            "lr": 1e-5,
            "threads": threads,
            "checkpoint_every": 0,
        },
        "eval": {"before": False, "after": False},
        "log": {"progress": False},
    }


def measure_sharing(path: Path, lora: bool, steps: int, threads: int, mb: int) -> dict:
    """Peak RSS (MB) and wall time of one `grpo-ensemble train` run, in a fresh process (its
    own ru_maxrss, from wait4: not a running maximum over earlier runs)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        rec = sharing_recipe(path, lora, steps, str(Path(tmp) / "run"), threads, mb)
        recipe.write_text(yaml.safe_dump(rec))
        cmd = [str(Path(sys.executable).with_name("grpo-ensemble")), "train", str(recipe)]
        here = str(Path(__file__).resolve().parent)  # the reward's module, grpo_step
        path_var = os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH")) if x)
        env = {**os.environ, "GRPO_ENSEMBLE_LOAD_PLUGINS": "", "PYTHONPATH": path_var}
        log = Path(tmp) / "log"
        with log.open("w") as f:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
        tuning = "lora" if lora else "full"
        if proc.returncode != 0:
            raise SystemExit(f"train failed ({tuning}):\n{log.read_text()[-3000:]}")
    out = {"tuning": tuning, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall}
    return {**out, **held_params(path, lora)}


def held_params(path: Path, lora: bool) -> dict:
    """Parameters the run holds: every copy of the model's weights, and the trainable ones."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    n = sum(p.numel() for p in model.parameters())
    adapters = n_adapter_params(path)
    if lora:
        return {"copies": 1, "params_held": n + adapters, "trainable": adapters}
    return {"copies": 3, "params_held": 3 * n, "trainable": n}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grpo_step import model_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="medium", help="a grpo_step.py configuration")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=32,
        help="candidates per forward/backward (32: a step's whole batch; smaller: less of the "
        "peak is activations)",
    )
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    path = model_dir(a.config)
    rows = []
    for lora in (False, True):
        r = measure_sharing(path, lora, a.steps, a.threads, a.micro_batch_size)
        r = {"config": a.config, "micro_batch_size": a.micro_batch_size, **r}
        rows.append(r)
        print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
