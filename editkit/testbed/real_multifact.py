"""Real subjects with several facts SmolLM2-135M-Instruct knows, for the multi-fact protocol.

``editkit/testbed/data/multifact_real/counterfact.json`` holds CounterFact records (ROME
release schema) of every subject of the shipped real facts (:mod:`editkit.testbed.real_facts`)
that has two or more relations there: France's capital, language, continent and anthem;
Claude Monet's birthplace, profession and native language; ... Each record passed that file's
filter on the *unedited* model (the true object ranks first among the relation's objects
and beats ``target_new`` on the rewrite prompt, wins on a paraphrase and on most
neighbourhood prompts), so every relation of these subjects is known before editing.
``scripts/build_real_multifact.py`` writes the file (subjects ordered by number of relations,
most first, then by first appearance) and ``meta.json`` beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from editkit.errors import DatasetFormatError

__all__ = ["real_multifact", "real_multifact_meta", "real_multifact_path"]


def real_multifact_path() -> Path:
    """Path of the shipped ``counterfact.json`` (``editkit/testbed/data/multifact_real/``)."""
    return Path(__file__).resolve().parent / "data" / "multifact_real" / "counterfact.json"


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetFormatError(
            f"{path} is missing; rebuild it with `python scripts/build_real_multifact.py`"
        ) from exc
    except ValueError as exc:
        raise DatasetFormatError(
            f"{path} is not valid JSON ({exc}); rebuild it with "
            "`python scripts/build_real_multifact.py`") from exc


def real_multifact() -> list[dict[str, Any]]:
    """The shipped records, grouped by subject (fresh dicts, safe to mutate)."""
    records = _read(real_multifact_path())
    if not isinstance(records, list):
        raise DatasetFormatError(f"{real_multifact_path()} must hold a JSON list of records")
    return records


def real_multifact_meta() -> dict[str, Any]:
    """``meta.json``: source, filter, subjects and their relations."""
    path = real_multifact_path().with_name("meta.json")
    meta = _read(path)
    if not isinstance(meta, dict):
        raise DatasetFormatError(f"{path} must hold a JSON object")
    return meta
