#!/usr/bin/env python
"""Why one subject's ROME edits collide: how similar are the keys k* of its relations?

ROME's key k* (Meng et al. 2022, eq. 3) is the edited MLP's input at the subject's last token,
averaged over context prefixes. In a causal model it depends only on the tokens up to that
position, so two relations whose rewrite prompts put the same text before the subject
(``"{} was born in"`` and ``"{} works as a"``: nothing) share k* exactly, and ROME's second
edit (Ŵ k* = v*) writes over the first one's value. This script measures, on the fact world
with the ROME preset, the cosine between k* of two relations of one subject (split by
whether the text before the subject is identical), and between k* of different subjects.

    python scripts/multifact_keys.py [--n-subjects 30] [--out docs/results/multifact/keys.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-subjects", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("docs/results/multifact/keys.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from editkit.eval.multifact import group_by_subject
    from editkit.methods._locate.keys import compute_key
    from editkit.registry import get_method
    from editkit.testbed import FactWorld, load_fact_world

    model, tok = load_fact_world()
    editor = get_method("rome")(model, tok)
    editor.prepare()
    layer = editor.hparams.layer
    groups = group_by_subject(FactWorld().records())[: args.n_subjects]
    keys = {}
    for g in groups:
        for r in g.records:
            res = compute_key(model, tok, editor.adapter, layer, r.request,
                              editor.context_templates)
            keys[r.case_id] = (g.subject, r.request.prompt.split("{}")[0], res.k_star)

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    same_prefix, other_prefix, other_subject = [], [], []
    for g in groups:
        for a, b in itertools.combinations(g.records, 2):
            _, pa, ka = keys[a.case_id]
            _, pb, kb = keys[b.case_id]
            (same_prefix if pa == pb else other_prefix).append(cos(ka, kb))
    firsts = [keys[g.records[0].case_id][2] for g in groups]
    other_subject = [cos(a, b) for a, b in itertools.combinations(firsts, 2)]

    def stats(xs):
        return {"n": len(xs), "mean": sum(xs) / len(xs) if xs else None,
                "min": min(xs) if xs else None, "max": max(xs) if xs else None}

    out = {"layer": layer, "n_subjects": len(groups),
           "same_subject_same_prefix": stats(same_prefix),
           "same_subject_other_prefix": stats(other_prefix),
           "different_subjects": stats(other_subject)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
