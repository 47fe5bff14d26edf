"""``editkit compare``: put several ``editkit eval`` results side by side.

    editkit compare results/ft_seq results/ft_l_seq --out comparison.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from editkit.cli.common import OptionError, check_writable, describe
from editkit.eval.report import compare


def add_parser(subparsers: Any) -> None:
    """Register ``editkit compare``."""
    c = subparsers.add_parser(
        "compare", help="put several 'editkit eval' results side by side",
        description=describe(__doc__) + "\nOne markdown table with the unedited and edited rows "
                    "of several runs.", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("results", nargs="+", help="results.json files or --out directories")
    c.add_argument("--out", default=None, help="write the table to this markdown file")
    c.add_argument("--title", default=None, help="heading of the table")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``editkit compare``; returns the exit status (errors are reported by
    :func:`editkit.cli.run`)."""
    missing = [r for r in args.results if not Path(r).expanduser().exists()]
    if missing:
        raise OptionError(f"{', '.join(map(repr, missing))} not found; pass results.json files or "
                          "the --out directories of 'editkit eval' runs")
    if args.out:
        check_writable("--out", args.out)
    table = compare(args.results, title=args.title)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
    print(table, end="")
    return 0
