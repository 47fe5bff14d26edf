#!/usr/bin/env bash
# Regenerates the runs behind docs/results/multifact.md: the multiple-facts protocol
# (editkit eval --protocol multi_fact; editkit/eval/multifact.py) on the offline fact world
# (first N subjects of FactWorld().records(), each with all 6 relations; matrix (ii) on the
# first PAIRS of them) and on SmolLM2-135M-Instruct over the shipped real subjects with >= 2
# known relations (editkit/testbed/data/multifact_real; matrix (ii) skipped). Each run writes
# results.json, report.md and interference.png into docs/results/multifact/<model>_<method>/.
#
# Usage: bash docs/results/multifact.sh [RUN ...]   (default: every run below)
#   RUN is one of factworld_memit factworld_rome factworld_ft_l factworld_alphaedit
#   smollm2_rome smollm2_memit smollm2_ft_l smollm2_alphaedit.
# Sizes are what fitted on 2 CPU cores shared by five sessions (see the doc); the full-size
# runs are e.g. `N=30 PAIRS=30 bash docs/results/multifact.sh factworld_rome` (sizes given
# in the environment override every run's).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more threads than free cores is far slower
OUT=docs/results/multifact
MOM2=${MOM2:-2000}  # SmolLM2: pydoc samples for C (the preset's 100000 take hours here)

factworld() {  # factworld <method> <subjects> <pairwise subjects>
  python -m editkit eval --model factworld --data factworld --protocol multi_fact \
    --n "${N:-$2}" --pairwise-subjects "${PAIRS:-$3}" --method "$1" --no-progress \
    --out "$OUT/factworld_$1"
}

smollm2() {  # smollm2 <method> <subjects>: the SmolLM2 preset with C from MOM2 samples
  local hp data
  # FT+L has no SmolLM2 preset and no statistics: its defaults scaled to 30 layers
  hp=$(python -c "
import json
from editkit.registry import get_method
from editkit.testbed.presets import MEMIT_SMOLLM2, ROME_SMOLLM2
preset = {'rome': ROME_SMOLLM2, 'memit': MEMIT_SMOLLM2, 'alphaedit': {**MEMIT_SMOLLM2, 'l2': 1.0},
          'ft_l': None}['$1']
print('' if preset is None else json.dumps(get_method('$1').hparams_class.from_dict(
    {**preset, 'mom2_n_samples': $MOM2}).to_dict()))")
  data=$(python -c "from editkit.testbed.real_multifact import real_multifact_path as p; print(p())")
  python -m editkit eval --model smollm2 --data "$data" --protocol multi_fact \
    --n "${SN:-$2}" --pairwise-subjects 0 --method "$1" ${hp:+--hparams "$hp"} --no-progress \
    --out "$OUT/smollm2_$1"
}

RUNS=("${@:-factworld_memit factworld_rome factworld_ft_l factworld_alphaedit smollm2_rome smollm2_memit smollm2_ft_l smollm2_alphaedit}")
for run in ${RUNS[@]}; do
  case "$run" in
    factworld_memit) factworld memit 30 5 ;;
    factworld_rome) factworld rome 30 2 ;;
    factworld_ft_l) factworld ft_l 30 3 ;;
    factworld_alphaedit) factworld alphaedit 30 2 ;;
    smollm2_rome) smollm2 rome 2 ;;
    smollm2_memit) smollm2 memit 2 ;;
    smollm2_ft_l) smollm2 ft_l 2 ;;
    smollm2_alphaedit) smollm2 alphaedit 2 ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
done
python -c "
from pathlib import Path
from editkit.eval.multifact import compare_multifact
runs = [p for p in sorted(Path('$OUT').glob('*/results.json'))]
Path('$OUT/compare.md').write_text(compare_multifact(runs, 'Multiple facts, every run'))"
