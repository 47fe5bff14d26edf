"""Metrics of the model-editing papers, registered with their direction and aggregation.

Every metric is a :class:`Metric` in the ``METRICS`` registry (entry-point group
``editkit.metrics`` for plugins): a name, the dataset kind it applies to, whether higher is
better, how it aggregates over records, and a function of one record's raw scores
(:class:`RecordScores`). Reports read those attributes; they never guess.

**CounterFact** (Meng et al. 2022, ROME §3/§4; definitions as in the reference
``summarize.py``). For a prompt *p*, ``lp(o | p)`` is the *mean per-token* log-probability of
``" " + o``; the papers' probabilities are ``P(o | p) = exp(lp) = exp(-mean NLL)``.

- ES  efficacy success   = E_p[ P(o*|p) > P(o^c|p) ] on the rewrite prompt.
- EM  efficacy magnitude = E_p[ P(o*|p) − P(o^c|p) ] on the rewrite prompt.
- PS / PM: the same on the paraphrase prompts (averaged within the record first).
- NS  neighborhood success   = E_p[ P(o^c|p) > P(o*|p) ] on the neighborhood prompts.
- NM  neighborhood magnitude = E_p[ P(o^c|p) − P(o*|p) ].
- S   score = harmonic mean of the aggregate ES, PS and NS (computed on the aggregates, as
  the paper; its CI by bootstrap over records).
- GE  generation entropy (fluency): for each generated text the word n-gram entropies in
  bits, (2/3·H₂ + 4/3·H₃)/2, averaged over the record's generation prompts.
- RS  reference score (consistency): TF-IDF cosine between the record's generated texts
  (joined) and its reference texts (joined) under a user-supplied idf table. Only computed
  when a :class:`ReferenceTable` is given; never estimated otherwise.

**zsRE** (Mitchell et al. 2022 split, token-level accuracy as in the ROME evaluation): the
target's tokens are teacher-forced after the prompt and a token counts as correct when it
is the model's argmax prediction.

- efficacy:   accuracy of ``alt`` tokens after the question ``src``.
- paraphrase: accuracy of ``alt`` tokens after ``rephrase``.
- specificity: accuracy of ``loc_ans`` tokens after ``loc + "?"`` (ROME's definition: the
  unedited model's value is the reference; editing should not lower it).
- unchanged:  fraction of ``loc`` positions whose argmax after the edit equals the argmax
  before it (MEND's "the prediction does not change" view of locality; 1.0 before editing).

Aggregation ``"mean"``: the mean over records with a value, with a 95% confidence interval
mean ± 1.96·s/√n (normal approximation, s the sample standard deviation). Aggregation
``"harmonic"`` (S): the harmonic mean of its inputs' means with a 95% percentile-bootstrap
interval (1000 resamples of the records, fixed seed).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from editkit.errors import DatasetFormatError, UnknownMetricError
from editkit.jsonio import read_json
from editkit.registry import Registry

# --------------------------------------------------------------------- raw scores


@dataclass
class RecordScores:
    """Raw per-record measurements of one model state (before or after an edit).

    ``logprobs[group]``: per prompt, ``[lp(new), lp(true)]`` mean per-token log-probs.
    ``correct[group]`` / ``predicted[group]``: per prompt, per target token, whether the
    argmax equals the teacher-forced target token, and the argmax id itself.
    ``generations``: generated texts (prompt + continuation) of the generation prompts.
    """

    logprobs: dict[str, list[list[float]]] = field(default_factory=dict)
    correct: dict[str, list[list[bool]]] = field(default_factory=dict)
    predicted: dict[str, list[list[int]]] = field(default_factory=dict)
    generations: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (only the measurements that were taken)."""
        d: dict[str, Any] = {}
        if self.logprobs:
            d["logprobs"] = self.logprobs
        if self.correct:
            d["correct"] = {k: [[int(x) for x in row] for row in v]
                            for k, v in self.correct.items()}
        if self.predicted:
            d["predicted"] = self.predicted
        if self.generations is not None:
            d["generations"] = self.generations
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecordScores:
        """Inverse of :meth:`to_dict`."""
        return cls(
            logprobs={k: [list(map(float, r)) for r in v]
                      for k, v in data.get("logprobs", {}).items()},
            correct={k: [[bool(x) for x in r] for r in v]
                     for k, v in data.get("correct", {}).items()},
            predicted={k: [list(map(int, r)) for r in v]
                       for k, v in data.get("predicted", {}).items()},
            generations=data.get("generations"),
        )


# ------------------------------------------------------- CounterFact, from log-probs
#: Prompt groups of a CounterFact record and the (success, magnitude) metrics read from each.
COUNTERFACT_GROUPS: dict[str, tuple[str, str]] = {
    "rewrite": ("ES", "EM"),
    "paraphrase": ("PS", "PM"),
    "neighborhood": ("NS", "NM"),
}


def select_neighborhood(prompts: Sequence[Any], n_neighbors: int | None = None) -> list[Any]:
    """The neighbourhood rule of every CounterFact number in editkit.

    Every neighbourhood prompt counts (``n_neighbors=None``, the ROME evaluation); a caller
    that asks for fewer gets the first ``n_neighbors`` in record order. Applied to prompts
    before scoring and to their log-probability rows by :func:`counterfact_metrics`.
    """
    if n_neighbors is None:
        return list(prompts)
    if n_neighbors < 0:
        raise ValueError(f"n_neighbors={n_neighbors} must be >= 0 or None (all prompts)")
    return list(prompts)[:n_neighbors]


def counterfact_metrics(logprobs: Mapping[str, Sequence[Sequence[float]]], *,
                        n_neighbors: int | None = None) -> dict[str, float | None]:
    """CounterFact successes and magnitudes of one record from per-prompt log-probabilities.

    ``logprobs[group]`` (``group`` in ``rewrite``, ``paraphrase``, ``neighborhood``) holds,
    per prompt, ``[lp(new), lp(true)]``: the mean per-token log-probabilities of
    ``" " + target_new`` and ``" " + target_true`` after the prompt, so that
    ``P(o | p) = exp(lp)`` (Meng et al. 2022, §3). Returns, per group, the mean over its
    prompts of

    - success: ``[P(new) > P(true)]`` for rewrite (ES) and paraphrase (PS) prompts,
      ``[P(true) > P(new)]`` for neighbourhood prompts (NS);
    - magnitude: ``P(new) − P(true)`` (EM, PM), ``P(true) − P(new)`` (NM).

    A group with no prompts gives ``None``. Neighbourhood rows follow
    :func:`select_neighborhood` (all unless ``n_neighbors`` is given). Pure: no model, no
    state; every CounterFact number editkit reports comes from here.
    """
    out: dict[str, float | None] = {}
    for group, (success, magnitude) in COUNTERFACT_GROUPS.items():
        rows = logprobs.get(group) or []
        if group == "neighborhood":
            rows = select_neighborhood(rows, n_neighbors)
        sign = -1.0 if group == "neighborhood" else 1.0
        if not rows:
            out[success] = out[magnitude] = None
            continue
        wins = [float(sign * (new - true) > 0) for new, true in rows]
        gaps = [sign * (math.exp(new) - math.exp(true)) for new, true in rows]
        out[success] = float(np.mean(wins))
        out[magnitude] = float(np.mean(gaps))
    return out


def harmonic_mean(values: Sequence[float | None]) -> float:
    """Harmonic mean of rates in [0, 1], such as S = H(ES, PS, NS).

    The one rule for S everywhere: missing values (``None`` or NaN: a group without
    prompts) are left out; if any remaining value is ≤ 0 the mean is 0.0 (its limit as a
    value goes to 0, and a rate below 0 is not a rate); with no value left it is NaN.
    """
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not present:
        return float("nan")
    if min(present) <= 0:
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


# ---------------------------------------------------------------- text measures
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def words(text: str) -> list[str]:
    """Word tokens for n-gram statistics: runs of word characters, and punctuation marks."""
    return _WORD.findall(text)


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the empirical distribution of word ``n``-grams of ``text``."""
    toks = words(text)
    grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    p = np.array(list(grams.values()), dtype=np.float64) / total
    return float(-(p * np.log2(p)).sum())


def text_entropy(text: str) -> float:
    """GE of one text: the weighted mean (2/3·H₂ + 4/3·H₃)/2 of bigram/trigram entropies."""
    return (2 / 3 * ngram_entropy(text, 2) + 4 / 3 * ngram_entropy(text, 3)) / 2


def generation_entropy(texts: Sequence[str]) -> float | None:
    """GE of a record: :func:`text_entropy` averaged over its generated texts."""
    return float(np.mean([text_entropy(t) for t in texts])) if texts else None


def tfidf_vector(text: str, idf: Mapping[str, float]) -> dict[str, float]:
    """Raw term counts × idf over the idf table's vocabulary (lower-cased word tokens of two
    or more characters; words absent from the table are ignored)."""
    counts = Counter(t for t in _TFIDF_TOKEN.findall(text.lower()) if t in idf)
    return {t: c * float(idf[t]) for t, c in counts.items()}


def tfidf_cosine(a: str, b: str, idf: Mapping[str, float]) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts (0 when either is empty)."""
    va, vb = tfidf_vector(a, idf), tfidf_vector(b, idf)
    na = math.sqrt(sum(x * x for x in va.values()))
    nb = math.sqrt(sum(x * x for x in vb.values()))
    if na == 0 or nb == 0:
        return 0.0
    return sum(x * vb.get(t, 0.0) for t, x in va.items()) / (na * nb)


@dataclass
class ReferenceTable:
    """Reference texts and an idf table for RS.

    ``idf``: word → inverse document frequency (lower-case words). ``references``: key →
    list of reference texts, where a record's key is looked up in this order: its
    ``case_id`` (as a string), its ``requested_rewrite.target_new.id``, its ``target_new``
    string. (The ROME evaluation uses Wikipedia snippets about other subjects that have
    the new attribute, keyed by relation and target id.)
    """

    idf: Mapping[str, float]
    references: Mapping[str, Sequence[str]]

    def __post_init__(self) -> None:
        if not self.idf:
            raise DatasetFormatError("ReferenceTable: the idf table is empty; give word → idf")
        for k, v in self.idf.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DatasetFormatError(f"ReferenceTable: idf[{k!r}] = {v!r} is not a number")
        for k, v in self.references.items():
            if isinstance(v, str) or not all(isinstance(t, str) for t in v):
                raise DatasetFormatError(
                    f"ReferenceTable: references[{k!r}] must be a list of strings, got {v!r}"
                )

    @classmethod
    def from_files(cls, idf_path: str | Path, references_path: str | Path) -> ReferenceTable:
        """Read a JSON ``{word: idf}`` file and a JSON ``{key: [texts]}`` file."""
        idf, refs = read_json(idf_path), read_json(references_path)
        if not isinstance(idf, Mapping) or not isinstance(refs, Mapping):
            raise DatasetFormatError(
                f"{idf_path} must hold a JSON object word → idf and {references_path} a JSON "
                "object key → list of texts"
            )
        return cls(idf, refs)

    def texts_for(self, record) -> list[str] | None:
        """Reference texts of ``record`` (looked up as the class docstring says), or ``None``."""
        raw = record.raw
        rw = raw.get("requested_rewrite", {}) if isinstance(raw, Mapping) else {}
        tn = rw.get("target_new", {}) if isinstance(rw, Mapping) else {}
        keys = [str(record.case_id)]
        if isinstance(tn, Mapping):
            keys += [str(tn[k]) for k in ("id", "str") if k in tn]
        keys.append(record.request.target_new)
        for k in keys:
            if k in self.references and self.references[k]:
                return list(self.references[k])
        return None


# ---------------------------------------------------------------------- metrics
@dataclass
class MetricContext:
    """What a metric function may read besides the scores of the state it measures."""

    record: Any  # EvalRecord
    pre: RecordScores | None = None  # the unedited model's scores of the same record
    references: ReferenceTable | None = None


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    ``compute(scores, ctx) -> float | None`` gives the per-record value (``None``: not
    applicable, e.g. no paraphrase prompts). ``aggregation`` is ``"mean"`` or
    ``"harmonic"`` (then ``inputs`` names the metrics whose aggregates it combines and
    ``compute`` is unused). ``groups``: prompt groups the metric needs scored;
    ``needs``: extra measurements (``"generation"``, ``"references"``, ``"pre"``).
    ``percent``: reports show ×100.
    """

    name: str
    dataset: str
    description: str
    higher_is_better: bool
    compute: Callable[[RecordScores, MetricContext], float | None] | None = None
    aggregation: str = "mean"
    inputs: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    percent: bool = True

    def info(self) -> dict[str, Any]:
        """What reports store about the metric: dataset, direction, aggregation, inputs."""
        return {"dataset": self.dataset, "description": self.description,
                "higher_is_better": self.higher_is_better, "aggregation": self.aggregation,
                "inputs": list(self.inputs), "percent": self.percent}


METRICS: Registry[Metric] = Registry(
    "metric",
    "editkit.metrics",
    lambda obj: isinstance(obj, Metric),
    UnknownMetricError,
    'Register a metric with an entry point in group "editkit.metrics" '
    '(name = "package.module:METRIC", an editkit.eval.Metric) or '
    "editkit.eval.METRICS.register(name, metric).",
)


def get_metric(name: str) -> Metric:
    """The registered :class:`Metric` called ``name`` (:class:`UnknownMetricError` if none)."""
    return METRICS.get(name)


def list_metrics(dataset: str | None = None) -> list[str]:
    """Registered metric names (of one dataset kind if given), in registration order."""
    names = METRICS.names()
    order = {n: i for i, n in enumerate(_BUILTIN_ORDER)}
    names.sort(key=lambda n: (order.get(n, len(order)), n))
    if dataset is None:
        return names
    return [n for n in names if METRICS.get(n).dataset == dataset]


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _counterfact(name: str) -> Callable[[RecordScores, MetricContext], float | None]:
    def fn(scores: RecordScores, ctx: MetricContext) -> float | None:
        return counterfact_metrics(scores.logprobs)[name]
    return fn


def _ge(scores: RecordScores, ctx: MetricContext) -> float | None:
    return generation_entropy(scores.generations or [])


def _rs(scores: RecordScores, ctx: MetricContext) -> float | None:
    if ctx.references is None or not scores.generations:
        return None
    refs = ctx.references.texts_for(ctx.record)
    if not refs:
        return None
    return tfidf_cosine(" ".join(scores.generations), " ".join(refs), ctx.references.idf)


def _token_accuracy(group: str) -> Callable[[RecordScores, MetricContext], float | None]:
    def fn(scores: RecordScores, ctx: MetricContext) -> float | None:
        flat = [c for row in scores.correct.get(group) or [] for c in row]
        return _mean([float(c) for c in flat])
    return fn


def _unchanged(scores: RecordScores, ctx: MetricContext) -> float | None:
    if ctx.pre is None:
        return None
    after = [t for row in scores.predicted.get("neighborhood") or [] for t in row]
    before = [t for row in ctx.pre.predicted.get("neighborhood") or [] for t in row]
    if not after or len(after) != len(before):
        return None
    return _mean([float(a == b) for a, b in zip(after, before, strict=True)])


_BUILTINS: list[Metric] = [
    Metric("S", "counterfact", "harmonic mean of ES, PS and NS", True,
           aggregation="harmonic", inputs=("ES", "PS", "NS")),
    Metric("ES", "counterfact", "efficacy success: P(new) > P(true) on the rewrite prompt",
           True, _counterfact("ES"), groups=("rewrite",)),
    Metric("PS", "counterfact", "paraphrase success: P(new) > P(true) on paraphrases", True,
           _counterfact("PS"), groups=("paraphrase",)),
    Metric("NS", "counterfact", "neighborhood success: P(true) > P(new) on neighbours", True,
           _counterfact("NS"), groups=("neighborhood",)),
    Metric("EM", "counterfact", "efficacy magnitude: P(new) − P(true) on the rewrite prompt",
           True, _counterfact("EM"), groups=("rewrite",)),
    Metric("PM", "counterfact", "paraphrase magnitude: P(new) − P(true) on paraphrases", True,
           _counterfact("PM"), groups=("paraphrase",)),
    Metric("NM", "counterfact", "neighborhood magnitude: P(true) − P(new) on neighbours", True,
           _counterfact("NM"), groups=("neighborhood",)),
    Metric("GE", "counterfact", "generation entropy (2/3·H2 + 4/3·H3)/2 in bits (fluency)",
           True, _ge, needs=frozenset({"generation"}), percent=False),
    Metric("RS", "counterfact", "reference score: TF-IDF cosine of generations to reference "
           "texts (consistency)", True, _rs, needs=frozenset({"generation", "references"})),
    Metric("efficacy", "zsre", "token top-1 accuracy of the new answer after the question",
           True, _token_accuracy("rewrite"), groups=("rewrite",)),
    Metric("paraphrase", "zsre", "token top-1 accuracy of the new answer after the rephrase",
           True, _token_accuracy("paraphrase"), groups=("paraphrase",)),
    Metric("specificity", "zsre", "token top-1 accuracy of loc_ans after loc (ROME)", True,
           _token_accuracy("neighborhood"), groups=("neighborhood",)),
    Metric("unchanged", "zsre", "fraction of loc token predictions unchanged by the edit (MEND)",
           True, _unchanged, groups=("neighborhood",), needs=frozenset({"pre"})),
]
_BUILTIN_ORDER = [m.name for m in _BUILTINS]
for _m in _BUILTINS:  # built-ins win over a plugin that reuses their name
    METRICS.register(_m.name, _m, override=_m.name in METRICS)


def default_metrics(dataset: str, references: bool = False) -> list[str]:
    """The metrics a report shows by default: every built-in of the dataset kind (RS only
    when reference texts are given)."""
    return [n for n in list_metrics(dataset)
            if n in _BUILTIN_ORDER and (references or "references" not in get_metric(n).needs)]


def resolve_metrics(names: Sequence[str] | None, dataset: str,
                    references: bool = False) -> list[Metric]:
    """Metric objects for ``names`` (defaults when ``None``), with derived metrics' inputs."""
    if names is None:
        names = default_metrics(dataset, references)
    out: dict[str, Metric] = {}
    for name in names:
        m = get_metric(name)
        if m.dataset != dataset:
            raise UnknownMetricError(
                f"metric {name!r} is a {m.dataset} metric but the records are {dataset}; "
                f"{dataset} metrics: {list_metrics(dataset)}"
            )
        if "references" in m.needs and not references:
            raise UnknownMetricError(
                f"metric {name!r} needs reference texts and an idf table; pass "
                "references=ReferenceTable(idf, texts) (CLI: --idf FILE --references FILE) "
                "or leave it out"
            )
        for dep in m.inputs:
            out.setdefault(dep, get_metric(dep))
        out[name] = m
    order = list_metrics()
    return sorted(out.values(), key=lambda m: order.index(m.name) if m.name in order else 1e9)


# ------------------------------------------------------------------ aggregation
Z95 = 1.959963984540054


def mean_ci(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean over the non-missing values with a 95% normal-approximation interval."""
    xs = np.array([v for v in values if v is not None], dtype=np.float64)
    n = int(xs.size)
    if n == 0:
        return {"mean": None, "ci95": None, "lo": None, "hi": None, "std": None, "n": 0}
    mean = float(xs.mean())
    std = float(xs.std(ddof=1)) if n > 1 else 0.0
    half = Z95 * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "ci95": half, "lo": None if half is None else mean - half,
            "hi": None if half is None else mean + half, "std": std, "n": n}


def harmonic_ci(columns: Sequence[Sequence[float | None]], n_boot: int = 1000,
                seed: int = 0) -> dict[str, float | int | None]:
    """Harmonic mean of the columns' means, with a percentile-bootstrap 95% interval.

    Only records with every input present are used (so all means are over the same records).
    """
    rows = [r for r in zip(*columns, strict=True) if all(v is not None for v in r)]
    n = len(rows)
    if n == 0:
        return {"mean": None, "ci95": None, "lo": None, "hi": None, "std": None, "n": 0}
    arr = np.array(rows, dtype=np.float64)
    point = harmonic_mean(list(arr.mean(axis=0)))
    if n == 1:
        return {"mean": point, "ci95": None, "lo": None, "hi": None, "std": 0.0, "n": 1}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = arr[idx].mean(axis=1)  # (n_boot, k)
    boots = np.array([harmonic_mean(list(row)) for row in means])
    lo, hi = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
    return {"mean": point, "ci95": max(point - lo, hi - point), "lo": lo, "hi": hi,
            "std": float(boots.std(ddof=1)), "n": n}


def aggregate(metrics: Sequence[Metric], per_record: Sequence[Mapping[str, float | None]],
              seed: int = 0) -> dict[str, dict[str, Any]]:
    """Aggregate per-record values (list of ``{metric: value}``) with confidence intervals."""
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        if m.aggregation == "mean":
            out[m.name] = mean_ci([r.get(m.name) for r in per_record])
        elif m.aggregation == "harmonic":
            out[m.name] = harmonic_ci([[r.get(i) for r in per_record] for i in m.inputs],
                                      seed=seed)
        else:
            raise UnknownMetricError(
                f"metric {m.name!r} has aggregation {m.aggregation!r}; use 'mean' or 'harmonic'"
            )
    return out


def compute_record_metrics(metrics: Sequence[Metric], scores: RecordScores,
                           ctx: MetricContext) -> dict[str, float | None]:
    """Per-record values of the metrics that have one (derived metrics are aggregate-only)."""
    return {m.name: (m.compute(scores, ctx) if m.compute is not None else None)
            for m in metrics if m.aggregation == "mean"}
