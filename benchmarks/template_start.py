"""What the context-prefix sampler does to fact-world quality: ``start="eos"`` (the reference's
sampler, editkit's default since issue 16) vs ``start="words"`` (editkit's former sampler),
ROME and MEMIT with their fact-world presets, each record edited alone and reverted.

    PYTHONPATH=. python benchmarks/template_start.py --n 30

Also prints the prefixes' lengths in tokens (the former start words split into several
tokens on the fact world's small vocabulary) and seconds per edit.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import torch

import editkit
from editkit import EditRequest
from editkit.eval import edit_quality
from editkit.methods._locate.templates import PLAIN, generate_context_templates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--methods", nargs="+", default=["rome", "memit"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from editkit.testbed import FactWorld, load_fact_world

    model, tok = load_fact_world(train_if_missing=False)[:2]
    adapter = editkit.get_adapter(model)
    requests = [EditRequest.from_counterfact(r) for r in FactWorld().records(n=args.n, seed=0)]
    print(f"fact world, first {len(requests)} records (seed 0), independent edits")
    for method in args.methods:
        cls = editkit.get_method(method)
        base = cls.hparams_class.for_model(model, adapter)
        for start in ("words", "eos"):
            hp = dataclasses.replace(
                base, value=dataclasses.replace(base.value, context_template_start=start))
            templates = generate_context_templates(
                model, tok, hp.value.context_template_length_params,
                seed=hp.value.context_template_seed, start=start)
            lengths = [len(tok(t.replace(PLAIN, ""))["input_ids"]) for t in templates[1:]]
            q = edit_quality(cls(model, tok, hp), requests)
            print(f"{method:6s} start={start:5s}: ES {q['ES']:.3f}  PS {q['PS']:.3f}  "
                  f"NS {q['NS']:.3f}  S {q['S']:.3f}  {q['seconds_per_edit']:.2f} s/edit; "
                  f"prefix tokens {min(lengths)}-{max(lengths)}", flush=True)


if __name__ == "__main__":
    main()
