#!/usr/bin/env python
"""Build ``editkit/testbed/data/multifact_real/``: real subjects with >= 2 known relations.

The shipped real facts (``editkit/testbed/data/real_facts/counterfact.json``, built by
``scripts/build_real_facts.py``) were each filtered on the unedited SmolLM2-135M-Instruct
(see its ``meta.json``). This script keeps every subject that has ``--min-relations`` or more
records there, orders the subjects by number of relations (most first, ties by first
appearance) and their records by first appearance, and writes ``counterfact.json`` and
``meta.json``. It needs no model: the knowledge filter was applied per record upstream.

Usage::

    python scripts/build_real_multifact.py [--min-relations 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from editkit.testbed.real_facts import real_facts, real_facts_meta, real_facts_path
from editkit.testbed.real_multifact import real_multifact_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-relations", type=int, default=2)
    ap.add_argument("--out", type=Path, default=real_multifact_path().parent)
    args = ap.parse_args()
    by_subject: dict[str, list[dict]] = {}
    for rec in real_facts():
        by_subject.setdefault(rec["requested_rewrite"]["subject"], []).append(rec)
    kept = [(s, recs) for s, recs in by_subject.items() if len(recs) >= args.min_relations]
    order = {s: i for i, (s, _) in enumerate(kept)}
    kept.sort(key=lambda item: (-len(item[1]), order[item[0]]))
    records = [rec for _, recs in kept for rec in recs]
    upstream = real_facts_meta()
    meta = {
        "model": upstream.get("model"),
        "format": "CounterFact (ROME release schema)",
        "source": str(real_facts_path().relative_to(Path(__file__).resolve().parents[1])),
        "builder": "scripts/build_real_multifact.py",
        "filter": {"per_record": upstream.get("filter"),
                   "subjects": f">= {args.min_relations} records (relations) per subject"},
        "order": "subjects by number of relations (most first), ties by first appearance",
        "n_subjects": len(kept),
        "n_records": len(records),
        "subjects": {s: [r["requested_rewrite"]["relation_id"] for r in recs]
                     for s, recs in kept},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "counterfact.json").write_text(
        json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    print(f"wrote {len(records)} records of {len(kept)} subjects to {args.out}")


if __name__ == "__main__":
    main()
