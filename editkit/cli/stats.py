"""``editkit stats``: compute and cache the key second moments C = E[k kᵀ] of a local model.

    editkit stats path/to/model --layers 5 6 --texts corpus.txt --n-samples 20000
    editkit stats fact_world --layers all

The statistics land in the cache ``editkit.stats`` uses (``$EDITKIT_CACHE/stats``), where ROME
and MEMIT find them later. ``fact_world`` names the offline fact-world model (its own corpus
is then the default text source).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from editkit.cli.common import load_model
from editkit.errors import EditkitError
from editkit.registry import get_adapter
from editkit.stats import default_cache_dir, second_moment

FACT_WORLD = "fact_world"


def add_parser(subparsers: Any) -> None:
    """Register ``editkit stats``."""
    p = subparsers.add_parser(
        "stats", help="compute and cache key second-moment statistics (for ROME/MEMIT)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a local model directory (save_pretrained) or 'fact_world'")
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
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", default=None, help="default $EDITKIT_CACHE/stats")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``editkit stats``; prints one line per layer. Returns the exit status."""
    try:
        model, tokenizer = load_model(args.model, device=args.device)
        texts = args.texts or (FACT_WORLD if args.model == FACT_WORLD else "wikitext")
        adapter = get_adapter(model)
        if args.layers == ["all"]:
            layers = list(range(adapter.num_layers(model)))
        else:
            try:
                layers = [int(x) for x in args.layers]
            except ValueError:
                print(f"error: --layers takes integers or 'all', got {args.layers}")
                return 2
        start = time.perf_counter()
        result = second_moment(
            model, layers, texts, tokenizer=tokenizer, n_samples=args.n_samples,
            max_length=args.max_length, dtype=args.dtype, adapter=adapter,
            batch_size=args.batch_size, cache_dir=args.cache_dir,
            progress=not args.no_progress)
    except (EditkitError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    seconds = time.perf_counter() - start
    where = args.cache_dir or default_cache_dir() / "stats"
    for layer, c in result.items():
        print(f"layer {layer}: C {tuple(c.shape)} {c.dtype}, trace {float(c.trace()):.4g}")
    print(f"{len(result)} layer(s) in {seconds:.1f}s; cached under {where}")
    return 0
