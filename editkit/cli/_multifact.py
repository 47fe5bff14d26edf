"""``editkit eval --protocol multi_fact``: the multiple-facts protocol of the eval subcommand.

Kept apart from ``eval.py`` because its report has another shape (conditions and
interference matrices, :class:`editkit.eval.multifact.MultiFactReport`). ``--n`` counts
subjects here (each with all its relations), not records.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from editkit.cli.common import OptionError, check_number, is_fact_world, load_model
from editkit.eval.datasets import load_dataset
from editkit.eval.multifact import PLOT_FILE, evaluate_multifact
from editkit.eval.report import REPORT_FILE, RESULTS_FILE


def add_options(p: argparse.ArgumentParser) -> None:
    """The options only ``--protocol multi_fact`` reads."""
    p.add_argument("--pairwise-subjects", type=int, default=None,
                   help="multi_fact: measure the edited-B-with-A matrix on the first N subjects "
                        "(default all; 0 skips it; it costs k*(k-1) pair edits per subject)")


def check(args: argparse.Namespace) -> None:
    """Refuse options that do not apply, before anything is loaded."""
    if args.protocol != "multi_fact":
        if args.pairwise_subjects is not None:
            raise OptionError(f"--pairwise-subjects applies to --protocol multi_fact only; leave "
                              f"it out for --protocol {args.protocol}")
        return
    check_number("--pairwise-subjects", args.pairwise_subjects, minimum=0)
    if args.n is not None and args.n < 2:
        raise OptionError(f"--n {args.n}: the multi_fact protocol needs at least 2 subjects "
                          "(--n counts subjects here)")
    for flag, value in (("--metrics", args.metrics), ("--idf", args.idf),
                        ("--references", args.references)):
        if value is not None:
            raise OptionError(f"{flag} does not apply to --protocol multi_fact (it reports "
                              "ES/PS/NS/S per condition); leave it out")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OptionError("--protocol multi_fact cannot be sharded over processes; run it "
                          "without torchrun")


def run(args: argparse.Namespace, hparams: dict[str, Any] | None) -> int:
    """Load every record (``--n`` selects subjects), run the protocol, write the outputs."""
    records = load_dataset(args.data, args.format, None, split=args.split, seed=args.seed,
                           zsre_target=args.zsre_target)
    model, tokenizer = load_model(args.model, args.device, dtype=args.model_dtype)
    label = Path(args.data).name if Path(args.data).exists() else args.data
    report = evaluate_multifact(
        args.method, model, tokenizer, records, hparams=hparams, n_subjects=args.n,
        pairwise_subjects=args.pairwise_subjects, max_rows=args.max_rows,
        dataset_name=label, model_name="factworld" if is_fact_world(args.model) else None,
        label=args.label, progress=not args.no_progress, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / RESULTS_FILE)
    report.plot(out / PLOT_FILE)
    markdown = report.to_markdown(plot=PLOT_FILE)
    (out / REPORT_FILE).write_text(markdown, encoding="utf-8")
    print(markdown.split("\n## Timings")[0].rstrip())
    print(f"\nwrote {out / RESULTS_FILE}, {out / REPORT_FILE}, {out / PLOT_FILE}")
    return 0
