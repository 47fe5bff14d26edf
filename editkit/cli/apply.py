"""``editkit apply``: apply a saved patch to a model through its edit history.

    editkit apply --model DIR edit.safetensors --out-model DIR_EDITED
    editkit apply --model factworld edit.safetensors           # check that it fits, then probe

The patch file is validated (schema, tensor digest, floating-point finite deltas) and must fit
the model: same parameter names and shapes, and the base weights it was computed on
(``--force`` skips that fingerprint check, and is needed for a patch without one).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from editkit.cli.common import add_dtype_option, load_model, probe
from editkit.editor import apply_patch, patch_requests
from editkit.errors import EditkitError
from editkit.patch import load_patch


def add_parser(subparsers: Any) -> None:
    """Register ``editkit apply``."""
    cmd = subparsers.add_parser(
        "apply", help="apply a saved patch (.safetensors) to a model",
        description="Validate a patch file written by 'editkit edit --save' or Patch.save, "
                    "apply it to --model (all or nothing), probe its edited prompts and "
                    "optionally save the edited model.")
    cmd.add_argument("patch", help="the patch file (.safetensors)")
    cmd.add_argument("--model", required=True,
                     help="save_pretrained directory, 'factworld' or 'smollm2'")
    cmd.add_argument("--out-model", help="save the edited model and tokenizer to this directory")
    cmd.add_argument("--force", action="store_true",
                     help="apply even if the model's weights are not the patch's base, or the "
                          "patch records no base fingerprint")
    cmd.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_dtype_option(cmd)
    cmd.set_defaults(func=run)


def _check_out_dir(out: str | None) -> None:
    # Refuse an unusable destination before loading the model, so no work is lost.
    if out is None:
        return
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise EditkitError(f"--out-model {out!r} is an existing file; pass a directory path")
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise EditkitError(f"--out-model {out!r}: {str(parent)!r} is not writable; pass a "
                           "directory you can write to")


def run(args: argparse.Namespace) -> int:
    """Run ``editkit apply``; returns the exit status."""
    _check_out_dir(args.out_model)
    patch = load_patch(args.patch, force=args.force)  # validate the file before the model
    model, tok = load_model(args.model, args.device, dtype=args.model_dtype)
    requests = patch_requests(patch)
    before = [probe(model, tok, "before", r.text, r.target_new, r.target_true) for r in requests]
    edit = apply_patch(model, patch, force=args.force)
    print(f"applied {args.patch} ({edit.method}, {len(patch.deltas)} parameter(s)) as edit "
          f"{edit.id}")
    for line, r in zip(before, requests, strict=True):
        print(line)
        print(probe(model, tok, "after", r.text, r.target_new, r.target_true))
    if args.out_model:
        model.save_pretrained(args.out_model)
        tok.save_pretrained(args.out_model)
        print(f"saved the edited model to {args.out_model}")
    else:
        print("the edited model was not saved; pass --out-model DIR to keep it")
    return 0
