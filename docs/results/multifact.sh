#!/usr/bin/env bash
# Regenerates the runs behind docs/results/multifact.md: the multiple-facts protocol
# (editkit eval --protocol multi_fact; editkit/eval/multifact.py) for MEMIT, ROME, FT+L and
# AlphaEdit on the offline fact world (N subjects, each with all 6 relations; matrix (ii) on
# the first PAIRS of them), then ROME and MEMIT on SmolLM2-135M-Instruct over the shipped
# real subjects with >= 2 known relations (editkit/testbed/data/multifact_real; first SN
# subjects, matrix (ii) skipped, C from MOM2 samples). Each run writes results.json, report.md and
# interference.png into docs/results/multifact/<model>_<method>/.
# Usage: bash docs/results/multifact.sh [factworld|smollm2 ...]   (default: both)
# Cost here (2 shared CPU cores): fact world ≈ 1 h for the four methods; SmolLM2 ≈ 30-60 s
# per ROME edit, 3 edits per record (alone, same subject, spread).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more threads than free cores is far slower
OUT=docs/results/multifact
N=${N:-30}
PAIRS=${PAIRS:-5}
SN=${SN:-3}
MOM2=${MOM2:-2000}
PARTS=("${@:-factworld smollm2}")
for part in ${PARTS[@]}; do
  if [ "$part" = factworld ]; then
    for method in memit rome ft_l alphaedit; do
      python -m editkit eval --model factworld --data factworld --protocol multi_fact \
        --n "$N" --pairwise-subjects "$PAIRS" --method "$method" --no-progress \
        --out "$OUT/factworld_$method"
    done
  elif [ "$part" = smollm2 ]; then
    DATA=$(python -c "from editkit.testbed.real_multifact import real_multifact_path as p; print(p())")
    for method in rome memit; do
      # The SmolLM2 preset with C from MOM2 pydoc samples (default 2000; the preset's 100000
      # take hours on this box and were not in the cache).
      HP=$(python -c "
import json, sys
from editkit.registry import get_method
from editkit.testbed.presets import MEMIT_SMOLLM2, ROME_SMOLLM2
preset = {'rome': ROME_SMOLLM2, 'memit': MEMIT_SMOLLM2}['$method']
hp = get_method('$method').hparams_class.from_dict({**preset, 'mom2_n_samples': $MOM2})
print(json.dumps(hp.to_dict()))")
      python -m editkit eval --model smollm2 --data "$DATA" --protocol multi_fact \
        --n "$SN" --pairwise-subjects 0 --method "$method" --hparams "$HP" --no-progress \
        --out "$OUT/smollm2_$method"
    done
  fi
done
