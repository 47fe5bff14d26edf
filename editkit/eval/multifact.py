"""The multiple-facts protocol: many edits on one subject, and how they interfere.

A *subject group* is the set of CounterFact records that share a subject and differ in
relation (all of a person's relations: birthplace, profession, sport, ...). For every group
the protocol measures three conditions with the editor's normal multi-request ``apply``
(sequential methods such as ROME and FT+L apply the requests one after the other, batch
methods such as MEMIT and AlphaEdit compute one update; MEMIT §5):

- ``alone``: each record edited by itself (apply, score, revert), the reference;
- ``same_subject``: all records of the group edited together, then each scored;
- ``spread``: the same number of records, one relation each from *different* subjects,
  edited together (a Latin square over the groups: spread group ``i`` takes relation slot
  ``j`` from subject group ``(i + j) mod n``, so it has the same relation mix as a subject
  group and every record appears once when all groups have the same size).

Each condition reports ES / PS / NS (Meng et al. 2022, §3; :func:`counterfact_metrics`) per
record, aggregated with 95% confidence intervals, and the paired per-record differences
``same_subject − alone`` and ``spread − alone``.

Interference between relations A and B of the same subject, two matrices (rows A, columns
B, each cell the mean over subject groups with a 95% interval):

(i) **unedited B after editing A** (``retention``): edit only A; on B's rewrite and
    paraphrase prompts, the fraction where B's true object still beats B's counterfactual
    object, ``[P(true_B) > P(new_B)]`` (the neighbourhood test of CounterFact, applied to the
    subject's own other facts). The unedited model's value per B is reported beside it.
    Diagonal: undefined (editing A changes A's answer on purpose).
(ii) **edited B with A also edited** (``paired_es``): edit B, then A (a sequential method
    applies B first and A on top of it; a batch method computes both in one update) and read
    ES of B. The diagonal holds ES of B edited alone, so ``M[A][B] − M[B][B]`` is what
    editing A costs B. Measured on the first ``pairwise_subjects`` groups (it needs
    k·(k − 1) pair edits per group of k records).

Why this matters for locate-and-edit methods: ROME's key k* is the MLP input at the
subject's last token, the same for every relation of one subject, and its update makes
``Ŵ k* = v*`` exactly (rank one); a second ROME edit of the same subject therefore
overwrites the value the first one wrote, and only the last edit's v* survives at that key
(the shared-key argument behind MEMIT's batched least squares, Meng et al. 2023 §4).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from editkit.editor import Editor
from editkit.errors import DatasetFormatError, EditkitError
from editkit.eval.datasets import EvalRecord, parse_records
from editkit.eval.metrics import (
    MetricContext,
    aggregate,
    compute_record_metrics,
    mean_ci,
    resolve_metrics,
)
from editkit.eval.report import RESULTS_FILE, json_safe, write_results
from editkit.eval.runner import _make_editor, _RevertGuard
from editkit.eval.scoring import score_records
from editkit.protocols import TokenizerLike

logger = logging.getLogger(__name__)

#: The protocol's name in :func:`editkit.eval.evaluate`'s error message and ``editkit eval``.
MULTI_FACT = "multi_fact"
#: Conditions, in report order.
CONDITIONS = ("alone", "same_subject", "spread")
#: Metrics reported per condition (S is the harmonic mean of ES, PS and NS).
METRIC_NAMES = ("S", "ES", "PS", "NS")
FULL_GROUPS = ("rewrite", "paraphrase", "neighborhood")
RETENTION_GROUPS = ("rewrite", "paraphrase")
PLOT_FILE = "interference.png"


# ------------------------------------------------------------------------- grouping
def relation_of(record: EvalRecord) -> str:
    """The record's relation: ``requested_rewrite.relation_id``, else its prompt template."""
    rw = record.raw.get("requested_rewrite") if isinstance(record.raw, Mapping) else None
    rel = rw.get("relation_id") if isinstance(rw, Mapping) else None
    return str(rel) if rel not in (None, "") else record.request.prompt


@dataclass(frozen=True)
class SubjectGroup:
    """The records of one subject, one per relation, in record order."""

    subject: str
    records: tuple[EvalRecord, ...]

    @property
    def relations(self) -> list[str]:
        return [relation_of(r) for r in self.records]


def group_by_subject(records: Sequence[EvalRecord | Mapping[str, Any]], *,
                     min_relations: int = 2, kind: str = "auto") -> list[SubjectGroup]:
    """Group CounterFact records by subject (first-appearance order), keeping subjects with
    at least ``min_relations`` records.

    Raises :class:`DatasetFormatError` when a subject has two records of one relation (the
    interference matrices need one fact per relation and subject), when the records are not
    CounterFact records (the protocol compares P(new) with P(true)), or when no subject has
    ``min_relations`` records.
    """
    if not isinstance(min_relations, int) or min_relations < 2:
        raise EditkitError(f"min_relations={min_relations!r} must be an integer >= 2: a "
                           "subject group needs at least two relations to interfere")
    recs = parse_records(records, kind)
    wrong = sorted({r.kind for r in recs} - {"counterfact"})
    if wrong:
        raise DatasetFormatError(
            f"the multi-fact protocol needs CounterFact records (with target_true), got "
            f"{wrong}; use --data factworld, realfacts or a CounterFact file")
    by_subject: dict[str, list[EvalRecord]] = {}
    for r in recs:
        group = by_subject.setdefault(r.request.subject, [])
        rel = relation_of(r)
        clash = next((o for o in group if relation_of(o) == rel), None)
        if clash is not None:
            raise DatasetFormatError(
                f"records {clash.case_id!r} and {r.case_id!r} both edit relation {rel!r} of "
                f"subject {r.request.subject!r}; the multi-fact protocol needs one record per "
                "(subject, relation): drop one of them")
        group.append(r)
    groups = [SubjectGroup(s, tuple(g)) for s, g in by_subject.items() if len(g) >= min_relations]
    if not groups:
        most = max((len(g) for g in by_subject.values()), default=0)
        raise DatasetFormatError(
            f"no subject has {min_relations} or more records (the most any of the "
            f"{len(by_subject)} subjects has is {most}); the multi-fact protocol edits several "
            "relations of one subject: give records that share subjects (e.g. --data factworld, "
            "every eval subject with all its relations; or realfacts)")
    return groups


def spread_groups(groups: Sequence[SubjectGroup]) -> list[list[EvalRecord]]:
    """Groups of the same sizes as ``groups`` whose records come from different subjects.

    Spread group ``i`` takes, for each slot ``j < len(groups[i])``, the ``j``-th record of
    subject group ``(i + j) mod n`` (its ``j mod size``-th when that group is smaller). With
    equal sizes k ≤ n this is a Latin square: every record appears exactly once, each spread
    group holds k different subjects and the same relation slots as a subject group.
    """
    n = len(groups)
    if n < 2:
        raise DatasetFormatError(
            f"the spread condition needs at least 2 subject groups, got {n}; give records of "
            "more subjects")
    out = []
    for i, g in enumerate(groups):
        k = min(len(g.records), n)
        out.append([groups[(i + j) % n].records[j % len(groups[(i + j) % n].records)]
                    for j in range(k)])
    return out


# --------------------------------------------------------------------- arithmetic
def retention(rows: Sequence[Sequence[float]]) -> float | None:
    """Fraction of prompts where the true object still wins: ``[lp(true) > lp(new)]``.

    ``rows``: per prompt ``[lp(new), lp(true)]`` as in :class:`RecordScores`; ``None``
    without prompts.
    """
    if not rows:
        return None
    return sum(float(true > new) for new, true in rows) / len(rows)


def interference_matrix(cells: Iterable[tuple[str, str, float | None]],
                        relations: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{A: {B: mean_ci}}`` over the values given for each (A, B) cell.

    ``cells``: ``(A, B, value)`` triples (one per subject group that has both relations;
    ``None`` values are left out). A cell without values has ``mean`` ``None`` and ``n`` 0.
    """
    values: dict[tuple[str, str], list[float | None]] = {}
    known = set(relations)
    for a, b, v in cells:
        if a not in known or b not in known:
            raise EditkitError(f"cell ({a!r}, {b!r}) names a relation outside {list(relations)}")
        values.setdefault((a, b), []).append(v)
    return {a: {b: mean_ci(values.get((a, b), [])) for b in relations} for a in relations}


def _metrics() -> list:
    return resolve_metrics(list(METRIC_NAMES), "counterfact")


def _values(record: EvalRecord, scores) -> dict[str, float | None]:
    return compute_record_metrics(_metrics(), scores, MetricContext(record))


def summarize(per_record: Sequence[Mapping[str, float | None]], seed: int = 0
              ) -> dict[str, dict[str, Any]]:
    """ES / PS / NS means with 95% intervals and S (bootstrap), as the main harness does."""
    return aggregate(_metrics(), per_record, seed=seed)


def paired_difference(after: Sequence[Mapping[str, float | None]],
                      before: Sequence[Mapping[str, float | None]],
                      metrics: Sequence[str] = ("ES", "PS", "NS")) -> dict[str, dict[str, Any]]:
    """Per metric, ``mean_ci`` of the per-record differences ``after − before`` (pairs
    where both values exist)."""
    out = {}
    for m in metrics:
        diffs = [a.get(m) - b.get(m) for a, b in zip(after, before, strict=True)
                 if a.get(m) is not None and b.get(m) is not None]
        out[m] = mean_ci(diffs)
    return out


# ------------------------------------------------------------------------- report
@dataclass
class MultiFactReport:
    """Result of :func:`evaluate_multifact` (fractions, not percent).

    ``conditions[c]``: aggregate ES/PS/NS/S of condition ``c`` (plus ``"pre"``, the unedited
    model); ``differences``: paired ``same_subject − alone`` and ``spread − alone``;
    ``per_relation[c][relation]``: ES mean per relation; ``retention`` / ``paired_es``: the
    interference matrices (i) and (ii) of the module docstring; ``retention_pre[B]``: the
    unedited model's retention of B; ``records``: per record its values per condition.
    """

    method: str
    model: str
    dataset: str
    apply_mode: str
    relations: list[str]
    subjects: list[str]
    conditions: dict[str, dict[str, dict[str, Any]]]
    differences: dict[str, dict[str, dict[str, Any]]]
    per_relation: dict[str, dict[str, dict[str, Any]]]
    retention: dict[str, dict[str, dict[str, Any]]]
    retention_pre: dict[str, dict[str, Any]]
    paired_es: dict[str, dict[str, dict[str, Any]]]
    records: list[dict[str, Any]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    editkit_version: str = ""
    label: str = ""
    protocol: str = MULTI_FACT

    @property
    def name(self) -> str:
        return self.label or self.method

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON; written to ``path`` (a directory gets results.json)."""
        text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False)
        if path is not None:
            write_results(text, path)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> MultiFactReport:
        """Read a report written by :meth:`to_json` (a file or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DatasetFormatError(f"cannot read multi-fact report {str(path)!r} "
                                     f"({exc.strerror})") from exc
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}: invalid JSON ({exc.msg})") from exc
        if not isinstance(data, dict) or data.get("protocol") != MULTI_FACT:
            raise DatasetFormatError(f"{path} is not a multi-fact report (protocol "
                                     f"{data.get('protocol') if isinstance(data, dict) else None!r})")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    # -------------------------------------------------------------- markdown
    def summary_rows(self, name: str | None = None) -> list[str]:
        """Markdown rows ``| name | condition | n | S | ES | PS | NS |`` (no header)."""
        rows = []
        for c in ("pre", *CONDITIONS):
            agg = self.conditions.get(c)
            if not agg:
                continue
            label = f"{self.model} (unedited)" if c == "pre" else (name or self.name)
            n = agg.get("ES", {}).get("n", 0)
            rows.append(f"| {label} | {c if c != 'pre' else '—'} | {n} | "
                        + " | ".join(_pct(agg.get(m, {})) for m in METRIC_NAMES) + " |")
        return rows

    def to_markdown(self, plot: str | None = None) -> str:
        """Tables: conditions, paired differences, ES per relation, both matrices."""
        k = self.config.get("group_sizes", [])
        lines = [
            f"# {self.name} · {self.dataset} · multiple facts",
            "",
            f"Model `{self.model}` · {len(self.subjects)} subjects · edits per subject "
            f"{_sizes(k)} · applied {self.apply_mode} · editkit {self.editkit_version}",
            "",
            "Means over records (matrices: over subjects) with 95% confidence intervals, in "
            "percent. Conditions: each edit alone; all relations of one subject edited "
            "together; the same number of edits spread over different subjects.",
            "",
            "| Editor | Condition | n | S ↑ | ES ↑ | PS ↑ | NS ↑ |",
            "|---|---|---|---|---|---|---|",
            *self.summary_rows(),
            "",
            "## Paired differences (per record, condition − alone)",
            "",
            "| Condition | ΔES | ΔPS | ΔNS |",
            "|---|---|---|---|",
        ]
        for c, diff in self.differences.items():
            lines.append(f"| {c} | " + " | ".join(_pct(diff.get(m, {}), signed=True)
                                                   for m in ("ES", "PS", "NS")) + " |")
        lines += ["", "## ES per relation", "",
                  "| Relation | " + " | ".join(CONDITIONS) + " |",
                  "|---" * (len(CONDITIONS) + 1) + "|"]
        for rel in self.relations:
            lines.append(f"| {rel} | " + " | ".join(
                _pct(self.per_relation.get(c, {}).get(rel, {})) for c in CONDITIONS) + " |")
        lines += ["", "## (i) Unedited B after editing A: retention of B's true object", "",
                  "Row A is the only edit; cell = fraction of B's rewrite and paraphrase prompts "
                  "where P(true_B) > P(new_B). The first row is the unedited model.", ""]
        lines += _matrix(self.relations, self.retention,
                         pre=self.retention_pre, diagonal="·")
        lines += ["", "## (ii) Edited B with A also edited: ES of B", "",
                  "B is edited, then A (a batch method: both in one update); the diagonal is "
                  "ES of B edited alone. "
                  + (f"Measured on {self.config.get('pairwise_subjects_used')} subjects."
                     if self.config.get("pairwise_subjects_used") else "Not measured."), ""]
        if self.config.get("pairwise_subjects_used"):
            lines += _matrix(self.relations, self.paired_es)
        if plot:
            lines += ["", f"![interference matrices]({plot})"]
        if self.timings:
            lines += ["", "## Timings", "", "| Stage | Seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in self.timings.items()]
        lines += ["", "## Configuration", "", "```json",
                  json.dumps(json_safe({"hparams": self.hparams, **self.config}), indent=1),
                  "```", ""]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Heatmaps of both interference matrices (matplotlib, Agg), written to ``path``."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

        rels = self.relations
        panels = [("(i) retention of unedited B after editing A", self.retention)]
        if self.config.get("pairwise_subjects_used"):
            panels.append(("(ii) ES of edited B with A also edited", self.paired_es))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), dpi=120,
                                 squeeze=False)
        for ax, (title, matrix) in zip(axes[0], panels, strict=True):
            grid = np.array([[_mean_or_nan(matrix.get(a, {}).get(b, {})) for b in rels]
                             for a in rels], dtype=float) * 100
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            for i in range(len(rels)):
                for j in range(len(rels)):
                    if not math.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center",
                                color="white" if grid[i, j] < 60 else "black", fontsize=8)
            ax.set_xticks(range(len(rels)), rels, rotation=45, ha="right")
            ax.set_yticks(range(len(rels)), rels)
            ax.set_xlabel("B (measured)")
            ax.set_ylabel("A (edited)")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, label="%")
        fig.suptitle(f"{self.name} · {self.model} · multiple facts", fontsize=10)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def compare_multifact(reports: Sequence[MultiFactReport | str | Path],
                       title: str | None = None) -> str:
    """One markdown table of several multi-fact runs: per run its conditions (the unedited
    row once per model and dataset), then the mean off-diagonal cell of each matrix."""
    loaded = [r if isinstance(r, MultiFactReport) else MultiFactReport.from_json(r)
              for r in reports]
    if not loaded:
        raise DatasetFormatError("compare_multifact() needs at least one report")
    lines = [f"# {title}", ""] if title else []
    lines += ["| Editor | Condition | n | S ↑ | ES ↑ | PS ↑ | NS ↑ |", "|---|---|---|---|---|---|---|"]
    seen: set[tuple[str, str]] = set()
    for r in loaded:
        rows = r.summary_rows(f"{r.name} ({len(r.subjects)} subjects)")
        if (r.model, r.dataset) in seen:
            rows = rows[1:]
        seen.add((r.model, r.dataset))
        lines += rows
    lines += ["", "| Editor | Retention of unedited B after editing A (mean cell) | "
              "ES of edited B with A also edited (mean off-diagonal cell) | ES of B alone "
              "(diagonal) |", "|---|---|---|---|"]
    for r in loaded:
        off = [_mean_or_nan(r.retention[a][b]) for a in r.relations for b in r.relations
               if a != b]
        pair = [_mean_or_nan(r.paired_es[a][b]) for a in r.relations for b in r.relations
                if a != b]
        diag = [_mean_or_nan(r.paired_es[a][a]) for a in r.relations]
        lines.append(f"| {r.name} ({len(r.subjects)} subjects) | {_avg(off)} | {_avg(pair)} | "
                     f"{_avg(diag)} |")
    return "\n".join(lines) + "\n"


def _avg(xs: Sequence[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    return f"{100 * sum(xs) / len(xs):.1f}" if xs else "—"


def _mean_or_nan(stats: Mapping[str, Any]) -> float:
    m = stats.get("mean") if stats else None
    return float("nan") if m is None else float(m)


def _sizes(sizes: Sequence[int]) -> str:
    if not sizes:
        return "—"
    lo, hi = min(sizes), max(sizes)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _pct(stats: Mapping[str, Any], signed: bool = False) -> str:
    mean = stats.get("mean") if stats else None
    if mean is None:
        return "—"
    text = f"{mean * 100:+.1f}" if signed else f"{mean * 100:.1f}"
    if stats.get("ci95") is not None:
        text += f" ± {stats['ci95'] * 100:.1f}"
    return text


def _matrix(relations: Sequence[str], matrix: Mapping[str, Mapping[str, Any]], *,
            pre: Mapping[str, Any] | None = None, diagonal: str | None = None) -> list[str]:
    out = ["| A \\ B | " + " | ".join(relations) + " |", "|---" * (len(relations) + 1) + "|"]
    if pre is not None:
        out.append("| *(unedited)* | " + " | ".join(_pct(pre.get(b, {})) for b in relations)
                   + " |")
    for a in relations:
        cells = [diagonal if (diagonal is not None and a == b) else
                 _pct(matrix.get(a, {}).get(b, {})) for b in relations]
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    return out


# ---------------------------------------------------------------------- protocol
def evaluate_multifact(
    editor_or_method: Editor | type[Editor] | str,
    model: nn.Module | None = None,
    tokenizer: TokenizerLike | None = None,
    records: Sequence[EvalRecord | Mapping[str, Any]] = (),
    hparams: Any = None,
    *,
    n_subjects: int | None = None,
    min_relations: int = 2,
    pairwise_subjects: int | None = None,
    max_rows: int = 128,
    kind: str = "auto",
    dataset_name: str | None = None,
    model_name: str | None = None,
    label: str | None = None,
    verify_revert: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> MultiFactReport:
    """Run the multiple-facts protocol (module docstring) and return its report.

    Args:
        editor_or_method: an ``Editor``, an ``Editor`` class or a registered method name.
        model, tokenizer: the model to edit (omit with an ``Editor`` instance).
        records: CounterFact records or dicts; grouped by subject with
            :func:`group_by_subject` (subjects with fewer than ``min_relations`` are dropped).
        n_subjects: use the first ``n_subjects`` subject groups (default: all).
        pairwise_subjects: measure matrix (ii) on the first this many groups (default: all;
            0 skips it). It costs k·(k − 1) two-edit applications per group of k.
        verify_revert: check after every condition that the weights are bit-for-bit those
            before the protocol (every edit is applied in an ``editor.applied`` block).
        seed: bootstrap seed of S.

    Every edit is reverted when the function returns (also on error): the model ends
    bit-for-bit as it started.
    """
    for name, value, minimum in (("n_subjects", n_subjects, 2),
                                 ("pairwise_subjects", pairwise_subjects, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < minimum):
            raise EditkitError(f"{name}={value!r} must be an integer >= {minimum} (or None for "
                               "all subject groups)")
    groups = group_by_subject(records, min_relations=min_relations, kind=kind)
    if n_subjects is not None:
        groups = groups[:n_subjects]
    spread = spread_groups(groups)
    editor = _make_editor(editor_or_method, model, tokenizer, hparams)
    model, tokenizer = editor.model, editor.tokenizer
    relations: list[str] = []
    for g in groups:
        relations.extend(r for r in g.relations if r not in relations)
    n_pair = len(groups) if pairwise_subjects is None else min(pairwise_subjects, len(groups))

    timings: dict[str, float] = {}
    start_all = t = time.perf_counter()
    editor.prepare()
    timings["prepare_s"] = time.perf_counter() - t
    guard = _RevertGuard(editor, verify_revert)

    every = [r for g in groups for r in g.records]
    key = {id(r): i for i, r in enumerate(every)}
    t = time.perf_counter()
    pre_scores = score_records(model, tokenizer, every, FULL_GROUPS, max_rows=max_rows,
                               progress=progress, desc="scoring unedited model")
    timings["pre_scoring_s"] = time.perf_counter() - t
    pre = [_values(r, s) for r, s in zip(every, pre_scores, strict=True)]
    retention_pre_cells = [(relation_of(r), relation_of(r),
                            retention((s.logprobs.get("rewrite") or [])
                                      + (s.logprobs.get("paraphrase") or [])))
                           for r, s in zip(every, pre_scores, strict=True)]

    alone: list[dict[str, float | None] | None] = [None] * len(every)
    same: list[dict[str, float | None] | None] = [None] * len(every)
    spread_values: list[tuple[int, dict[str, float | None]]] = []
    retention_cells: list[tuple[str, str, float | None]] = []
    paired_cells: list[tuple[str, str, float | None]] = []
    stage_s = dict.fromkeys(("alone_s", "same_subject_s", "pairwise_s", "spread_s"), 0.0)

    def score(recs: Sequence[EvalRecord], groups_: Sequence[str] = FULL_GROUPS):
        return score_records(model, tokenizer, recs, groups_, max_rows=max_rows)

    total = sum(len(g.records) for g in groups) * 2 + sum(len(s) for s in spread) \
        + sum(len(g.records) * (len(g.records) - 1) for g in groups[:n_pair])
    bar = tqdm(total=total, desc=f"{editor.name} · {MULTI_FACT}", unit="edit",
               disable=not progress)
    try:
        for gi, g in enumerate(groups):
            t = time.perf_counter()
            for a in g.records:  # alone, and matrix (i): the subject's other facts after A
                others = [b for b in g.records if b is not a]
                with editor.applied(a.request):
                    alone[key[id(a)]] = _values(a, score([a])[0])
                    for b, s in zip(others, score(others, RETENTION_GROUPS), strict=True):
                        retention_cells.append((relation_of(a), relation_of(b), retention(
                            (s.logprobs.get("rewrite") or [])
                            + (s.logprobs.get("paraphrase") or []))))
                bar.update(1)
            guard.verify()
            stage_s["alone_s"] += time.perf_counter() - t
            t = time.perf_counter()
            with editor.applied([r.request for r in g.records]):
                for r, s in zip(g.records, score(g.records), strict=True):
                    same[key[id(r)]] = _values(r, s)
            bar.update(len(g.records))
            guard.verify()
            stage_s["same_subject_s"] += time.perf_counter() - t
            if gi < n_pair:
                t = time.perf_counter()
                paired_cells.extend(_pairwise(editor, g, score))
                bar.update(len(g.records) * (len(g.records) - 1))
                guard.verify()
                stage_s["pairwise_s"] += time.perf_counter() - t
        t = time.perf_counter()
        for chunk in spread:
            with editor.applied([r.request for r in chunk]):
                for r, s in zip(chunk, score(chunk), strict=True):
                    spread_values.append((key[id(r)], _values(r, s)))
            bar.update(len(chunk))
        guard.verify()
        stage_s["spread_s"] += time.perf_counter() - t
    finally:
        bar.close()
    timings.update(stage_s)

    diag = [(relation_of(r), relation_of(r), alone[key[id(r)]]["ES"])
            for g in groups[:n_pair] for r in g.records]
    conditions = {"pre": summarize(pre, seed), "alone": summarize(alone, seed),  # type: ignore[arg-type]
                  "same_subject": summarize(same, seed),  # type: ignore[arg-type]
                  "spread": summarize([v for _, v in spread_values], seed)}
    differences = {
        "same_subject": paired_difference(same, alone),  # type: ignore[arg-type]
        "spread": paired_difference([v for _, v in spread_values],
                                    [alone[i] for i, _ in spread_values]),  # type: ignore[misc]
    }
    by_condition = {"alone": [(i, v) for i, v in enumerate(alone)],
                    "same_subject": [(i, v) for i, v in enumerate(same)],
                    "spread": spread_values}
    per_relation = {c: {rel: mean_ci([v["ES"] for i, v in items  # type: ignore[index]
                                      if relation_of(every[i]) == rel])
                        for rel in relations} for c, items in by_condition.items()}
    per_record = []
    for i, r in enumerate(every):
        per_record.append({**r.to_dict(), "relation": relation_of(r), "pre": pre[i],
                           "alone": alone[i], "same_subject": same[i],
                           "spread": [v for j, v in spread_values if j == i]})

    from editkit._version import __version__

    timings["total_s"] = time.perf_counter() - start_all
    name = getattr(getattr(model, "config", None), "name_or_path", "") or \
        getattr(getattr(model, "config", None), "model_type", "model")
    return MultiFactReport(
        method=editor.name,
        model=model_name or str(name).rstrip("/").split("/")[-1] or "model",
        dataset=dataset_name or "counterfact",
        apply_mode="sequentially" if editor.sequential else "in one batch",
        relations=relations,
        subjects=[g.subject for g in groups],
        conditions=conditions,
        differences=differences,
        per_relation=per_relation,
        retention=interference_matrix(retention_cells, relations),
        retention_pre={b: mean_ci([v for _, b2, v in retention_pre_cells if b2 == b])
                       for b in relations},
        paired_es=interference_matrix(paired_cells + diag if n_pair else [], relations),
        records=per_record,
        hparams=editor.hparams.to_dict(),
        config={"protocol": MULTI_FACT, "n_subjects": len(groups),
                "group_sizes": [len(g.records) for g in groups],
                "n_records": len(every), "min_relations": min_relations,
                "pairwise_subjects_used": n_pair, "max_rows": max_rows, "seed": seed,
                "spread": "Latin square over subject groups (spread_groups)",
                "confidence_interval": "95%: mean ± 1.96·s/√n; S: percentile bootstrap",
                "verify_revert": verify_revert},
        timings=timings,
        editkit_version=__version__,
        label=label or "",
    )


def _pairwise(editor: Editor, group: SubjectGroup, score) -> list[tuple[str, str, float | None]]:
    """Matrix (ii) cells of one group: ``(A, B, ES of B after editing B, then A)``.

    A sequential editor applies B once and each A on top of it (``editor.apply([B, A])``
    computes exactly that, so the nesting only saves recomputing B); a batch editor gets
    ``[B, A]`` in one ``apply``.
    """
    cells = []
    for b in group.records:
        others = [a for a in group.records if a is not b]
        if editor.sequential:
            with editor.applied(b.request):
                for a in others:
                    with editor.applied(a.request):
                        cells.append((relation_of(a), relation_of(b),
                                      _values(b, score([b], ("rewrite",))[0])["ES"]))
        else:
            for a in others:
                with editor.applied([b.request, a.request]):
                    cells.append((relation_of(a), relation_of(b),
                                  _values(b, score([b], ("rewrite",))[0])["ES"]))
    return cells


__all__ = [
    "CONDITIONS", "MULTI_FACT", "MultiFactReport", "SubjectGroup", "compare_multifact",
    "evaluate_multifact",
    "group_by_subject", "interference_matrix", "paired_difference", "relation_of", "retention",
    "spread_groups", "summarize",
]
