"""Causal tracing against the reference code itself: same model, prompts, noise; numbers and time.

    python benchmarks/bench_vs_reference_tracing.py --ref /work/ref/rome
        [--facts 5] [--samples 10] [--window 10] [--tiny-layers 6] [--threads 1]
        [--kinds hidden,mlp,attn] [--no-fact-world] [--no-tiny]

``--ref`` is a checkout of kmeng01/rome (MIT). Its ``experiments/causal_trace.py`` is imported
at runtime from there; nothing of it is copied. Patched only for a CPU machine without its
training dependencies: ``make_inputs`` gets ``device="cpu"`` (its default is ``"cuda"``), and a
placeholder module stands in for ``datasets`` / ``sklearn`` if they are missing (only
reference code this benchmark does not run calls them); ``util/globals.py`` reads ``globals.yml`` from the
working directory, so the import runs from ``--ref``.

For each fact-world record (the first ``--facts``), on (1) the offline fact-world GPT-2 and
(2) a tiny random GPT-2 of ``--tiny-layers`` layers (the fact-world tokenizer), per kind:

- reference: ``calculate_hidden_flow(mt, filled_prompt, subject, samples=n, noise=ν,
  window=w, kind=...)`` — it traces the model's top-1 token; its noise is
  ``numpy.random.RandomState(1).randn(n, s, d) · ν``, the same for every restoration;
- editkit: ``CausalTracer(model, tok, noise_std=ν, samples=n, seed=1, noise_rng="numpy")
  .trace(filled_prompt, subject, kinds=..., window=w)`` — the same noise tensor, drawn by the
  same generator with the same seed; the answer is the top-1 token as well.

ν = 3σ with σ the reference's ``collect_embedding_std`` over the traced subjects (editkit's
:func:`~editkit.tracing.embedding_std` is printed beside it). The two sides run interleaved
per record and kind, after one untimed warm-up each; the script prints the largest
|score difference| (and of p_clean / p_corrupt) and the time ratio editkit / reference.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers

from editkit.requests import EditRequest
from editkit.tokens import fill
from editkit.tracing import CausalTracer, embedding_std

#: reference kind name (None = hidden states) of each editkit kind
REF_KIND = {"hidden": None, "mlp": "mlp", "attn": "attn"}


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


#: Packages the reference imports at module level for code this benchmark never runs (its
#: covariance helpers, dataset classes): placeholders when they are not installed.
OPTIONAL = ("datasets", "sklearn")


class _Placeholder(types.ModuleType):
    """A module whose every attribute is a callable that says the package is missing."""

    __path__: list[str] = []

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def missing(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{attr}: not installed (a placeholder so that "
                               "the reference imports; this benchmark does not use it)")
        return missing


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import finder serving :class:`_Placeholder` for ``name`` and its submodules."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module) -> None:
        return None


def load_reference(ref: str):
    """``experiments.causal_trace`` of the reference checkout at ``ref``, patched for CPU."""
    root = Path(ref).expanduser().resolve()
    if not (root / "experiments" / "causal_trace.py").is_file():
        raise SystemExit(f"--ref {ref!r} is not a kmeng01/rome checkout "
                         "(no experiments/causal_trace.py)")
    for name in OPTIONAL:
        if importlib.util.find_spec(name) is None:
            sys.meta_path.insert(0, _Placeholders(name))
    sys.path.insert(0, str(root))
    with _cwd(root):  # util/globals.py opens globals.yml relative to the working directory
        ct = importlib.import_module("experiments.causal_trace")
    ct.make_inputs.__defaults__ = ("cpu",)  # the reference puts inputs on "cuda" by default
    return ct


def fact_world_requests(n: int) -> list[EditRequest]:
    from editkit.testbed import FactWorld

    return [EditRequest.from_counterfact(r) for r in FactWorld().records(n)]


def compare(label: str, ct, model, tokenizer, requests, kinds, samples: int,
            window: int) -> dict:
    mt = ct.ModelAndTokenizer(model=model, tokenizer=tokenizer)
    subjects = [r.subject for r in requests]
    sigma_ref = ct.collect_embedding_std(mt, subjects)
    sigma_ek = embedding_std(model, tokenizer, subjects)
    nu = 3.0 * sigma_ref
    tracer = CausalTracer(model, tokenizer, noise_std=nu, samples=samples, seed=1,
                          noise_rng="numpy")

    def reference(r: EditRequest, kind: str) -> dict:
        with torch.no_grad():
            return ct.calculate_hidden_flow(mt, fill(r.prompt, r.subject), r.subject,
                                            samples=samples, noise=nu, window=window,
                                            kind=REF_KIND[kind])

    def editkit(r: EditRequest, kind: str):
        return tracer.trace(fill(r.prompt, r.subject), r.subject, kinds=kind,
                            window=window)[kind]

    reference(requests[0], kinds[0])  # warm-up (and editkit's one-time self-check)
    editkit(requests[0], kinds[0])
    t_ref = t_ek = 0.0
    diff = dp = 0.0
    answers_equal = True
    for r in requests:
        for kind in kinds:
            start = time.perf_counter()
            a = reference(r, kind)
            t_ref += time.perf_counter() - start
            start = time.perf_counter()
            b = editkit(r, kind)
            t_ek += time.perf_counter() - start
            ref_scores = a["scores"].numpy().astype(np.float64)
            if ref_scores.shape != b.scores.shape:
                raise SystemExit(f"{label}: score shapes differ on {r.subject!r} ({kind}): "
                                 f"reference {ref_scores.shape}, editkit {b.scores.shape}")
            diff = max(diff, float(np.abs(ref_scores - b.scores).max()))
            dp = max(dp, abs(a["low_score"] - b.p_corrupt), abs(float(a["high_score"])
                                                                 - b.p_clean))
            answers_equal &= a["answer"].strip() == b.answer and \
                tuple(a["subject_range"]) == tuple(b.subject_range)
    return {"label": label, "facts": len(requests), "layers": tracer.n_layers,
            "sigma_ref": sigma_ref, "sigma_ek": sigma_ek, "diff": diff, "dp": dp,
            "answers": answers_equal, "t_ref": t_ref, "t_ek": t_ek, "ratio": t_ek / t_ref}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", required=True, help="a kmeng01/rome checkout")
    parser.add_argument("--facts", type=int, default=5)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10, help="the reference's default 10")
    parser.add_argument("--tiny-layers", type=int, default=6)
    parser.add_argument("--kinds", default="hidden,mlp,attn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-fact-world", action="store_true")
    parser.add_argument("--no-tiny", action="store_true")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if any(k not in REF_KIND for k in kinds):
        raise SystemExit(f"--kinds: the reference traces {sorted(REF_KIND)}")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    ct = load_reference(args.ref)
    requests = fact_world_requests(args.facts)

    from editkit.testbed import load_fact_world

    model, tokenizer = load_fact_world()
    rows = []
    if not args.no_fact_world:
        rows.append(compare(f"fact world ({model.config.n_layer} layers)", ct, model.eval(),
                            tokenizer, requests, kinds, args.samples, args.window))
    if not args.no_tiny:
        cfg = transformers.GPT2Config(n_layer=args.tiny_layers, n_embd=48, n_head=4,
                                      n_positions=128, vocab_size=len(tokenizer),
                                      initializer_range=0.3)
        torch.manual_seed(0)
        tiny = transformers.GPT2LMHeadModel(cfg).eval()
        rows.append(compare(f"tiny random GPT-2 ({args.tiny_layers} layers)", ct, tiny,
                            tokenizer, requests, kinds, args.samples, args.window))

    print(f"editkit vs reference calculate_hidden_flow: kinds {'+'.join(kinds)}, "
          f"{args.samples} samples, window {args.window}, identical noise "
          f"(numpy RandomState(1) · 3σ_ref), {args.threads} thread(s), cpu")
    print(f"{'model':30s} {'facts':>5s} {'σ ref':>8s} {'σ editkit':>9s} {'max |Δ score|':>13s} "
          f"{'max |Δ p|':>9s} {'same answer':>11s} {'ref s':>7s} {'editkit s':>9s} "
          f"{'editkit/ref':>11s} {'speed-up':>8s}")
    for r in rows:
        print(f"{r['label']:30s} {r['facts']:5d} {r['sigma_ref']:8.4f} {r['sigma_ek']:9.4f} "
              f"{r['diff']:13.1e} {r['dp']:9.1e} {str(r['answers']):>11s} {r['t_ref']:7.2f} "
              f"{r['t_ek']:9.2f} {r['ratio']:11.3f} {1 / r['ratio']:7.1f}×")
    bad = [r["label"] for r in rows if r["diff"] > 1e-4 or not r["answers"]]
    if bad:
        raise SystemExit(f"editkit and the reference disagree on: {', '.join(bad)}")


if __name__ == "__main__":
    main()
