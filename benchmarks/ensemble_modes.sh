#!/usr/bin/env bash
# The ensemble experiment of docs/ensembles.md: solo vs each peer mode vs on-failure injection,
# several seeds, each run through the project's own CLI and held-out evaluation.
#   bash benchmarks/ensemble_modes.sh [SEEDS...]        (default seeds: 0 1 2)
# Prints one line per run: configuration, seed, accuracy before, after, wall seconds.
set -euo pipefail
if [ $# -gt 0 ]; then seeds=("$@"); else seeds=(0 1 2); fi
configs=(
  "solo|recipes/quickstart-solo.yaml|"
  "on_policy|recipes/ensemble-always.yaml|peers.0.mode=on_policy"
  "shaped|recipes/ensemble-always.yaml|peers.0.mode=shaped"
  "tis|recipes/ensemble-always.yaml|peers.0.mode=tis"
  "baseline_only|recipes/ensemble-always.yaml|peers.0.mode=baseline_only"
  "on_failure|recipes/quickstart.yaml|"
)
for seed in "${seeds[@]}"; do
  for c in "${configs[@]}"; do
    IFS='|' read -r name recipe extra <<<"$c"
    rm -rf "runs/modes/$name-$seed"  # a fresh run (a directory with checkpoints is refused)
    args=(--set log.progress=false --set seed="$seed" --set output_dir="runs/modes/$name-$seed")
    [ -n "$extra" ] && args+=(--set "$extra")
    start=$SECONDS
    out=$(grpo-ensemble train "$recipe" "${args[@]}" 2>/dev/null)
    secs=$((SECONDS - start))
    before=$(grep -o 'before training: [0-9.]*' <<<"$out" | grep -o '[0-9.]*$')
    after=$(grep -o 'after training: [0-9.]*' <<<"$out" | grep -o '[0-9.]*$')
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$seed" "$before" "$after" "$secs"
  done
done
