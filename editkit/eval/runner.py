"""``evaluate``: run an editing method over records under a protocol and score it.

Protocols (MEMIT §5 for batch and sequential editing):

- ``"independent"``: for every record, apply its edit, score it, revert; the revert is
  checked bit-for-bit against the weights before the edit.
- ``"batch"``: hand ``batch_size`` records at once to ``editor.apply`` (a batch method
  such as MEMIT computes one update; a sequential method such as FT or ROME applies them
  one after the other, as ``Editor.apply`` does), score those records, revert.
- ``"sequential"``: keep every edit; at each checkpoint score all records edited so far
  (the retention curve); the full metric set is computed after the last edit; finally all
  edits are reverted (checked bit-for-bit).

The unedited model is scored on the same prompts first, so every report has before → after.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from editkit.distributed import gather_in_order, rank_and_world, shard_indices
from editkit.editor import EditHistory, Editor
from editkit.errors import EditFailedError, EditkitError, InvalidHyperParamsError
from editkit.eval.datasets import EvalRecord, parse_records
from editkit.eval.generation import GenerationConfig
from editkit.eval.metrics import (
    Metric,
    MetricContext,
    RecordScores,
    ReferenceTable,
    aggregate,
    compute_record_metrics,
    resolve_metrics,
)
from editkit.eval.report import Report
from editkit.eval.scoring import score_records
from editkit.protocols import TokenizerLike

logger = logging.getLogger(__name__)

PROTOCOLS = ("independent", "sequential", "batch")
#: Models up to this many parameters are snapshotted whole to check reverts bit-for-bit;
#: larger ones only in the parameters the editor declares it may change.
FULL_SNAPSHOT_LIMIT = 50_000_000


def default_checkpoints(n: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``n``, and ``n`` itself."""
    points, base = set(), 1
    while base <= n:
        points.update(p for p in (base, 2 * base, 5 * base) if p <= n)
        base *= 10
    points.add(n)
    return sorted(points)


def _make_editor(editor_or_method: Any, model: nn.Module | None, tokenizer,
                 hparams: Any) -> Editor:
    if isinstance(editor_or_method, Editor):
        if model is not None and editor_or_method.model is not model:
            raise EditkitError(
                "the editor edits a different model than the one passed to evaluate(); pass "
                "model=None (or the editor's own model)"
            )
        if hparams is not None:
            raise InvalidHyperParamsError(
                "hparams= is ignored when an Editor instance is given; pass them to the "
                "editor's constructor, or pass the method's name or class instead"
            )
        return editor_or_method
    if isinstance(editor_or_method, str):
        from editkit.registry import get_method

        cls = get_method(editor_or_method)
    elif isinstance(editor_or_method, type) and issubclass(editor_or_method, Editor):
        cls = editor_or_method
    else:
        raise EditkitError(
            f"evaluate() needs an Editor, an Editor class or a method name, got "
            f"{type(editor_or_method).__name__} {editor_or_method!r}"
        )
    if model is None:
        raise EditkitError(f"evaluate({cls.__name__}) needs model=; pass the model to edit")
    return cls(model, tokenizer, hparams=hparams)


class _RevertGuard:
    """Snapshot of the weights an evaluation must restore exactly."""

    def __init__(self, editor: Editor, enabled: bool) -> None:
        self.editor = editor
        self.enabled = enabled
        self.snapshot: dict[str, torch.Tensor] = {}
        self.n_before = len(EditHistory.of(editor.model).edits)
        if enabled:
            params = dict(editor.model.named_parameters())
            total = sum(p.numel() for p in params.values())
            names = list(params) if total <= FULL_SNAPSHOT_LIMIT else editor.edited_parameters()
            self.snapshot = {n: params[n].detach().clone() for n in names}

    def revert_added(self) -> None:
        """Revert every edit applied since the snapshot and check the weights."""
        history = EditHistory.of(self.editor.model)
        added = history.edits[self.n_before:]
        if self.n_before == 0 and added:
            self.editor.revert("all")
        else:
            for e in reversed(added):
                self.editor.revert(e.id)
        self.verify()

    def verify(self) -> None:
        """Check that the weights are bit-for-bit those of the snapshot (when enabled)."""
        if not self.enabled:
            return
        params = dict(self.editor.model.named_parameters())
        for name, value in self.snapshot.items():
            if not torch.equal(params[name], value):
                raise EditFailedError(
                    f"reverting the evaluation's edits did not restore parameter {name!r} "
                    "bit-for-bit; the method changed weights outside its patches (compute_update "
                    "must leave the model unchanged)"
                )


def _record_values(metrics: Sequence[Metric], records: Sequence[EvalRecord],
                   scores: Sequence[RecordScores], pre: Sequence[RecordScores],
                   references: ReferenceTable | None) -> list[dict[str, float | None]]:
    return [compute_record_metrics(metrics, s, MetricContext(r, p, references))
            for r, s, p in zip(records, scores, pre, strict=True)]


def evaluate(
    editor_or_method: Editor | type[Editor] | str,
    model: nn.Module | None = None,
    tokenizer: TokenizerLike | None = None,
    records: Sequence[EvalRecord | dict[str, Any]] = (),
    protocol: str = "independent",
    metrics: Sequence[str] | None = None,
    batch_size: int | None = None,
    checkpoints: Sequence[int] | None = None,
    hparams: Any = None,
    *,
    references: ReferenceTable | None = None,
    generation: GenerationConfig | None = None,
    max_rows: int = 128,
    kind: str = "auto",
    dataset_name: str | None = None,
    model_name: str | None = None,
    label: str | None = None,
    skip_errors: bool = False,
    verify_revert: bool = True,
    keep_raw: bool = True,
    progress: bool = True,
    seed: int = 0,
    group: Any = None,
) -> Report:
    """Edit and score ``records`` under ``protocol``; return a :class:`Report`.

    Args:
        editor_or_method: an ``Editor`` (its model is edited), an ``Editor`` subclass or a
            registered method name (``"ft"``, ``"ft_l"``, ``"rome"``, ...).
        model, tokenizer: the model to edit (omit with an ``Editor`` instance).
        records: ``EvalRecord``\\ s or raw CounterFact / zsRE dicts (one kind).
        protocol: ``"independent"``, ``"sequential"`` or ``"batch"``.
        metrics: metric names (default: every built-in metric of the dataset kind; RS only
            with ``references``).
        batch_size: records per ``apply`` call of the batch protocol (default: all).
        checkpoints: numbers of edits after which the sequential protocol scores all edited
            records (default 1, 2, 5, 10, 20, 50, ... and the last).
        hparams: the method's hyperparameters (``HyperParams`` or dict) when constructing it.
        references: reference texts + idf table for RS.
        generation: decoding settings for GE/RS texts (default greedy, 50 new tokens).
        max_rows: prompt × target rows per scoring forward pass (whole records per pass).
        skip_errors: record a failed edit (typed ``EditkitError``; the model is unchanged)
            and go on, instead of raising.
        verify_revert: check that reverting restores the weights bit-for-bit.
        keep_raw: keep raw log-probs / predictions / generations per record in the report.
        dataset_name, model_name: labels for the report (default: the dataset kind and the
            base name of ``model.config.name_or_path``).
        label: row label of the method in tables (default: the method name).
        group: an initialised ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD`` under torchrun) to shard the records over:
            with the independent protocol each rank edits and scores every ``world``-th
            record, with the batch protocol every ``world``-th batch; the per-record scores are
            gathered in record order and every rank returns the same report, equal to the
            one-process one. The sequential protocol cannot be sharded (each edit builds on
            all earlier ones). Only rank 0 shows progress.
    """
    if protocol == "multi_fact":  # its own report shape: conditions and interference matrices
        raise EditkitError(
            "protocol='multi_fact' has its own report (conditions and interference matrices): "
            "call editkit.eval.evaluate_multifact(method, model, tokenizer, records) instead "
            "(CLI: editkit eval --protocol multi_fact)")
    if protocol not in PROTOCOLS:
        raise EditkitError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS} (or "
                           "evaluate_multifact for the multiple-facts protocol)")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise EditkitError(f"batch_size={batch_size!r} must be a positive integer")
    rank, world = rank_and_world(group)
    if world > 1 and protocol == "sequential":
        raise EditkitError(
            "protocol='sequential' cannot be sharded over processes: every edit builds on all "
            "earlier ones; run it in one process (group=None, no torchrun), or use "
            "protocol='independent' or 'batch'")
    progress = progress and rank == 0
    start_all = time.perf_counter()
    editor = _make_editor(editor_or_method, model, tokenizer, hparams)
    model, tokenizer = editor.model, editor.tokenizer
    recs = parse_records(records, kind)
    if not recs:
        raise EditkitError("no records to evaluate; load some with editkit.eval.load_dataset")
    kinds = {r.kind for r in recs}
    if len(kinds) != 1:
        raise EditkitError(f"records mix dataset kinds {sorted(kinds)}; evaluate one at a time")
    dataset = kinds.pop()
    chosen = resolve_metrics(metrics, dataset, references is not None)
    known = ("rewrite", "paraphrase", "neighborhood", "attribute")
    groups = sorted({g for m in chosen for g in m.groups},
                    key=lambda g: (known.index(g) if g in known else len(known), g))
    gen_config = generation or GenerationConfig()
    wants_generation = any("generation" in m.needs for m in chosen)
    gen = gen_config if wants_generation else None
    cheap = [m for m in chosen if "generation" not in m.needs]
    n = len(recs)
    if protocol == "sequential":
        cps = sorted({int(c) for c in (checkpoints or default_checkpoints(n)) if 1 <= int(c) <= n}
                     | {n})
    elif checkpoints:
        raise EditkitError(f"checkpoints= only applies to protocol='sequential', not {protocol!r}")
    else:
        cps = []
    k = 1 if protocol == "independent" else (batch_size or n if protocol == "batch" else 1)

    timings: dict[str, float] = {}
    t = time.perf_counter()
    editor.prepare()
    timings["prepare_s"] = time.perf_counter() - t

    # The blocks of records edited together (one record each, but for the batch protocol),
    # and this rank's share of them: every world-th block.
    blocks = [list(range(s0, min(s0 + k, n))) for s0 in range(0, n, k)]
    my_blocks = [blocks[b] for b in shard_indices(len(blocks), rank, world)]
    mine = [i for block in my_blocks for i in block] if protocol != "sequential" else list(range(n))

    t = time.perf_counter()
    pre_mine = score_records(model, tokenizer, [recs[i] for i in mine], groups, generation=gen,
                             max_rows=max_rows, progress=progress, desc="scoring unedited model")
    timings["pre_scoring_s"] = time.perf_counter() - t
    pre: list[RecordScores] = [None] * n  # type: ignore[list-item]
    for i, s in zip(mine, pre_mine, strict=True):
        pre[i] = s

    guard = _RevertGuard(editor, verify_revert)
    post: list[RecordScores | None] = [None] * n
    failures: list[dict[str, Any]] = []
    edit_times: list[float] = []
    curve: list[dict[str, Any]] = []
    score_time = 0.0

    def apply(indices: Sequence[int], stack: contextlib.ExitStack | None = None) -> bool:
        """Apply the records' edits (for the ``stack``'s lifetime when given); False when
        the edit failed and ``skip_errors`` lets the evaluation go on."""
        t0 = time.perf_counter()
        requests = [recs[i].request for i in indices]
        try:
            if stack is None:
                editor.apply(requests)
            else:
                stack.enter_context(editor.applied(requests))
        except EditkitError as exc:
            if not skip_errors:
                raise
            logger.warning("edit of case(s) %s failed: %s", [recs[i].case_id for i in indices],
                           exc)
            failures.extend({"case_id": recs[i].case_id, "index": i,
                             "error": f"{type(exc).__name__}: {exc}"} for i in indices)
            return False
        edit_times.append(time.perf_counter() - t0)
        return True

    bar = tqdm(total=len(mine), desc=f"{editor.name} · {protocol}", unit="record",
               disable=not progress)
    try:
        if protocol in ("independent", "batch"):
            for idx in my_blocks:
                with contextlib.ExitStack() as edited:  # the edits last for this block
                    if apply(idx, edited):
                        t0 = time.perf_counter()
                        scored = score_records(model, tokenizer, [recs[i] for i in idx],
                                               groups, generation=gen, max_rows=max_rows)
                        score_time += time.perf_counter() - t0
                        for i, s in zip(idx, scored, strict=True):
                            post[i] = s
                guard.verify()
                bar.update(len(idx))
        else:
            applied: list[int] = []
            for i in range(n):
                if apply([i]):
                    applied.append(i)
                bar.update(1)
                if i + 1 not in cps or not applied:
                    continue
                final = i + 1 == n
                t0 = time.perf_counter()
                sub = [recs[j] for j in applied]
                scored = score_records(model, tokenizer, sub, groups,
                                       generation=gen if final else None, max_rows=max_rows)
                score_time += time.perf_counter() - t0
                values = _record_values(cheap, sub, scored, [pre[j] for j in applied],
                                        references)
                curve.append({"n_edits": len(applied), "n_processed": i + 1,
                              "post": aggregate(cheap, values, seed=seed)})
                if final:
                    for j, s in zip(applied, scored, strict=True):
                        post[j] = s
            guard.revert_added()
    finally:
        bar.close()
    if world > 1:
        # Every record's pre/post scores, the failures and the time spent, from every rank.
        shared = gather_in_order({rank: (
            {i: pre[i] for i in mine}, {i: post[i] for i in mine}, failures, edit_times,
            score_time, timings["pre_scoring_s"])}, world, group)
        pre, post, failures, edit_times = [None] * n, [None] * n, [], []  # type: ignore[list-item]
        score_time, timings["pre_scoring_s"] = 0.0, 0.0
        for pre_part, post_part, fail_part, times_part, score_part, pre_time in shared:
            for i, s in pre_part.items():
                pre[i] = s
            for i, s in post_part.items():
                post[i] = s
            failures.extend(fail_part)
            edit_times.extend(times_part)
            score_time += score_part
            timings["pre_scoring_s"] += pre_time
        failures.sort(key=lambda f: f["index"])
        timings["processes"] = world
    timings["edit_s_total"] = float(sum(edit_times))
    n_edited = n - len(failures)
    timings["edit_s_per_record"] = float(sum(edit_times) / max(n_edited, 1))
    timings["post_scoring_s"] = score_time

    done = [i for i in range(n) if post[i] is not None]
    pre_values = _record_values(chosen, [recs[i] for i in done], [pre[i] for i in done],
                                [pre[i] for i in done], references)
    post_values = _record_values(chosen, [recs[i] for i in done], [post[i] for i in done],
                                 [pre[i] for i in done], references)
    position = {i: j for j, i in enumerate(done)}
    per_record = []
    for i in range(n):
        entry: dict[str, Any] = {**recs[i].to_dict(), "pre": None, "post": None}
        if i in position:
            entry["pre"], entry["post"] = pre_values[position[i]], post_values[position[i]]
            if keep_raw:
                entry["raw"] = {"pre": pre[i].to_dict(), "post": post[i].to_dict()}
        per_record.append(entry)

    from editkit._version import __version__

    timings["total_s"] = time.perf_counter() - start_all
    config = {
        "protocol": protocol,
        "batch_size": k if protocol == "batch" else None,
        "checkpoints": cps or None,
        "n_records": n,
        "dataset_kind": dataset,
        "metrics": [m.name for m in chosen],
        "generation": gen_config.to_dict() if wants_generation else None,
        "references": references is not None,
        "max_rows": max_rows,
        "seed": seed,
        "confidence_interval": "95%: mean ± 1.96·s/√n; S: percentile bootstrap, 1000 resamples",
        "verify_revert": verify_revert,
    }
    name = getattr(getattr(model, "config", None), "name_or_path", "") or \
        getattr(getattr(model, "config", None), "model_type", "model")
    return Report(
        method=editor.name,
        model=model_name or str(name).rstrip("/").split("/")[-1] or "model",
        dataset=dataset_name or dataset,
        protocol=protocol,
        metrics=[m.name for m in chosen],
        metric_info={m.name: m.info() for m in chosen},
        records=per_record,
        aggregate={"pre": aggregate(chosen, pre_values, seed=seed),
                   "post": aggregate(chosen, post_values, seed=seed)},
        curve=curve,
        hparams=editor.hparams.to_dict(),
        config=config,
        timings=timings,
        failures=failures,
        editkit_version=__version__,
        label=label or "",
    )
