"""``editkit eval``: edit and score a model on CounterFact / zsRE records.

    editkit eval --model factworld --method ft_l --data factworld --n 100 \\
        --protocol sequential --out results/ft_l_seq

``eval`` writes ``results.json``, ``report.md`` and, for sequential runs, ``retention.png``
into ``--out``. ``--model`` is ``factworld`` (the offline fact-world GPT-2) or a
``save_pretrained`` directory with its tokenizer; ``--data`` is ``factworld``, a local
CounterFact / zsRE ``.json`` / ``.jsonl`` file, or ``hub:<name>[:<split>]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from editkit.cli import _multifact
from editkit.cli.common import (
    MODEL_CHOICES,
    OptionError,
    add_dtype_option,
    check_device,
    check_method,
    check_model,
    check_number,
    check_overrides,
    check_writable,
    describe,
    is_fact_world,
    load_model,
    read_json_option,
)
from editkit.distributed import default_group, rank_and_world, torchrun_group
from editkit.errors import EditkitError
from editkit.eval.datasets import load_dataset
from editkit.eval.generation import GenerationConfig
from editkit.eval.metrics import ReferenceTable
from editkit.eval.plots import plot_retention
from editkit.eval.report import PLOT_FILE, REPORT_FILE, RESULTS_FILE
from editkit.eval.runner import evaluate


def add_parser(subparsers: Any) -> None:
    """Register ``editkit eval``."""
    p = subparsers.add_parser(
        "eval", help="edit and score a model on CounterFact / zsRE records",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_CHOICES)
    p.add_argument("--method", required=True, help="registered method name (ft, ft_l, rome, ...)")
    p.add_argument("--data", required=True,
                   help="'factworld', 'realfacts' (real facts SmolLM2 knows), a CounterFact/zsRE "
                        ".json or .jsonl file, or hub:<name>")
    p.add_argument("--task", default=None,
                   help="a registered evaluation task other than CounterFact / zsRE: mquake "
                        "(multi-hop) or portability (KnowEdit); see editkit.eval.list_tasks()")
    p.add_argument("--format", default="auto", choices=("auto", "counterfact", "zsre"),
                   help="record format (default: detected from the first record)")
    p.add_argument("--split", default=None, help="hub split (default train)")
    p.add_argument("--zsre-target", default="alt", choices=("alt", "answer"),
                   help="zsRE edit target: alt (MEND) or answers[0] (ROME's release)")
    p.add_argument("--n", type=int, default=None, help="number of records, >= 1 (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fact world's record sample, sampling and bootstrap")
    p.add_argument("--protocol", default="independent",
                   choices=("independent", "sequential", "batch", "multi_fact"),
                   help="edit each record alone and revert, accumulate edits one by one, "
                        "apply them in batches (default independent), or multi_fact: all "
                        "relations of a subject at once vs spread vs alone, and interference "
                        "matrices (--n counts subjects)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="records per apply() in the batch protocol (default: all)")
    p.add_argument("--checkpoints", default=None,
                   help="comma-separated edit counts to score at (sequential; default "
                        "1,2,5,10,20,50,...)")
    p.add_argument("--hparams", default=None,
                   help="JSON file or inline JSON object of the method's hyperparameters")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metric names (default: all of the dataset kind)")
    p.add_argument("--max-new-tokens", type=int, default=50,
                   help="generated tokens per generation prompt for GE/RS")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample generations from the top k tokens (default greedy)")
    p.add_argument("--idf", default=None, help="JSON {word: idf} table for RS")
    p.add_argument("--references", default=None, help="JSON {key: [texts]} for RS")
    p.add_argument("--max-rows", type=int, default=128, help="scoring rows per forward pass")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_dtype_option(p)
    p.add_argument("--skip-errors", action="store_true",
                   help="record failed edits in the report instead of stopping")
    p.add_argument("--no-raw", action="store_true",
                   help="leave raw log-probs, predictions and generated texts out of "
                        "results.json (per-record metric values are kept)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--label", default=None,
                   help="row label of the method in tables (default: the method name)")
    p.add_argument("--out", default="results", help="output directory (default ./results)")
    _multifact.add_options(p)
    p.set_defaults(func=run)


def _hparams(text: str | None) -> dict[str, Any] | None:
    return read_json_option("--hparams", text)


def _check(args: argparse.Namespace) -> None:
    """Every option before the dataset and the model are loaded."""
    check_method(args.method)
    check_model(args.model)
    if args.task is not None:
        from editkit.cli._eval_task import check_task

        check_task(args)
    check_device(args.device)
    for flag, value, minimum in (("--n", args.n, 1), ("--batch-size", args.batch_size, 1),
                                 ("--max-new-tokens", args.max_new_tokens, 0),
                                 ("--top-k", args.top_k, 1), ("--max-rows", args.max_rows, 1)):
        check_number(flag, value, minimum=minimum)
    if args.batch_size is not None and args.protocol != "batch":
        raise OptionError(f"--batch-size {args.batch_size} applies to --protocol batch only; "
                          f"leave it out for --protocol {args.protocol}")
    if args.checkpoints and args.protocol != "sequential":
        raise OptionError(f"--checkpoints applies to --protocol sequential only; leave it out "
                          f"for --protocol {args.protocol}")
    for flag, value in (("--idf", args.idf), ("--references", args.references)):
        if value is not None and not Path(value).expanduser().is_file():
            raise OptionError(f"{flag} {value!r} does not exist; pass a JSON file")
    check_writable("--out", args.out, directory=True)
    _multifact.check(args)


def run(args: argparse.Namespace) -> int:
    """Run ``editkit eval``; returns the exit status (errors are reported by
    :func:`editkit.cli.run`). Under ``torchrun`` (``WORLD_SIZE`` > 1) the records (batches,
    with ``--protocol batch``) are sharded over the processes, and rank 0 gathers the scores
    in record order and writes the outputs."""
    if (args.idf is None) != (args.references is None):
        raise EditkitError("RS needs both --idf and --references (or neither)")
    _check(args)
    if args.protocol == "sequential" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OptionError("--protocol sequential cannot be sharded over processes (every edit "
                          "builds on all earlier ones); run it without torchrun, or use "
                          "--protocol independent or batch")
    with torchrun_group(args.device) as args.device:
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    hparams = _hparams(args.hparams)
    if hparams is not None:
        check_overrides(args.method, hparams, "--hparams")
    if args.task not in (None, "counterfact", "zsre"):
        from editkit.cli._eval_task import run_task

        return run_task(args, hparams)
    if args.protocol == "multi_fact":
        return _multifact.run(args, hparams)
    references = ReferenceTable.from_files(args.idf, args.references) if args.idf else None
    checkpoints = None
    if args.checkpoints:
        try:
            checkpoints = [int(x) for x in args.checkpoints.split(",") if x.strip()]
        except ValueError:
            raise OptionError(f"--checkpoints {args.checkpoints!r}: give integers like 1,10,100") \
                from None
        if not checkpoints or min(checkpoints) < 1:
            raise OptionError(f"--checkpoints {args.checkpoints!r}: give positive edit counts "
                              "like 1,10,100")
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    records = load_dataset(args.data, args.format, args.n, split=args.split, seed=args.seed,
                           zsre_target=args.zsre_target)
    model, tokenizer = load_model(args.model, args.device, dtype=args.model_dtype)
    label = Path(args.data).name if Path(args.data).exists() else args.data
    report = evaluate(
        args.method, model, tokenizer, records, protocol=args.protocol, metrics=metrics,
        batch_size=args.batch_size, checkpoints=checkpoints, hparams=hparams,
        references=references,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                                    seed=args.seed),
        max_rows=args.max_rows, dataset_name=label,
        model_name="factworld" if is_fact_world(args.model) else None,
        skip_errors=args.skip_errors, progress=not args.no_progress, seed=args.seed,
        label=args.label, keep_raw=not args.no_raw, group=default_group(),
    )
    if rank_and_world(default_group())[0] != 0:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / RESULTS_FILE)
    plot = None
    if report.curve:
        plot_retention(report, out / PLOT_FILE)
        plot = PLOT_FILE
    markdown = report.to_markdown(plot=plot)
    (out / REPORT_FILE).write_text(markdown, encoding="utf-8")
    print(markdown.split("\n## ")[0].rstrip())
    print(f"\nwrote {out / RESULTS_FILE}, {out / REPORT_FILE}"
          + (f", {out / PLOT_FILE}" if plot else ""))
    return 0
