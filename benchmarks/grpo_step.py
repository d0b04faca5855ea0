"""Seconds per GRPO step, by phase, for grpo-ensemble and (when installed) TRL's GRPOTrainer.

    python benchmarks/grpo_step.py                       # tiny and medium, both frameworks
    python benchmarks/grpo_step.py --configs tiny --frameworks ours --json out.json
    python benchmarks/grpo_step.py --configs big         # a ~0.6B model, for a GPU
    python benchmarks/grpo_step.py --configs medium --tuning full,lora  # and LoRA adapters

Each configuration runs in a fresh subprocess per framework (so that peak memory is that run's
own), on the very same model files and prompts, with fixed-length completions (EOS is
forbidden before `max_new_tokens`, in both), the same group size, batch, loss settings (clip
0.2, token-mean loss, beta, μ) and threads. A step is one generation of `completions`
candidates and μ optimizer steps over them (TRL: `num_iterations` = μ optimizer steps per
generation). The median over the timed steps is reported; warm-up steps are excluded.
`--tuning lora` trains LoRA adapters instead (rank 16, alpha 32, every projection; ours:
`policy.lora`, TRL: `peft_config`); both then take the reference from the base, adapters off.

Phases (ours): generation, scoring, reference/old log-probs, forward+backward+optimizer step,
weight sync. TRL: generation (its `generate` calls), scoring (the reward function), log-probs
(the rest of its generate-and-score: reference and old log-probs), update (the rest of the
step). Achieved FLOP/s of the training phase count 6·N·T per fwd+bwd pass and 2·N·T per
log-prob pass (N: parameters other than the embedding table, T: tokens in the batch), against
the machine's measured fp32 matrix-product rate.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import lora_bench

CONFIGS = {
    # name: layers, width, heads, group size, completions per step, new tokens
    "tiny": dict(layers=2, width=64, heads=4, group=4, completions=8, new_tokens=32),
    "medium": dict(layers=6, width=256, heads=8, group=8, completions=32, new_tokens=64),
    "large": dict(layers=12, width=512, heads=8, group=8, completions=32, new_tokens=64),
    "big": dict(layers=24, width=1280, heads=20, group=8, completions=64, new_tokens=128),
}
VARIANTS = [(0.0, 1), (0.0, 2), (0.04, 1), (0.04, 2)]  # (beta, mu)


@dataclass
class Result:
    framework: str
    config: str
    beta: float
    mu: int
    step_s: float
    phases: dict
    gen_tokens_per_s: float
    train_tokens_per_s: float
    train_gflops: float
    matmul_gflops: float
    train_fraction_of_matmul: float
    peak_rss_mb: float
    device: str
    precision: str = "fp32"
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated, on a GPU
    completion_len: float | None = None  # measured mean, where the framework reports it
    reused_sampling_fraction: float | None = None  # ours: first-pass tokens replayed
    zero_advantage_skipped_fraction: float | None = None  # ours: tokens left out (advantage 0)
    zero_stage: int | None = None  # ours: DeepSpeed's ZeRO stage
    tuning: str = "full"  # "full": every weight trains; "lora": LoRA adapters (PEFT)


def model_dir(config: str) -> Path:
    """A Llama model of the configuration's shape, random weights, saved once."""
    c = CONFIGS[config]
    root = Path(os.environ.get("GRPO_ENSEMBLE_CACHE", Path.home() / ".cache" / "grpo_ensemble"))
    out = root / "bench" / f"{config}-{c['layers']}x{c['width']}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_ensemble.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = 512
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=c["width"],
            intermediate_size=4 * c["width"],
            num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"],
            num_key_value_heads=c["heads"],
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(model.config, key))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def matmul_gflops(device: str, precision: str = "fp32") -> float:
    """Best-of-10 rate of an (n × n) @ (n × n) product (n: 2048 on a CPU, 8192 on a GPU) on
    this device and thread count, in the run's precision (fp32 or bf16)."""
    import torch

    n = 8192 if device == "cuda" else 2048  # a GPU's small products are launch-bound
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def digit_share(text: str) -> float:
    """The benchmark's reward: the share of a completion's characters that are digits. Graded,
    so that a group's rewards differ and every candidate has a non-zero advantage, as in the
    steps of a run that learns (exact match gives random models 0 everywhere: no gradient, and
    grpo-ensemble would leave such candidates out of the update, `train.skip_zero_advantage`)."""
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


def digit_share_scorer(samples) -> list[float]:
    """`digit_share` as grpo-ensemble's `python` reward scorer calls it."""
    return [digit_share(s.completion) for s in samples]


def prompts(n: int) -> list[dict]:
    from grpo_ensemble.data.tasks import TASKS

    return TASKS["arithmetic"]("train")[:n]


def flops(n_params: int, work: dict, beta: float, mu: int) -> float:
    """Training-phase FLOPs one step computes: μ fwd+bwd passes over `work["train"]` token
    positions, the ref pass and (where run) the old pass over `work["frozen"]` (the forward
    that gradient checkpointing repeats is not counted), less the first pass's forward over
    the `work["reused"]` positions whose products it took from sampling."""
    frozen_passes = 2 * (beta > 0) + 2 * (mu > 1 and work["old_pass"])
    train = 6 * mu * work["train"] - 2 * work.get("reused", 0)
    return n_params * (train + frozen_passes * work["frozen"])


def work_of(framework: str, config: str, path: Path, gc: bool) -> dict:
    """Token positions each pass runs, and whether μ > 1 runs an old pass. TRL runs every
    row's prompt and an old pass; ours runs a group's prompt once where `shared_prompt_plan`
    says so, and keeps the first pass's log-probs where the model has no dropout."""
    c = CONFIGS[config]
    rows, groups, prompt, new = c["completions"], c["completions"] // c["group"], 8, c["new_tokens"]
    whole = rows * (prompt + new)
    if framework != "ours":
        return {"train": whole, "frozen": whole, "old_pass": True}
    from transformers import AutoModelForCausalLM

    from grpo_ensemble.models.logprobs import TokenBatch, shared_prompt_plan
    from grpo_ensemble.trainer.update import train_mode_is_eval_mode

    model = AutoModelForCausalLM.from_pretrained(path)
    prompts = [[1] + [3 + g] * (prompt - 1) for g in range(groups) for _ in range(rows // groups)]
    batch = TokenBatch.build(prompts, [[3] * new] * rows, pad_id=0)
    shared = rows * new + groups * prompt

    def positions() -> int:
        return whole if shared_prompt_plan(model, batch) is None else shared

    frozen = positions()  # eval mode
    if gc:
        model.activation_checkpointing_enable()
    model.train()
    return {"train": positions(), "frozen": frozen, "old_pass": not train_mode_is_eval_mode(model)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def n_matmul_params(path: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    per_layer = 4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # + LM head


# --------------------------------------------------------------------------------------- ours


@dataclass
class Setting:
    """What both frameworks run with: configuration, loss, steps, threads, precision (and
    ours alone: the ZeRO stage; TRL runs without DeepSpeed)."""

    config: str
    beta: float
    mu: int
    steps: int
    warmup: int
    threads: int
    gc: bool  # gradient checkpointing
    precision: str = "fp32"
    zero_stage: int = 0
    tuning: str = "full"  # or "lora"


def run_ours(s: Setting, reuse: bool = True) -> Result:
    import torch

    from grpo_ensemble.trainer.loop import train

    config, beta, mu, steps, warmup, threads, gc, precision, zero_stage, tuning = astuple(s)
    c = CONFIGS[config]
    path = model_dir(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        n_prompts = c["completions"] // c["group"]
        data.write_text(
            "".join(json.dumps(r) + "\n" for r in prompts(n_prompts * (steps + warmup)))
        )
        sampling = {"max_new_tokens": c["new_tokens"], "min_new_tokens": c["new_tokens"]}
        lora = {"lora": lora_bench.LORA} if tuning == "lora" else {}
        recipe = {
            "seed": 0,
            "output_dir": str(Path(tmp) / "run"),
            "policy": {"model": str(path), "n": c["group"], "sampling": sampling, **lora},
            "rewards": [{"name": "python", "params": {"function": "grpo_step:digit_share_scorer"}}],
            "data": {"train": str(data), "eval": None, "shuffle": False},
            "loss": {"beta": beta, "mu": mu, "clip_low": 0.2, "clip_high": 0.2},
            "train": {
                "steps": steps + warmup,
                "prompts_per_step": n_prompts,
                "micro_batch_size": c["completions"],
                "lr": 1e-6,
                "zero_stage": zero_stage,
                "threads": threads if device == "cpu" else None,
                "checkpoint_every": 0,
                "gradient_checkpointing": gc,
                "reuse_sampling_forward": reuse,
                "precision": precision,
            },
            "eval": {"before": False, "after": False},
            "log": {"progress": False},
        }
        from grpo_ensemble.recipe import recipe_from_dict

        result = train(recipe_from_dict(recipe))
    timed = result.metrics[warmup:]

    def med(key: str) -> float:
        return statistics.median(m.get(key, 0.0) for m in timed)

    phases = {
        "generate": med("time/generate"),
        "score": med("time/score"),
        "logprobs": med("time/logprobs"),
        "update": med("time/update") - med("time/logprobs"),
        "sync": med("time/sync"),
    }
    # completion positions whose forward products the first pass took from sampling
    reused = med("reused_sampling_fraction") * c["completions"] * (c["new_tokens"] - 1)
    args = (config, beta, mu, med("time/step"), phases, path, device, gc, reused, precision)
    res = _result("ours", *args, tuning)
    res.completion_len = med("completion_len")
    res.reused_sampling_fraction = med("reused_sampling_fraction")
    res.zero_advantage_skipped_fraction = med("zero_advantage_skipped_fraction")
    res.zero_stage = zero_stage
    return res


def _result(
    framework,
    config,
    beta,
    mu,
    step_s,
    phases,
    path,
    device,
    gc=False,
    reused=0.0,
    precision="fp32",
    tuning="full",
) -> Result:
    c = CONFIGS[config]
    prompt_tokens = 8  # "<bos>37+45=": about 7 characters on average, plus BOS
    tokens = c["completions"] * (prompt_tokens + c["new_tokens"])
    train_s = phases["logprobs"] + phases["update"]
    work = {**work_of(framework, config, path, gc), "reused": reused}
    if tuning == "lora":
        n_adapters = lora_bench.n_adapter_params(path)
        done = lora_bench.lora_flops(n_matmul_params(path), n_adapters, work, beta, mu)
    else:
        done = flops(n_matmul_params(path), work, beta, mu)
    achieved = done / train_s / 1e9
    peak_gpu = None
    if device == "cuda":
        import torch

        peak_gpu = torch.cuda.max_memory_allocated() / 2**20
    peak = matmul_gflops(device, precision)
    return Result(
        framework=framework,
        config=config,
        beta=beta,
        mu=mu,
        step_s=step_s,
        phases=phases,
        gen_tokens_per_s=c["completions"] * c["new_tokens"] / phases["generate"],
        train_tokens_per_s=tokens * mu / phases["update"],
        train_gflops=achieved,
        matmul_gflops=peak,
        train_fraction_of_matmul=achieved / peak,
        peak_rss_mb=peak_rss_mb(),
        device=device,
        precision=precision,
        peak_gpu_mb=peak_gpu,
        tuning=tuning,
    )


# ---------------------------------------------------------------------------------------- TRL


def run_trl(s: Setting) -> Result:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    config, beta, mu, steps, warmup, threads, gc, precision, _, tuning = astuple(s)
    c = CONFIGS[config]
    path = model_dir(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads)
    n_prompts = c["completions"] // c["group"]
    rows = prompts(n_prompts * (steps + warmup))
    clock = {"score": 0.0, "generate": 0.0, "gen_and_score": 0.0}

    def digit_share_reward(prompts, completions, **kwargs):
        t = time.perf_counter()
        out = [digit_share(x) for x in completions]
        clock["score"] += time.perf_counter() - t
        return out

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=c["completions"],
            gradient_accumulation_steps=1,
            num_generations=c["group"],
            max_completion_length=c["new_tokens"],
            generation_kwargs={"min_new_tokens": c["new_tokens"]},
            temperature=1.0,
            top_p=1.0,
            beta=beta,
            num_iterations=mu,
            epsilon=0.2,
            loss_type="dapo",
            scale_rewards="group",
            learning_rate=1e-6,
            max_steps=(steps + warmup) * mu,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            use_cpu=device == "cpu",
            bf16=precision == "bf16",  # mixed precision: fp32 weights, bf16 autocast
            dataloader_num_workers=0,
            disable_dropout=True,
            gradient_checkpointing=gc,  # TRL's default is on: set as ours, explicitly
            shuffle_dataset=False,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=str(path),
            reward_funcs=[digit_share_reward],
            args=args,
            train_dataset=Dataset.from_list(rows),
            peft_config=lora_bench.peft_config() if tuning == "lora" else None,
        )
        model = trainer.model
        generate = model.generate

        def timed_generate(*a, **k):
            t = time.perf_counter()
            out = generate(*a, **k)
            clock["generate"] += time.perf_counter() - t
            return out

        model.generate = timed_generate
        gen_and_score = trainer._generate_and_score_completions

        def timed_gen_and_score(*a, **k):
            t = time.perf_counter()
            out = gen_and_score(*a, **k)
            clock["gen_and_score"] += time.perf_counter() - t
            return out

        trainer._generate_and_score_completions = timed_gen_and_score
        steps_log: list[dict] = []

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()
                self.before = dict(clock)

            def on_step_end(self, args, state, control, **kw):
                d = {k: clock[k] - self.before[k] for k in clock}
                steps_log.append({"total": time.perf_counter() - self.t, **d})

        trainer.add_callback(StepClock())
        trainer.train()
    # one of our steps = μ optimizer steps of TRL (it generates on the first of them)
    grouped = [steps_log[i : i + mu] for i in range(0, len(steps_log), mu)][warmup:]

    def med(key: str) -> float:
        return statistics.median(sum(s[key] for s in g) for g in grouped)

    gen, score, both = med("generate"), med("score"), med("gen_and_score")
    phases = {
        "generate": gen,
        "score": score,
        "logprobs": both - gen - score,
        "update": med("total") - both,
        "sync": 0.0,
    }
    total = med("total")
    return _result(
        "trl", config, beta, mu, total, phases, path, device, precision=precision, tuning=tuning
    )


# ------------------------------------------------------------------------------------- driver


def worker(a) -> None:
    if a.completions:
        CONFIGS[a.config]["completions"] = a.completions
    if a.new_tokens:
        CONFIGS[a.config]["new_tokens"] = a.new_tokens
    setting = Setting(
        a.config,
        a.beta,
        a.mu,
        a.steps,
        a.warmup,
        a.threads,
        a.gradient_checkpointing,
        a.precision,
        a.zero_stage,
        a.tuning,
    )
    res = run_ours(setting, reuse=not a.no_reuse) if a.worker == "ours" else run_trl(setting)
    print("RESULT " + json.dumps(asdict(res)), flush=True)
    sys.stderr.flush()
    atexit._run_exitfuncs()  # our own clean-up (the process group's rendezvous folder)
    os._exit(0)  # no further teardown: a process group's shutdown must not hold the parent up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--configs", default="tiny,medium", help="comma-separated: tiny,medium,large,big"
    )
    p.add_argument("--frameworks", default="ours,trl", help="comma-separated: ours,trl")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (both frameworks)")
    p.add_argument("--variants", default="all", help="'all' or e.g. '0:1,0.04:2' (beta:mu)")
    p.add_argument(
        "--tuning",
        default="full",
        help="comma-separated: full (every weight trains), lora (LoRA adapters, rank 16, "
        "alpha 32, on q,k,v,o,gate,up,down: ours policy.lora, TRL peft_config)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both frameworks recompute activations in the backward pass (TRL's default; "
        "without this flag, neither does)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each framework this many times, alternating ours and TRL so that a slow "
        "spell of the machine hits both; the run with the median step time is reported",
    )
    p.add_argument(
        "--no-reuse",
        action="store_true",
        help="ours: the first optimizer pass computes its forward in full instead of taking "
        "the policy's products from sampling (train.reuse_sampling_forward: false)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32 (identical settings in both) or bf16 for a GPU: ours trains with "
        "DeepSpeed's bf16 (bf16 weights, fp32 master copy), TRL with its bf16 mixed precision "
        "(fp32 weights, bf16 autocast), each framework's usual bf16 set-up",
    )
    p.add_argument(
        "--zero-stage",
        type=int,
        choices=[0, 1, 2, 3],
        default=0,
        help="ours: the DeepSpeed ZeRO stage (one process: 0 and 1 differ in the bf16 "
        "optimizer DeepSpeed wraps around AdamW); TRL runs without DeepSpeed",
    )
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument(
        "--scaling",
        action="store_true",
        help="ours only, tiny model, beta 0, mu 1: step time against completions per step "
        "(8, 16, 32, 64) and against completion length (16, 32, 64, 128)",
    )
    p.add_argument("--completions", type=int, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    p.add_argument("--mu", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.scaling:
        return scaling(a)
    frameworks = a.frameworks.split(",")
    if "trl" in frameworks:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install -e '.[bench]'): measuring ours only")
            frameworks = [f for f in frameworks if f != "trl"]
    variants = VARIANTS
    if a.variants != "all":
        variants = [(float(x), int(y)) for x, y in (v.split(":") for v in a.variants.split(","))]
    results = []
    for config in a.configs.split(","):
        model_dir(config)
        for beta, mu in variants:
            for tuning in a.tuning.split(","):
                results += _measure(frameworks, config, beta, mu, tuning, a)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def _measure(frameworks: list, config: str, beta: float, mu: int, tuning: str, a) -> list:
    """Each framework's run of one configuration, variant and tuning (the median of the
    repeats), printed with the ours/TRL ratios."""
    runs: dict[str, list[dict]] = {fw: [] for fw in frameworks}
    for _ in range(a.repeats):
        for fw in frameworks:
            r = _run(fw, config, beta, mu, a, tuning=tuning)
            if r is not None:
                runs[fw].append(r)
    row = {}
    for fw, rs in runs.items():
        if not rs:
            continue
        r = sorted(rs, key=lambda x: x["step_s"])[(len(rs) - 1) // 2]  # lower median
        r["repeats_step_s"] = [x["step_s"] for x in rs]
        r["gradient_checkpointing"] = a.gradient_checkpointing
        row[fw] = r
        _print(r)
    if "ours" in row and "trl" in row:
        ratio = row["ours"]["step_s"] / row["trl"]["step_s"]
        key = "peak_gpu_mb" if row["ours"].get("peak_gpu_mb") else "peak_rss_mb"
        mem = row["ours"][key] / row["trl"][key]
        print(f"    ours/trl step time {ratio:.2f}x, peak memory {mem:.2f}x", flush=True)
    return list(row.values())


def _run(
    fw: str, config: str, beta: float, mu: int, a, extra: tuple = (), tuning: str = "full"
) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", fw, "--config", config, "--beta", str(beta)]
    cmd += ["--mu", str(mu), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    cmd += ["--threads", str(a.threads), "--precision", a.precision, *extra]
    cmd += ["--zero-stage", str(a.zero_stage), "--tuning", tuning]
    if a.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if a.no_reuse:
        cmd.append("--no-reuse")
    env = {**os.environ, "GRPO_ENSEMBLE_LOAD_PLUGINS": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{fw} {config} {tuning} beta={beta} mu={mu} {extra} failed:")
        print(proc.stderr[-3000:])
        return None
    return json.loads(line.removeprefix("RESULT "))


def scaling(a) -> None:
    """Step time of the tiny configuration as completions per step, then length, double."""
    model_dir("tiny")
    rows = []
    for flag, values in (("--completions", (8, 16, 32, 64)), ("--new-tokens", (16, 32, 64, 128))):
        for v in values:
            r = _run("ours", "tiny", 0.0, 1, a, (flag, str(v)))
            if r is not None:
                r["varied"] = {flag.strip("-"): v}
                rows.append(r)
                print(f"{flag} {v:4d}: step {r['step_s'] * 1000:6.0f} ms", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def _print(r: dict) -> None:
    ph = " ".join(f"{k} {v * 1000:.0f}" for k, v in r["phases"].items())
    print(
        f"{r['framework']:>4} {r['config']:<6} {r.get('tuning', 'full'):<4} "
        f"beta={r['beta']:<4} mu={r['mu']} "
        f"step {r['step_s'] * 1000:7.0f} ms [{ph} ms] gen {r['gen_tokens_per_s']:7.0f} tok/s "
        f"train {r['train_tokens_per_s']:7.0f} tok/s {r['train_gflops']:6.1f} GFLOP/s "
        f"({100 * r['train_fraction_of_matmul']:.0f}% of {r['matmul_gflops']:.0f}) "
        f"rss {r['peak_rss_mb']:.0f} MB"
        + (f" gpu {r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") is not None else ""),
        flush=True,
    )


if __name__ == "__main__":
    main()
