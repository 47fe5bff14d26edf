#!/usr/bin/env bash
# Regenerates the runs behind docs/results/factworld.md: FT, FT+L and ROME with their
# default hyperparameters on 100 fact-world records under the three protocols, plus ROME
# edited at the subject's last token (the paper's choice) as a variant. Each run writes
# results.json + report.md (+ retention.png) into docs/results/factworld/<run>/; `compare`
# joins them. (`python -m editkit.eval.cli` = `editkit eval` / `editkit compare`.)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more threads than free cores is far slower
OUT=docs/results/factworld
N=${N:-100}
run() {  # run <name> <method> <protocol> [extra args...]
  local name=$1 method=$2 protocol=$3
  shift 3
  python -m editkit.eval.cli eval --model factworld --data factworld --n "$N" \
    --method "$method" --protocol "$protocol" --no-progress --no-raw \
    --out "$OUT/${name}_${protocol}" "$@"
}
for method in ft ft_l rome; do
  run "$method" "$method" independent
  run "$method" "$method" sequential
  run "$method" "$method" batch --batch-size 10
done
# ROME as in the paper: the key/value of the subject's last token (layer 0, 60 steps).
SUBJECT_HP=$(python -c "
import json
from editkit.methods.rome.hparams import ROMEHyperParams as H
hp = H(**H.FACT_WORLD).to_dict()
hp.update(layer=0, fact_token='subject_last', v_num_grad_steps=60)
print(json.dumps(hp))")
for protocol in independent sequential; do
  run rome_subject rome "$protocol" --hparams "$SUBJECT_HP" --label "rome (subject_last, l=0)"
done
for protocol in independent sequential batch; do
  python -m editkit.eval.cli compare "$OUT"/*_"$protocol" \
    --title "Fact world, $N records, protocol: $protocol" --out "$OUT/compare_$protocol.md"
done
