#!/usr/bin/env bash
# Regenerate docs/results/passages.md: the passage data, every run, the tables.
# Fact world: ≈ 25 min on one CPU core; SmolLM2: ≈ 1 h per method on one core (ROME ~25–60 s
# per edit here), so run the SmolLM2 configurations you need. Each run appends one JSON line per
# passage to docs/results/passages/<set>_<config>.jsonl and skips passages already there
# (delete the files to start afresh).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python scripts/build_passages.py            # 60 fact-world passages (deterministic)
python scripts/build_smollm2_passages.py    # 18 hand-written passages, re-checked on SmolLM2

python scripts/passages_experiment.py --set factworld \
  --config extract rome_last rome memit memit_last ft_l alphaedit rome_last_pattern
python scripts/passages_experiment.py --set smollm2 --config incontext extract memit rome ft_l alphaedit memit_model

python scripts/passages_table.py --write docs/results/passages.md
