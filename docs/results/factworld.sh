#!/usr/bin/env bash
# Regenerates the runs behind docs/results/factworld.md: FT, FT+L, ROME and MEMIT with their
# default hyperparameters on 100 fact-world records under the three protocols, plus ROME
# keyed on the prompt's last token (layer 2) as a variant. Each run writes results.json +
# report.md (+ retention.png) into docs/results/factworld/<run>_<protocol>/, and
# compare_<protocol>.md tables are rebuilt from them; docs/results/factworld.md quotes those.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more threads than free cores is far slower
OUT=docs/results/factworld
N=${N:-100}
run() {  # run <name> <method> <protocol> [extra args...]
  local name=$1 method=$2 protocol=$3
  shift 3
  local extra=()
  [ "$protocol" = batch ] && extra=(--batch-size 10)
  editkit eval --model factworld --data factworld --n "$N" --method "$method" \
    --protocol "$protocol" "${extra[@]}" --no-progress --no-raw \
    --out "$OUT/${name}_${protocol}" "$@"
}
LAST_HP=$(python -c "
import json
from editkit.methods.rome.hparams import ROMEHyperParams as H
hp = H(**H.FACT_WORLD).to_dict()
hp.update(layer=2, fact_token='last', v_num_grad_steps=20)
print(json.dumps(hp))")
for protocol in independent sequential batch; do
  for method in ft ft_l rome memit; do
    run "$method" "$method" "$protocol"
  done
  run rome_last rome "$protocol" --hparams "$LAST_HP" --label "rome (last token, l=2)"
  editkit compare "$OUT"/{ft,ft_l,rome,rome_last,memit}_"$protocol" \
    --title "Fact world, $N records, protocol: $protocol" --out "$OUT/compare_$protocol.md"
done
