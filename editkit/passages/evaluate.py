"""Passage records and the three-way evaluation of an incorporated passage.

For every question about a passage's facts we ask three models:

(a) the unedited model, question alone — what it believed before;
(b) the unedited model with the passage before the question — the in-context reference, what
    reading the passage gives;
(c) the edited model (the passage incorporated by fact edits), question alone.

Each answer is scored two ways: by cloze probability, as CounterFact does — correct when the
mean per-token log-probability of ``" " + new`` beats that of ``" " + old`` (works on small
models) — and by greedy generation — correct when the greedy continuation starts with one of
the new answer's aliases. From the accuracies: the share of the in-context gain that the edit
recovers, ``(c − a) / (b − a)``, which is defined only when reading helps, ``b − a`` above a
margin (:data:`MIN_GAIN`); below it the share is reported as undefined (``None``), never as a
division by a tiny or negative number. Also: what the edit broke — neighbourhood success
(prompts about *other* subjects whose answer is the old object keep preferring it, CounterFact
NS) and generation entropy (:func:`editkit.eval.generation_entropy`) before and after — and,
when an extractor is evaluated, its precision and recall against the true triples.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from editkit.errors import DatasetFormatError, EditkitError
from editkit.eval.generation import GenerationConfig, generate
from editkit.eval.metrics import generation_entropy, mean_ci
from editkit.jsonio import read_json_records
from editkit.passages.incorporate import incorporate
from editkit.passages.relations import get_relation
from editkit.passages.triples import Triple, triple_key, triples_from_records
from editkit.protocols import TokenizerLike
from editkit.tokens import encode, score_targets

__all__ = ["MIN_GAIN", "PassageRecord", "Question", "evaluate_passage", "evaluate_passages",
           "extraction_scores", "in_context_share", "load_passages", "parse_question", "passages_path",
           "summarise"]

#: Below this in-context gain (b − a, accuracy) the share of it an edit recovers is undefined.
MIN_GAIN = 0.05

_DATA = Path(__file__).resolve().parent / "data"
#: Shipped passage sets: name → file.
SHIPPED = {"factworld": "factworld_passages.jsonl", "smollm2": "smollm2_passages.jsonl"}


@dataclass(frozen=True)
class Question:
    """A question about one fact of a passage.

    ``prompts``: cloze prompts with the subject filled in (the answer follows). ``new`` / ``old``:
    the answer the passage states and the one the model held before; ``new_aliases`` are
    accepted by the generation check (``new`` always is). ``neighborhood``: prompts about other
    subjects whose answer is ``old`` (they should keep it). ``question``: a natural question.
    """

    subject: str
    relation: str
    prompts: tuple[str, ...]
    new: str
    old: str
    new_aliases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    question: str | None = None


@dataclass(frozen=True)
class PassageRecord:
    """A passage, the true triples it states, and questions about them."""

    id: str
    passage: str
    triples: tuple[Triple, ...]
    questions: tuple[Question, ...]
    generation_prompts: tuple[str, ...] = field(default=())


def _strs(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or \
            not all(isinstance(v, str) and v.strip() for v in value):
        raise DatasetFormatError(f"{where}: {name} must be a list of non-empty strings, got "
                                 f"{value!r}")
    return tuple(value)


def parse_question(q: Any, where: str) -> Question:
    """One question record (subject, relation, prompts, new, old[, new_aliases, neighborhood,
    question]); errors name ``where``."""
    if not isinstance(q, dict):
        raise DatasetFormatError(f"{where}: a question is a JSON object, got {q!r}")
    missing = [k for k in ("subject", "relation", "prompts", "new", "old") if k not in q]
    if missing:
        raise DatasetFormatError(f"{where}: question lacks {missing}; give subject, relation, "
                                 "prompts (cloze, subject filled in), new and old")
    for k in ("subject", "relation", "new", "old"):
        if not isinstance(q[k], str) or not q[k].strip():
            raise DatasetFormatError(f"{where}: question {k} must be a non-empty string, got "
                                     f"{q[k]!r}")
    if q["new"].strip() == q["old"].strip():
        raise DatasetFormatError(f"{where}: question new and old answers are both {q['new']!r};"
                                 " a passage question needs a changed answer")
    try:
        rid = get_relation(q["relation"]).id
    except EditkitError as exc:
        raise DatasetFormatError(f"{where}: {exc}") from None
    prompts = _strs(q["prompts"], where, "prompts")
    if not prompts:
        raise DatasetFormatError(f"{where}: question has no prompts")
    return Question(q["subject"], rid, prompts, q["new"], q["old"],
                    _strs(q.get("new_aliases"), where, "new_aliases"),
                    _strs(q.get("neighborhood"), where, "neighborhood"), q.get("question"))


def parse_passage(rec: Any, where: str) -> PassageRecord:
    """One passage record (a JSON object: id, passage, triples, questions)."""
    if not isinstance(rec, dict):
        raise DatasetFormatError(f"{where}: a passage record is a JSON object, got "
                                 f"{type(rec).__name__}")
    missing = [k for k in ("id", "passage", "triples", "questions") if k not in rec]
    if missing:
        raise DatasetFormatError(f"{where}: passage record lacks {missing}; give id, passage, "
                                 "triples and questions")
    if not isinstance(rec["passage"], str) or not rec["passage"].strip():
        raise DatasetFormatError(f"{where}: passage must be non-empty text")
    if not isinstance(rec["triples"], list) or not isinstance(rec["questions"], list) \
            or not rec["questions"]:
        raise DatasetFormatError(f"{where}: triples and questions must be lists (at least one "
                                 "question)")
    triples = tuple(triples_from_records(rec["triples"], where=f"{where} triples"))
    questions = tuple(parse_question(q, f"{where} question {i}")
                      for i, q in enumerate(rec["questions"], 1))
    return PassageRecord(str(rec["id"]), rec["passage"], triples, questions,
                         _strs(rec.get("generation_prompts"), where, "generation_prompts"))


def passages_path(name: str) -> Path:
    """The shipped file of passage set ``name`` (``"factworld"`` or ``"smollm2"``)."""
    if name not in SHIPPED:
        raise DatasetFormatError(f"no shipped passage set {name!r}; choose {sorted(SHIPPED)} or "
                                 "pass a JSONL file")
    return _DATA / SHIPPED[name]


def load_passages(source: str | Path, n: int | None = None) -> list[PassageRecord]:
    """Passage records from a shipped set name or a JSON/JSONL file (line-numbered errors)."""
    path = passages_path(str(source)) if str(source) in SHIPPED else Path(source)
    records = read_json_records(path, hint="one passage record (id, passage, triples, "
                                           "questions) per line")
    out = [parse_passage(r, f"{path}:{i}") for i, r in enumerate(records, 1)]
    return out if n is None else out[:n]


# ------------------------------------------------------------------- scoring
def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _starts_with(text: str, answers: Sequence[str]) -> bool:
    got = _norm(text)
    return any(got == a or got.startswith(a + " ") for a in map(_norm, answers) if a)


def _rows(record: PassageRecord) -> list[tuple[Question, str]]:
    return [(q, p) for q in record.questions for p in q.prompts]


def cloze_and_generation(model: nn.Module, tokenizer: TokenizerLike, record: PassageRecord,
                         context: str | None = None) -> dict[str, list[float]]:
    """Per (question, prompt): cloze correctness (new beats old) and greedy-generation match,
    with ``context`` (the passage) before the prompt when given."""
    rows = _rows(record)
    prefix = "" if context is None else " ".join(context.split()) + " "
    prompts = [prefix + p for _, p in rows]
    lp = score_targets(model, tokenizer, prompts * 2, [q.new for q, _ in rows]
                       + [q.old for q, _ in rows]).tolist()
    k = len(rows)
    cloze = [float(lp[i] > lp[k + i]) for i in range(k)]
    n_tok = max(len(encode(tokenizer, " " + a)) for q, _ in rows for a in (q.new, *q.new_aliases))
    texts = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=n_tok + 1),
                     full_text=False)
    gen = [float(_starts_with(t, (q.new, *q.new_aliases))) for (q, _), t in
           zip(rows, texts, strict=True)]
    return {"cloze": cloze, "gen": gen}


def neighbourhood(model: nn.Module, tokenizer: TokenizerLike, record: PassageRecord
                  ) -> list[float]:
    """Per neighbourhood prompt: its old answer still beats the passage's new one."""
    rows = [(q, p) for q in record.questions for p in q.neighborhood]
    if not rows:
        return []
    lp = score_targets(model, tokenizer, [p for _, p in rows] * 2,
                       [q.old for q, _ in rows] + [q.new for q, _ in rows]).tolist()
    k = len(rows)
    return [float(lp[i] > lp[k + i]) for i in range(k)]


def _generation_prompts(record: PassageRecord) -> list[str]:
    if record.generation_prompts:
        return list(record.generation_prompts)
    subjects = list(dict.fromkeys(q.subject for q in record.questions))
    return [f"{s} is" for s in subjects]


def extraction_scores(found: Sequence[Triple], truth: Sequence[Triple]) -> dict[str, float | None]:
    """Precision and recall of extracted triples against the true ones (same normalised
    subject, same relation id, same normalised object)."""
    f = {triple_key(t) for t in found}
    t = {triple_key(x) for x in truth}
    hit = len(f & t)
    return {"precision": hit / len(f) if f else None, "recall": hit / len(t) if t else None,
            "n_found": len(f), "n_true": len(t), "n_correct": hit}


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def evaluate_passage(model: nn.Module, tokenizer: TokenizerLike, record: PassageRecord, *,
                     method: Any = "memit", hparams: Any = None, extractor: Any = None,
                     generation: GenerationConfig | None = None,
                     reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Incorporate ``record``'s passage, measure (a), (b), (c) and the damage, revert.

    ``extractor=None`` edits the record's true triples; a name or callable extracts them (and
    precision/recall is measured). ``reference``: (a)/(b) measured earlier for this record
    (they do not depend on the method), to skip recomputing them. The model is left as it was.
    """
    gen_cfg = generation or GenerationConfig(max_new_tokens=30)
    if reference is None:
        a = cloze_and_generation(model, tokenizer, record)
        b = cloze_and_generation(model, tokenizer, record, context=record.passage)
        ns_a = neighbourhood(model, tokenizer, record)
        ge_a = generation_entropy(generate(model, tokenizer, _generation_prompts(record),
                                           gen_cfg))
        reference = {"a_cloze": _mean(a["cloze"]), "a_gen": _mean(a["gen"]),
                     "b_cloze": _mean(b["cloze"]), "b_gen": _mean(b["gen"]),
                     "ns_before": _mean(ns_a), "ge_before": ge_a}
    out: dict[str, Any] = {"id": record.id, "n_facts": len(record.triples),
                           "n_questions": len(record.questions), **reference}
    truth = [Triple(t.subject, t.relation, t.object, t.old) for t in record.triples]
    start = time.perf_counter()
    try:
        if extractor is None:
            result = incorporate(model, tokenizer, record.passage, truth, method=method,
                                 hparams=hparams)
        else:
            result = incorporate(model, tokenizer, record.passage, extractor=extractor,
                                 method=method, hparams=hparams)
    except EditkitError as exc:
        if extractor is None:
            raise
        # The extractor found nothing usable: the model is unedited, (c) = (a).
        out.update({"c_cloze": out["a_cloze"], "c_gen": out["a_gen"], "ns_after":
                    out["ns_before"], "ge_after": out["ge_before"], "edited": False,
                    "error": str(exc), **extraction_scores([], truth)})
        return out
    out["seconds"] = time.perf_counter() - start
    try:
        c = cloze_and_generation(model, tokenizer, record)
        per_q = [len(q.prompts) for q in record.questions]
        starts = np.cumsum([0, *per_q])
        out.update({"c_cloze": _mean(c["cloze"]), "c_gen": _mean(c["gen"]),
                    # In the order the facts were edited (a sequential method edits the
                    # passage's first triple first): does a later edit undo an earlier one?
                    "c_cloze_by_fact": [_mean(c["cloze"][i:j]) for i, j in
                                        zip(starts[:-1], starts[1:], strict=True)],
                    "ns_after": _mean(neighbourhood(model, tokenizer, record)),
                    "ge_after": generation_entropy(generate(
                        model, tokenizer, _generation_prompts(record), gen_cfg)),
                    "edited": True, "n_rejected": len(result.rejected),
                    "triples_used": [t.to_dict() for t in result.triples]})
        if extractor is not None:
            out.update(extraction_scores(result.triples, truth))
    finally:
        result.revert()
    return out


def evaluate_passages(model: nn.Module, tokenizer: TokenizerLike,
                      records: Sequence[PassageRecord], **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`evaluate_passage` for every record (the model is left as it was)."""
    return [evaluate_passage(model, tokenizer, r, **kwargs) for r in records]


def in_context_share(rows: Sequence[dict[str, Any]], kind: str = "cloze", n_boot: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Share of the in-context gain the edit recovers, ``(c̄ − ā) / (b̄ − ā)`` over passages,
    with a percentile-bootstrap 95% interval (resampling passages); ``None`` (with the gain)
    when ``b̄ − ā < MIN_GAIN``: reading the passage does not help, so there is nothing to
    recover (bootstrap samples below the margin are left out of the interval)."""
    arr = np.array([[r[f"a_{kind}"], r[f"b_{kind}"], r[f"c_{kind}"]] for r in rows
                    if all(r.get(f"{x}_{kind}") is not None for x in "abc")], dtype=np.float64)
    if arr.size == 0:
        return {"share": None, "gain": None, "lo": None, "hi": None, "n": 0}
    a, b, c = arr.mean(axis=0)
    gain = float(b - a)
    if gain < MIN_GAIN:
        return {"share": None, "gain": gain, "lo": None, "hi": None, "n": len(arr),
                "why": f"in-context gain {gain:.3f} < {MIN_GAIN}: reading the passage does not "
                       "help this model"}
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(n_boot):
        s = arr[rng.integers(0, len(arr), len(arr))].mean(axis=0)
        if s[1] - s[0] >= MIN_GAIN:
            shares.append((s[2] - s[0]) / (s[1] - s[0]))
    lo, hi = (np.percentile(shares, [2.5, 97.5]).tolist() if shares else (None, None))
    return {"share": float((c - a) / gain), "gain": gain, "lo": lo, "hi": hi, "n": len(arr)}


#: Per-passage values :func:`summarise` averages.
SUMMARY_KEYS = ("a_cloze", "b_cloze", "c_cloze", "a_gen", "b_gen", "c_gen", "ns_before",
                "ns_after", "ge_before", "ge_after", "precision", "recall")


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means with 95% intervals over passages, and the in-context shares."""
    out: dict[str, Any] = {k: mean_ci([r.get(k) for r in rows]) for k in SUMMARY_KEYS
                           if any(r.get(k) is not None for r in rows)}
    out["share_cloze"] = in_context_share(rows, "cloze")
    out["share_gen"] = in_context_share(rows, "gen")
    out["n"] = len(rows)
    return out
