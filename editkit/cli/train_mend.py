"""``editkit train-mend``: train a MEND hypernetwork (options in :mod:`editkit.cli._train`).

    editkit train-mend --model factworld --data factworld --out runs/mend --max-minutes 15
"""

from __future__ import annotations

import argparse
from typing import Any

from editkit.cli._train import add_train_parser, run_train


def add_parser(subparsers: Any) -> None:
    """Register the ``train-mend`` subcommand."""
    add_train_parser(subparsers, "mend").set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``editkit train-mend``; returns the exit status."""
    return run_train(args)
