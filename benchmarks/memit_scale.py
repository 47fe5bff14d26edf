"""MEMIT at scale on the fact world: time, peak memory and ES/PS/NS vs batch size, beside
sequential ROME on the same records (the MEMIT paper's scaling figure, Meng et al. 2023).

    python benchmarks/memit_scale.py [--sizes 1 10 100 1000] [--rome-max 100]
                                     [--eval-n 50] [--threads 1] [--out docs/results/memit_scale]

Requests: the fact world has 100 eval subjects × 6 relations = 600 CounterFact-shaped records
the model knows. A batch of n ≤ 600 edits takes the first n of a fixed shuffle of them; a
larger batch adds requests on *invented* subjects from further worlds
(``FactWorld(seed=s, n_subjects=400)``, s = 1, 2, ..., subjects of the base world and repeated
(subject, prompt) pairs skipped): they cost MEMIT the same as real ones (a z, a key per
layer), but the model never learnt them, so quality is measured only on real records.

Quality: ES/PS/NS (``editkit.eval.counterfact_metrics``) on the first ``--eval-n`` real
records of each batch, after the whole batch is in. Sequential ROME edits the same first n
requests one after another (n ≤ ``--rome-max``) and is measured on the same records.

Each (method, size) runs in a fresh subprocess so its peak resident memory is its own; the
memory an edit adds is the process's peak RSS after the edit minus the peak before it (model,
statistics, templates loaded). MEMIT never forms an n × n matrix: each layer solves
(λC + K Kᵀ) Δᵀ = ... with K Kᵀ of size d × d (``memit.solve_layer_update``), so memory is
O(d² + n·d). Writes ``OUT.json`` and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import torch
method, n, eval_n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
sys.path.insert(0, sys.argv[5])
from memit_scale import requests_for, quality
from editkit.testbed import load_fact_world

model, tok = load_fact_world(train_if_missing=False)
records, requests = requests_for(n)
if method == "memit":
    from editkit.methods.memit import MEMIT
    editor = MEMIT(model, tok)
else:
    from editkit.methods.rome import ROME
    editor = ROME(model, tok)
editor.prepare()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
editor.apply(requests)
seconds = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
row = {"method": method, "n": n, "seconds": seconds, "seconds_per_edit": seconds / n,
       "peak_added_mib": (after - before) / 1024, "peak_rss_mib": after / 1024,
       "eval_records": min(eval_n, len(records))}
if method == "memit":
    row["z_seconds"] = editor.last_timings["z"]
    row["layer_seconds"] = editor.last_timings["layers"]
    row["z_batch_size"] = editor.z_batch_size
row.update(quality(model, tok, records[:eval_n]))
print(json.dumps(row))
"""

BASE_SEED = 0


def requests_for(n: int):
    """(real records among the first n, the n requests): see the module docstring."""
    from editkit import EditRequest
    from editkit.testbed import FactWorld

    base = FactWorld()
    real = base.records(n=None)
    import random

    random.Random(BASE_SEED).shuffle(real)
    chosen = real[:n]
    requests = [EditRequest.from_counterfact(r) for r in chosen]
    seen = {(r.subject, r.prompt) for r in requests}
    known = set(base.subjects)
    seed = 1
    while len(requests) < n:
        for rec in FactWorld(seed=seed, n_subjects=400).records(n=None):
            req = EditRequest.from_counterfact(rec)
            if req.subject in known or (req.subject, req.prompt) in seen:
                continue
            seen.add((req.subject, req.prompt))
            requests.append(req)
            if len(requests) == n:
                break
        seed += 1
    return chosen, requests


def quality(model, tok, records) -> dict[str, float]:
    """Mean ES/PS/NS of the current model on CounterFact-shaped ``records``."""
    import statistics

    from editkit.eval import counterfact_metrics, score_records
    from editkit.eval.datasets import parse_counterfact

    parsed = [parse_counterfact(r, i) for i, r in enumerate(records)]
    scores = score_records(model, tok, parsed, ["rewrite", "paraphrase", "neighborhood"])
    per = [counterfact_metrics(s.logprobs) for s in scores]
    return {k: statistics.mean(float(m[k]) for m in per if m[k] is not None)
            for k in ("ES", "PS", "NS")}


def run(method: str, n: int, eval_n: int, threads: int) -> dict:
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(n), str(eval_n),
                          str(threads), here], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} n={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method, style in (("memit", "o-"), ("rome", "s--")):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        for key, color in (("ES", "tab:blue"), ("PS", "tab:orange"), ("NS", "tab:green")):
            axes[0].plot(ns, [r[key] for r in rs], style, color=color,
                         label=f"{method.upper()} {key}")
        axes[1].plot(ns, [r["seconds"] for r in rs], style, label=method.upper())
        axes[2].plot(ns, [max(r["peak_added_mib"], 0.1) for r in rs], style,
                     label=method.upper())
    axes[0].set(xscale="log", xlabel="edits", ylabel="success rate", ylim=(-0.02, 1.02),
                title="quality after n edits (fact world)")
    axes[1].set(xscale="log", yscale="log", xlabel="edits", ylabel="seconds (total)",
                title="time")
    axes[2].set(xscale="log", yscale="log", xlabel="edits", ylabel="peak RSS added (MiB)",
                title="memory")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--rome-max", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results/memit_scale")
    ap.add_argument("--resume", action="store_true", help="keep rows already in OUT.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT.png from OUT.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.with_suffix(".json").read_text())["rows"], out.with_suffix(".png"))
        return
    rows: list[dict] = []
    if args.resume and out.with_suffix(".json").exists():
        rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    done = {(r["method"], r["n"]) for r in rows}
    for n in args.sizes:
        for method in ("memit", "rome"):
            if (method, n) in done or (method == "rome" and n > args.rome_max):
                continue
            t = time.perf_counter()
            row = run(method, n, args.eval_n, args.threads)
            rows.append(row)
            print(f"{method:5s} n={n:5d}: {row['seconds']:8.1f} s ({row['seconds_per_edit']:.3f}"
                  f" s/edit), peak added {row['peak_added_mib']:7.1f} MiB; ES {row['ES']:.2f} "
                  f"PS {row['PS']:.2f} NS {row['NS']:.2f} on {row['eval_records']} records "
                  f"[{time.perf_counter() - t:.0f} s wall]", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(
                {"command": "python benchmarks/memit_scale.py " + " ".join(sys.argv[1:]),
                 "threads": args.threads, "eval_n": args.eval_n, "rows": rows}, indent=1) + "\n")
            plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
