"""``editkit`` command line: thin subcommands over the Python API.

    editkit demo                       # edit a fact of the offline fact world, then revert
    editkit demo --model smollm2       # the same on a real model, SmolLM2-135M (offline)
    editkit edit --model DIR --method ft --prompt "{} plays" --subject X --target Y
    editkit incorporate --model factworld --passage bio.txt --method rome  # a passage's facts
    editkit methods                    # list registered methods and adapters
    editkit stats | trace | suggest-layer | eval | compare | train-mend | train-ke | cache ...
    editkit study localization --model factworld --methods rome,ft   # Hase et al. 2023

One module per subcommand: each module in ``SUBCOMMANDS`` exposes ``add_parser(subparsers)``
(which sets the parser's ``func``) and ``run(args)``. The command line sits on top of the
layering: it may import everything, and nothing in the library imports it.

Errors and exit status, the same for every subcommand:

* Every error is one line on stderr, ``editkit <subcommand>: error: <what and how to fix>``;
  no traceback, unless ``-v`` is given (before or after the subcommand) for an unexpected one.
* Exit status 2, usage errors: the user asked for something wrong. Bad options (argparse),
  unreadable or malformed input files, values out of range, unknown methods, metrics or
  models, requests or hyperparameters the method refuses, a patch or hypernetwork that does
  not fit. These are every ``EditkitError`` except the failures below.
* Exit status 1, failures: the request was fine but the work did not succeed. An edit that
  failed (``EditFailedError``), statistics that could not be computed (``StatsError``), a
  model whose forward editkit cannot reproduce (``ReplayMismatchError``), an output that could
  not be written (``OSError``), and any unexpected exception (reported as a bug, with
  "please report"; ``-v`` prints its traceback).
* Exit status 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from editkit.cache import sweep_stale_once
from editkit.cli import (
    apply,
    cache,
    compare,
    demo,
    edit,
    incorporate,
    methods,
    stats,
    study,
    suggest_layer,
    trace,
    train_ke,
    train_mend,
)
from editkit.cli import eval as eval_
from editkit.cli.common import build_editor, load_model
from editkit.errors import EditFailedError, EditkitError, ReplayMismatchError, StatsError

__all__ = ["FAILURES", "SUBCOMMANDS", "add_parser", "build_editor", "build_parser",
           "cli_message", "exit_status", "load_model", "main", "run"]

logger = logging.getLogger(__name__)

#: The subcommand modules, in the order ``editkit --help`` lists them.
SUBCOMMANDS = (demo, edit, incorporate, apply, methods, stats, trace, suggest_layer, eval_, compare,
               train_mend, train_ke, cache, study)

#: Typed errors that mean "the work failed" (exit status 1); every other ``EditkitError``
#: means "the user asked for something wrong" (exit status 2).
FAILURES: tuple[type[BaseException], ...] = (EditFailedError, StatsError, ReplayMismatchError)

#: Python spellings in library messages and what the command line calls them. The library
#: speaks to Python callers; on the command line the fix is an option, not a keyword.
_CLI_SPELLINGS: tuple[tuple[str, str], ...] = (
    (r"[Pp]ass kind='(\w+)' or kind='(\w+)'", r"pass --format \1 or --format \2"),
    (r"pass hparams=(\w+)\(hypernet_path='([^']*)'\)", r"""pass --hparams '{"hypernet_path": "\2"}'"""),
    (r"[Pp]ass hparams= to choose your own",
     "Pass --hparams FILE.json or --set '{\"field\": value}' to choose your own"),
    (r"texts=\['\.\.\.', \.\.\.\], ", ""),
    (r"texts=\[str, \.\.\.\]", "--texts FILE.txt"),
    (r"\btexts=(['\"]?)([\w./-]+)\1", r"--texts \2"),
    (r"^(layers?)=(\d+) is out of range", r"--\1 \2 is out of range"),
    (r"\bn_samples=", "--n-samples "),
    (r"\bmax_length=", "--max-length "),
    (r"\bbatch_size=", "--batch-size "),
)


def exit_status(exc: BaseException) -> int:
    """The exit status of an error by the convention of the module docstring."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, EditkitError):
        return 1 if isinstance(exc, FAILURES) else 2
    return 1


#: Spellings whose option only some subcommands have.
_ONLY_FOR = {r"[Pp]ass kind='(\w+)' or kind='(\w+)'": {"eval"}}


def cli_message(message: str, command: str | None = None) -> str:
    """A library message with its Python spellings replaced by the options of ``command``
    (every subcommand's when None)."""
    for pattern, replacement in _CLI_SPELLINGS:
        if command is None or command in _ONLY_FOR.get(pattern, {command}):
            message = re.sub(pattern, replacement, message)
    return message


def add_parser(subparsers: Any) -> None:
    """Register every editkit subcommand on ``subparsers`` (to embed them in another CLI)."""
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    for parser in subparsers.choices.values():
        # -v also after the subcommand; SUPPRESS keeps a -v given before it from being reset.
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="log at INFO level; print the traceback of an unexpected error")


def _report(args: argparse.Namespace, text: str) -> None:
    print(f"editkit {getattr(args, 'command', None) or 'command'}: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args`` were parsed for and return its exit status; errors are
    printed on stderr, never raised (see the module docstring for the convention)."""
    verbose = bool(getattr(args, "verbose", False))

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        _report(args, f"warning: {cli_message(str(message), getattr(args, 'command', None))}")

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return int(args.func(args) or 0)
        except EditkitError as exc:
            _report(args, f"error: {cli_message(str(exc), getattr(args, 'command', None))}")
            return exit_status(exc)
        except KeyboardInterrupt:
            _report(args, "interrupted")
            return 130
        except OSError as exc:
            # Reading and writing files the user named: the OS says what went wrong.
            where = f" {exc.filename!r}" if exc.filename else ""
            _report(args, f"error: cannot access{where}: {exc.strerror or exc}; check the path, "
                          "its permissions and the free space")
            if verbose:
                traceback.print_exc()
            return 1
        except Exception as exc:
            if verbose:
                traceback.print_exc()
            detail = " ".join(str(exc).split())[:300]
            _report(args, f"error: unexpected {type(exc).__name__}: {detail}. This is a bug in "
                          "editkit, please report it"
                          + ("" if verbose else " (rerun with -v to see the traceback)"))
            return 1


def build_parser() -> argparse.ArgumentParser:
    """The ``editkit`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="editkit", description=__doc__.split("\n")[0].replace(
        "``", ""))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; print the traceback of an unexpected error")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``editkit`` console script: parse, run, and return the exit status (0 success,
    2 usage error, 1 failure; see the module docstring)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # The next run after a kill cleans what the killed write left (old temporaries only).
    sweep_stale_once()
    return run(args)
