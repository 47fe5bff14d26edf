"""Passage incorporation: write the facts a passage states into a model by fact edits.

    from editkit.passages import incorporate, load_passages, evaluate_passages
    result = incorporate(model, tokenizer, "Kalo Holbar was born in Quenby. ...",
                         extractor="pattern", method="rome")
    result.triples, result.requests, result.revert()

* :mod:`~editkit.passages.relations` — the relation registry (Wikidata ids, phrases, the
  fact world's relations → cloze prompts and questions; entry-point group
  ``editkit.relations``);
* :mod:`~editkit.passages.extractors` — ``given``, ``pattern`` and ``model`` extractors
  (entry-point group ``editkit.extractors``);
* :mod:`~editkit.passages.incorporate` — :func:`incorporate` and its result;
* :mod:`~editkit.passages.evaluate` — passage records and the three-way evaluation (unedited,
  passage in context, edited), shipped data (:func:`passages_path`).

This package sits above ``methods``, ``eval`` and ``testbed`` and below the command line.
"""

from __future__ import annotations

from editkit.passages.evaluate import (
    PassageRecord,
    Question,
    evaluate_passages,
    load_passages,
    passages_path,
    summarise,
)
from editkit.passages.extractors import (
    EXTRACTORS,
    EXTRACTORS_GROUP,
    Extraction,
    GivenExtractor,
    ModelExtractor,
    PatternExtractor,
    UnknownExtractorError,
    get_extractor,
    list_extractors,
    parse_triple_lines,
)
from editkit.passages.incorporate import (
    IncorporationResult,
    build_editor,
    incorporate,
    requests_from_triples,
)
from editkit.passages.relations import (
    RELATIONS,
    RELATIONS_GROUP,
    RelationSpec,
    UnknownRelationError,
    get_relation,
    list_relations,
    register_relation,
)
from editkit.passages.triples import InvalidTripleError, Rejected, Triple, read_triples

__all__ = [
    "EXTRACTORS", "EXTRACTORS_GROUP", "RELATIONS", "RELATIONS_GROUP", "Extraction",
    "GivenExtractor", "IncorporationResult", "InvalidTripleError", "ModelExtractor",
    "PassageRecord", "PatternExtractor", "Question", "Rejected", "RelationSpec", "Triple",
    "UnknownExtractorError", "UnknownRelationError", "build_editor", "evaluate_passages",
    "get_extractor", "get_relation", "incorporate", "list_extractors", "list_relations",
    "load_passages", "parse_triple_lines", "passages_path", "read_triples",
    "register_relation", "requests_from_triples", "summarise",
]
