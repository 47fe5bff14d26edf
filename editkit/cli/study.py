"""``editkit study``: studies that combine tracing and editing.

    editkit study localization --model factworld --n 100 --methods rome,ft --out out/loc
    editkit study localization --model smollm2 --data real --n 30 --methods rome,ft_l \\
        --layers 3,9,15,21 --objectives inject,erase,force --out out/loc_smollm2
    torchrun --nproc_per_node 2 -m editkit study localization ...   # facts split over ranks

``localization`` is Hase et al. (2023), "Does Localization Inform Editing?": per fact one
causal trace (ν = 3σ over the subjects, ``--samples`` draws) gives the tracing effect at every
layer; every method × objective edits the fact at every layer (reverted after each) and
scores it (rewrite / paraphrase / neighbourhood scores of the objective); then the R² of the
rewrite score on layer, tracing effect and both, with bootstrap 95 % intervals, per method
and objective. ``--model`` as for ``editkit trace``; ``--data`` a JSON list of CounterFact
records, or ``real`` for the shipped real facts (``editkit.testbed.real_facts``; default for
smollm2), default for factworld its own records. Results go to ``--out``: ``traces.jsonl`` and
``edits.jsonl`` (written as they are computed; rerunning resumes), ``analysis.json``,
``analysis_<effect kind>.md`` (tables), ``scatter.png`` and ``r2_bars.png``.
``--analyse-only`` redoes the analysis and plots.
``--set rome:value.num_grad_steps=20`` sets a method's hyperparameter (repeatable; values are
JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from editkit.cli.common import (
    MODEL_CHOICES,
    OptionError,
    add_dtype_option,
    check_device,
    check_method,
    check_model,
    check_number,
    check_writable,
    describe,
    is_fact_world,
    is_smollm2,
    load_model,
)
from editkit.distributed import default_group, rank_and_world, torchrun_group
from editkit.requests import OBJECTIVES, EditRequest
from editkit.study import StudyConfig, analyse, run_localization
from editkit.study.localization import markdown_tables
from editkit.study.plots import plot_r2_bars, plot_scatter


def add_parser(subparsers: Any) -> None:
    """Register ``editkit study`` and its ``localization`` study."""
    s = subparsers.add_parser(
        "study", help="studies combining tracing and editing (localization)",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = s.add_subparsers(dest="study", metavar="STUDY")
    s.set_defaults(func=_missing_study)
    loc = studies.add_parser(
        "localization", help="does the tracing effect predict where editing works?",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    loc.add_argument("--model", required=True, help=MODEL_CHOICES)
    loc.add_argument("--data", help="JSON list of CounterFact records, or 'real' (the shipped "
                                    "real facts)")
    loc.add_argument("--n", type=int, default=None, help="first N records (default 100)")
    loc.add_argument("--methods", default="rome,ft", help="comma list (default rome,ft)")
    loc.add_argument("--layers", help="comma list of edited layers (default all)")
    loc.add_argument("--objectives", default=",".join(OBJECTIVES),
                     help=f"comma list of {', '.join(OBJECTIVES)} (default all)")
    loc.add_argument("--samples", type=int, default=10, help="trace noise samples (paper 10)")
    loc.add_argument("--force-samples", type=int, default=10,
                     help="noise draws per prompt of force (paper 10)")
    loc.add_argument("--noise-multiple", type=float, default=3.0, help="ν = this × σ (3)")
    loc.add_argument("--seed", type=int, default=0)
    loc.add_argument("--window", type=int, default=None, help="MLP trace window")
    loc.add_argument("--n-neighbors", type=int, default=5)
    loc.add_argument("--set", action="append", default=[], metavar="METHOD:FIELD=JSON",
                     help="hyperparameter override, e.g. rome:value.num_grad_steps=20")
    loc.add_argument("--effect-kind", default="mlp", choices=("mlp", "hidden"),
                     help="tracing effect used in the regressions (default mlp)")
    loc.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    loc.add_argument("--device", default="cpu")
    add_dtype_option(loc)
    loc.add_argument("--out", required=True, help="output directory")
    loc.add_argument("--analyse-only", action="store_true",
                     help="only redo analysis.json and the plots from the files in --out")
    loc.add_argument("--no-progress", action="store_true")
    loc.set_defaults(func=run)


def _missing_study(args: argparse.Namespace) -> int:
    raise OptionError("name a study: editkit study localization ...")


def _ints(flag: str, value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"{flag} {value!r}: give comma-separated integers, e.g. 0,1,2") from None


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["rome:value.num_grad_steps=20"]`` → ``{"rome": {"value.num_grad_steps": 20}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        key, eq, raw = rest.partition("=")
        if not sep or not eq or not key.strip():
            raise OptionError(f"--set {item!r}: write METHOD:FIELD=VALUE, e.g. "
                              "rome:value.num_grad_steps=20")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method.strip(), {})[key.strip()] = value
    return out


def _requests(args: argparse.Namespace) -> list[EditRequest]:
    n = 100 if args.n is None else args.n
    if args.data and args.data != "real":
        from editkit.cli.trace import _read_data

        data = _read_data(args.data)[:n]
    elif args.data == "real" or is_smollm2(args.model):
        from editkit.testbed import real_facts

        data = real_facts(n)
    elif is_fact_world(args.model):
        from editkit.testbed import FactWorld

        data = FactWorld().records(n)
    else:
        raise OptionError("pass --data FILE (a JSON list of CounterFact records) or --data real")
    return [EditRequest.from_counterfact(r) for r in data]


def run(args: argparse.Namespace) -> int:
    """Run ``editkit study localization``; returns the exit status."""
    out = Path(args.out)
    for flag, value in (("--n", args.n), ("--samples", args.samples),
                        ("--force-samples", args.force_samples), ("--n-boot", args.n_boot),
                        ("--window", args.window), ("--n-neighbors", args.n_neighbors)):
        check_number(flag, value)
    if args.analyse_only:
        return _analyse(args, out)
    check_model(args.model)
    check_device(args.device)
    check_writable("--out", args.out, directory=True)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for m in methods:
        check_method(m)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    config = StudyConfig(
        methods=methods, layers=tuple(_ints("--layers", args.layers)) if args.layers else None,
        objectives=objectives, samples=args.samples, force_samples=args.force_samples,
        seed=args.seed, noise_multiple=args.noise_multiple, window=args.window,
        n_neighbors=args.n_neighbors, overrides=parse_overrides(args.set))
    requests = _requests(args)
    with torchrun_group(args.device) as device:
        model, tokenizer = load_model(args.model, device=device, dtype=args.model_dtype)
        group = default_group()
        run_localization(model, tokenizer, requests, config, out, group=group,
                         progress=not args.no_progress)
        rank, world = rank_and_world(group)
        if world > 1:
            import torch.distributed as dist

            dist.barrier(group)
        if rank != 0:
            return 0
    return _analyse(args, out)


def _analyse(args: argparse.Namespace, out: Path) -> int:
    if not out.is_dir():
        raise OptionError(f"--out {str(out)!r} holds no study results; run the study first")
    result = analyse(out, effect_kind=args.effect_kind, n_boot=args.n_boot, seed=args.seed)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    (out / f"analysis_{args.effect_kind}.md").write_text(markdown_tables(result))
    if result["cells"]:
        plot_scatter(result, out / "scatter.png")
        plot_r2_bars(result, out / "r2_bars.png")
    print(f"{'method/objective':28s} {'facts':>5s}  R²(layer)  R²(tracing)  R²(both)  added")
    for key, cell in result["cells"].items():
        if "r2" not in cell:
            print(f"{key:28s} {cell['n_facts']:5d}  (too few facts)")
            continue
        r2, ci = cell["r2"], cell["ci95"]
        print(f"{key:28s} {cell['n_facts']:5d}  {r2['layer']:.3f}      {r2['tracing']:.3f}"
              f"        {r2['both']:.3f}     {r2['added']:+.3f} "
              f"[{ci['added'][0]:+.3f}, {ci['added'][1]:+.3f}]")
    print(f"wrote {out / 'analysis.json'}")
    return 0
