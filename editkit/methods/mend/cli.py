"""``editkit train-mend``: train a MEND hypernetwork (see :mod:`editkit.methods._learned.cli`).

    editkit train-mend --model factworld --data factworld --out runs/mend --max-minutes 15
"""

from __future__ import annotations

import argparse
from typing import Any

from editkit.methods._learned.cli import add_train_parser, run_train


def add_parser(subparsers: Any) -> None:
    """Register the ``train-mend`` subcommand."""
    add_train_parser(subparsers, "mend")


def run(args: argparse.Namespace) -> int:
    return run_train(args)
