"""Evaluation harness: CounterFact and zsRE metrics, editing protocols, reports.

    from editkit.eval import evaluate, load_dataset
    records = load_dataset("counterfact.json", n=100)
    report = evaluate("rome", model, tokenizer, records, protocol="independent")
    print(report.to_markdown())
    report.to_json("results/results.json")

One implementation of each CounterFact number: :func:`counterfact_metrics` maps per-prompt
log-probabilities to ES / PS / NS / EM / PM / NM, :func:`harmonic_mean` gives S, and
:func:`select_neighborhood` is the neighbourhood rule (all prompts unless the caller asks
for fewer); :func:`edit_success` / :func:`edit_quality` score requests and editors with
them. :func:`read_json_records` (from :mod:`editkit.jsonio`) reads every record file.

Composite facts: :func:`load_mquake` / :func:`load_portability` read MQuAKE and KnowEdit
portability records and :func:`evaluate_multihop` / :func:`evaluate_portability` score
edit-wise, multi-hop, hop-wise and portability metrics (:mod:`editkit.eval.multihop`);
:data:`TASKS` maps task names (counterfact, zsre, mquake, portability, plugins through the
``editkit.eval_tasks`` entry-point group) to their loader and evaluator.

See docs/evaluation.md for the metric definitions and protocols, docs/results/multihop.md for
the multi-hop measurements.
"""

from __future__ import annotations

from editkit.errors import DatasetFormatError, DatasetUnavailableError, UnknownMetricError
from editkit.eval.datasets import (
    EvalRecord,
    detect_kind,
    load_counterfact,
    load_dataset,
    load_requests,
    load_zsre,
    parse_counterfact,
    parse_records,
    parse_zsre,
)
from editkit.eval.generation import GenerationConfig, generate
from editkit.eval.metrics import (
    METRICS,
    Metric,
    MetricContext,
    RecordScores,
    ReferenceTable,
    aggregate,
    counterfact_metrics,
    default_metrics,
    generation_entropy,
    get_metric,
    harmonic_mean,
    list_metrics,
    mean_ci,
    ngram_entropy,
    select_neighborhood,
    text_entropy,
    tfidf_cosine,
)
from editkit.eval.multifact import MultiFactReport, evaluate_multifact, group_by_subject
from editkit.eval.multihop import (
    Hop,
    MultiHopRecord,
    MultiHopReport,
    PortabilityRecord,
    Probe,
    answer_matches,
    evaluate_multihop,
    evaluate_portability,
    load_mquake,
    load_portability,
    parse_mquake,
    parse_portability,
)
from editkit.eval.objectives import (
    objective_probs,
    objective_scores,
    rewrite_score,
)
from editkit.eval.plots import plot_retention
from editkit.eval.quality import edit_quality, edit_success, request_logprobs
from editkit.eval.report import Report, compare
from editkit.eval.runner import PROTOCOLS, default_checkpoints, evaluate
from editkit.eval.scoring import score_records, score_rows
from editkit.eval.tasks import TASKS, Task, UnknownTaskError, get_task, list_tasks
from editkit.jsonio import iter_jsonl, read_json_records

__all__ = [
    "METRICS", "PROTOCOLS", "DatasetFormatError", "DatasetUnavailableError", "EvalRecord",
    "GenerationConfig", "Metric", "MetricContext", "MultiFactReport", "evaluate_multifact",
    "group_by_subject", "RecordScores", "ReferenceTable", "Report",
    "UnknownMetricError", "aggregate", "compare", "counterfact_metrics", "default_checkpoints",
    "default_metrics", "detect_kind", "edit_quality", "edit_success", "evaluate", "generate",
    "generation_entropy", "get_metric", "harmonic_mean", "iter_jsonl", "list_metrics",
    "load_counterfact", "load_dataset", "load_requests", "load_zsre", "mean_ci",
    "ngram_entropy", "objective_probs", "objective_scores", "parse_counterfact",
    "parse_records", "parse_zsre", "plot_retention",
    "read_json_records", "request_logprobs", "rewrite_score", "score_records", "score_rows",
    "select_neighborhood", "text_entropy", "tfidf_cosine",
    # composite (multi-hop) facts and the task registry
    "TASKS", "Hop", "MultiHopRecord", "MultiHopReport", "PortabilityRecord", "Probe", "Task",
    "UnknownTaskError", "answer_matches", "evaluate_multihop", "evaluate_portability",
    "get_task", "list_tasks", "load_mquake", "load_portability", "parse_mquake",
    "parse_portability",
]
