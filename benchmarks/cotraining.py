"""The co-training measurement of docs/ensembles.md: two policies trained together (each a
peer of the other) against each trained alone and each trained with the other frozen as its
peer, at equal samples and steps, over seeds; held-out accuracy through the project's own CLI.

    python benchmarks/cotraining.py --seeds 0 1 2 --task arithmetic --out results.json

Every configuration starts from `recipes/cotrain.yaml` (the two policies, their samples per
prompt, sampling, injection, loss and schedule); a policy trained alone or with a frozen peer
keeps its own entry's settings, and the frozen peer samples as the co-trained policy did.
Prints one line per run and, at the end, a markdown table: each configuration's accuracy
per seed and its mean with a 95% t-interval over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "arithmetic": ("builtin:arithmetic/train", "builtin:arithmetic/test"),
    "arithmetic-chat": ("builtin:arithmetic-chat/train", "builtin:arithmetic-chat/test"),
}
OWN = ("name", "mode", "train", "loss")  # a policy entry's fields that `policy` has not


def configurations(co: dict) -> dict[str, tuple[dict, str | None]]:
    """name → (recipe, the policy it trains; None: both): the co-trained pair, each policy
    alone, each with the other frozen."""
    a, b = co["policies"]
    out = {"co-trained": (co, None)}
    for me, other in ((a, b), (b, a)):
        solo = {k: v for k, v in co.items() if k not in ("policies", "placement")}
        solo["policy"] = {k: v for k, v in me.items() if k not in OWN}
        solo["train"] = {**co.get("train", {}), **me.get("train", {})}
        solo["loss"] = {**co.get("loss", {}), **me.get("loss", {})}
        out[f"{me['name']} alone"] = (solo, me["name"])
        peered = copy.deepcopy(solo)
        peer = {k: v for k, v in other.items() if k not in ("train", "loss")}
        peered["peers"] = [peer]
        out[f"{me['name']} + frozen {other['name']}"] = (peered, me["name"])
    return out


def accuracies(run_dir: Path, co: bool) -> dict[str, tuple[float, float]]:
    """policy name → (accuracy before, after), from each evaluation file."""
    dirs = sorted((run_dir / "policies").iterdir()) if co else [run_dir]
    out = {}
    for d in dirs:
        rows = json.loads((d / "eval.json").read_text())
        before = next(r["accuracy"] for r in rows if r["when"] == "before")
        after = next(r["accuracy"] for r in rows if r["when"] == "after")
        out[d.name if co else "policy"] = (before, after)
    return out


def run(recipe: dict, out: Path, seed: int) -> tuple[dict, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(recipe, fh)
    args = [sys.executable, "-m", "grpo_ensemble", "train", fh.name]
    args += ["--set", f"seed={seed}", "--set", f"output_dir={out}", "--set", "log.progress=false"]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    Path(fh.name).unlink()
    if proc.returncode:
        raise SystemExit(f"{out}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return accuracies(out, "policies" in recipe), seconds


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over the values."""
    from grpo_ensemble.report.stats import t_quantile

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile(n - 1) * (var / n) ** 0.5


def table(results: list[dict], seeds: list[int]) -> str:
    rows = {}
    for r in results:
        rows.setdefault((r["policy"], r["configuration"]), {})[r["seed"]] = r["after"]
    head = "| policy | trained | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95% |"
    lines = [head, "| --- | --- | " + "--- | " * len(seeds) + "--- |"]
    for (policy, config), by_seed in rows.items():
        values = [by_seed[s] for s in seeds if s in by_seed]
        mean, half = interval(values)
        cells = " | ".join(f"{100 * by_seed[s]:.1f}%" if s in by_seed else "" for s in seeds)
        lines.append(f"| {policy} | {config} | {cells} | {100 * mean:.1f}% ± {100 * half:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cotrain.yaml"))
    ap.add_argument("--runs", default="runs/cotraining", help="where the run directories go")
    ap.add_argument("--out", help="write every run's figures to this JSON file")
    args = ap.parse_args()
    co = yaml.safe_load(Path(args.recipe).read_text())
    co["data"] = {**co.get("data", {}), "train": TASKS[args.task][0], "eval": TASKS[args.task][1]}
    results = []
    for seed in args.seeds:
        for config, (recipe, who) in configurations(co).items():
            slug = config.replace(" + ", "-with-").replace(" ", "-")
            out = Path(args.runs) / args.task / f"{slug}-{seed}"
            if out.exists():
                raise SystemExit(f"{out} exists: remove it or give another --runs")
            found, seconds = run(recipe, out, seed)
            for policy, (before, after) in found.items():
                row = {
                    "task": args.task,
                    "configuration": config,
                    "policy": who or policy,
                    "seed": seed,
                    "before": before,
                    "after": after,
                    "seconds": round(seconds),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
