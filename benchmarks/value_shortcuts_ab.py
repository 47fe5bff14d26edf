"""v* with the previous default shortcuts vs the current ones, interleaved per record (issue 16).

    PYTHONPATH=. python benchmarks/value_shortcuts_ab.py --model factworld --steps 60 --n 6
    PYTHONPATH=. python benchmarks/value_shortcuts_ab.py --model smollm2 --steps 6 --n 2

Three configurations of :class:`editkit.methods.rome.ValueShortcuts` run ``compute_value``
on each record in turn (the reference's step counting, early stopping off so that every
configuration runs the same steps): the default before ``edit_block_once`` and
``ragged_rows`` ("previous"), ``edit_block_once`` alone on top of it, and today's default.
Printed: seconds per record and configuration (construction included), the medians, the
median per-record ratio current / previous, and the relative difference of v*.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings

import torch

import editkit
from editkit import EditRequest
from editkit.methods._locate.templates import generate_context_templates
from editkit.methods.rome import ROMEHyperParams, ValueShortcuts, compute_value

CONFIGS = {
    "previous": ValueShortcuts(edit_block_once=False, ragged_rows=False),
    "+ edited block once": ValueShortcuts(ragged_rows=False),
    "+ ragged rows (current)": ValueShortcuts(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("factworld", "smollm2"), default="factworld")
    ap.add_argument("--steps", type=int, default=60, help="v* steps (all run)")
    ap.add_argument("--n", type=int, default=6, help="records")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.model == "factworld":
        from editkit.testbed import FactWorld, load_fact_world

        model, tok = load_fact_world(train_if_missing=False)[:2]
        records = FactWorld().records(n=args.n, seed=0)
    else:
        from editkit.testbed.real_facts import real_facts
        from editkit.testbed.smollm2 import load_smollm2

        model, tok = load_smollm2()
        records = real_facts(args.n)
    requests = [EditRequest.from_counterfact(r) for r in records][: args.n]
    adapter = editkit.get_adapter(model)
    hp = ROMEHyperParams.for_model(model, adapter)
    hp.value = dataclasses.replace(hp.value, count_steps="reference",
                                   num_grad_steps=args.steps, early_stop_loss=0.0)
    templates = generate_context_templates(model, tok, hp.value.context_template_length_params,
                                           use_cache=False, start=hp.value.context_template_start)
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    worst = 0.0
    for request in requests:
        res = {}
        for name, sc in CONFIGS.items():
            t = time.perf_counter()
            res[name] = compute_value(model, tok, adapter, hp, request, templates, shortcuts=sc)
            times[name].append(time.perf_counter() - t)
        base = res["previous"].v_star
        diff = max(float((r.v_star - base).norm() / base.norm()) for r in res.values())
        worst = max(worst, diff)
        print(f"  {request.subject[:28]:28s} " + "  ".join(
            f"{k} {v[-1]:.2f}s" for k, v in times.items()) + f"  rel. |Δv*| {diff:.1e}",
            flush=True)
    first, last = next(iter(CONFIGS)), list(CONFIGS)[-1]
    print(f"\nv* per record ({args.steps} steps, construction included), median of "
          f"{len(requests)}:")
    for name, v in times.items():
        print(f"  {name:26s} {statistics.median(v):8.3f}s")
    ratio = statistics.median(a / b for a, b in zip(times[last], times[first], strict=True))
    print(f"median per-record ratio current / previous: {ratio:.2f}; max rel. |Δv*| {worst:.1e}")


if __name__ == "__main__":
    main()
