"""``editkit suggest-layer``: the layer of maximal MLP AIE at the last subject token.

    editkit suggest-layer --model DIR --data counterfact.json --n 50 [--sweep rome]
    editkit suggest-layer --model factworld --n 50 --out out/

``--model`` and ``--data`` are as for ``editkit trace``. ``--sweep METHOD`` also edits at each
layer with that method and compares the edit quality with the traced curve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from editkit.cli.common import OptionError, check_method, check_number, check_writable, describe
from editkit.cli.trace import check_common, common_options, load, records
from editkit.tracing import layer_from_aie, layer_sweep, mlp_aie, plots


def add_parser(subparsers: Any) -> None:
    """Register ``editkit suggest-layer``."""
    s = subparsers.add_parser(
        "suggest-layer", help="the layer of maximal MLP AIE at the last subject token",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(s)
    s.add_argument("--sweep", metavar="METHOD",
                   help="also edit at each layer with this method (e.g. rome, ft) and compare")
    s.add_argument("--layers", help="comma list of layers to sweep (default all)")
    s.add_argument("--sweep-n", type=int, default=None,
                   help="records edited per layer in the sweep (default: as --n)")
    s.add_argument("--out", help="write suggest_layer.json (+ sweep JSON and plots) here")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``editkit suggest-layer``; returns the exit status."""
    check_common(args)
    facts = records(args, 50)
    sweep_layers = None
    if args.sweep:
        check_method(args.sweep)
        check_number("--sweep-n", args.sweep_n)
        if args.layers:
            try:
                sweep_layers = [int(x) for x in args.layers.split(",") if x.strip()]
            except ValueError:
                raise OptionError(f"--layers {args.layers!r}: give comma-separated layer "
                                  "indices, e.g. 3,4,5") from None
    elif args.layers or args.sweep_n is not None:
        raise OptionError("--layers and --sweep-n apply to the --sweep only; add --sweep METHOD "
                          "or leave them out")
    if args.out:
        check_writable("--out", args.out, directory=True)
    model, tokenizer = load(args)
    aie = mlp_aie(model, tokenizer, facts, window=args.window, samples=args.samples,
                  noise_multiple=args.noise_multiple, noise_std=args.noise_std,
                  seed=args.seed, batch_size=args.batch_size, answer=args.answer,
                  progress=not args.no_progress)
    layer, curve = layer_from_aie(aie)
    print(f"suggested layer: {layer}  (MLP AIE at the last subject token over "
          f"{aie.n_facts} facts, window {aie.window})")
    for i, value in enumerate(curve):
        se = aie.stderr[aie.groups.index("last subject token"), i]
        print(f"  layer {i:3d}  AIE {value:+.4f} ± {1.96 * se:.4f}{'  <-' if i == layer else ''}")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "suggest_layer.json").write_text(json.dumps(
            {"layer": layer, "curve": curve.tolist(), "aie": aie.to_dict()}, indent=1))
        plots.plot_aie({"mlp": aie}, out / "suggest_layer_aie")
    if args.sweep:
        layers = sweep_layers
        n_sweep = args.sweep_n if args.sweep_n is not None else len(facts)
        sweep = layer_sweep(args.sweep, model, tokenizer, facts[:n_sweep], layers,
                            trace_curve=curve, progress=not args.no_progress)
        print(f"{sweep.method} sweep over {sweep.n_records} records:")
        print("  layer  efficacy  magnitude  paraphrase  specificity  score  traced AIE")
        for i, lay in enumerate(sweep.layers):
            print(f"  {lay:5d}  {sweep.efficacy[i]:8.3f}  {sweep.efficacy_magnitude[i]:+9.3f}  "
                  f"{sweep.paraphrase[i]:10.3f}  {sweep.specificity[i]:11.3f}  "
                  f"{sweep.score[i]:5.3f}  {sweep.trace_curve[i]:+10.4f}")

        def fmt(r: float | None) -> str:
            return "n/a (constant)" if r is None else f"{r:+.3f}"

        print(f"best layer (score): {sweep.best_layer}; traced layer: {layer}; "
              f"{'agree' if sweep.agree else 'disagree'}")
        print(f"corr(traced AIE, efficacy) = {fmt(sweep.correlation)}, with efficacy magnitude "
              f"= {fmt(sweep.correlation_magnitude)}, with score = "
              f"{fmt(sweep.correlation_score)}")
        if out is not None:
            sweep.save(out / f"layer_sweep_{sweep.method}.json")
            plots.plot_layer_sweep(sweep, out / f"layer_sweep_{sweep.method}")
    return 0
