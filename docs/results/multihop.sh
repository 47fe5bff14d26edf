#!/usr/bin/env bash
# Regenerates docs/results/multihop.md's runs: the chain-world model and records, the SmolLM2
# two-hop records, and single-hop vs multi-hop success per method with the edit on the first
# or the second hop (benchmarks/multihop.py). Each run appends one JSON line per record to
# docs/results/multihop/<model>/<method>.jsonl (a rerun skips records already there; delete
# the directory for a fresh run) and rewrites summary.json / summary.md there.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more threads than free cores is far slower
OUT=docs/results/multihop
N=${N:-60}          # chain-world records per edited hop
N_SMOL=${N_SMOL:-34}  # SmolLM2 records per edited hop (the first N_SMOL chains; 63 = all)
# 1. the shipped chain-world model (skip if editkit/testbed/data/chain_world is current)
[ "${REBUILD:-0}" = 1 ] && python scripts/build_fact_world.py --world chain
[ "${REBUILD:-0}" = 1 ] && python scripts/build_two_hop.py
# 2. the chain world: FT+L, ROME, MEMIT, AlphaEdit
python benchmarks/multihop.py --model chainworld --methods ft,ft_l,rome,memit,alphaedit \
  --n "$N" --out "$OUT/chainworld"
# 2b. three hops (employer_country), ROME, edits at hop 1, 2 and 3
python benchmarks/multihop.py --model chainworld --methods rome --chains employer_country \
  --hops 1,2,3 --n 30 --out "$OUT/chainworld_3hop"
# 3. SmolLM2-135M: the four methods (10–80 s per edit on a shared CPU)
python benchmarks/multihop.py --model smollm2 --methods "${METHODS:-ft_l,rome,memit,alphaedit}" --n "$N_SMOL" \
  --out "$OUT/smollm2"
# 4. the EasyEdit portability view of ROME on the chain world (editkit eval --task portability)
HP=$(python -c "import json; from editkit.testbed.presets import ROME_FACT_WORLD as R; \
print(json.dumps({**R, 'mom2_dataset': 'chain_world'}))")
python -m editkit eval --task portability --model editkit/testbed/data/chain_world \
  --method rome --data chainworld --n 40 --seed 0 --hparams "$HP" --no-progress --no-raw \
  --out "$OUT/chainworld_portability_rome"
