"""Triples — (subject, relation, object) — read, validated against a passage, compared.

A triple is what a passage states; :func:`check_triple` accepts it only when its subject is
found in the passage (case and spacing aside), its object is non-empty and its relation is
known to the relation registry (:mod:`editkit.passages.relations`). A triple that fails is
never dropped silently: extractors keep it as a :class:`Rejected` line with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editkit.errors import DatasetFormatError, EditkitError
from editkit.jsonio import read_json_records
from editkit.passages.relations import RelationSpec, UnknownRelationError, get_relation

__all__ = ["InvalidTripleError", "Rejected", "Triple", "check_triple", "find_in_passage",
           "read_triples", "triple_key", "triples_from_records"]


class InvalidTripleError(EditkitError, ValueError):
    """A triple cannot be used: empty or non-string fields, a subject absent from the passage."""


@dataclass(frozen=True)
class Triple:
    """A fact a passage states. ``relation`` is a registry id or phrase; ``old`` (optional) is
    the object the model held before (``target_true`` of the edit)."""

    subject: str
    relation: str
    object: str
    old: str | None = None

    def __post_init__(self) -> None:
        for name in ("subject", "relation", "object"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidTripleError(f"triple {name} must be a string, got "
                                         f"{type(value).__name__} {value!r}")
            cleaned = " ".join(value.split())
            if not cleaned:
                raise InvalidTripleError(f"triple {name} is empty ({value!r}); give a non-empty "
                                         "string")
            object.__setattr__(self, name, cleaned)
        if self.old is not None:
            if not isinstance(self.old, str) or not self.old.strip():
                raise InvalidTripleError(f"triple old object must be a non-empty string or "
                                         f"absent, got {self.old!r}")
            object.__setattr__(self, "old", " ".join(self.old.split()))

    @property
    def spec(self) -> RelationSpec:
        """The registered relation (``UnknownRelationError`` if none)."""
        return get_relation(self.relation)

    def to_dict(self) -> dict[str, Any]:
        d = {"subject": self.subject, "relation": self.relation, "object": self.object}
        if self.old is not None:
            d["old"] = self.old
        return d


@dataclass(frozen=True)
class Rejected:
    """An extractor's line (or triple) it could not use, and why."""

    line: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"line": self.line, "reason": self.reason}


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def find_in_passage(subject: str, passage: str) -> str | None:
    """The subject as the passage spells it (case and spacing may differ), else ``None``."""
    words = subject.split()
    if not words:
        return None
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    m = re.search(pattern, passage, flags=re.IGNORECASE)
    return None if m is None else " ".join(m.group(0).split())


def check_triple(triple: Triple, passage: str | None) -> Triple:
    """``triple`` with its subject spelled as in the passage and its relation resolved to the
    registry id; raises :class:`InvalidTripleError` / :class:`UnknownRelationError`."""
    spec = get_relation(triple.relation)
    subject = triple.subject
    if passage is not None:
        found = find_in_passage(subject, passage)
        if found is None:
            raise InvalidTripleError(f"subject {subject!r} of triple ({subject!r}, "
                                     f"{triple.relation!r}, {triple.object!r}) is not in the "
                                     "passage; a passage can only state facts about what it "
                                     "names — fix the subject's spelling")
        subject = found
    if _norm(triple.object) == _norm(subject):
        raise InvalidTripleError(f"triple ({subject!r}, {triple.relation!r}, {triple.object!r}) "
                                 "has its subject as object; give the fact's object")
    return Triple(subject, spec.id, triple.object, triple.old)


def triple_key(triple: Triple) -> tuple[str, str, str]:
    """A comparison key: normalised subject, the relation's registry id, normalised object
    (an unknown relation keeps its normalised phrase)."""
    try:
        rid = get_relation(triple.relation).id
    except UnknownRelationError:
        rid = _norm(triple.relation)
    return _norm(triple.subject), rid, _norm(triple.object)


def triples_from_records(records: Sequence[Any], where: str = "triples") -> list[Triple]:
    """Triples from JSON objects ``{"subject", "relation", "object"[, "old"]}`` (also lists
    ``[subject, relation, object]``); errors name the record."""
    out = []
    for i, rec in enumerate(records, 1):
        if isinstance(rec, (list, tuple)) and len(rec) in (3, 4):
            rec = dict(zip(("subject", "relation", "object", "old"), rec, strict=False))
        if not isinstance(rec, Mapping):
            raise DatasetFormatError(f"{where}:{i}: a triple is a JSON object with subject, "
                                     f"relation and object, got {type(rec).__name__} {rec!r}")
        missing = [k for k in ("subject", "relation", "object") if k not in rec]
        if missing:
            raise DatasetFormatError(f"{where}:{i}: triple {dict(rec)!r} lacks {missing}; write "
                                     '{"subject": ..., "relation": ..., "object": ...}')
        try:
            out.append(Triple(rec["subject"], rec["relation"], rec["object"], rec.get("old")))
        except InvalidTripleError as exc:
            raise DatasetFormatError(f"{where}:{i}: {exc}") from None
    return out


def read_triples(path: str | Path) -> list[Triple]:
    """Triples of a JSONL (one object per line) or JSON (a list) file."""
    records = read_json_records(path, hint='one {"subject", "relation", "object"} per line')
    return triples_from_records(records, where=str(path))


def dedupe(triples: Iterable[Triple]) -> list[Triple]:
    """Triples in first-seen order without repeats (by :func:`triple_key`)."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for t in triples:
        k = triple_key(t)
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out
