"""``editkit train-ke``: train a KE hypernetwork (options in :mod:`editkit.cli._train`).

    editkit train-ke --model factworld --data factworld --out runs/ke --max-minutes 15
"""

from __future__ import annotations

import argparse
from typing import Any

from editkit.cli._train import add_train_parser, run_train


def add_parser(subparsers: Any) -> None:
    """Register the ``train-ke`` subcommand."""
    add_train_parser(subparsers, "ke").set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``editkit train-ke``; returns the exit status."""
    return run_train(args)
