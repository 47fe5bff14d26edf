"""``editkit cache``: what the editkit cache holds, and clearing it.

    editkit cache list                 # each kind of cached data, its size and files
    editkit cache clear stats --yes    # delete the cached statistics
    editkit cache clear --yes          # delete everything

The cache root is $EDITKIT_CACHE (default ~/.cache/editkit). Everything in it is recomputed
when needed: statistics, context templates, sampled texts, the SmolLM2 conversion.
"""

from __future__ import annotations

import argparse
from typing import Any

from editkit.cache import TEMPORARY_KIND, cache_entries, clear_cache, default_cache_dir
from editkit.cli.common import OptionError, describe


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def add_parser(subparsers: Any) -> None:
    """Register ``editkit cache``."""
    p = subparsers.add_parser("cache", help="list or clear the editkit cache ($EDITKIT_CACHE)",
                              description=describe(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("list", "clear"), help="list the cache, or clear it")
    p.add_argument("kind", nargs="?", default=None,
                   help=f"with clear: one kind (a folder shown by 'list', or {TEMPORARY_KIND!r} "
                        "for leftover temporaries); default everything")
    p.add_argument("--yes", action="store_true", help="clear without asking")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``editkit cache``; returns the exit status."""
    root = default_cache_dir()
    if args.action == "list":
        if args.kind is not None:
            raise OptionError(f"editkit cache list takes no kind (got {args.kind!r}); run "
                              "'editkit cache list' to see every kind")
        entries = cache_entries(root)
        print(f"editkit cache: {root}")
        if not entries:
            print("  (empty)")
            return 0
        for e in entries:
            print(f"  {e.kind:<18} {_size(e.bytes):>9} {e.files:6d} file(s)  {e.description}")
        print(f"  {'total':<18} {_size(sum(e.bytes for e in entries)):>9}")
        return 0
    what = f"the {args.kind!r} cache" if args.kind else "everything"
    if not args.yes:
        try:
            answer = input(f"delete {what} under {root}? [y/N] ")
        except (EOFError, OSError):  # no terminal to ask (a script, a closed stdin)
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise OptionError(f"nothing deleted: {what} under {root} is kept; pass --yes to clear "
                              "without asking")
    removed = clear_cache(args.kind, root)
    print(f"deleted {len(removed)} item(s) of {what} under {root}")
    return 0
