"""``editkit compare``: put several ``editkit eval`` results side by side.

    editkit compare results/ft_seq results/ft_l_seq --out comparison.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from editkit.cli.common import errors_exit_2
from editkit.eval.report import compare


def add_parser(subparsers: Any) -> None:
    """Register ``editkit compare``."""
    c = subparsers.add_parser(
        "compare", help="put several `editkit eval` results side by side",
        description="One markdown table with the unedited and edited rows of several runs.",
    )
    c.add_argument("results", nargs="+", help="results.json files or --out directories")
    c.add_argument("--out", default=None, help="write the table to this markdown file")
    c.add_argument("--title", default=None, help="heading of the table")
    c.set_defaults(func=run)


@errors_exit_2
def run(args: argparse.Namespace) -> int:
    """Run ``editkit compare``; 0 on success, 2 on a typed error (printed to stderr)."""
    table = compare(args.results, title=args.title)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
    print(table, end="")
    return 0
