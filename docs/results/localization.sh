#!/usr/bin/env bash
# Regenerates docs/results/localization.md's runs: the "Does localization inform editing?"
# study (Hase et al. 2023) on the fact world and on SmolLM2-135M. Each run writes traces.jsonl
# and edits.jsonl (one JSON line per trace / per edit, resumable), analysis.json, scatter.png
# and r2_bars.png into docs/results/localization/<run>/.
# Usage: bash docs/results/localization.sh [factworld|smollm2_reduced|smollm2_full ...]
#        (default: factworld smollm2_reduced). Under torchrun the facts are split over ranks:
#        torchrun --nproc_per_node 2 -m editkit study localization ... (same options).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more threads than free cores is far slower
OUT=docs/results/localization
RUNS=("${@:-factworld smollm2_reduced}")
for run in ${RUNS[@]}; do
  case "$run" in
    factworld)  # ≈ 45 min on one free CPU core (the committed run took ~1 h on a shared one)
      python -m editkit study localization --model factworld --n 100 --methods rome,ft \
        --layers 0,1,2,3 --objectives inject,erase,amplify,reverse_tracing,force \
        --force-samples 3 --set rome:value.num_grad_steps=20 \
        --set 'rome:value.context_template_length_params=[[5,2]]' \
        --no-progress --out "$OUT/factworld"
      for kind in mlp hidden; do  # both tracing effects; file names as committed
        python -m editkit study localization --model factworld --analyse-only \
          --effect-kind "$kind" --out "$OUT/factworld"
        mv "$OUT/factworld/analysis.json" "$OUT/factworld/analysis_$kind.json"
        mv "$OUT/factworld/scatter.png" "$OUT/factworld/scatter_$kind.png"
        mv "$OUT/factworld/r2_bars.png" "$OUT/factworld/r2_bars_$kind.png"
      done ;;
    smollm2_reduced)  # what fit the session: 5 facts, 2 layers (≈ 30 min on a shared core)
      python -m editkit study localization --model smollm2 --data real --n 5 \
        --methods rome,ft_l --layers 3,8 --objectives inject,erase,force --force-samples 2 \
        --set rome:value.num_grad_steps=20 \
        --set 'rome:value.context_template_length_params=[[5,2]]' \
        --set rome:mom2_n_samples=2000 --no-progress --out "$OUT/smollm2_reduced" ;;
    smollm2_full)  # the run: 30 facts, 6 layers, paper settings (≈ 720 edits; 10+ h)
      python -m editkit study localization --model smollm2 --data real --n 30 \
        --methods rome,ft_l --layers 0,3,6,9,14,20 --objectives inject,erase,force \
        --no-progress --out "$OUT/smollm2_full" ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
done
