#!/usr/bin/env python
"""Rebuild the shipped fact-world model in ``editkit/testbed/data/fact_world/``.

Trains the byte-level BPE tokenizer and the small GPT-2 of the default
``FactWorld()`` with the default ``TrainSettings()`` (so that the shipped
directory's ``world_fingerprint`` matches what ``load_fact_world()`` expects),
then prints the training time, the recall numbers and the size of the data.

Usage::

    python scripts/build_fact_world.py            # into the package data dir
    python scripts/build_fact_world.py --out DIR  # somewhere else
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
    """Train, save and report; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: package data)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()

    from editkit.testbed import FactWorld, TrainSettings, package_data_dir, train_fact_world
    from editkit.testbed.train import META_FILE

    out = args.out if args.out is not None else package_data_dir()
    world = FactWorld()
    settings = TrainSettings()
    print(f"world: {json.dumps(world.summary())}")
    print(f"settings: {json.dumps(settings.to_dict())}")
    t0 = time.perf_counter()
    path = train_fact_world(out, world=world, seed=settings.seed, settings=settings)
    wall = time.perf_counter() - t0
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))

    files = sorted(p for p in path.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"saved to {path}")
    for p in files:
        print(f"  {p.name:28s} {p.stat().st_size / 1024:9.1f} KiB")
    print(f"total size: {total / 1024 / 1024:.2f} MiB")
    print(f"training time: {meta['train_seconds']:.1f} s ({meta['steps']} steps, "
          f"{torch.get_num_threads()} threads); wall incl. tokenizer+eval: {wall:.1f} s")
    print(f"final loss: {meta['final_loss']}")
    for key, value in meta["metrics"].items():
        print(f"  {key:28s} {value:.4f}" if key.endswith("recall") else f"  {key:28s} {value:.0f}")
    ok = (
        meta["metrics"]["train_template_recall"] >= 0.95
        and meta["metrics"]["paraphrase_recall"] >= 0.8
        and total < MAX_SHIPPED_BYTES
    )
    if not ok:
        print("WARNING: recall below target or data too large", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
