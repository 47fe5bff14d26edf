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

from editkit.cli.common import (
    MODEL_CHOICES,
    OptionError,
    add_dtype_option,
    build_editor,
    check_device,
    check_method,
    check_model,
    check_overrides,
    check_writable,
    describe,
    layer_override,
    load_model,
    probe,
    read_json_option,
)
from editkit.errors import EditkitError, InvalidRequestError
from editkit.requests import EditRequest


def add_parser(subparsers: Any) -> None:
    """Register ``editkit edit``."""
    edit = subparsers.add_parser(
        "edit", help="edit a model and save the patch (and the edited model)",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    edit.add_argument("--model", required=True, help=MODEL_CHOICES)
    edit.add_argument("--method", default="ft_l", help="registered method (editkit methods)")
    edit.add_argument("--prompt", help="prompt with {} for the subject, e.g. '{} plays'")
    edit.add_argument("--subject", help="the subject, e.g. 'LeBron James'")
    edit.add_argument("--target", help="new target, e.g. 'football'")
    edit.add_argument("--target-true", help="current target (optional, for display)")
    edit.add_argument("--paraphrase", action="append", help="a paraphrase prompt to probe")
    edit.add_argument("--requests", help="JSONL file, one edit request object per line "
                                         "(prompt, subject, target_new, ...)")
    edit.add_argument("--hparams", help="the method's hyperparameters: JSON file or inline object")
    edit.add_argument("--layer", type=int,
                      help="the edited layer (methods that edit one layer: ft, ft_l, rome)")
    edit.add_argument("--set", help='JSON of hyperparameter overrides, e.g. \'{"lr": 1e-3}\'')
    edit.add_argument("--save", help="write the patch (safetensors) here; with several requests "
                                     "and a method that edits one at a time, one file per edit")
    edit.add_argument("--out-model", help="also save the edited model to this directory")
    edit.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_dtype_option(edit)
    edit.set_defaults(func=run)


def _read_requests(value: str) -> list[EditRequest]:
    path = Path(value).expanduser()
    if not path.is_file():
        raise OptionError(f"--requests {value!r} does not exist; pass a JSONL file with one "
                          "request object per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"--requests {value!r} cannot be read ({exc}); pass a UTF-8 JSONL "
                          "file") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise OptionError(f"--requests {value!r} line {number} is not valid JSON ({exc}); "
                              "write one JSON object per line") from None
        if not isinstance(data, dict):
            raise OptionError(f"--requests {value!r} line {number} is a JSON "
                              f"{type(data).__name__}, not an object; write "
                              '{"prompt": "{} plays", "subject": ..., "target_new": ...}')
        try:
            requests.append(EditRequest.from_dict(data))
        except EditkitError as exc:
            raise type(exc)(f"--requests {value!r} line {number}: {exc}") from None
        except (TypeError, KeyError, ValueError) as exc:
            raise InvalidRequestError(
                f"--requests {value!r} line {number} is not an edit request ({exc}); give "
                "prompt, subject and target_new") from None
    if not requests:
        raise OptionError(f"--requests {value!r} holds no request; write one JSON object per line")
    return requests


def _requests_from_args(args: argparse.Namespace):
    if args.requests:
        given = [f"--{n.replace('_', '-')}" for n in ("prompt", "subject", "target",
                                                       "target_true", "paraphrase")
                 if getattr(args, n) is not None]
        if given:
            raise OptionError(f"--requests FILE replaces {', '.join(given)}; pass either a "
                              "requests file or one request's options")
        return _read_requests(args.requests)
    missing = [f"--{n}" for n in ("prompt", "subject", "target") if getattr(args, n) is None]
    if missing:
        raise InvalidRequestError(
            f"editkit edit needs {', '.join(missing)} (or --requests FILE.jsonl)")
    return [EditRequest(args.prompt, args.subject, args.target, args.target_true,
                        paraphrases=tuple(args.paraphrase or ()))]


def _check(args: argparse.Namespace) -> tuple[list[EditRequest], dict[str, Any]]:
    """Every option, before the model is loaded: the requests, the method and its
    hyperparameters, the device and the output paths (so that no edit is lost to a typo)."""
    check_method(args.method)
    requests = _requests_from_args(args)
    if args.hparams is not None:
        check_overrides(args.method, read_json_option("--hparams", args.hparams) or {},
                        "--hparams")
    overrides = read_json_option("--set", args.set, inline_only=True) or {}
    check_overrides(args.method, overrides)
    if "layer" in overrides and args.layer is not None:
        raise OptionError("--layer and --set '{\"layer\": ...}' both set the layer; keep one")
    overrides.update(layer_override(args.method, args.layer))
    check_device(args.device)
    check_model(args.model)
    if args.save:
        check_writable("--save", args.save)
    if args.out_model:
        check_writable("--out-model", args.out_model, directory=True)
    return requests, overrides


def run(args: argparse.Namespace) -> int:
    """Run ``editkit edit``; returns the exit status."""
    requests, overrides = _check(args)
    model, tok = load_model(args.model, args.device, dtype=args.model_dtype)
    editor = build_editor(args.method, model, tok, args.hparams, overrides)
    editor.check_request_lengths(requests)  # before the probes run the model on the prompts
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
        if len(edits) > 1:
            # The method applied the requests one at a time, so each is its own patch (and
            # revertible on its own): one file per edit, named after the edit id.
            print(f"{args.method} applied the {len(requests)} requests as {len(edits)} separate "
                  f"edits; saved one patch per edit:")
            for e in edits:
                print(f"  {e.patch.save(Path(args.save).with_suffix(f'.{e.id}.safetensors'))}")
        else:
            what = (f"one combined patch for all {len(requests)} requests" if len(requests) > 1
                    else "the patch")
            print(f"saved {what} to {edits[-1].patch.save(args.save)}")
    if args.out_model:
        model.save_pretrained(args.out_model)
        tok.save_pretrained(args.out_model)
        print(f"saved the edited model to {args.out_model}")
    return 0
