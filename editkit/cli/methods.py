"""``editkit methods``: list the registered editing methods and model adapters."""

from __future__ import annotations

import argparse
from typing import Any

from editkit.registry import list_adapters, list_methods


def add_parser(subparsers: Any) -> None:
    """Register ``editkit methods``."""
    methods = subparsers.add_parser(
        "methods", help="list registered methods and model adapters",
        description="List the registered editing methods (the names --method takes) and the "
                    "model adapters (the model families editkit can edit).")
    methods.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the registered names; returns 0."""
    print("methods: ", ", ".join(list_methods()))
    print("adapters:", ", ".join(list_adapters()))
    return 0
