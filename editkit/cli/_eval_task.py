"""``editkit eval --task NAME``: the registered evaluation tasks besides CounterFact / zsRE.

    editkit eval --task mquake --model editkit/testbed/data/chain_world --method rome \\
        --data chainworld --n 20 --out results/mquake_rome
    editkit eval --task portability --model smollm2 --method rome --data twohop --n 10

The task's loader reads ``--data`` (``mquake``: an MQuAKE ``.json``/``.jsonl``,
``chainworld``, ``twohop`` or ``hub:<name>``; ``portability``: a KnowEdit-style file or the
same built-ins), every record is edited alone and reverted, and ``results.json`` +
``report.md`` (means with 95% CIs, grouped by the records' edited hop) go into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from editkit.cli.common import OptionError, load_model
from editkit.eval.report import REPORT_FILE, RESULTS_FILE
from editkit.eval.tasks import TASKS, get_task


def check_task(args: argparse.Namespace) -> None:
    """Usage errors of ``--task`` before anything is loaded."""
    if args.task not in TASKS:
        raise OptionError(f"--task {args.task!r} is not a registered evaluation task; use one "
                          f"of {TASKS.names()}")
    if args.task in ("counterfact", "zsre"):
        return
    for flag, value, default in (("--protocol", args.protocol, "independent"),
                                 ("--format", args.format, "auto"),
                                 ("--checkpoints", args.checkpoints, None),
                                 ("--batch-size", args.batch_size, None),
                                 ("--idf", args.idf, None)):
        if value != default:
            raise OptionError(f"{flag} {value} applies to CounterFact / zsRE only; --task "
                              f"{args.task} edits each record alone (leave {flag} out)")


def run_task(args: argparse.Namespace, hparams: dict[str, Any] | None) -> int:
    """Load, edit, score and write one registered task (``args.task``)."""
    task = get_task(args.task)
    records = task.load(args.data, args.n, split=args.split,
                        seed=args.seed if args.n is not None else None)
    model, tokenizer = load_model(args.model, args.device, dtype=args.model_dtype)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    report = task.evaluate(args.method, model, tokenizer, records, hparams=hparams,
                           metrics=metrics, max_rows=args.max_rows,
                           progress=not args.no_progress, skip_errors=args.skip_errors,
                           label=args.label, keep_raw=not args.no_raw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / RESULTS_FILE)
    by = "edit_hop" if any("edit_hop" in r.get("labels", {}) for r in report.rows) else None
    markdown = report.to_markdown(by=by)
    (out / REPORT_FILE).write_text(markdown, encoding="utf-8")
    print(markdown.rstrip())
    failed = sum(1 for r in report.rows if r.get("error"))
    if failed:
        print(f"\n{failed} of {len(report.rows)} edits failed (see {out / RESULTS_FILE})")
    print(f"\nwrote {out / RESULTS_FILE}, {out / REPORT_FILE}")
    return 0
