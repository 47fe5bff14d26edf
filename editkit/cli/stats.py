"""``editkit stats``: compute and cache the key second moments C = E[k kᵀ] of a local model.

    editkit stats path/to/model --layers 5 6 --texts corpus.txt --n-samples 20000
    editkit stats factworld --layers all

The statistics land in the cache ``editkit.stats`` uses (``$EDITKIT_CACHE/stats``), where ROME
and MEMIT find them later. ``factworld`` (or ``fact_world``, ``fact-world``) names the offline
fact-world model (its own corpus is then the default text source); ``smollm2`` the built-in
SmolLM2-135M. If the text source holds fewer texts than ``--n-samples``, all of them are used
and a warning says how many.

Under ``torchrun --nproc_per_node k -m editkit.cli stats ...`` (``WORLD_SIZE`` > 1) each process
joins the process group torchrun describes (gloo on CPU, NCCL on CUDA, one GPU per local rank),
reads every k-th text, the sums are all-reduced, and rank 0 writes the cache and prints.

``--export DIR`` also writes the matrices for others to reuse (``mom2.safetensors`` + the card
``editkit_stats.json``: model fingerprint and revision, layers, text source, samples, max
length, dtype, editkit version); ``second_moment(..., source=DIR)`` or ``mom2_dataset=DIR``
load them and refuse them for another model or other settings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from editkit.cli.common import (
    MODEL_CHOICES,
    OptionError,
    add_dtype_option,
    check_device,
    check_model,
    check_number,
    check_writable,
    describe,
    is_fact_world,
    load_model,
)
from editkit.distributed import join_torchrun, torchrun_group
from editkit.registry import TEXT_SOURCES, get_adapter
from editkit.stats import (
    STATS_CARD,
    STATS_TENSORS,
    default_cache_dir,
    export_statistics,
    second_moment,
)

FACT_WORLD = "fact_world"


def add_parser(subparsers: Any) -> None:
    """Register ``editkit stats``."""
    p = subparsers.add_parser(
        "stats", help="compute and cache key second-moment statistics (for ROME/MEMIT)",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_CHOICES)
    p.add_argument("--layers", nargs="+", required=True,
                   help="layer indices, or 'all' for every layer (computed in one pass)")
    p.add_argument("--texts", default=None,
                   help="text source: 'wikitext' (hub), 'pydoc' (offline), 'fact_world', "
                        "'generated' (sampled from the model, --n-samples texts), or a "
                        ".txt/.jsonl file; default wikitext (fact_world for the fact world)")
    p.add_argument("--n-samples", type=int, default=100_000, help="texts to read (default 100000)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of the stored matrices (accumulation is float64)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="texts per forward pass (the length sort reads 8x as many at a time)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per forward pass (default batch size x max length, at "
                        "most 512 on a CPU, where small forwards are fastest)")
    p.add_argument("--cache-dir", default=None, help="default $EDITKIT_CACHE/stats")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    # --dtype is the stored matrices' dtype here (it predates the model option).
    add_dtype_option(p, "--model-dtype")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also write the matrices as shareable statistics to DIR (safetensors, "
                        "one tensor per layer, + a JSON card identifying the model and "
                        "settings), for second_moment(source=DIR) / mom2_dataset=DIR")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


#: Kept importable under its former name; the helper lives in :mod:`editkit.distributed`.
_join_torchrun = join_torchrun


def run(args: argparse.Namespace) -> int:
    """Run ``editkit stats``; prints one line per layer. Returns the exit status."""
    check_device(args.device)
    check_model(args.model)
    with torchrun_group(args.device) as device:
        return _run(args, device)


def _layers(spec: list[str]) -> list[int] | None:
    """``--layers``: integers, or ``None`` for 'all'."""
    if spec == ["all"]:
        return None
    try:
        return [int(x) for x in spec]
    except ValueError:
        raise OptionError(f"--layers {' '.join(spec)!r}: give layer indices (integers, e.g. "
                          "--layers 5 6) or 'all'") from None


def _check_texts(texts: str | None) -> None:
    """A ``--texts`` value that is neither a named source nor an existing file is a typo."""
    if texts is None or texts in TEXT_SOURCES or Path(texts).expanduser().is_file():
        return
    raise OptionError(f"--texts {texts!r} is neither an existing .txt/.jsonl file nor a named "
                      f"source; pass a file or one of {', '.join(TEXT_SOURCES.names())}")


def _run(args: argparse.Namespace, device: str) -> int:
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                   if torch.distributed.is_available() and torch.distributed.is_initialized()
                   else (0, 1))
    wanted = _layers(args.layers)
    if args.texts is not None and is_fact_world(args.texts):
        args.texts = FACT_WORLD  # the fact world's corpus, under any of its model names
    _check_texts(args.texts)
    for flag, value in (("--n-samples", args.n_samples), ("--max-length", args.max_length),
                        ("--batch-size", args.batch_size), ("--batch-tokens", args.batch_tokens)):
        check_number(flag, value)
    if args.cache_dir:
        check_writable("--cache-dir", args.cache_dir, directory=True)
    if args.export:
        check_writable("--export", args.export, directory=True)
    model, tokenizer = load_model(args.model, device=device, dtype=args.model_dtype)
    texts = args.texts or (FACT_WORLD if is_fact_world(args.model) else "wikitext")
    adapter = get_adapter(model)
    n_layers = adapter.num_layers(model)
    layers = list(range(n_layers)) if wanted is None else wanted
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise OptionError(f"--layers {' '.join(map(str, bad))} out of range for this model with "
                          f"{n_layers} layers; use indices in [0, {n_layers - 1}] or 'all'")
    start = time.perf_counter()
    result = second_moment(
        model, layers, texts, tokenizer=tokenizer, n_samples=args.n_samples,
        max_length=args.max_length, dtype=args.dtype, adapter=adapter,
        batch_size=args.batch_size, batch_tokens=args.batch_tokens, cache_dir=args.cache_dir,
        progress=not args.no_progress and rank == 0)
    seconds = time.perf_counter() - start
    if rank != 0:
        return 0
    where = args.cache_dir or default_cache_dir() / "stats"
    for layer, c in result.items():
        print(f"layer {layer}: C {tuple(c.shape)} {c.dtype}, trace {float(c.trace()):.4g}")
    shared = f" over {world} processes" if world > 1 else ""
    print(f"{len(result)} layer(s) in {seconds:.1f}s{shared}; cached under {where}")
    if args.export:
        exported = export_statistics(model, result, args.export, tokenizer=tokenizer,
                                     texts=texts, n_samples=args.n_samples,
                                     max_length=args.max_length, adapter=adapter)
        print(f"exported to {exported}/ ({STATS_TENSORS} + {STATS_CARD})")
    return 0
