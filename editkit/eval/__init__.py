"""Evaluation harness: CounterFact and zsRE metrics, editing protocols, reports.

    from editkit.eval import evaluate, load_dataset
    records = load_dataset("counterfact.json", n=100)
    report = evaluate("rome", model, tokenizer, records, protocol="independent")
    print(report.to_markdown())
    report.to_json("results/results.json")

See docs/evaluation.md for the metric definitions and protocols.
"""

from __future__ import annotations

from editkit.errors import DatasetFormatError, DatasetUnavailableError, UnknownMetricError
from editkit.eval.datasets import (
    EvalRecord,
    detect_kind,
    load_counterfact,
    load_dataset,
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
    default_metrics,
    generation_entropy,
    get_metric,
    list_metrics,
    mean_ci,
    ngram_entropy,
    text_entropy,
    tfidf_cosine,
)
from editkit.eval.plots import plot_retention
from editkit.eval.report import Report, compare
from editkit.eval.runner import PROTOCOLS, default_checkpoints, evaluate
from editkit.eval.scoring import score_records, score_rows

__all__ = [
    "METRICS", "PROTOCOLS", "DatasetFormatError", "DatasetUnavailableError", "EvalRecord",
    "GenerationConfig", "Metric", "MetricContext", "RecordScores", "ReferenceTable", "Report",
    "UnknownMetricError", "aggregate", "compare", "default_checkpoints", "default_metrics",
    "detect_kind", "evaluate", "generate", "generation_entropy", "get_metric", "list_metrics",
    "load_counterfact", "load_dataset", "load_zsre", "mean_ci", "ngram_entropy",
    "parse_counterfact", "parse_records", "parse_zsre", "plot_retention", "score_records",
    "score_rows", "text_entropy", "tfidf_cosine",
]
