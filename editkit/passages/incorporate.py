"""Incorporate a passage into a model by editing the facts it states.

    result = incorporate(model, tokenizer, passage, extractor="pattern", method="memit")
    result.triples, result.requests, result.edits   # what was read and what was applied
    result.revert()                                 # the model bit-for-bit as before

Steps: the triples (given, or found by an extractor) are checked against the passage; each
becomes an :class:`~editkit.requests.EditRequest` whose prompt is its relation's first cloze
prompt (:mod:`editkit.passages.relations`) and whose target is the triple's object; the
requests go to one ``editor.apply`` — a batch method (MEMIT, AlphaEdit) edits them together,
a sequential one (ROME, FT+L) one after another — which is a transaction: if any edit
fails, every parameter is left bit-for-bit as before and the typed error propagates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from editkit.editor import AppliedEdit, EditHistory, Editor
from editkit.errors import EditkitError, InvalidRequestError
from editkit.passages.extractors import Extraction, GivenExtractor, get_extractor
from editkit.passages.relations import get_relation
from editkit.passages.triples import InvalidTripleError, Triple
from editkit.protocols import TokenizerLike
from editkit.registry import get_adapter, get_method
from editkit.requests import EditRequest

__all__ = ["IncorporationResult", "build_editor", "incorporate", "requests_from_triples"]

logger = logging.getLogger(__name__)


@dataclass
class IncorporationResult:
    """An incorporated passage: the triples read from it, the requests built from them, and
    the history entries the edit added (one for a batch method, one per request otherwise).

    ``revert()`` removes exactly those edits (other edits on the model stay).
    """

    editor: Editor
    passage: str
    triples: list[Triple]
    requests: list[EditRequest]
    edits: list[AppliedEdit]
    extraction: Extraction = field(default_factory=lambda: Extraction([]))

    @property
    def rejected(self):
        """Lines or triples the extractor could not use, with the reasons."""
        return self.extraction.rejected

    @property
    def patches(self):
        return [e.patch for e in self.edits]

    def revert(self) -> None:
        """Undo this incorporation's edits (bit-for-bit when no later edit touches the same
        weights; otherwise as :meth:`Editor.revert` defines)."""
        history = EditHistory.of(self.editor.model)
        live = {e.id for e in history.edits}
        ids = [e.id for e in self.edits if e.id in live]
        if ids:
            history.remove(self.editor.model, ids)
        self.edits = []

    def summary(self) -> dict[str, Any]:
        return {"method": self.editor.name, "triples": [t.to_dict() for t in self.triples],
                "requests": [r.to_dict() for r in self.requests],
                "edit_ids": [e.id for e in self.edits],
                "rejected": [r.to_dict() for r in self.rejected]}


def requests_from_triples(triples: Sequence[Triple], *, prompt_index: int = 0
                          ) -> list[EditRequest]:
    """One request per triple: its relation's cloze prompt ``prompt_index`` (0: the rewrite
    prompt), the subject, ``target_new`` = the object, ``target_true`` = the triple's ``old``
    when known; the relation's other prompts become the request's paraphrases."""
    out = []
    for t in triples:
        spec = get_relation(t.relation)
        prompt = spec.prompts[min(prompt_index, len(spec.prompts) - 1)]
        paraphrases = tuple(p.replace("{}", t.subject) for p in spec.prompts if p != prompt)
        try:
            out.append(EditRequest(prompt, t.subject, t.object, t.old, paraphrases=paraphrases,
                                   case_id=f"{t.subject}|{spec.id}"))
        except InvalidRequestError as exc:
            raise InvalidTripleError(f"triple {t.to_dict()} does not make an edit request: "
                                     f"{exc}") from None
    return out


def build_editor(method: str | Editor, model: nn.Module, tokenizer: TokenizerLike,
                 hparams: Any = None) -> Editor:
    """An editor: ``method`` itself when it is one; else the registered method with its
    defaults for this model (presets included), a hyperparameters object, or defaults
    updated by a mapping of overrides (``{"layer": 2}``)."""
    if isinstance(method, Editor):
        return method
    cls = get_method(method)
    if hparams is None or isinstance(hparams, Mapping):
        hp = cls.hparams_class.for_model(model, get_adapter(model))
        if hparams:
            hp = cls.hparams_class.from_dict({**hp.to_dict(), **dict(hparams)})
    else:
        hp = hparams
    return cls(model, tokenizer, hp)


def _extract(passage: str, triples, extractor, model, tokenizer) -> Extraction:
    if triples is not None:
        if isinstance(triples, (str, bytes)) or not isinstance(triples, Sequence):
            triples = GivenExtractor(triples).triples  # a path
        bad = [t for t in triples if not isinstance(t, Triple)]
        if bad:
            raise InvalidTripleError(f"triples must be Triple objects, got "
                                     f"{type(bad[0]).__name__} {bad[0]!r}; build them with "
                                     "Triple(subject, relation, object)")
        return GivenExtractor(list(triples), strict=True)(passage)
    if isinstance(extractor, str):
        extractor = get_extractor(extractor)
    if not callable(extractor):
        raise InvalidTripleError(f"extractor {extractor!r} is neither a registered name nor a "
                                 "callable(passage, model=, tokenizer=)")
    return extractor(passage, model=model, tokenizer=tokenizer)


def incorporate(model: nn.Module, tokenizer: TokenizerLike, passage: str,
                triples: Sequence[Triple] | str | None = None, *,
                extractor: str | Callable[..., Extraction] = "pattern",
                method: str | Editor = "memit", hparams: Any = None) -> IncorporationResult:
    """Edit ``model`` so that it states what ``passage`` states.

    Args:
        passage: The text.
        triples: The facts to write (``Triple`` objects or a JSONL path); checked strictly
            (an invalid one raises). ``None``: use ``extractor``.
        extractor: A registered extractor name (``"given"`` needs ``triples``; ``"pattern"``,
            ``"model"``) or a callable; its rejected lines stay in ``result.rejected``.
        method: A registered method name or a ready :class:`Editor` of this model.
        hparams: The method's hyperparameters object, or a mapping of overrides of its
            defaults for this model.

    Raises:
        InvalidTripleError, UnknownRelationError: bad triples (nothing is edited).
        EditkitError: the edit failed; the model is left bit-for-bit unchanged.
    """
    if not isinstance(passage, str) or not passage.strip():
        raise InvalidTripleError(f"passage must be non-empty text, got {passage!r}")
    extraction = _extract(passage, triples, extractor, model, tokenizer)
    if not extraction.triples:
        why = "; ".join(f"{r.line!r}: {r.reason}" for r in extraction.rejected[:5])
        raise InvalidTripleError(
            "no usable triple was found in the passage" + (f" (rejected: {why})" if why else "")
            + "; give the triples (triples=... / --triples FILE) or another extractor")
    requests = requests_from_triples(extraction.triples)
    editor = build_editor(method, model, tokenizer, hparams)
    if editor.model is not model:
        raise EditkitError("the editor given as method= edits another model; build it on "
                           "the model passed to incorporate")
    history = EditHistory.of(model)
    n_before = len(history.edits)
    editor.apply(requests)
    edits = list(history.edits[n_before:])
    logger.info("incorporated %d triple(s) with %s in %d edit(s)", len(requests), editor.name,
                len(edits))
    return IncorporationResult(editor, passage, extraction.triples, requests, edits, extraction)
