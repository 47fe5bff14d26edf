"""MEMIT cost: seconds per edit by batch size, peak memory 10 vs 400 edits, one-pass stats,
and batched vs one-by-one z.

    python benchmarks/bench_memit.py [--sizes 1 10 100 400] [--threads 2]
    python benchmarks/bench_memit.py --z-only 64 [--threads 1]

Each batch size runs in a fresh subprocess on the offline fact world so its peak RSS
(``ru_maxrss``) is its own; the memory added by an edit of n requests is reported as the
peak after the edit minus the peak before it (model, statistics and templates loaded). The
statistics comparison computes C for five layers of a tiny random 12-layer GPT-2 in one pass
and in five single-layer passes, in this process, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, warnings
import torch
torch.set_num_threads(int(sys.argv[2]))
from editkit import EditRequest
from editkit.methods.memit import MEMIT
from editkit.testbed import FactWorld, load_fact_world

n = int(sys.argv[1])
model, tok = load_fact_world()
reqs = [EditRequest.from_counterfact(r) for r in FactWorld().records(n=n)]
editor = MEMIT(model, tok).prepare()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
editor.apply(reqs)
seconds = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "seconds": seconds, "z_seconds": editor.last_timings["z"],
                  "layer_seconds": editor.last_timings["layers"],
                  "peak_added_mib": (after - before) / 1024}))
"""


def stats_one_pass_vs_per_layer(threads: int) -> dict[str, float]:
    import torch
    import transformers as T

    from editkit.stats import second_moment
    from editkit.testbed import load_fact_world

    torch.set_num_threads(threads)
    _, tok = load_fact_world()  # any offline tokenizer will do
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=12, n_embd=128, n_head=4,
                                           vocab_size=len(tok), n_positions=128)).eval()
    layers = [3, 4, 5, 6, 7]
    kw = {"tokenizer": tok, "n_samples": 400, "max_length": 64, "use_cache": False,
          "progress": False}
    t = time.perf_counter()
    joint = second_moment(model, layers, "pydoc", **kw)
    one = time.perf_counter() - t
    t = time.perf_counter()
    single = {layer: second_moment(model, [layer], "pydoc", **kw)[layer] for layer in layers}
    five = time.perf_counter() - t
    same = all(torch.allclose(joint[k], single[k], rtol=1e-5, atol=1e-7) for k in layers)
    return {"one_pass_s": one, "five_passes_s": five, "ratio": five / one, "equal": same}


def z_batched_vs_sequential(threads: int, n: int, sizes: list[int]) -> None:
    """Seconds of MEMIT's z for ``n`` fact-world requests, optimised ``size`` at a time
    (1 = one after another), interleaved in this process; max |Δz| against size 1."""
    import statistics

    import torch

    from editkit import EditRequest
    from editkit.methods.memit import MEMIT
    from editkit.testbed import FactWorld, load_fact_world

    torch.set_num_threads(threads)
    model, tok = load_fact_world()
    reqs = [EditRequest.from_counterfact(r) for r in FactWorld().records(n=n, seed=2)]
    editor = MEMIT(model, tok).prepare()
    times: dict[int, list[float]] = {s: [] for s in sizes}
    z: dict[int, torch.Tensor] = {}
    for _ in range(2):  # two rounds, interleaved
        for size in sizes:
            editor.z_batch_size = size
            t = time.perf_counter()
            z[size] = torch.stack(editor.targets(reqs))
            times[size].append(time.perf_counter() - t)
    base = min(times[sizes[0]])
    for size in sizes:
        best = min(times[size])
        diff = float((z[size] - z[sizes[0]]).norm(dim=1).max() / z[sizes[0]].norm(dim=1).min())
        print(f"z of {n} requests, {size:3d} per batch: {best:6.2f} s ({best / n:.3f} s/edit), "
              f"x{best / base:.2f} of {sizes[0]} per batch; max rel. |Δz| {diff:.1e}",
              flush=True)
    print("(median of 2 rounds instead of best: "
          + ", ".join(f"{s}: {statistics.median(times[s]):.2f}s" for s in sizes) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 400])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--z-only", type=int, default=0, metavar="N",
                        help="only time z of N requests batched vs one by one")
    args = parser.parse_args()
    if args.z_only:
        z_batched_vs_sequential(args.threads, args.z_only, [1, 4, 16, 64])
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.threads)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"batch {n:4d}: {row['seconds']:7.1f} s total, {row['seconds'] / n:6.3f} s/edit "
              f"(z {row['z_seconds']:.1f} s, layer solves {row['layer_seconds']:.2f} s), "
              f"peak memory added {row['peak_added_mib']:.1f} MiB", flush=True)
    by_n = {r["n"]: r for r in rows}
    if 10 in by_n and 400 in by_n:
        ten, four = by_n[10]["peak_added_mib"], by_n[400]["peak_added_mib"]
        print(f"peak memory added, 400 vs 10 edits: {four:.1f} vs {ten:.1f} MiB "
              f"(ratio {four / max(ten, 1e-3):.1f} for 40x the edits)")
    s = stats_one_pass_vs_per_layer(args.threads)
    print(f"stats for 5 layers: one pass {s['one_pass_s']:.2f} s, five single-layer passes "
          f"{s['five_passes_s']:.2f} s, ratio {s['ratio']:.2f}x, identical results: {s['equal']}")
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
