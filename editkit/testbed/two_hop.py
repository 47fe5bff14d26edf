"""Two-hop facts SmolLM2-135M-Instruct knows on both hops, as MQuAKE-format records.

``editkit/testbed/data/two_hop/mquake.json`` holds records in MQuAKE's published format
(Zhong et al. 2023) over hand-written real-world chains (landmark → city → country, company →
headquarters city → country, city → country → capital): one record per chain with the edit on
the first hop and one with the edit on the second hop (the bridge entity's fact), each with
three multi-hop cloze questions. ``scripts/build_two_hop.py`` kept only the chains whose two
hops the unedited model ranks first among the hop relation's objects (with a margin over the
edit's new object); ``meta.json`` records the criterion and the counts.

>>> from editkit.testbed.two_hop import two_hop_records
>>> from editkit.eval import load_mquake
>>> records = load_mquake(two_hop_records(edit_hop=1))   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from editkit.errors import DatasetFormatError

__all__ = ["two_hop_dir", "two_hop_meta", "two_hop_records"]


def two_hop_dir() -> Path:
    """The package-data directory ``editkit/testbed/data/two_hop``."""
    return Path(__file__).resolve().parent / "data" / "two_hop"


def _read(name: str) -> Any:
    path = two_hop_dir() / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetFormatError(f"the shipped two-hop data {path} is missing; rebuild it with "
                                 "python scripts/build_two_hop.py") from exc


def two_hop_records(n: int | None = None, *, edit_hop: int | None = None) -> list[dict[str, Any]]:
    """The shipped records (fresh dicts), optionally only those editing hop ``edit_hop``
    (1 or 2), the first ``n``."""
    recs = _read("mquake.json")
    if edit_hop is not None:
        recs = [r for r in recs if r["orig"]["edit_hop"] == edit_hop]
    return recs if n is None else recs[:n]


def two_hop_meta() -> dict[str, Any]:
    """How the records were built and filtered (``meta.json``)."""
    return _read("meta.json")
