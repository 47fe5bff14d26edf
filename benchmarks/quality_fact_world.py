"""ROME vs FT+L on the offline fact world: efficacy / paraphrase / neighbourhood success.

    python benchmarks/quality_fact_world.py [--n 50] [--seed 0] [--methods rome ft_l]
    python benchmarks/quality_fact_world.py --methods "ft_l:layer=0,norm_constraint=0.05"

A method may carry hyperparameter overrides after a colon (``name:key=value,...``).

Each record is edited independently (``editkit.eval.edit_quality``: apply, measure, revert).
Success compares the mean per-token log-probability of " " + target (CounterFact
convention, ``editkit.eval.counterfact_metrics``): ES = P(new) > P(true) on the rewrite
prompt, PS = the same on the paraphrase prompts (held-out templates), NS = P(true) > P(new)
on every neighbourhood prompt (other subjects with the same true object); S = their harmonic
mean (``editkit.eval.harmonic_mean``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import editkit
from editkit import EditRequest
from editkit.eval import edit_quality


def parse_method(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    return name, overrides


def evaluate(spec, model, tok, requests):
    method, overrides = parse_method(spec)
    cls = editkit.get_method(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hparams = cls.hparams_class.for_model(model, editkit.get_adapter(model))
        hparams = cls.hparams_class.from_dict({**hparams.to_dict(), **overrides})
        editor = cls(model, tok, hparams)
    t = time.perf_counter()
    editor.prepare()
    prep = time.perf_counter() - t
    return {**edit_quality(editor, requests), "prepare_s": prep, "hparams": editor.hparams}


def row(name: str, q: dict) -> str:
    cells = "  ".join(f"{k} {q[k]:.3f}" for k in ("ES", "PS", "NS", "S"))
    return f"{name:>10}: {cells}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["rome", "ft_l"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from editkit.testbed import FactWorld, load_fact_world

    model, tok = load_fact_world(train_if_missing=False)
    requests = [EditRequest.from_counterfact(r)
                for r in FactWorld().records(n=args.n, seed=args.seed)]
    print(f"fact world: {len(requests)} records (seed {args.seed}), independent edits")
    print(row("unedited", edit_quality((model, tok), requests)))
    for method in args.methods:
        r = evaluate(method, model, tok, requests)
        print(f"{row(method, r)}  ({r['seconds_per_edit']:.2f} s/edit, prepare "
              f"{r['prepare_s']:.1f} s)")
        print(f"{'':>12}hparams: {r['hparams'].to_dict()}")


if __name__ == "__main__":
    main()
