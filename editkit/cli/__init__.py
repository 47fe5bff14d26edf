"""``editkit`` command line: thin subcommands over the Python API.

    editkit demo                       # edit a fact of the offline fact world, then revert
    editkit demo --model smollm2       # the same on a real model, SmolLM2-135M (offline)
    editkit edit --model DIR --method ft --prompt "{} plays" --subject X --target Y
    editkit methods                    # list registered methods and adapters
    editkit stats | trace | suggest-layer | eval | compare | train-mend | train-ke ...

One module per subcommand: each module in :data:`SUBCOMMANDS` exposes
``add_parser(subparsers)`` (which sets the parser's ``func``) and ``run(args)``. The command
line sits on top of the layering: it may import everything, and nothing in the library
imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from editkit.cli import (
    apply,
    compare,
    demo,
    edit,
    methods,
    stats,
    suggest_layer,
    trace,
    train_ke,
    train_mend,
)
from editkit.cli import eval as eval_
from editkit.cli.common import build_editor, load_model
from editkit.errors import EditkitError

__all__ = ["SUBCOMMANDS", "add_parser", "build_editor", "build_parser", "load_model", "main",
           "run"]

#: The subcommand modules, in the order ``editkit --help`` lists them.
SUBCOMMANDS = (demo, edit, apply, methods, stats, trace, suggest_layer, eval_, compare, train_mend,
               train_ke)


def add_parser(subparsers: Any) -> None:
    """Register every editkit subcommand on ``subparsers`` (to embed them in another CLI)."""
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args`` were parsed for; its own exit status."""
    return int(args.func(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The ``editkit`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="editkit", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``editkit`` console script; a typed editkit error is exit status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except EditkitError as exc:
        print(f"editkit: error: {exc}", file=sys.stderr)
        return 2
