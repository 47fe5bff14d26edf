"""``editkit trace``: causal tracing from the command line.

    editkit trace --model DIR --prompt "{} was born in" --subject "Ada Lovelace" --out out/
    editkit trace --model DIR --data counterfact.json --n 100 --aie --out out/
    editkit trace --model factworld --n 50 --aie --sever --out docs/tracing/

``--model`` is a directory written by ``save_pretrained`` (model and tokenizer) or
``factworld`` (the offline fact world, whose own records are the default ``--data``).
``--data`` is a JSON list of CounterFact records. By default, as the paper and the reference
code, each record is traced on the model's prediction and records whose ``target_true`` the
model does not predict are skipped (``--answer target_true`` traces them all). Defaults follow
the paper: ν = 3σ (σ over the subjects' token embeddings), 10 Gaussian samples, window 10
clipped to the depth; ``--noise-std`` is an absolute ν (the reference code's ``noise``).
Outputs: JSON of the raw numbers, token × layer heatmaps (PNG + SVG) and, with ``--aie``,
the average indirect effect by token group with 95 % bands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from editkit.cli.common import (
    MODEL_CHOICES,
    OptionError,
    add_dtype_option,
    check_device,
    check_model,
    check_number,
    check_writable,
    describe,
    is_fact_world,
    load_model,
)
from editkit.distributed import (
    default_group,
    gather_in_order,
    rank_and_world,
    shard_indices,
    torchrun_group,
)
from editkit.errors import DatasetFormatError, InvalidRequestError
from editkit.testbed import FactWorld
from editkit.tracing import SEVERED_KINDS, CausalTracer, aie_by_kind, plots, trace_naive
from editkit.tracing.kinds import check_kinds, default_window
from editkit.tracing.trace import as_trace_requests


def common_options(p: argparse.ArgumentParser) -> None:
    """Options ``trace`` and ``suggest-layer`` share."""
    p.add_argument("--model", required=True, help=MODEL_CHOICES)
    p.add_argument("--data", help="JSON list of CounterFact records (default for factworld: "
                                  "its own records)")
    p.add_argument("--n", type=int, default=None, help="trace the first N records")
    p.add_argument("--window", type=int, default=None,
                   help="MLP/attention window, labelled by its centre (default: the paper's "
                        "10, clipped to the depth)")
    p.add_argument("--samples", type=int, default=10, help="noise samples (paper: 10)")
    p.add_argument("--noise-multiple", type=float, default=None,
                   help="ν = NOISE_MULTIPLE × σ, σ over the subjects (default 3, the paper's)")
    p.add_argument("--noise-std", type=float, default=None,
                   help="absolute ν instead (the reference code's noise=, e.g. 0.1)")
    p.add_argument("--noise", type=float, default=None, help=argparse.SUPPRESS)  # deprecated
    p.add_argument("--answer", choices=("predicted", "target_true"), default="predicted",
                   help="with records: trace the model's prediction and skip the records "
                        "it gets wrong (default, the paper's), or trace every target_true")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="rows (restorations × samples) per forward")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_dtype_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def check_common(args: argparse.Namespace) -> None:
    """The options of :func:`common_options`, before the model is loaded."""
    check_model(args.model)
    check_device(args.device)
    for flag, value in (("--n", args.n), ("--window", args.window),
                        ("--samples", args.samples), ("--batch-size", args.batch_size)):
        check_number(flag, value)
    if args.noise is not None:
        if args.noise_multiple is not None:
            raise OptionError("--noise is the old name of --noise-multiple; give only one")
        print("warning: --noise is deprecated: it is --noise-multiple (ν = NOISE × σ); for "
              "the reference code's absolute noise use --noise-std", file=sys.stderr)
        args.noise_multiple = args.noise
    if args.noise_multiple is not None and args.noise_std is not None:
        raise OptionError("--noise-multiple and --noise-std exclude each other: ν is either a "
                          "multiple of σ or an absolute standard deviation")
    for flag, value in (("--noise-multiple", args.noise_multiple),
                        ("--noise-std", args.noise_std)):
        if value is not None:
            check_number(flag, value, minimum=0)
    if args.data is not None:
        _read_data(args.data)


def add_parser(subparsers: Any) -> None:
    """Register ``editkit trace``."""
    t = subparsers.add_parser(
        "trace", help="causal tracing: heatmaps of where a model recalls facts",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(t)
    t.add_argument("--prompt", help="prompt with {} for the subject, e.g. '{} was born in'")
    t.add_argument("--subject")
    t.add_argument("--target", help="answer to trace (default: the model's prediction)")
    t.add_argument("--aie", action="store_true",
                   help="with --data: average indirect effect over the records")
    t.add_argument("--kinds", default="hidden,mlp,attn",
                   help="comma list of hidden, mlp, attn (default all three)")
    t.add_argument("--uniform-noise", action="store_true",
                   help="U(-ν, ν) noise instead of Gaussian (the reference's uniform_noise)")
    t.add_argument("--replace-with", metavar="SUBJECT", default=None,
                   help="corrupt by writing SUBJECT's embeddings over the subject's")
    t.add_argument("--token-range", choices=("subject_last", "subject", "last"), default=None,
                   help="restore only these tokens (default all; the reference's "
                        "subject_last)")
    t.add_argument("--sever", action="store_true",
                   help="also trace hidden states with MLP / attention above frozen")
    t.add_argument("--examples", type=int, default=3,
                   help="with --data: heatmaps for the first N records (default 3)")
    t.add_argument("--naive", action="store_true",
                   help="use the straightforward implementation (slow; for checking)")
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(func=run)


# --------------------------------------------------------------------------- helpers
def load(args: argparse.Namespace):
    """The ``--model`` on ``--device``."""
    return load_model(args.model, device=args.device, dtype=args.model_dtype)


def _read_data(value: str) -> list:
    path = Path(value).expanduser()
    if not path.is_file():
        raise OptionError(f"--data {value!r} does not exist; pass a JSON file holding a list of "
                          "CounterFact records")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DatasetFormatError(f"--data {value!r} is not valid JSON ({exc}); pass a JSON list "
                                 "of CounterFact records") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetFormatError(
            f"--data {value!r} must hold a JSON list of CounterFact records (objects)")
    return data


def records(args: argparse.Namespace, n_default: int | None) -> list[dict]:
    """The ``--data`` records (or the fact world's own), the first ``--n`` or ``n_default``."""
    n = args.n if args.n is not None else n_default
    if args.data:
        data = _read_data(args.data)
        return data[:n] if n is not None else data
    if is_fact_world(args.model):
        return FactWorld().records(n)
    raise OptionError("pass --data FILE (a JSON list of CounterFact records), or "
                      "--prompt and --subject for a single prompt")


def _kinds(args: argparse.Namespace) -> tuple[str, ...]:
    kinds = check_kinds([k.strip() for k in args.kinds.split(",") if k.strip()])
    return kinds + SEVERED_KINDS if args.sever else kinds


def tracer_options(args: argparse.Namespace) -> dict:
    """The corruption options of :class:`~editkit.tracing.CausalTracer` from ``args``."""
    return {"noise_multiple": args.noise_multiple, "noise_std": args.noise_std,
            "uniform_noise": args.uniform_noise,
            "replace": args.replace_with if args.replace_with else False}


def print_settings(tracer: CausalTracer, window: int | None, n_layers: int,
                   answer: str | None) -> None:
    """The settings a trace used, defaults included (they reproduce the paper)."""
    w = window if window is not None else default_window(n_layers)
    nu = "per subject" if tracer.noise_std is None else f"{tracer.noise_std:.4g}"
    level = (f"ν = {tracer.noise_multiple:g}σ ({nu})" if tracer.noise_multiple is not None
             else f"ν = {nu} (absolute)")
    print(f"settings: {tracer.corruption} corruption, {level}, σ from "
          f"{tracer.sigma_source}; {tracer.samples} samples, seed {tracer.seed}; "
          f"MLP/attention window {w} of {n_layers} layers, labelled by its centre"
          + (f"; answer: {answer}" if answer else ""))


def _print_trace(results: dict) -> None:
    first = next(iter(results.values()))
    print(f"{first.prompt.replace('{}', first.subject)!r} → {first.answer!r}: "
          f"p clean {first.p_clean:.4f}, corrupted {first.p_corrupt:.4f}")
    b, e = first.subject_range
    for kind, res in results.items():
        ie = res.indirect_effects  # NaN rows: outside --token-range
        t, layer = divmod(int(np.nanargmax(ie)), ie.shape[1])
        print(f"  {kind:18s} max IE {np.nanmax(ie):+.4f} at token {t} {res.tokens[t]!r}"
              f"{' (subject)' if b <= t < e else ''}, layer {layer}")


# --------------------------------------------------------------------------- trace
def run(args: argparse.Namespace) -> int:
    """Run ``editkit trace``; returns the exit status. Under ``torchrun`` (``WORLD_SIZE`` > 1)
    every process traces every ``world``-th record, and rank 0 gathers them (in record order)
    and writes the outputs."""
    check_common(args)
    with torchrun_group(args.device) as args.device:
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    check_number("--examples", args.examples, minimum=0)
    kinds = _kinds(args)
    if args.prompt or args.subject:
        if not (args.prompt and args.subject):
            raise OptionError("--prompt and --subject go together, e.g. --prompt "
                              "'{} was born in' --subject 'Ada Lovelace'")
        if args.data:
            raise OptionError("--data and --prompt/--subject exclude each other; trace one "
                              "prompt or the records of a file")
    elif not args.data and not is_fact_world(args.model):
        records(args, 100)  # the "pass --data" error, before loading the model
    out = check_writable("--out", args.out, directory=True)
    group = default_group()
    rank, world = rank_and_world(group)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(args)
    start = time.perf_counter()

    if args.prompt or args.subject:
        texts = [args.subject]
        prompts = [(args.prompt, args.subject, args.target)]
    else:
        requests = as_trace_requests(records(args, 100))
        texts = [r.subject for r in requests]
        prompts = [(r.prompt, r.subject, r.target_true) for r in requests]

    opts = tracer_options(args)
    tracer = CausalTracer(model, tokenizer, texts=texts, samples=args.samples,
                          seed=args.seed, batch_size=args.batch_size,
                          progress=len(prompts) == 1 and not args.no_progress, **opts)
    single = bool(args.prompt)
    answer = None if single else args.answer
    if rank == 0:
        print_settings(tracer, args.window, tracer.n_layers, answer)
    local = {}
    for i in tqdm(shard_indices(len(prompts), rank, world), desc="causal trace",
                  disable=args.no_progress or len(prompts) == 1 or rank != 0):
        prompt, subject, target = prompts[i]
        skip = answer == "predicted" and target is not None
        if args.naive:
            res = trace_naive(model, tokenizer, prompt, subject, target, kinds=kinds,
                              window=args.window, samples=args.samples,
                              noise_std=tracer.noise_std, seed=args.seed,
                              uniform_noise=args.uniform_noise, replace=opts["replace"],
                              noise_multiple=tracer.noise_multiple,
                              token_range=args.token_range)
            if skip and not next(iter(res.values())).correct_prediction:
                res = {}
        else:
            res = tracer.trace(prompt, subject, target, kinds=kinds, window=args.window,
                               token_range=args.token_range, skip_wrong=skip)
        local[i] = res
    gathered = gather_in_order(local, len(prompts), group)
    elapsed = time.perf_counter() - start
    if rank != 0:
        return 0
    traces = [res for res in gathered if res]
    skipped = [prompts[i][1] for i, res in enumerate(gathered) if not res]
    if skipped:
        print(f"skipped {len(skipped)} of {len(prompts)} records whose target_true the model "
              "does not predict (--answer target_true traces them too)")
    if not traces:
        raise InvalidRequestError("the model predicts none of the records' target_true, so "
                                  "nothing was traced; pass --answer target_true to trace them "
                                  "anyway")

    payload = [{k: r.to_dict() for k, r in res.items()} for res in traces]
    if len(traces) == 1:
        (out / "trace.json").write_text(json.dumps(payload[0], indent=1))
        plots.plot_traces(traces[0], out / "trace")
        for kind, res in traces[0].items():
            plots.plot_trace(res, out / f"trace_{kind}")
        _print_trace(traces[0])
    else:
        (out / "traces.json").write_text(json.dumps(payload))
        for i, res in enumerate(traces[: args.examples]):
            plots.plot_traces(res, out / f"record_{i}")
            _print_trace(res)
    if args.aie:
        aies = aie_by_kind(traces)
        (out / "aie.json").write_text(json.dumps({k: a.to_dict() for k, a in aies.items()},
                                                 indent=1))
        plain = {k: a for k, a in aies.items() if k in ("hidden", "mlp", "attn")}
        if plain:
            plots.plot_aie(plain, out / "aie")
            plots.plot_aie_heatmaps(plain, out / "aie_heatmap")
        if any(k.startswith("hidden_sever") for k in aies):
            plots.plot_severed(aies, path=out / "aie_severed")
        first = next(iter(aies.values()))
        print(f"AIE over {len(traces)} facts (p clean {first.p_clean:.3f}, corrupted "
              f"{first.p_corrupt:.3f}); max over layers @ its layer, per token group:")
        short = [g.replace(" subject ", " subj ").replace(" tokens", "").replace(" token", "")
                 for g in first.groups]
        print(f"  {'kind':18s}" + "".join(f"{g:>17s}" for g in short))
        for kind, aie in aies.items():
            cells = [f"{aie.mean[i].max():+.3f} @ {int(aie.mean[i].argmax())}"
                     if aie.counts[i] else "-" for i in range(len(aie.groups))]
            print(f"  {kind:18s}" + "".join(f"{c:>17s}" for c in cells))
    shared = f" over {world} processes" if world > 1 else ""
    print(f"traced {len(traces)} prompt(s) in {elapsed:.1f}s{shared}; wrote {out}/")
    return 0
