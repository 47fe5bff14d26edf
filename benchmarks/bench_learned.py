"""Edit latency of a trained MEND (and KE) against ROME, FT and FT+L on the fact world.

MEND's selling point is speed per edit: one forward/backward pass of the edit prompt and a
small network, against ROME's optimisation of v* (20 Adam steps over ~20 prefixed prompts)
and FT's 25 fine-tuning steps. Everything is measured in this one run, on the same records,
and printed as ratios to MEND's latency. One-time costs (ROME's statistics and context
templates, a hypernetwork's load) are reported separately as ``prepare``.

    python benchmarks/bench_learned.py               # shipped or cached hypernetworks
    python benchmarks/bench_learned.py --n 30 --threads 2

If no trained hypernetwork fits the fact-world model, a short one is trained first (the
latency of an edit does not depend on how well the hypernetwork is trained).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch


def _learned_factory(cls, cfg_cls, model, tok, train, val, steps: int):
    """A factory of the shipped editor, or (if none fits) of a briefly trained one."""
    from editkit.errors import HypernetworkMissingError

    try:
        cls(model, tok).prepare()
        return (lambda: cls(model, tok)), "shipped hypernetwork (load + fingerprint in prepare)"
    except HypernetworkMissingError:
        out = tempfile.mkdtemp(prefix=f"bench_{cls.METHOD}_")
        cfg = cfg_cls(max_steps=steps, val_every=steps, val_size=16, out_dir=out,
                      progress=False)
        cls.train(model, tok, train, val, cfg)
        return (lambda: cls.load(out, model, tok)), f"trained {steps} steps here"


def time_edits(factory, requests, warmup: int = 2) -> tuple[float, list[float]]:
    """(construct + prepare seconds, per-edit apply seconds); edits are reverted after timing."""
    t0 = time.perf_counter()
    editor = factory()
    editor.prepare()
    prepare = time.perf_counter() - t0
    for r in requests[:warmup]:
        with editor.applied(r):
            pass
    times = []
    for r in requests:
        t = time.perf_counter()
        with editor.applied(r):
            times.append(time.perf_counter() - t)
    return prepare, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="edits timed per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=50,
                        help="steps of the fallback training when no hypernetwork fits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from editkit.methods._learned.data import as_requests, split_by_subject
    from editkit.methods.ft import FT, FTL
    from editkit.methods.ke import KE, KETrainConfig
    from editkit.methods.mend import MEND, MENDTrainConfig
    from editkit.testbed import FactWorld, load_fact_world

    model, tok = load_fact_world()
    reqs = as_requests(FactWorld().records())
    train, val, test = split_by_subject(reqs, (0.8, 0.1, 0.1), seed=0)
    requests = test[: args.n]

    editors: list[tuple[str, object, str]] = []
    factory, how = _learned_factory(MEND, MENDTrainConfig, model, tok, train, val,
                                    args.train_steps)
    editors.append(("MEND", factory, how))
    factory, how = _learned_factory(KE, KETrainConfig, model, tok, train, val, args.train_steps)
    editors.append(("KE", factory, how))
    try:
        from editkit.methods.rome import ROME

        editors.append(("ROME", lambda: ROME(model, tok),
                        "statistics + context templates in prepare (cached on disk)"))
    except ImportError:
        pass
    editors.append(("FT", lambda: FT(model, tok), "defaults; stops early at NLL 0.01"))
    editors.append(("FT+L", lambda: FTL(model, tok), "defaults"))

    rows = []
    for name, factory, note in editors:
        prepare, times = time_edits(factory, requests)
        rows.append((name, prepare, statistics.median(times), statistics.mean(times), note))
    ref = rows[0][2]
    print(f"fact world: {len(requests)} edits per method, torch threads = {args.threads}")
    print("| method | prepare (s) | median ms/edit | mean ms/edit | × MEND median | note |")
    print("|---|---|---|---|---|---|")
    for name, prepare, med, mean, note in rows:
        print(f"| {name} | {prepare:.2f} | {1e3 * med:.1f} | {1e3 * mean:.1f} | "
              f"{med / ref:.1f}× | {note} |")


if __name__ == "__main__":
    main()
