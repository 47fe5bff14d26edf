"""The offline fact world: invented facts and a small GPT-2 that knows them.

A deterministic synthetic world (:class:`FactWorld`: invented people × a few
relations, several templates per relation, paraphrase templates held out per
fact) and a small GPT-2 trained on it on CPU in a few minutes. It gives
CounterFact-shaped records (:meth:`FactWorld.records`), so every editing
method and metric runs for real without a model hub.

>>> from editkit.testbed import FactWorld, load_fact_world
>>> model, tokenizer = load_fact_world()          # doctest: +SKIP
>>> record = FactWorld().records(n=1)[0]           # doctest: +SKIP

Where the model comes from (:func:`load_fact_world`):

1. the shipped package data ``editkit/testbed/data/fact_world/`` when its
   ``world_fingerprint`` matches the requested world and settings;
2. else the user cache ``$EDITKIT_CACHE`` (or ``$XDG_CACHE_HOME/editkit``, or
   ``~/.cache/editkit``) under ``fact_world/<fingerprint prefix>/``;
3. else it is trained there (a few minutes, progress bar), written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from editkit.stats import default_cache_dir
from editkit.testbed.chains import (
    CHAINS,
    Chain,
    ChainWorld,
    chain_recall,
    chain_world_dir,
    load_chain_world,
    register_chain_text_source,
)
from editkit.testbed.presets import is_fact_world_model
from editkit.testbed.presets import register as _register_presets
from editkit.testbed.real_facts import real_facts, real_facts_meta, real_facts_path
from editkit.testbed.sources import register_text_sources
from editkit.testbed.train import (
    META_FILE,
    TrainSettings,
    fact_recall,
    load_trained,
    mark_fact_world,
    score_candidates,
    train_fact_world,
    world_fingerprint,
)
from editkit.testbed.world import FILLER_SENTENCES, RELATIONS, Fact, FactWorld, Relation

_register_presets()

__all__ = [
    "CHAINS",
    "FILLER_SENTENCES",
    "RELATIONS",
    "Chain",
    "ChainWorld",
    "Fact",
    "FactWorld",
    "Relation",
    "TrainSettings",
    "cache_dir",
    "chain_recall",
    "chain_world_dir",
    "fact_recall",
    "fact_world_dir",
    "is_fact_world_model",
    "is_valid_model_dir",
    "load_chain_world",
    "load_fact_world",
    "mark_fact_world",
    "package_data_dir",
    "real_facts",
    "real_facts_meta",
    "real_facts_path",
    "score_candidates",
    "train_fact_world",
    "world_fingerprint",
]

logger = logging.getLogger(__name__)

register_text_sources()
register_chain_text_source()

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", META_FILE)


def package_data_dir() -> Path:
    """The directory of the shipped model, ``editkit/testbed/data/fact_world``."""
    return Path(__file__).resolve().parent / "data" / "fact_world"


def cache_dir() -> Path:
    """The editkit cache root (:func:`editkit.stats.default_cache_dir`): ``$EDITKIT_CACHE``,
    else ``$XDG_CACHE_HOME/editkit``, else ``~/.cache/editkit``."""
    return default_cache_dir()


def _expected(
    world: FactWorld | None, settings: TrainSettings | None
) -> tuple[FactWorld, TrainSettings, str]:
    """The (world, settings) defaults filled in, and their fingerprint."""
    world = world if world is not None else FactWorld()
    settings = settings if settings is not None else TrainSettings()
    return world, settings, world_fingerprint(world, settings)


def is_valid_model_dir(path: str | os.PathLike[str], fingerprint: str) -> bool:
    """Whether ``path`` holds a complete saved model with this ``world_fingerprint``."""
    path = Path(path)
    if not all((path / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("world_fingerprint") == fingerprint


def fact_world_dir(world: FactWorld | None = None, settings: TrainSettings | None = None) -> Path:
    """Where the model of (``world``, ``settings``) is, or would be trained to.

    Args:
        world: Defaults to ``FactWorld()``.
        settings: Defaults to ``TrainSettings()``.

    Returns:
        The shipped package-data directory if it matches the fingerprint,
        otherwise the cache directory ``<cache>/fact_world/<fingerprint[:16]>``
        (which may not exist yet).
    """
    _, _, fp = _expected(world, settings)
    shipped = package_data_dir()
    if is_valid_model_dir(shipped, fp):
        return shipped
    return cache_dir() / "fact_world" / fp[:16]


def load_fact_world(
    device: str = "cpu",
    train_if_missing: bool = True,
    *,
    world: FactWorld | None = None,
    settings: TrainSettings | None = None,
    padding_side: str | None = None,
) -> tuple[Any, Any]:
    """Load the fact-world GPT-2 and its tokenizer, training them if needed.

    Args:
        device: Device to put the model on.
        train_if_missing: Train into the cache when neither the shipped data
            nor the cache holds a matching model; if ``False``, raise
            ``FileNotFoundError`` instead.
        world: The world; defaults to ``FactWorld()`` (the shipped model's).
        settings: Training settings; defaults to ``TrainSettings()``.
        padding_side: Override the tokenizer's padding side (``"left"`` or
            ``"right"``; saved default ``"right"``).

    Returns:
        ``(model, tokenizer)``: a ``GPT2LMHeadModel`` in eval mode, float32,
        on ``device``, and a ``PreTrainedTokenizerFast`` whose pad token is
        ``<|endoftext|>`` (= eos).
    """
    world, settings, fp = _expected(world, settings)
    path = fact_world_dir(world, settings)
    if not is_valid_model_dir(path, fp):
        if path.exists():
            logger.warning("fact-world cache %s is stale or incomplete; retraining", path)
        if not train_if_missing:
            raise FileNotFoundError(
                f"no fact-world model with fingerprint {fp[:16]} in {package_data_dir()} or "
                f"{path}; call load_fact_world(train_if_missing=True) or "
                f"train_fact_world({str(path)!r})"
            )
        logger.warning(
            "training the fact-world model into %s (a few minutes on CPU, done once)", path
        )
        train_fact_world(path, world=world, seed=settings.seed, settings=settings)
    return load_trained(path, fp, device, padding_side)
