"""Real, well-known facts that SmolLM2-135M-Instruct knows, in CounterFact format.

The shipped file ``editkit/testbed/data/real_facts/counterfact.json`` holds records of the
ROME release's CounterFact schema (Meng et al. 2022: ``requested_rewrite`` with a ``{}``
prompt, ``subject``, ``target_new``/``target_true``, ``relation_id``; plus
``paraphrase_prompts``, ``neighborhood_prompts``, ``attribute_prompts`` and
``generation_prompts``) over hand-written facts ("The capital of France is" → Paris) in
Wikidata-style relations (P36, P17, P37, ...). ``scripts/build_real_facts.py`` kept only
the facts the unedited model gets right: on the rewrite prompt the true object ranks first
among the relation's objects and beats ``target_new`` by a margin, it also wins on a
paraphrase and on most neighbourhood prompts. ``meta.json`` next to it records the model,
the criterion and the counts per relation.

>>> from editkit.testbed.real_facts import real_facts
>>> records = real_facts(10)                      # doctest: +SKIP
>>> from editkit.eval.datasets import load_counterfact
>>> data = load_counterfact(real_facts_path())    # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from editkit.errors import DatasetFormatError

__all__ = ["interleave_relations", "real_facts", "real_facts_meta", "real_facts_path"]


def real_facts_path() -> Path:
    """Path of the shipped ``counterfact.json`` (``editkit/testbed/data/real_facts/``)."""
    return Path(__file__).resolve().parent / "data" / "real_facts" / "counterfact.json"


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetFormatError(
            f"the real-fact file {path} is missing; rebuild it with "
            "`python scripts/build_real_facts.py` (needs SmolLM2, see editkit.testbed.smollm2)"
        ) from exc
    except ValueError as exc:
        raise DatasetFormatError(
            f"{path} is not valid JSON ({exc}); rebuild it with `python scripts/build_real_facts.py`"
        ) from exc


def real_facts(n: int | None = None) -> list[dict[str, Any]]:
    """The shipped CounterFact records, in ``case_id`` order (fresh dicts, safe to mutate).

    Args:
        n: Return only the first ``n`` records (records are interleaved by relation, see
            :func:`interleave_relations`, so the first 14 cover every relation); ``None``
            returns all of them.

    Raises:
        ValueError: ``n`` is negative.
        DatasetFormatError: The shipped file is missing or is not a JSON list.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    path = real_facts_path()
    records = _read(path)
    if not isinstance(records, list):
        raise DatasetFormatError(
            f"{path} must hold a JSON list of CounterFact records, got {type(records).__name__}; "
            "rebuild it with `python scripts/build_real_facts.py`"
        )
    return records if n is None else records[:n]


def interleave_relations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order records round-robin over their relations (in order of first appearance, each
    relation's records in their own order) and renumber ``case_id`` 0..n-1, so that the first
    n records of a file (``--n`` of the evaluation harness) cover every relation."""
    queues: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        queues.setdefault(rec["requested_rewrite"]["relation_id"], []).append(rec)
    ordered: list[dict[str, Any]] = []
    while any(queues.values()):
        for queue in queues.values():
            if queue:
                ordered.append(queue.pop(0))
    return [{**rec, "case_id": i} for i, rec in enumerate(ordered)]


def real_facts_meta() -> dict[str, Any]:
    """The ``meta.json`` written next to the records (model, filter, counts per relation)."""
    meta = _read(real_facts_path().with_name("meta.json"))
    if not isinstance(meta, dict):
        raise DatasetFormatError(f"{real_facts_path().with_name('meta.json')} must hold a JSON object")
    return meta
