"""The fact world's corpus as a named statistics text source, ``texts="fact_world"``.

Declared under the ``editkit.text_sources`` entry point in ``pyproject.toml`` and also
registered when :mod:`editkit.testbed` is imported, so ``mom2_dataset="fact_world"`` resolves
without :mod:`editkit.stats` knowing the testbed exists.
"""

from __future__ import annotations

from typing import Any

from editkit.registry import TEXT_SOURCES
from editkit.stats import TextSource
from editkit.testbed.world import FactWorld

#: The registered name (kept from the time it was hard-coded in ``editkit.stats``).
FACT_WORLD_SOURCE = "fact_world"


def _fact_world_texts() -> list[str]:
    return FactWorld().texts()


def fact_world_source(**_: Any) -> TextSource:
    """The default fact world's training corpus; its identity follows the world's content."""
    return TextSource(f"fact_world:{FactWorld().fingerprint()[:16]}", "fact-world corpus",
                      _fact_world_texts)


def register_text_sources() -> None:
    """Register :func:`fact_world_source` unless an entry point already did."""
    if FACT_WORLD_SOURCE not in TEXT_SOURCES:
        TEXT_SOURCES.register(FACT_WORLD_SOURCE, fact_world_source)
