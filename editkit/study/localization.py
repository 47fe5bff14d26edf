"""Does localization inform editing? The study of Hase et al. (2023) as one function.

For every fact: one causal trace (:class:`editkit.tracing.CausalTracer`, the paper's
corruption: ν = 3σ over the facts' subjects, ``samples`` draws, restoring the last subject
token) gives its tracing effect at every layer, ``p(o_true | restored at ℓ) −
p(o_true | subject noised)`` for MLP (window) and hidden-state restorations. Then, for every
method × objective × layer, the fact is edited at that layer alone (reverted afterwards) and
the objective's rewrite, paraphrase and neighbourhood scores are measured
(:mod:`editkit.eval.objectives`). ``force`` and ``reverse_tracing`` use the trace's ν and seed,
so the noise they train on is the noise the trace drew. Finally
:func:`analyse` regresses the rewrite score on layer, tracing effect and both
(:mod:`editkit.study.regression`).

Results are written incrementally (one JSON line per trace and per edit), so a partial run
is usable and a rerun resumes where it stopped. Under ``torchrun`` each rank takes every
``world``-th fact (:func:`editkit.distributed.shard_indices`) and writes its own files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from editkit.distributed import rank_and_world, shard_indices
from editkit.errors import EditkitError, InvalidHyperParamsError, InvalidRequestError
from editkit.eval.objectives import objective_probs, objective_scores
from editkit.methods._locate.objectives import resolve_request
from editkit.registry import get_adapter, get_method
from editkit.requests import OBJECTIVES, EditRequest, Objective
from editkit.study.regression import bootstrap_r2
from editkit.tracing import CausalTracer
from editkit.tracing.kinds import scaled_window

logger = logging.getLogger(__name__)

#: Tracing kinds whose effect is recorded; ``effect_kind`` of :func:`analyse` picks one.
EFFECT_KINDS = ("mlp", "hidden")


@dataclasses.dataclass
class StudyConfig:
    """What :func:`run_localization` edits and how.

    ``methods``: registered method names (each must list the objectives in its
    ``objectives``). ``layers``: edited layers (default all). ``samples``/``seed``/
    ``noise_multiple``: the trace's corruption (paper 10, 3σ). ``window``: MLP restoration
    window (default :func:`~editkit.tracing.kinds.scaled_window`, the paper's 10 of 48 layers
    as a fraction of the depth: 1 on the 4-layer fact world, where the clipped 10 would
    restore every MLP at every layer and make the effect the same at all of them).
    ``force_samples``: noise draws
    per prompt of the ``force`` and ``reverse_tracing`` objectives (paper 10). ``overrides``:
    per method, dotted hyperparameter fields to set (``{"rome": {"value.num_grad_steps": 20}}``).
    ``n_neighbors``: neighbourhood prompts scored per fact (None: all).
    """

    methods: tuple[str, ...] = ("rome", "ft")
    layers: tuple[int, ...] | None = None
    objectives: tuple[str, ...] = OBJECTIVES
    samples: int = 10
    force_samples: int = 10
    seed: int = 0
    noise_multiple: float = 3.0
    window: int | None = None
    n_neighbors: int | None = 5
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown:
            raise InvalidRequestError(f"unknown objective(s) {unknown}; use {list(OBJECTIVES)}")
        for m in self.methods:
            cls = get_method(m)
            missing = [o for o in self.objectives if o not in cls.objectives]
            if missing:
                from editkit.errors import UnsupportedObjectiveError

                raise UnsupportedObjectiveError(
                    f"method {m!r} cannot optimise {missing}; it supports "
                    f"{sorted(cls.objectives)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return d


def set_field(hp: Any, dotted: str, value: Any) -> Any:
    """``hp`` with the (possibly nested, ``value.num_grad_steps``) field set; lists become
    tuples where the field holds a tuple."""
    head, _, rest = dotted.partition(".")
    if not dataclasses.is_dataclass(hp) or head not in {f.name for f in dataclasses.fields(hp)}:
        raise InvalidHyperParamsError(f"{type(hp).__name__} has no field {head!r}")
    if rest:
        return dataclasses.replace(hp, **{head: set_field(getattr(hp, head), rest, value)})
    if isinstance(getattr(hp, head), tuple) and isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return dataclasses.replace(hp, **{head: value})


def make_editor(method: str, model: nn.Module, tokenizer, layer: int,
                overrides: Mapping[str, Any] | None = None):
    """An editor of ``method`` with its defaults for ``model``, editing ``layer`` only."""
    cls = get_method(method)
    adapter = get_adapter(model)
    hp = cls.hparams_class.for_model(model, adapter)
    names = {f.name for f in dataclasses.fields(hp)}
    if "layer" in names:
        hp = dataclasses.replace(hp, layer=layer)
    elif "layers" in names:
        hp = dataclasses.replace(hp, layers=[layer])
    else:
        raise InvalidHyperParamsError(f"{method} has no layer or layers hyperparameter")
    for key, value in (overrides or {}).items():
        hp = set_field(hp, key, value)
    return cls(model, tokenizer, hp)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interrupted run
                logger.warning("skipping a truncated line of %s", path)
    return out


def _append(path: Path, row: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def trace_effects(tracer: CausalTracer, request: EditRequest, window: int | None
                  ) -> dict[str, Any]:
    """One trace of ``request`` on target_true: per kind, the effect at every layer at the
    last subject token (restored − corrupted probability)."""
    res = tracer.trace(request.prompt, request.subject, request.target_true,
                       kinds=EFFECT_KINDS, window=window, token_range="subject_last")
    first = res[EFFECT_KINDS[0]]
    last = first.subject_range[1] - 1
    out: dict[str, Any] = {"p_clean": first.p_clean, "p_corrupt": first.p_corrupt,
                           "noise_std": first.noise_std,
                           "correct_prediction": bool(first.correct_prediction)}
    for kind, r in res.items():
        out[f"effect_{kind}"] = [float(v) - first.p_corrupt for v in np.asarray(r.scores)[last]]
    return out


def run_localization(model: nn.Module, tokenizer, requests: Sequence[EditRequest],
                     config: StudyConfig, out_dir: str | Path, *, group: Any = None,
                     progress: bool = True) -> Path:
    """Trace and edit every request (this rank's share); JSONL under ``out_dir``.

    Files: ``traces[.rankR].jsonl`` (one line per fact) and ``edits[.rankR].jsonl`` (one per
    fact × objective × method × layer), appended as they are computed; an existing line is
    not recomputed. Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world(group)
    suffix = f".rank{rank}" if world > 1 else ""
    traces_path, edits_path = out / f"traces{suffix}.jsonl", out / f"edits{suffix}.jsonl"
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    requests = [r for r in requests if r.target_true is not None]
    adapter = get_adapter(model)
    n_layers = adapter.num_layers(model)
    layers = list(config.layers) if config.layers is not None else list(range(n_layers))
    bad = [v for v in layers if not 0 <= v < n_layers]
    if bad:
        raise InvalidHyperParamsError(f"layers {bad} out of range 0..{n_layers - 1}")
    window = config.window if config.window is not None else scaled_window(n_layers)
    tracer = CausalTracer(model, tokenizer, texts=[r.subject for r in requests],
                          samples=config.samples, seed=config.seed,
                          noise_multiple=config.noise_multiple, adapter=adapter)
    done_traces = {str(t["case_id"]): t for t in _read_jsonl(traces_path)}
    done_edits = {(str(e["case_id"]), e["objective"], e["method"], int(e["layer"]))
                  for e in _read_jsonl(edits_path)}
    editors: dict[tuple[str, int], Any] = {}
    mine = shard_indices(len(requests), rank, world)
    for i in tqdm(mine, disable=not progress, desc=f"facts (rank {rank})"):
        base = requests[i]
        cid = str(base.case_id if base.case_id is not None else i)
        if cid not in done_traces:
            row = {"case_id": cid, "index": i, "text": base.text,
                   "target_true": base.target_true, "window": window,
                   **trace_effects(tracer, base, window)}
            _append(traces_path, row)
            done_traces[cid] = row
        nu = float(done_traces[cid]["noise_std"])
        for name in config.objectives:
            keys = [(cid, name, m, layer) for m in config.methods for layer in layers]
            if all(k in done_edits for k in keys):
                continue
            ob = Objective(name, noise_std=nu, samples=config.force_samples, seed=config.seed)
            try:
                req = resolve_request(model, tokenizer, adapter, base.with_objective(ob))
            except EditkitError as exc:
                logger.warning("fact %s, %s: %s", cid, name, exc)
                continue
            pre = objective_probs(model, tokenizer, adapter, req, n_neighbors=config.n_neighbors)
            for method in config.methods:
                for layer in layers:
                    key = (cid, name, method, layer)
                    if key in done_edits:
                        continue
                    if (method, layer) not in editors:
                        editors[(method, layer)] = make_editor(
                            method, model, tokenizer, layer, config.overrides.get(method))
                    ed = editors[(method, layer)]
                    start = time.perf_counter()
                    try:
                        with ed.applied(req):
                            seconds = time.perf_counter() - start
                            post = objective_probs(model, tokenizer, adapter, req,
                                                   n_neighbors=config.n_neighbors)
                    except EditkitError as exc:
                        logger.warning("fact %s, %s, %s@%d failed: %s", cid, name, method,
                                       layer, exc)
                        continue
                    _append(edits_path, {
                        "case_id": cid, "objective": name, "method": method, "layer": layer,
                        "target": req.optimised_target, "seconds": seconds,
                        "pre": pre, "post": post,
                        **objective_scores(pre, post, name)})
                    done_edits.add(key)
    return out


def load_results(out_dir: str | Path) -> tuple[dict[str, dict], list[dict]]:
    """The traces (by case id) and edits of every rank's files under ``out_dir``."""
    out = Path(out_dir)
    traces: dict[str, dict] = {}
    for p in sorted(out.glob("traces*.jsonl")):
        for t in _read_jsonl(p):
            traces[str(t["case_id"])] = t
    edits = [e for p in sorted(out.glob("edits*.jsonl")) for e in _read_jsonl(p)]
    return traces, edits


def analyse(out_dir: str | Path, *, effect_kind: str = "mlp", score: str = "rewrite_score",
            n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per method × objective: R² of the regressions of ``score`` on layer, tracing effect
    (``effect_kind``) and both, with bootstrap intervals, plus mean scores per layer and the
    mean tracing effect per layer. Only facts with every layer edited count (balanced)."""
    if effect_kind not in EFFECT_KINDS:
        raise InvalidRequestError(f"effect_kind {effect_kind!r}; use one of {EFFECT_KINDS}")
    traces, edits = load_results(out_dir)
    result: dict[str, Any] = {"effect_kind": effect_kind, "score": score, "cells": {}}
    cells: dict[tuple[str, str], list[dict]] = {}
    for e in edits:
        if e.get(score) is not None and str(e["case_id"]) in traces:
            cells.setdefault((e["method"], e["objective"]), []).append(e)
    for (method, objective), rows in sorted(cells.items()):
        layers_all = sorted({int(r["layer"]) for r in rows})
        by_fact: dict[str, dict[int, dict]] = {}
        for r in rows:
            by_fact.setdefault(str(r["case_id"]), {})[int(r["layer"])] = r
        full = {f: v for f, v in by_fact.items() if len(v) == len(layers_all)}
        facts, lay, eff, y = [], [], [], []
        for f, per in sorted(full.items()):
            curve = traces[f][f"effect_{effect_kind}"]
            for layer, r in sorted(per.items()):
                facts.append(f)
                lay.append(layer)
                eff.append(curve[layer])
                y.append(float(r[score]))
        entry: dict[str, Any] = {"n_facts": len(full), "layers": layers_all}
        if len(full) >= 3:
            entry.update(bootstrap_r2(facts, lay, eff, y, n_boot=n_boot, seed=seed).to_dict())
        y_arr, lay_arr, eff_arr = np.asarray(y), np.asarray(lay), np.asarray(eff)
        entry["mean_score_by_layer"] = {
            str(v): float(y_arr[lay_arr == v].mean()) for v in layers_all if (lay_arr == v).any()}
        entry["mean_effect_by_layer"] = {
            str(v): float(eff_arr[lay_arr == v].mean()) for v in layers_all
            if (lay_arr == v).any()}
        for other in ("paraphrase_score", "neighborhood_score"):
            vals = [float(per[layer][other]) for per in full.values() for layer in per
                    if per[layer].get(other) is not None]
            entry[f"mean_{other}"] = float(np.mean(vals)) if vals else None
        entry["points"] = {"layer": lay, "effect": eff, "score": y}
        result["cells"][f"{method}/{objective}"] = entry
    return result


def markdown_tables(analysis: Mapping[str, Any]) -> str:
    """Two markdown tables of an :func:`analyse` result: the R² of the three regressions (with
    95 % bootstrap intervals) per method × objective, and the mean rewrite score and mean
    tracing effect per edited layer."""
    def ci(cell: Mapping[str, Any], key: str) -> str:
        lo, hi = cell["ci95"][key]
        return f"{cell['r2'][key]:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = ["| method | objective | facts | R² layer | R² tracing effect | R² both | added by "
             "tracing (both − layer) | mean paraphrase score | mean neighbourhood score |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, cell in analysis["cells"].items():
        method, objective = key.split("/")
        ps, ns = cell.get("mean_paraphrase_score"), cell.get("mean_neighborhood_score")
        fmt = (lambda v: "—" if v is None else f"{v:.3f}")  # noqa: E731
        if "r2" not in cell:
            lines.append(f"| {method} | {objective} | {cell['n_facts']} | — | — | — | — | "
                         f"{fmt(ps)} | {fmt(ns)} |")
            continue
        lines.append(f"| {method} | {objective} | {cell['n_facts']} | {ci(cell, 'layer')} | "
                     f"{ci(cell, 'tracing')} | {ci(cell, 'both')} | {ci(cell, 'added')} | "
                     f"{fmt(ps)} | {fmt(ns)} |")
    layers = sorted({int(v) for c in analysis["cells"].values() for v in c["layers"]})
    lines += ["", "| method | objective | " + " | ".join(f"layer {v}" for v in layers) + " |",
              "|---|---|" + "---|" * len(layers)]
    for key, cell in analysis["cells"].items():
        method, objective = key.split("/")
        vals = [cell["mean_score_by_layer"].get(str(v)) for v in layers]
        lines.append(f"| {method} | {objective} | " + " | ".join(
            "—" if v is None else f"{v:.2f}" for v in vals) + " |")
    first = next(iter(analysis["cells"].values()), None)
    if first is not None:
        eff = [first["mean_effect_by_layer"].get(str(v)) for v in layers]
        lines.append(f"| (tracing effect, {analysis['effect_kind']}) | mean over facts | "
                     + " | ".join("—" if v is None else f"{v:+.3f}" for v in eff) + " |")
    return "\n".join(lines) + "\n"
