"""ROME vs FT+L on the offline fact world: efficacy / paraphrase / neighbourhood success.

    python benchmarks/quality_fact_world.py [--n 50] [--seed 0] [--methods rome ft_l]
    python benchmarks/quality_fact_world.py --methods "ft_l:layer=0,norm_constraint=0.05"

A method may carry hyperparameter overrides after a colon (``name:key=value,...``).

Each record is edited independently (apply, measure, revert). Success compares the mean
per-token log-probability of " " + target (CounterFact convention): ES = P(new) > P(true) on
the rewrite prompt, PS = the same on the paraphrase prompts (held-out templates), NS =
P(true) > P(new) on neighbourhood prompts (other subjects with the same true object).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import editkit
from editkit import EditRequest
from editkit.tokens import score_targets


def success(model, tok, prompts, first, second) -> float:
    a = score_targets(model, tok, prompts, [first] * len(prompts))
    b = score_targets(model, tok, prompts, [second] * len(prompts))
    return (a > b).float().mean().item()


def record_scores(model, tok, rec) -> tuple[float, float, float]:
    rw = rec["requested_rewrite"]
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    return (success(model, tok, [rw["prompt"].format(rw["subject"])], new, true),
            success(model, tok, rec["paraphrase_prompts"], new, true),
            success(model, tok, rec["neighborhood_prompts"], true, new))


def parse_method(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    return name, overrides


def evaluate(spec, model, tok, records):
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
    es, ps, ns, secs = [], [], [], []
    for rec in records:
        t = time.perf_counter()
        editor.apply(EditRequest.from_counterfact(rec))
        secs.append(time.perf_counter() - t)
        e, p, n = record_scores(model, tok, rec)
        es.append(e)
        ps.append(p)
        ns.append(n)
        editor.revert()
    return {"ES": statistics.mean(es), "PS": statistics.mean(ps), "NS": statistics.mean(ns),
            "s/edit": statistics.mean(secs), "prepare_s": prep, "hparams": editor.hparams}


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
    records = FactWorld().records(n=args.n, seed=args.seed)
    print(f"fact world: {len(records)} records (seed {args.seed}), independent edits")
    es, ps, ns = zip(*(record_scores(model, tok, r) for r in records), strict=True)
    print(f"{'unedited':>10}: ES {statistics.mean(es):.3f}  PS {statistics.mean(ps):.3f}  "
          f"NS {statistics.mean(ns):.3f}")
    for method in args.methods:
        r = evaluate(method, model, tok, records)
        s = statistics.harmonic_mean([r["ES"], r["PS"], r["NS"]])
        print(f"{method:>10}: ES {r['ES']:.3f}  PS {r['PS']:.3f}  NS {r['NS']:.3f}  S {s:.3f}  "
              f"({r['s/edit']:.2f} s/edit, prepare {r['prepare_s']:.1f} s)")
        print(f"{'':>12}hparams: {r['hparams'].to_dict()}")


if __name__ == "__main__":
    main()
