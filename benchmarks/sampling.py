"""The sampling loop alone: the usual lean decode step against the static one (on a GPU, the
CUDA graph it is replayed as), with and without a recording for the replay, in one process.

    python benchmarks/sampling.py --config big --precision bf16 --rounds 3   # on a GPU
    python benchmarks/sampling.py --config tiny --rounds 5                   # on a CPU

`sample` of the configuration's model (the benchmark's model files, built once: see
grpo_step.py) over `completions` rows of a few 8-token prompts (each `group` times), exactly
`new_tokens` new tokens a row. First the two ways' tokens, log-probs and recordings for the same
seeds are compared; then one warm-up call of each way, and `rounds` rounds of all four ways,
alternating; the median, least and greatest time of each, in ms. On a CPU the static step runs
without a graph (and is not what sampling uses there: it attends over the whole cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from grpo_step import CONFIGS, model_dir  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from grpo_ensemble.engine import decode  # noqa: E402
from grpo_ensemble.engine.recording import BufferPool, Recording  # noqa: E402
from grpo_ensemble.engine.sampling import sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (on a CPU)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    c = CONFIGS[a.config]
    model = AutoModelForCausalLM.from_pretrained(model_dir(a.config), dtype=dtype)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = torch.randint(5, vocab - 1, (c["completions"] // c["group"], 8), generator=g)
    ids = prompts.repeat_interleave(c["group"], 0).to(device)
    mask = torch.ones_like(ids)
    new = c["new_tokens"]
    pool = BufferPool()
    seeds = list(range(len(ids)))
    usual = set(decode.STATIC_DEVICES)

    def run(static: bool, record: bool):
        decode.STATIC_DEVICES.clear()
        decode.STATIC_DEVICES.update({device} if static else set())
        rec = Recording(new - 1, pool) if record else None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sample(model, ids, mask, new, 2, 0, seeds=seeds, min_new_tokens=new, recording=rec)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out, rec

    try:
        _, lean, rec_lean = run(False, True)
        _, static, rec_static = run(True, True)
        same = (lean[0] == static[0]).float().mean().item()
        dlogp = (lean[1] - static[1]).abs().max().item()
        print(f"{a.config} {a.precision} on {device}: tokens the same {same:.4f}, ", end="")
        print(f"max |Δ logp| {dlogp:.2e}")
        if rec_lean.filled and rec_static.filled:
            for name, buf in rec_lean.layers[0].items():
                other = rec_static.layers[0][name]
                d = (buf[: rec_lean.steps].float() - other[: rec_static.steps].float()).abs().max()
                print(f"  recording, layer 0, {name}: max |Δ| {d.item():.2e}")
        del rec_lean, rec_static
        ways = {(s, r): [] for s in (False, True) for r in (False, True)}
        for s, r in ways:  # warm-up
            run(s, r)
        for _ in range(a.rounds):
            for (s, r), times in ways.items():
                times.append(run(s, r)[0] * 1000)
    finally:
        decode.STATIC_DEVICES.clear()
        decode.STATIC_DEVICES.update(usual)
    label = "static (CUDA graph)" if device == "cuda" else "static (no graph)"
    for (s, r), times in ways.items():
        name = (label if s else "lean") + (" + recording" if r else "")
        print(
            f"{name:32s} median {statistics.median(times):8.1f} ms  "
            f"min {min(times):8.1f}  max {max(times):8.1f}  ({len(ids)} rows × {new} tokens)"
        )
    if device == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
