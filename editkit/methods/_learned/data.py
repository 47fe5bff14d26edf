"""Training data of the learned editors: records → edit examples, subject-disjoint splits.

An :class:`EditExample` is one edit request plus the prompts its training losses read: the
rewrite prompt and its paraphrases (edit loss: the new target should follow them) and
unrelated prompts (locality loss: the output distribution should not move). Records come as
``EditRequest``\\ s or in the CounterFact or zsRE formats (converted by the core's
``EditRequest.from_counterfact`` / ``from_zsre``); reading files is the caller's job
(:func:`editkit.eval.load_requests`).

Splits are made **by subject** (:func:`split_by_subject`), so the subjects of validation and
test edits never occur in training; prompts of training examples that mention a held-out
subject are dropped (:func:`build_examples`).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editkit.errors import DatasetFormatError
from editkit.requests import EditRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditExample:
    """An edit request with the prompts its training losses use.

    ``edit_prompts``: rewrite prompt first, then paraphrases (filled text, no target).
    ``locality``: its own unrelated prompts (e.g. CounterFact neighbourhood prompts).
    """

    request: EditRequest
    edit_prompts: tuple[str, ...]
    locality: tuple[str, ...]


# ----------------------------------------------------------------- records
def _as_request(record: Any, index: int) -> EditRequest:
    if isinstance(record, EditRequest):
        return record
    if hasattr(record, "request") and isinstance(record.request, EditRequest):
        return record.request  # an editkit.eval.EvalRecord
    if isinstance(record, Mapping):
        if "requested_rewrite" in record:
            return EditRequest.from_counterfact(record)
        if "src" in record and "alt" in record:
            return EditRequest.from_zsre(record)
        if "prompt" in record and "subject" in record:
            return EditRequest.from_dict(record)
    raise DatasetFormatError(
        f"record {index} ({type(record).__name__}) is neither a CounterFact record "
        "('requested_rewrite'), a zsRE record ('src', 'alt'), an EditRequest dict nor an "
        "EditRequest; convert it to one of these formats"
    )


def as_requests(records: Iterable[Any]) -> list[EditRequest]:
    """``EditRequest``\\ s from CounterFact / zsRE dicts, ``EvalRecord``\\ s or requests.

    Records are converted by the request constructors of the core
    (:meth:`EditRequest.from_counterfact`, :meth:`EditRequest.from_zsre`); files and named
    sources are read by :func:`editkit.eval.load_requests`, which validates them first.
    """
    return [_as_request(r, i) for i, r in enumerate(records)]


# ------------------------------------------------------------------ splits
def _subject_key(subject: str) -> str:
    return subject.strip().lower()


def split_by_subject(requests: Sequence[EditRequest],
                     fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0) -> tuple[list[EditRequest], ...]:
    """Split ``requests`` into ``len(fractions)`` parts with disjoint subjects.

    Subjects are shuffled with ``seed`` and assigned greedily so that each part's share of
    *requests* is close to its fraction. Every part keeps the input order.
    """
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions={tuple(fractions)} must be non-negative with a positive sum")
    total = float(sum(fractions))
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(_subject_key(r.subject), []).append(i)
    subjects = sorted(groups)
    random.Random(seed).shuffle(subjects)
    targets = [f / total * len(requests) for f in fractions]
    assigned: list[list[int]] = [[] for _ in fractions]
    part = 0
    for s in subjects:
        while part < len(fractions) - 1 and len(assigned[part]) >= targets[part] - 1e-9:
            part += 1
        assigned[part].extend(groups[s])
    return tuple([requests[i] for i in sorted(idx)] for idx in assigned)


def subjects_of(requests: Iterable[EditRequest]) -> set[str]:
    return {r.subject for r in requests}


def _subject_pattern(subjects: Iterable[str]) -> re.Pattern[str] | None:
    names = sorted({s for s in subjects if s}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in names) + r")(?!\w)")


def mentions_any(text: str, subjects: Iterable[str]) -> bool:
    """Whether ``text`` mentions any of ``subjects`` as a whole name ("Ann" ≠ "Anna")."""
    pattern = _subject_pattern(subjects)
    return pattern is not None and pattern.search(text) is not None


def build_examples(requests: Sequence[EditRequest],
                   exclude_subjects: Iterable[str] = ()) -> list[EditExample]:
    """Edit examples; prompts that mention any of ``exclude_subjects`` are dropped."""
    excluded = {s for s in exclude_subjects if s}
    pattern = _subject_pattern(excluded)

    def ok(text: str) -> bool:
        return pattern is None or pattern.search(text) is None

    out = []
    for r in requests:
        if r.subject in excluded:
            continue
        paraphrases = tuple(p for p in r.paraphrases if ok(p))
        locality = tuple(p for p in r.neighborhood if ok(p))
        out.append(EditExample(r, (r.text, *paraphrases), locality))
    return out


def locality_pool(examples: Sequence[EditExample], extra: Iterable[str] = (),
                  exclude_subjects: Iterable[str] = ()) -> list[str]:
    """Shared unrelated prompts: every example's rewrite and neighbourhood prompts + ``extra``."""
    pattern = _subject_pattern(exclude_subjects)
    pool: dict[str, None] = {}
    for e in examples:
        pool.setdefault(e.request.text, None)
        for p in e.locality:
            pool.setdefault(p, None)
    for text in extra:
        if text and (pattern is None or pattern.search(text) is None):
            pool.setdefault(text, None)
    return list(pool)


# ----------------------------------------------------------------- batches
@dataclass
class Batch:
    """The prompts of one training or validation step of ``len(examples)`` edits.

    ``edit_rows``: (prompt, edit index) pairs scored against the edit's new target;
    ``loc_rows``: (unrelated prompt, edit index) pairs for the locality loss.
    """

    examples: list[EditExample]
    edit_rows: list[tuple[str, int]]
    loc_rows: list[tuple[str, int]]


def _pick(gen: torch.Generator, items: Sequence[str], k: int) -> list[str]:
    if k <= 0 or not items:
        return []
    if k >= len(items):
        return list(items)
    if len(items) > 8 * k:  # large pools: sample with replacement (cheap)
        idx = torch.randint(len(items), (k,), generator=gen).tolist()
    else:
        idx = torch.randperm(len(items), generator=gen)[:k].tolist()
    return [items[i] for i in idx]


def make_batch(examples: Sequence[EditExample], pool: Sequence[str], gen: torch.Generator,
               n_paraphrases: int, n_locality: int) -> Batch:
    """Rows of a step: rewrite + up to ``n_paraphrases`` paraphrases, ``n_locality`` unrelated.

    Half of the unrelated prompts come from the example's own neighbourhood prompts when it
    has some, the rest from ``pool`` (never one that mentions the example's own subject).
    """
    edit_rows: list[tuple[str, int]] = []
    loc_rows: list[tuple[str, int]] = []
    for i, e in enumerate(examples):
        edit_rows.append((e.edit_prompts[0], i))
        edit_rows += [(p, i) for p in _pick(gen, e.edit_prompts[1:], n_paraphrases)]
        own = _pick(gen, e.locality, (n_locality + 1) // 2 if pool else n_locality)
        need = n_locality - len(own)
        own_subject = _subject_pattern([e.request.subject])
        candidates = [p for p in _pick(gen, pool, need + 4)
                      if own_subject is None or own_subject.search(p) is None][:need]
        loc_rows += [(p, i) for p in own + candidates]
    return Batch(list(examples), edit_rows, loc_rows)
