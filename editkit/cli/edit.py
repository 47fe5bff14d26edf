"""``editkit edit``: edit a model (a directory, ``factworld`` or ``smollm2``), probe the edited
prompts before and after, and save the patch (and optionally the edited model).

    editkit edit --model DIR --method ft --prompt "{} plays" --subject X --target Y --save p.safetensors
    editkit edit --model DIR --method memit --requests edits.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from editkit.cli.common import build_editor, load_model, probe
from editkit.errors import InvalidRequestError
from editkit.requests import EditRequest


def add_parser(subparsers: Any) -> None:
    """Register ``editkit edit``."""
    edit = subparsers.add_parser("edit", help="edit a local model directory and save the patch")
    edit.add_argument("--model", required=True, help="save_pretrained dir, or 'factworld'")
    edit.add_argument("--method", default="ft_l", help="registered method (editkit methods)")
    edit.add_argument("--prompt", help="prompt with {} for the subject, e.g. '{} plays'")
    edit.add_argument("--subject")
    edit.add_argument("--target", help="new target, e.g. 'football'")
    edit.add_argument("--target-true", help="current target (optional, for display)")
    edit.add_argument("--paraphrase", action="append", help="a paraphrase prompt to probe")
    edit.add_argument("--requests", help="JSONL file of EditRequest dicts (batch edits)")
    edit.add_argument("--hparams", help="JSON file with the method's hyperparameters")
    edit.add_argument("--layer", type=int, help="override the edited layer")
    edit.add_argument("--set", help='JSON of hyperparameter overrides, e.g. \'{"lr": 1e-3}\'')
    edit.add_argument("--save", help="write the patch (safetensors) here")
    edit.add_argument("--out-model", help="also save the edited model to this directory")
    edit.add_argument("--device", default="cpu")
    edit.set_defaults(func=run)


def _requests_from_args(args: argparse.Namespace):
    if args.requests:
        lines = Path(args.requests).read_text().splitlines()
        return [EditRequest.from_dict(json.loads(line)) for line in lines if line.strip()]
    missing = [f"--{n}" for n in ("prompt", "subject", "target") if getattr(args, n) is None]
    if missing:
        raise InvalidRequestError(
            f"editkit edit needs {', '.join(missing)} (or --requests FILE.jsonl)")
    return [EditRequest(args.prompt, args.subject, args.target, args.target_true,
                        paraphrases=tuple(args.paraphrase or ()))]


def run(args: argparse.Namespace) -> int:
    """Run ``editkit edit``; returns the exit status."""
    requests = _requests_from_args(args)
    model, tok = load_model(args.model, args.device)
    overrides = json.loads(args.set) if args.set else {}
    if args.layer is not None:
        overrides["layer"] = args.layer
    editor = build_editor(args.method, model, tok, args.hparams, overrides)
    probes = [(r, p) for r in requests for p in (r.text, *r.paraphrases)]
    before = [probe(model, tok, "before", p, r.target_new, r.target_true) for r, p in probes]
    t0 = time.perf_counter()
    editor.apply(requests)
    print(f"{args.method}: {len(requests)} request(s) applied in {time.perf_counter() - t0:.1f}s")
    for line, (r, p) in zip(before, probes, strict=True):
        print(line)
        print(probe(model, tok, "after", p, r.target_new, r.target_true))
    if args.save:
        edits = editor.history
        patch = edits[-1].patch
        if len(edits) > 1:  # one patch per request for sequential methods: save each
            for e in edits:
                e.patch.save(Path(args.save).with_suffix(f".{e.id}.safetensors"))
            print(f"saved {len(edits)} patches next to {args.save}")
        else:
            print(f"saved patch to {patch.save(args.save)}")
    if args.out_model:
        model.save_pretrained(args.out_model)
        tok.save_pretrained(args.out_model)
        print(f"saved the edited model to {args.out_model}")
    return 0
