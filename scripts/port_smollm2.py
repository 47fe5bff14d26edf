"""Port editing to SmolLM2-135M the way the ROME authors ported it to new models.

    python scripts/port_smollm2.py trace  [--n 20]             # causal trace the real facts
    python scripts/port_smollm2.py sweep  [--n 10] [--layers 2,4,6,...]   # ROME layer sweep
    python scripts/port_smollm2.py stats  [--n 30]             # pydoc vs generated statistics
    python scripts/port_smollm2.py memit-lambda [--n 10]       # MEMIT's λ on a few facts

Every stage writes its raw numbers (JSON) and plots under ``docs/smollm2/`` and prints a
summary; ``docs/smollm2.md`` discusses them. The facts are the shipped real-fact file
(``editkit.testbed.real_facts``), all of which the unedited model gets right.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from editkit.requests import EditRequest
from editkit.testbed.real_facts import interleave_relations, real_facts
from editkit.testbed.smollm2 import load_smollm2

OUT = Path(__file__).resolve().parents[1] / "docs" / "smollm2"


def facts(args) -> list[dict]:
    """The first ``args.n`` real facts taken round-robin over the relations (the shipped file
    is already in that order; a ``--data`` file may be grouped by relation)."""
    records = json.loads(Path(args.data).read_text()) if args.data else real_facts()
    return interleave_relations(records)[: args.n]


def _trace(args, model, tok) -> None:
    from editkit.tracing import KINDS, aie_by_kind, plots, scaled_window, trace_records
    from editkit.tracing.layers import layer_from_aie

    records = facts(args)
    t0 = time.perf_counter()
    # the settings of the committed docs/smollm2/trace (before the tracer's defaults became
    # the paper's): window 6 = 10 scaled to 30 layers, every record traced on target_true
    traces = trace_records(model, tok, records, kinds=KINDS, answer="target_true",
                           window=scaled_window(model.config.num_hidden_layers))
    elapsed = time.perf_counter() - t0
    out = OUT / "trace"
    out.mkdir(parents=True, exist_ok=True)
    (out / "traces.json").write_text(json.dumps([{k: r.to_dict() for k, r in t.items()}
                                                 for t in traces]))
    for i, res in enumerate(traces[:3]):
        plots.plot_traces(res, out / f"record_{i}")
    aies = aie_by_kind(traces)
    (out / "aie.json").write_text(json.dumps({k: a.to_dict() for k, a in aies.items()}, indent=1))
    plots.plot_aie(aies, out / "aie")
    plots.plot_aie_heatmaps(aies, out / "aie_heatmap")
    suggestion = layer_from_aie(aies["mlp"])
    (out / "suggest_layer.json").write_text(json.dumps(
        {"layer": suggestion.layer, "curve": [float(x) for x in suggestion.curve],
         "n_facts": len(traces), "seconds": elapsed}, indent=1))
    first = aies["hidden"]
    print(f"traced {len(traces)} facts in {elapsed:.0f}s (p clean {first.p_clean:.3f}, "
          f"corrupted {first.p_corrupt:.3f}); suggest_layer → {suggestion.layer}")
    for kind, aie in aies.items():
        for g, name in enumerate(aie.groups):
            if aie.counts[g]:
                print(f"  {kind:6s} {name:26s} max {aie.mean[g].max():+.3f} @ layer "
                      f"{int(aie.mean[g].argmax())}")


def _sweep(args, model, tok) -> None:
    from editkit.methods.rome import ROMEHyperParams
    from editkit.registry import get_adapter
    from editkit.stats import second_moment
    from editkit.tracing import plots
    from editkit.tracing.layers import layer_sweep

    layers = [int(x) for x in args.layers.split(",")]
    hp = ROMEHyperParams.for_model(model, get_adapter(model))
    # One pass over the statistics text for every candidate layer (the editors then hit the cache).
    second_moment(model, layers, hp.mom2_dataset, tokenizer=tok, n_samples=hp.mom2_n_samples,
                  max_length=hp.mom2_max_length, dtype=hp.mom2_dtype)
    trace_file = OUT / "trace" / "suggest_layer.json"
    curve = json.loads(trace_file.read_text())["curve"] if trace_file.is_file() else None
    t0 = time.perf_counter()
    sweep = layer_sweep("rome", model, tok, facts(args)[args.skip:], layers, hparams=hp,
                        trace_curve=curve, trace=False)
    out = OUT / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    name = f"layer_sweep_rome{args.tag}"
    sweep.save(out / f"{name}.json")
    plots.plot_layer_sweep(sweep, out / name)
    print(f"ROME sweep over {sweep.n_records} facts in {time.perf_counter() - t0:.0f}s")
    for i, lay in enumerate(sweep.layers):
        print(f"  layer {lay:2d}: ES {sweep.ES[i]:.3f}  PS {sweep.PS[i]:.3f}  "
              f"NS {sweep.NS[i]:.3f}  S {sweep.S[i]:.3f}")
    print(f"best layer {sweep.best_layer}; correlation with the traced curve: "
          f"{sweep.correlation_score}")


def _edit_scores(editor_cls, hp, model, tok, records) -> dict[str, float]:
    """Independent edits (apply, score, revert) with one editor; mean ES, EM, PS, NS
    (editkit.eval.edit_success) and s/edit."""
    from editkit.eval import edit_success

    editor = editor_cls(model, tok, hp)
    editor.prepare()
    rows, t0 = [], time.perf_counter()
    for rec in records:
        req = EditRequest.from_counterfact(rec)
        with editor.applied(req):
            rows.append(edit_success(model, tok, req))
    out = {k: float(np.mean([r[k] for r in rows if r[k] is not None]))
           for k in ("ES", "EM", "PS", "NS")}
    out["seconds_per_edit"] = (time.perf_counter() - t0) / len(records)
    return out


def _stats(args, model, tok) -> None:
    from editkit.methods.rome import ROME, ROMEHyperParams
    from editkit.registry import get_adapter
    from editkit.stats import generate_texts

    base = ROMEHyperParams.for_model(model, get_adapter(model))
    records = facts(args)
    t0 = time.perf_counter()
    generate_texts(model, tok, args.generated, length=128)
    gen_seconds = time.perf_counter() - t0
    results = {}
    for source, n_samples in (("pydoc", base.mom2_n_samples), ("generated", args.generated)):
        hp = dataclasses.replace(base, mom2_dataset=source, mom2_n_samples=n_samples)
        results[source] = _edit_scores(ROME, hp, model, tok, records)
        print(source, results[source])
    results["generated_sampling_seconds"] = gen_seconds
    out = OUT / "stats"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats_sources.json").write_text(json.dumps(results, indent=1))


def _memit_lambda(args, model, tok) -> None:
    from editkit.methods.memit import MEMIT, MEMITHyperParams
    from editkit.registry import get_adapter

    base = MEMITHyperParams.for_model(model, get_adapter(model))
    records = facts(args)
    results = {}
    for lam in [float(x) for x in args.lambdas.split(",")]:
        hp = dataclasses.replace(base, mom2_update_weight=lam)
        results[str(lam)] = _edit_scores(MEMIT, hp, model, tok, records)
        print(f"λ={lam:g}", results[str(lam)])
    out = OUT / "memit"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memit_lambda.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["trace", "sweep", "stats", "memit-lambda"])
    parser.add_argument("--n", type=int, default=None, help="facts (default per stage)")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first SKIP facts")
    parser.add_argument("--tag", default="", help="suffix of the sweep's output files")
    parser.add_argument("--data", default=None, help="CounterFact JSON (default: shipped)")
    parser.add_argument("--layers", default="1,3,5,7,9,12,15,18,22")
    parser.add_argument("--generated", type=int, default=256, help="generated texts for C")
    parser.add_argument("--lambdas", default="1000,15000,100000")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.n = args.n or {"trace": 20, "sweep": 10, "stats": 30, "memit-lambda": 10}[args.stage]
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    {"trace": _trace, "sweep": _sweep, "stats": _stats, "memit-lambda": _memit_lambda}[
        args.stage](args, model, tok)


if __name__ == "__main__":
    main()
