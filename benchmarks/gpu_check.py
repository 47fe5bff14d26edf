"""Every method on a GPU, in float32 and bfloat16: efficacy, exact revert, time.

    python benchmarks/gpu_check.py                 # CUDA if present, else a clean skip
    python benchmarks/gpu_check.py --device cpu    # the same checks on the CPU (slow in bf16)
    python benchmarks/gpu_check.py --n 10 --methods rome memit --dtypes float32

For each method × dtype it loads the offline fact world onto the device in that dtype,
edits ``--n`` records one at a time and prints, per cell: ES (P(new) > P(true) on the
rewrite prompt, ``editkit.eval.edit_success``), whether every parameter is bit-for-bit the
original after ``revert`` (``exact``), whether every tensor the edit touched stayed on the
device (``on_device``), and the median seconds per edit. The statistics of ROME / MEMIT /
AlphaEdit are computed once per dtype (their preparation time is printed separately).
Exit status 1 when any cell fails its revert or device check, so it can gate a GPU CI job;
ES is reported, not gated (bf16 may lose a point or two; compare with the float32 row).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

import editkit
from editkit.eval import edit_success
from editkit.testbed import FactWorld, load_fact_world

METHODS = ("ft", "ft_l", "rome", "memit", "alphaedit", "mend", "ke")


def check_cell(method: str, dtype: torch.dtype, device: str, requests) -> dict:
    model, tok = load_fact_world(device=device)
    model = model.to(dtype)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls = editkit.get_method(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor = cls(model, tok)
    t = time.perf_counter()
    editor.prepare()
    prepare_s = time.perf_counter() - t
    seconds, es, on_device = [], [], True
    for request in requests:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with editor.applied(request) as edit:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
            es.append(edit_success(model, tok, request)["ES"])
            params = dict(model.named_parameters())
            on_device &= all(params[name].device.type == torch.device(device).type
                             for name in edit.patch.deltas)
    exact = all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    return {"method": method, "dtype": str(dtype).removeprefix("torch."),
            "ES": sum(es) / len(es), "exact": exact, "on_device": on_device,
            "s_per_edit": statistics.median(seconds), "prepare_s": prepare_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda when available, else skip")
    ap.add_argument("--n", type=int, default=10, help="records edited per cell")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("gpu_check: no CUDA device here; skipped (pass --device cpu to run the checks on "
              "the CPU)")
        return 0
    if device.startswith("cuda"):
        print(f"gpu_check: {torch.cuda.get_device_name(torch.device(device))}, "
              f"torch {torch.__version__}")
    requests = [editkit.EditRequest.from_counterfact(r)
                for r in FactWorld().records(n=args.n)]
    failed = False
    print(f"{'method':>10} {'dtype':>9} {'ES':>6} {'exact':>6} {'device':>7} "
          f"{'s/edit':>8} {'prepare s':>10}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for method in args.methods:
            try:
                cell = check_cell(method, dtype, device, requests)
            except editkit.EditkitError as exc:  # a method that refuses this dtype says why
                print(f"{method:>10} {dtype_name:>9}  refused: {exc}")
                continue
            failed |= not (cell["exact"] and cell["on_device"])
            print(f"{method:>10} {cell['dtype']:>9} {cell['ES']:6.2f} {str(cell['exact']):>6} "
                  f"{str(cell['on_device']):>7} {cell['s_per_edit']:8.3f} "
                  f"{cell['prepare_s']:10.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
