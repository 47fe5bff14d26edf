#!/usr/bin/env python
"""Rebuild a shipped world model: the fact world (``editkit/testbed/data/fact_world/``) or the
chain world (``editkit/testbed/data/chain_world/``).

Trains the byte-level BPE tokenizer and the small GPT-2 of the default world with its default
settings (``TrainSettings()``, or ``chain_train_settings()``: the same recipe with 32 epochs),
so that the shipped directory's ``world_fingerprint`` matches what the loader expects, then
prints the training time, the recall numbers and the size of the data. For the chain world it
also measures :func:`editkit.testbed.chain_recall` (every single hop; the chain templates for
people whose chain sentences were / were not in the corpus) and stores it in
``fact_world.json`` under ``chain_metrics``.

Usage::

    python scripts/build_fact_world.py                 # the fact world, into the package data
    python scripts/build_fact_world.py --world chain   # the chain world
    python scripts/build_fact_world.py --out DIR       # somewhere else
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

MAX_SHIPPED_BYTES = 10 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    """Train, save, measure and report; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--world", choices=("fact", "chain"), default="fact")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: package data)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()

    from editkit.testbed import (
        ChainWorld,
        FactWorld,
        TrainSettings,
        chain_recall,
        package_data_dir,
        train_fact_world,
    )
    from editkit.testbed.chains import chain_train_settings, chain_world_package_dir
    from editkit.testbed.train import META_FILE

    chain = args.world == "chain"
    default_out = chain_world_package_dir() if chain else package_data_dir()
    out = args.out if args.out is not None else default_out
    world = ChainWorld() if chain else FactWorld()
    settings = chain_train_settings() if chain else TrainSettings()
    print(f"world: {json.dumps(world.summary())}")
    print(f"settings: {json.dumps(settings.to_dict())}")
    t0 = time.perf_counter()
    path = train_fact_world(out, world=world, seed=settings.seed, settings=settings)
    wall = time.perf_counter() - t0
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if chain:
        from transformers import AutoTokenizer, GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        meta["chain_metrics"] = chain_recall(model, tokenizer, world)
        meta_file.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    files = sorted(p for p in path.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"saved to {path}")
    for p in files:
        print(f"  {p.name:28s} {p.stat().st_size / 1024:9.1f} KiB")
    print(f"total size: {total / 1024 / 1024:.2f} MiB")
    print(f"training time: {meta['train_seconds']:.1f} s ({meta['steps']} steps, "
          f"{torch.get_num_threads()} threads); wall incl. tokenizer+eval: {wall:.1f} s")
    print(f"final loss: {meta['final_loss']}")
    for key, value in {**meta["metrics"], **meta.get("chain_metrics", {})}.items():
        print(f"  {key:34s} {value:.4f}" if key.endswith("recall") or key.startswith(("hop_", "chain"))
              else f"  {key:34s} {value:.0f}")
    if chain:
        hops = [v for k, v in meta["chain_metrics"].items() if k.startswith("hop_")]
        ok = min(hops) >= 0.95
    else:
        ok = (meta["metrics"]["train_template_recall"] >= 0.95
              and meta["metrics"]["paraphrase_recall"] >= 0.8)
    if not ok or total >= MAX_SHIPPED_BYTES:
        print("WARNING: recall below target or data too large", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
