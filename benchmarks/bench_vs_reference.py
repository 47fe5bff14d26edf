"""editkit's ROME against the reference implementation itself (kmeng01/rome), side by side.

    python benchmarks/bench_vs_reference.py --ref /work/ref/rome --model factworld --n 20
    python benchmarks/bench_vs_reference.py --ref /work/ref/rome --model smollm2 --n 4

``--ref`` is a checkout of kmeng01/rome (or kmeng01/memit, which ships the same ``rome``
package). Its code is imported at runtime from there and never copied; only what CPU
execution needs is patched, at runtime and only while the reference runs:

* ``"cuda"`` devices in ``compute_v`` (a ``torch`` stand-in in that module's namespace and
  ``BatchEncoding.to``) become the model's device;
* ``util.globals`` reads ``globals.yml`` from the working directory: it is imported from
  ``--ref``; a missing ``datasets`` package is replaced by a stub (no hub access here);
* the statistics: both sides get the SAME C, computed once by ``editkit.stats.second_moment``
  on the same texts, injected as the reference's cached inverse (``compute_u.inv_mom2_cache``);
* the context templates: both sides get the SAME templates (editkit's sampler, which starts
  from the end-of-text token as the reference's does), injected into
  ``rome_main.CONTEXT_TEMPLATES_CACHE``;
* a LLaMA config lacks the GPT-2 names the reference reads (``n_embd``, ``n_positions``):
  they are set as aliases on the config.

Both sides edit the same model with the same hyperparameters (editkit's preset, the step count
in the reference's counting: ``value.count_steps="reference"``), each record edited alone and
reverted, the two sides interleaved per record (alternating which goes first) in one process.
Printed: ES / PS / NS of both sides and the paired differences, median seconds per edit of both
and the ratio editkit / reference, the phase breakdown (templates, k*, v*, solve), and the
statistics loop (editkit's ``second_moment`` vs the reference's ``layer_stats`` on the same
texts, same C to float tolerance).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

import editkit
from editkit import EditRequest
from editkit.eval.quality import edit_success
from editkit.methods._locate.templates import generate_context_templates
from editkit.methods.rome import ROME, ROMEHyperParams
from editkit.stats import second_moment, text_source

METRICS = ("ES", "PS", "NS")


# ---------------------------------------------------------------- importing the reference
class _CpuTorch(types.ModuleType):
    """``torch`` for the reference's modules, with ``device="cuda"`` mapped to ``device``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__("torch")
        self._device = device

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in ("tensor", "zeros", "ones", "full", "empty", "arange"):
            def on_device(*args, _f=attr, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = self._device
                return _f(*args, **kwargs)
            return on_device
        return attr


def import_reference(ref: Path, device: torch.device):
    """The reference's ``rome`` package imported from ``ref`` (patched for CPU)."""
    if not (ref / "rome" / "rome_main.py").is_file():
        sys.exit(f"--ref {ref}: no rome/rome_main.py there; pass a checkout of kmeng01/rome")
    try:
        import datasets  # noqa: F401
    except ImportError:  # only load_dataset is imported, and only layer_stats calls it
        stub = types.ModuleType("datasets")

        def load_dataset(*_a, **_k):
            raise RuntimeError("no 'datasets' here: the benchmark injects the statistics")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    sys.path.insert(0, str(ref))
    cwd = os.getcwd()
    os.chdir(ref)  # util.globals opens "globals.yml" relative to the working directory
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import rome.compute_u
            import rome.compute_v
            import rome.layer_stats
            import rome.rome_main
    finally:
        os.chdir(cwd)
    rome.compute_v.torch = _CpuTorch(device)
    return rome


@contextlib.contextmanager
def reference_running(device: torch.device):
    """While the reference runs: ``BatchEncoding.to("cuda")`` goes to ``device``; its
    prints are swallowed."""
    from transformers import BatchEncoding

    original = BatchEncoding.to

    def to(self, where, *a, **k):
        return original(self, device if str(where).startswith("cuda") else where, *a, **k)

    BatchEncoding.to = to
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        BatchEncoding.to = original


def module_template(adapter, model, slot: str) -> str:
    """An adapter's module name with the layer index as ``{}`` (the reference's form)."""
    a, b = adapter.module_name(slot, 1), adapter.module_name(slot, 2)
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return a[:i] + "{}" + a[i + 1:]


def reference_hparams(rome, hp: ROMEHyperParams, model, adapter):
    n_layers = adapter.num_layers(model)
    rewrite = module_template(adapter, model, "mlp_out")
    block = module_template(adapter, model, "block")
    vp = hp.value
    return rome.rome_main.ROMEHyperParams(
        layers=[hp.layer], fact_token=vp.fact_token, v_num_grad_steps=vp.num_grad_steps,
        v_lr=vp.lr, v_loss_layer=vp.read_layer(n_layers), v_weight_decay=vp.weight_decay,
        clamp_norm_factor=vp.clamp_norm_factor, kl_factor=vp.kl_factor, mom2_adjustment=True,
        context_template_length_params=[list(p) for p in vp.context_template_length_params],
        rewrite_module_tmp=rewrite, layer_module_tmp=block,
        mlp_module_tmp=rewrite.rsplit(".", 1)[0], attn_module_tmp=block + ".attn",
        ln_f_module=adapter.module_name("final_norm"), lm_head_module=adapter.module_name("lm_head"),
        mom2_dataset="injected", mom2_n_samples=hp.mom2_n_samples, mom2_dtype=hp.mom2_dtype)


# ---------------------------------------------------------------- the reference MEMIT
def import_reference_memit(ref: Path, device: torch.device, covariances: dict[str, torch.Tensor]):
    """The reference's ``memit`` package imported from ``ref`` (kmeng01/memit), patched for
    CPU and for blocks that return a tensor (see :class:`_TupleOutputs`); ``get_cov`` returns
    the injected second moments (by module name), as ``inv_mom2_cache`` does for ROME."""
    if not (ref / "memit" / "memit_main.py").is_file():
        sys.exit(f"--ref {ref}: no memit/memit_main.py there; pass a checkout of kmeng01/memit")
    import_reference(ref, device)  # its rome package, util.globals, the datasets stub
    cwd = os.getcwd()
    os.chdir(ref)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import memit.compute_z
            import memit.memit_main
    finally:
        os.chdir(cwd)
    memit.compute_z.torch = _CpuTorch(device)
    memit.compute_z.nethook = _TupleOutputs(memit.compute_z.nethook)

    def get_cov(model, tok, layer_name, *args, **kwargs):
        return covariances[layer_name].to(device)

    memit.memit_main.get_cov = get_cov
    return memit


class _TupleOutputs(types.ModuleType):
    """The reference's ``nethook`` for ``compute_z``, on transformers versions whose blocks
    return a tensor: compute_z reads and edits a block's output as ``output[0]`` (the hidden
    state of a tuple, as transformers 4.x returned it), which on a tensor would be the first
    row. Its edit function and the retained outputs see a 1-tuple around the tensor."""

    def __init__(self, nethook) -> None:
        super().__init__("nethook")
        self._nethook = nethook

    def __getattr__(self, name):
        return getattr(self._nethook, name)

    def TraceDict(self, module, layers, *args, edit_output=None, **kwargs):  # noqa: N802
        def edit(output, layer):
            if isinstance(output, torch.Tensor):
                return edit_output((output,), layer)[0]
            return edit_output(output, layer)

        traces = self._nethook.TraceDict(module, layers, *args,
                                         edit_output=edit if edit_output else None, **kwargs)
        return _TupleTraces(traces)


class _TupleTraces:
    """A reference ``TraceDict`` whose retained tensor outputs read as 1-tuples."""

    def __init__(self, traces) -> None:
        self._traces = traces

    def __enter__(self):
        self._traces.__enter__()
        return self

    def __exit__(self, *exc):
        return self._traces.__exit__(*exc)

    def __getitem__(self, name):
        trace = self._traces[name]
        out = trace.output
        return types.SimpleNamespace(output=(out,) if isinstance(out, torch.Tensor) else out,
                                     input=getattr(trace, "input", None))


def reference_memit_hparams(memit, hp, model, adapter):
    n_layers = adapter.num_layers(model)
    rewrite = module_template(adapter, model, "mlp_out")
    block = module_template(adapter, model, "block")
    lm_weight = adapter.module(model, "lm_head").weight
    # the reference reads the unembedding by parameter name: a tied one is listed under
    # the embedding's name only
    lm_name = next(n for n, p in model.named_parameters() if p is lm_weight)
    vp = hp.value
    return memit.memit_main.MEMITHyperParams(
        layers=list(hp.layers), layer_selection="all", fact_token=vp.fact_token,
        v_num_grad_steps=vp.num_grad_steps, v_lr=vp.lr, v_loss_layer=vp.read_layer(n_layers),
        v_weight_decay=vp.weight_decay, clamp_norm_factor=vp.clamp_norm_factor,
        kl_factor=vp.kl_factor, mom2_adjustment=True, mom2_update_weight=hp.mom2_update_weight,
        rewrite_module_tmp=rewrite, layer_module_tmp=block,
        mlp_module_tmp=rewrite.rsplit(".", 1)[0], attn_module_tmp=block + ".attn",
        ln_f_module=adapter.module_name("final_norm"), lm_head_module=lm_name[:-len(".weight")],
        mom2_dataset="injected", mom2_n_samples=hp.mom2_n_samples, mom2_dtype=hp.mom2_dtype)


def run_memit_reference(memit, rhp, model, tok, requests, device
                        ) -> tuple[float, list, dict, dict]:
    main = memit.memit_main
    phases = {"z": 0.0}
    original = main.compute_z

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            phases["z"] += time.perf_counter() - t0

    reqs = [{"case_id": i, "prompt": r.prompt, "subject": r.subject,
             "target_new": {"str": r.target_new}} for i, r in enumerate(requests)]
    main.compute_z = timed
    try:
        with reference_running(device):
            t = time.perf_counter()
            deltas = main.execute_memit(model, tok, reqs, rhp)
            seconds = time.perf_counter() - t
    finally:
        main.compute_z = original
    phases["layers"] = seconds - phases["z"]
    params = dict(model.named_parameters())
    saved, updates = {}, {}
    with torch.no_grad():
        for name, (key_mat, val_mat) in deltas.items():
            w = params[name]
            saved[name] = w.detach().clone()
            upd = key_mat.to(device) @ val_mat.to(device).T
            w[...] += main.upd_matrix_match_shape(upd, w.shape).float()
            updates[name] = w.detach() - saved[name]
    try:
        scores = [score(model, tok, r) for r in requests]
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                params[name][...] = w0
    return seconds, scores, phases, updates


def run_memit_editkit(editor, requests) -> tuple[float, list, dict, dict]:
    params = dict(editor.model.named_parameters())
    before = {n: params[n].detach().clone() for n in editor.edited_parameters()}
    t = time.perf_counter()
    with editor.applied(requests):
        seconds = time.perf_counter() - t
        updates = {n: params[n].detach() - w0 for n, w0 in before.items()}
        scores = [score(editor.model, editor.tokenizer, r) for r in requests]
    return seconds, scores, dict(editor.last_timings), updates


def main_memit(args) -> None:
    """``--method memit``: one batch of ``--batch`` records through both MEMITs (same C,
    templates, hyperparameters), for each batch size; the two sides alternate."""
    from editkit.methods.memit import MEMIT, MEMITHyperParams

    sizes = [int(x) for x in args.batch.split(",")]
    model, tok, requests = load(args.model, max(sizes))
    device = next(model.parameters()).device
    adapter = editkit.get_adapter(model)
    hp = MEMITHyperParams.for_model(model, adapter)
    hp.value = dataclasses.replace(hp.value, count_steps=args.counting)
    max_length = hp.mom2_max_length or 256
    if getattr(model.config, "n_positions", None):
        max_length = min(max_length, model.config.n_positions)
    templates = generate_context_templates(model, tok, hp.value.context_template_length_params,
                                           use_cache=False,
                                           start=hp.value.context_template_start)
    texts = list(text_source(hp.mom2_dataset, args.stats_texts, model=model,
                             tokenizer=tok).texts(args.stats_texts))
    covs = second_moment(model, list(hp.layers), texts, tokenizer=tok, n_samples=len(texts),
                         max_length=max_length, dtype=hp.mom2_dtype, adapter=adapter,
                         progress=False)
    # the reference keeps C in float32 (``stat.mom2.moment().float()``): both sides get that
    covs = {layer: c.float() for layer, c in covs.items()}
    names = {adapter.module_name("mlp_out", layer): c for layer, c in covs.items()}
    memit = import_reference_memit(args.ref.resolve(), device, names)
    groups, i = [], 0  # the reference's templates: lists per prefix length, bare prompt first
    for size in [1] + [count for _, count in hp.value.context_template_length_params]:
        groups.append(list(templates[i:i + size]))
        i += size
    memit.memit_main.CONTEXT_TEMPLATES_CACHE = groups
    rhp = reference_memit_hparams(memit, hp, model, adapter)
    editor = MEMIT(model, tok, hp, context_templates=templates, covariances=covs)
    editor.prepare()
    print(f"MEMIT, model {args.model} ({type(model).__name__}), layers {list(hp.layers)}, "
          f"{hp.value.num_grad_steps} steps counted as {args.counting!r}, "
          f"{len(templates)} templates, C from {len(texts)} texts of {hp.mom2_dataset}, "
          f"{args.threads} thread(s)")
    print("\n| edits | side | ES | PS | NS | s/batch | s/edit | z s | layers s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, n in enumerate(sizes):
        batch = requests[:n]
        sides = ["editkit", "reference"] if k % 2 == 0 else ["reference", "editkit"]
        out = {}
        for side in sides:
            if side == "editkit":
                out[side] = run_memit_editkit(editor, batch)
            else:
                out[side] = run_memit_reference(memit, rhp, model, tok, batch, device)
        for side in ("editkit", "reference"):
            seconds, scores, phases, _ = out[side]
            means = {m: statistics.fmean(s[m] for s in scores if m in s) for m in METRICS}
            print(f"| {n} | {side} | {means['ES']:.3f} | {means['PS']:.3f} | "
                  f"{means['NS']:.3f} | {seconds:.1f} | {seconds / n:.3f} | "
                  f"{phases['z']:.1f} | {phases['layers']:.1f} |", flush=True)
        diffs = {m: [a[m] - b[m] for a, b in zip(out["editkit"][1], out["reference"][1],
                                                strict=True) if m in a and m in b]
                 for m in METRICS}
        print("|   | editkit − reference | " + " | ".join(
            f"{statistics.fmean(d):+.3f} ({sum(abs(x) > 1e-9 for x in d)}/{len(d)} differ)"
            for d in diffs.values()) + f" | ratio {out['editkit'][0] / out['reference'][0]:.2f}×"
            " | | | |", flush=True)
        ups = out["editkit"][3], out["reference"][3]
        rel = max(float((ups[0][n] - ups[1][n]).abs().max() / ups[1][n].abs().max())
                  for n in ups[1])
        print(f"|   | weight updates: max |ΔW_editkit − ΔW_reference| / max |ΔW_reference| = "
              f"{rel:.1e} | | | | | | | |", flush=True)


# ---------------------------------------------------------------- models and records
def load(which: str, n: int):
    if which == "factworld":
        from editkit.testbed import FactWorld, load_fact_world

        model, tok = load_fact_world(train_if_missing=False)[:2]
        records = FactWorld().records(n=n, seed=0)
    else:
        from editkit.testbed.real_facts import real_facts
        from editkit.testbed.smollm2 import load_smollm2

        model, tok = load_smollm2()
        records = real_facts(n)
    # The reference reads GPT-2 config names; LLaMA configs call them otherwise.
    cfg = model.config
    if not hasattr(cfg, "n_embd"):
        cfg.n_embd = cfg.hidden_size
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, [EditRequest.from_counterfact(r) for r in records]


# ---------------------------------------------------------------- one edit per side
def score(model, tok, request) -> dict[str, float]:
    s = edit_success(model, tok, request)
    return {k: s[k] for k in METRICS if s[k] is not None}


def run_editkit(editor: ROME, request: EditRequest) -> tuple[float, dict, dict]:
    t = time.perf_counter()
    with editor.applied(request):
        seconds = time.perf_counter() - t
        scores = score(editor.model, editor.tokenizer, request)
    phases = dict(editor.last_step.timings)
    return seconds, scores, {"k*": phases["k_star"], "v*": phases["v_star"],
                             "solve": phases["update"]}


def run_reference(rome, rhp, model, tok, request: EditRequest, device) -> tuple[float, dict, dict]:
    phases = {"k*+u": 0.0, "v*+solve": 0.0}
    main = rome.rome_main
    originals = main.compute_u, main.compute_v

    def timed(name, f):
        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                phases[name] += time.perf_counter() - t0
        return g

    req = {"prompt": request.prompt, "subject": request.subject,
           "target_new": {"str": request.target_new}}
    main.compute_u, main.compute_v = timed("k*+u", originals[0]), timed("v*+solve", originals[1])
    try:
        with reference_running(device):
            t = time.perf_counter()
            deltas = main.execute_rome(model, tok, req, rhp)
            seconds = time.perf_counter() - t
    finally:
        main.compute_u, main.compute_v = originals
    params = dict(model.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, (u, v) in deltas.items():
            w = params[name]
            saved[name] = w.detach().clone()
            w[...] += main.upd_matrix_match_shape(u.unsqueeze(1) @ v.unsqueeze(0), w.shape)
    try:
        scores = score(model, tok, request)
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                params[name][...] = w0
    return seconds, scores, phases


# ---------------------------------------------------------------- statistics loop
def compare_statistics(rome, model, tok, adapter, layer, texts, max_length, reps):
    """editkit's second_moment (length-sorted and plain) vs the reference's layer_stats on
    the same texts; seconds per run (interleaved) and the relative difference of C."""
    name = adapter.module_name("mlp_out", layer)
    ls = rome.layer_stats
    cfg = model.config
    had = hasattr(cfg, "n_positions")
    old_npos = getattr(cfg, "n_positions", None)
    cfg.n_positions = max_length  # the reference truncates texts to n_positions
    ls.load_dataset = lambda *a, **k: {"train": [{"text": t} for t in texts]}
    to_device = ls.dict_to_
    ls.dict_to_ = lambda data, where: to_device(data, model.device)  # its "cuda"
    times = {"editkit": [], "editkit plain": [], "reference": []}
    try:
        for _ in range(reps):
            for side in times:
                t = time.perf_counter()
                if side == "reference":
                    with tempfile.TemporaryDirectory() as d, reference_running(model.device):
                        stat = ls.layer_stats(model, tok, name, d, "wikitext", ["mom2"],
                                              sample_size=len(texts), precision="float64",
                                              download=False,
                                              progress=lambda x, total=None: x)
                    ref_c = stat.mom2.moment()
                else:
                    c = second_moment(model, [layer], list(texts), tokenizer=tok,
                                      n_samples=len(texts), max_length=max_length,
                                      dtype="float64", adapter=adapter, use_cache=False,
                                      progress=False,
                                      sort_by_length=side == "editkit")[layer]
                times[side].append(time.perf_counter() - t)
    finally:
        if had:
            cfg.n_positions = old_npos
        else:
            del cfg.n_positions
    diff = float((c - ref_c.to(c.dtype)).abs().max() / ref_c.abs().max())
    return {k: statistics.median(v) for k, v in times.items()}, diff


# ---------------------------------------------------------------- main
def _cells(scores: dict) -> str:
    return " ".join(f"{k} {scores.get(k, float('nan')):.2f}" for k in METRICS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, required=True, help="checkout of kmeng01/rome")
    ap.add_argument("--model", choices=("factworld", "smollm2"), default="factworld")
    ap.add_argument("--n", type=int, default=10, help="records (each edited alone)")
    ap.add_argument("--stats-texts", type=int, default=2000,
                    help="texts of the statistics source for C (both sides get the same C)")
    ap.add_argument("--compare-stats", type=int, default=200,
                    help="texts for the statistics-loop comparison (0: skip it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--counting", choices=("reference", "updates"), default="reference",
                    help="editkit's value.count_steps (reference: same number of updates)")
    ap.add_argument("--method", choices=("rome", "memit"), default="rome",
                    help="memit: --ref is a checkout of kmeng01/memit; one batch per --batch")
    ap.add_argument("--batch", default="10,100",
                    help="--method memit: batch sizes, comma-separated (each a fresh batch "
                         "of the first records, edited together)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.method == "memit":
        main_memit(args)
        return

    model, tok, requests = load(args.model, args.n)
    requests = [r for r in requests if r.target_true is not None][: args.n]
    device = next(model.parameters()).device
    adapter = editkit.get_adapter(model)
    rome = import_reference(args.ref.resolve(), device)
    hp = ROMEHyperParams.for_model(model, adapter)
    hp.value = dataclasses.replace(hp.value, count_steps=args.counting)
    max_length = hp.mom2_max_length or 256
    if getattr(model.config, "n_positions", None):
        max_length = min(max_length, model.config.n_positions)

    # The same templates for both sides (and the time each sampler takes to make them).
    t = time.perf_counter()
    templates = generate_context_templates(model, tok, hp.value.context_template_length_params,
                                           use_cache=False)
    t_templates = time.perf_counter() - t
    from util.generate import generate_fast  # the reference's sampler, for its time only

    t = time.perf_counter()
    with reference_running(device):
        for length, count in hp.value.context_template_length_params:
            generate_fast(model, tok, ["<|endoftext|>"], n_gen_per_prompt=count,
                          max_out_len=length)
    t_ref_templates = time.perf_counter() - t
    rome.rome_main.CONTEXT_TEMPLATES_CACHE = list(templates)

    # The same C for both sides.
    texts = text_source(hp.mom2_dataset, args.stats_texts, model=model, tokenizer=tok)
    texts = list(texts.texts(args.stats_texts))
    cov = second_moment(model, [hp.layer], texts, tokenizer=tok, n_samples=len(texts),
                        max_length=max_length, dtype=hp.mom2_dtype, adapter=adapter,
                        progress=False)[hp.layer]
    rewrite = module_template(adapter, model, "mlp_out").format(hp.layer)
    key = (model.config._name_or_path.replace("/", "_"), rewrite)
    rome.compute_u.inv_mom2_cache[key] = torch.inverse(cov.float().to(device)).float()
    rhp = reference_hparams(rome, hp, model, adapter)
    editor = ROME(model, tok, hp, context_templates=templates, covariance=cov)
    editor.prepare()

    print(f"model {args.model} ({type(model).__name__}), layer {hp.layer}, "
          f"{hp.value.num_grad_steps} steps counted as {args.counting!r}, "
          f"{len(templates)} templates, C from {len(texts)} texts of {hp.mom2_dataset}, "
          f"{args.threads} thread(s)")
    rows = []
    for i, request in enumerate(requests):
        sides = ["editkit", "reference"] if i % 2 == 0 else ["reference", "editkit"]
        row = {}
        for side in sides:
            if side == "editkit":
                row[side] = run_editkit(editor, request)
            else:
                row[side] = run_reference(rome, rhp, model, tok, request, device)
        rows.append(row)
        e, r = row["editkit"], row["reference"]
        print(f"  {i:3d} {request.subject[:28]:28s} editkit {e[0]:6.2f}s {_cells(e[1])} | "
              f"reference {r[0]:6.2f}s {_cells(r[1])} | v* {e[2]['v*']:.2f}s vs "
              f"{r[2]['v*+solve']:.2f}s", flush=True)

    print("\n| side | ES | PS | NS | median s/edit | phases (median s) |")
    print("|---|---|---|---|---|---|")
    med = {}
    for side in ("editkit", "reference"):
        means = {k: statistics.fmean(r[side][1][k] for r in rows if k in r[side][1])
                 for k in METRICS}
        med[side] = statistics.median(r[side][0] for r in rows)
        phases = {p: statistics.median(r[side][2][p] for r in rows) for p in rows[0][side][2]}
        tmpl = t_templates if side == "editkit" else t_ref_templates
        cells = ", ".join(f"{p} {v:.3f}" for p, v in phases.items())
        print(f"| {side} | {means['ES']:.3f} | {means['PS']:.3f} | {means['NS']:.3f} | "
              f"{med[side]:.3f} | templates (once) {tmpl:.2f}, {cells} |")
    diffs = {k: [r["editkit"][1][k] - r["reference"][1][k] for r in rows
                 if k in r["editkit"][1] and k in r["reference"][1]] for k in METRICS}
    print("\npaired differences editkit − reference: " + ", ".join(
        f"{k} mean {statistics.fmean(d):+.3f} ({sum(x != 0 for x in d)}/{len(d)} records differ)"
        for k, d in diffs.items() if d))
    print(f"time per edit, editkit / reference: {med['editkit'] / med['reference']:.2f}× "
          f"(goal ≤ 0.5×)")

    if args.compare_stats:
        times, diff = compare_statistics(rome, model, tok, adapter, hp.layer,
                                         texts[: args.compare_stats], max_length, reps=2)
        print(f"\nstatistics loop, {args.compare_stats} texts of {hp.mom2_dataset} "
              f"(max {max_length} tokens), median of 2 interleaved runs: "
              + ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
              + f"; editkit / reference {times['editkit'] / times['reference']:.2f}× "
              f"(plain loop {times['editkit plain'] / times['reference']:.2f}×); "
              f"max |ΔC| / max |C| = {diff:.1e}")


if __name__ == "__main__":
    main()
