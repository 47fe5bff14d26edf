"""Run the passage-incorporation experiment of docs/results/passages.md.

One JSON line per passage and configuration is appended to ``OUT/<set>_<config>.jsonl`` as
soon as it is measured (a partial run is usable; a rerun skips passages already done), then
``scripts/passages_table.py`` turns the files into the tables.

    PYTHONPATH=. python scripts/passages_experiment.py --set factworld --config rome_last rome
    PYTHONPATH=. python scripts/passages_experiment.py --set smollm2 --config extract memit --n 18
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from editkit.passages import load_passages
from editkit.passages.evaluate import cloze_and_generation, evaluate_passage, extraction_scores
from editkit.passages.extractors import ModelExtractor, PatternExtractor

#: Configurations: (method, hyperparameter overrides of the method's defaults for the model,
#: extractor: None = the passage's true triples).
CONFIGS = {
    "ft_l": ("ft_l", None, None),
    "rome": ("rome", None, None),
    # ROME keyed on the prompt's last token at layer 2 (the variant of docs/results/
    # factworld.md): one key per (subject, relation) prompt instead of one per subject.
    "rome_last": ("rome", {"layer": 2, "value": {"fact_token": "last", "num_grad_steps": 20,
                                      "context_template_start": "words"}},
                  None),
    "memit": ("memit", None, None),
    # MEMIT keyed on the prompt's last token at layers (1, 2): does one key per fact (rather
    # than one per subject) rescue a batch of several facts of one subject?
    "memit_last": ("memit", {"layers": [1, 2], "value": {
        "fact_token": "last", "num_grad_steps": 25, "weight_decay": 0.0, "clamp_norm_factor": 4.0,
        "context_template_start": "words"}}, None),
    "alphaedit": ("alphaedit", None, None),
    "rome_last_pattern": ("rome", {"layer": 2, "value": {"fact_token": "last",
                                              "num_grad_steps": 20,
                                              "context_template_start": "words"}}, "pattern"),
    "memit_model": ("memit", None, "model"),
}


def load(name: str):
    if name == "factworld":
        from editkit.testbed import load_fact_world

        return load_fact_world()
    from editkit.testbed.smollm2 import load_smollm2

    return load_smollm2()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", required=True, choices=["factworld", "smollm2"])
    ap.add_argument("--config", nargs="+", required=True,
                    help=f"configurations: {sorted(CONFIGS)}, 'extract' (extractor P/R only) "
                         "or 'incontext' ((a) and (b) only, no edit)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--out", default="docs/results/passages")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    model, tok = load(args.set)
    records = load_passages(args.set, n=args.n)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference: dict[str, dict] = {}
    ref_path = out_dir / f"{args.set}_reference.jsonl"
    if ref_path.exists():
        for line in ref_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            reference[row["id"]] = row["reference"]
    for config in args.config:
        path = out_dir / f"{args.set}_{config}.jsonl"
        done = set()
        if path.exists():
            done = {json.loads(x)["id"] for x in path.read_text(encoding="utf-8").splitlines()}
        t0 = time.time()
        for rec in records:
            if rec.id in done:
                continue
            if config == "incontext":  # (a) and (b) only: no edit
                a = cloze_and_generation(model, tok, rec)
                b = cloze_and_generation(model, tok, rec, context=rec.passage)
                row = {"id": rec.id, "n_facts": len(rec.triples),
                       **{f"{k}_{m}": sum(v[m]) / len(v[m]) for k, v in (("a", a), ("b", b))
                          for m in ("cloze", "gen")}}
            elif config == "extract":
                extractor = PatternExtractor() if args.set == "factworld" else ModelExtractor()
                start = time.perf_counter()
                ex = extractor(rec.passage, model=model, tokenizer=tok)
                row = {"id": rec.id, **extraction_scores(ex.triples, rec.triples),
                       "seconds": time.perf_counter() - start,
                       "triples": [t.to_dict() for t in ex.triples],
                       "rejected": [r.to_dict() for r in ex.rejected], "raw": ex.raw}
            else:
                method, hparams, extractor = CONFIGS[config]
                row = evaluate_passage(model, tok, rec, method=method, hparams=hparams,
                                       extractor=extractor, reference=reference.get(rec.id))
                if rec.id not in reference:
                    reference[rec.id] = {k: row[k] for k in ("a_cloze", "a_gen", "b_cloze",
                                                             "b_gen", "ns_before", "ge_before")}
                    with ref_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps({"id": rec.id, "reference": reference[rec.id]}) + "\n")
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{config} {rec.id} c_cloze={row.get('c_cloze')} ns={row.get('ns_after')} "
                  f"P={row.get('precision')} R={row.get('recall')} "
                  f"({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
