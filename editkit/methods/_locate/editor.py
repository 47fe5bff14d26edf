"""``LocateEditor``: the setup ROME, MEMIT and AlphaEdit share, and what a patch records of it.

Each of them takes the same constructor settings (context templates, precomputed key
statistics, a text source for the statistics, a cache directory) and prepares the same
things once per model (templates sampled from the model, second moments C of the edited
layers' keys). The patches they compute record those settings under ``metadata["settings"]``
(values, or content hashes for tensors and text collections), so a patch says how it was
made and can be reproduced from itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.editor import Editor
from editkit.errors import StatsError
from editkit.methods._locate.linalg import solve_device
from editkit.methods._locate.templates import (
    PLAIN,
    check_templates,
    generate_context_templates,
)
from editkit.patch import tensor_fingerprint
from editkit.tokens import context_length, encode

logger = logging.getLogger(__name__)

#: What to change when C (or a system built on it) cannot be inverted: C was estimated from
#: too little or too uniform text (fewer distinct keys than its dimension).
SINGULAR_FIX = ("estimate C from more text (raise mom2_n_samples) or from another text "
                "source (mom2_dataset or stats_texts=), or pass full-rank covariances")


def describe_texts(source: Any) -> Any:
    """A JSON-able identity of a statistics text source: names and paths as given, text
    collections by count and content hash, a ``datasets.Dataset`` by its fingerprint."""
    if source is None or isinstance(source, (str, Path)):
        return None if source is None else str(source)
    fingerprint = getattr(source, "_fingerprint", None)
    if fingerprint is not None:
        return {"dataset_fingerprint": str(fingerprint), "rows": len(source)}
    if isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        digest = hashlib.sha256()
        for text in source:
            digest.update(text.encode("utf-8"))
            digest.update(b"\0")
        return {"texts": len(source), "sha256": digest.hexdigest()[:16]}
    return {"type": type(source).__name__}


class LocateEditor(Editor):
    """Base of the locate-then-edit editors (private): constructor settings and preparation.

    Keyword arguments:
        context_templates: Prefix templates (each with one ``{}``) instead of sampling them
            from the model; ``"{}"`` (the bare prompt) is always included first.
        covariances: Precomputed ``C = E[k kᵀ]`` per edited layer (skips ``editkit.stats``).
        stats_texts: Text source for C instead of ``hparams.mom2_dataset`` (a list of
            strings, a path or a ``datasets.Dataset``; see ``editkit.stats``).
        cache_dir: Root of the statistics / template caches (default ``$EDITKIT_CACHE``).
    """

    def __init__(self, model: nn.Module, tokenizer=None, hparams=None, adapter=None, *,
                 context_templates: Sequence[str] | None = None,
                 covariances: dict[int, torch.Tensor] | None = None, stats_texts: Any = None,
                 cache_dir: str | None = None) -> None:
        super().__init__(model, tokenizer, hparams, adapter)
        self.context_templates = (check_templates(context_templates)
                                  if context_templates is not None else None)
        self.covariances = dict(covariances) if covariances else None
        self._given = {"context_templates": context_templates is not None,
                       "covariances": covariances is not None}
        self._stats_texts = stats_texts
        self._cache_dir = cache_dir
        self._settings: dict[str, Any] | None = None
        self._record_statistics_source()

    def _record_statistics_source(self) -> None:
        source = self._statistics_source_name()
        if source is not None and source != self.hparams.mom2_dataset:
            # The patch records these hyperparameters: they must name the C actually used,
            # not the preset's "wikitext" that was never read (settings_metadata carries
            # the content hash of a given text collection or of the covariances).
            self.hparams = dataclasses.replace(self.hparams, mom2_dataset=source)

    def _statistics_source_name(self) -> str | None:
        """What C comes from when the constructor overrides ``mom2_dataset``: the given
        covariances, a named source or path given as ``stats_texts``, or a text collection
        (``"stats_texts"``; see ``settings["stats_texts"]``). ``None`` when not overridden."""
        if self._given["covariances"]:
            return "covariances"
        if self._stats_texts is None:
            return None
        if isinstance(self._stats_texts, (str, Path)):
            return str(self._stats_texts)
        return "stats_texts"

    def _cache(self, name: str) -> Path | None:
        return Path(self._cache_dir) / name if self._cache_dir else None

    def _prepare_templates(self) -> None:
        if self.context_templates is None:
            vp = self.hparams.value
            self.context_templates = generate_context_templates(
                self.model, self.tokenizer, vp.context_template_length_params,
                seed=vp.context_template_seed, cache_dir=self._cache("context_templates"),
                start=vp.context_template_start)
            logger.info("%s context templates: %s", self.name, self.context_templates)

    def _prepare_statistics(self, layers: Sequence[int]) -> None:
        """C of every layer in ``layers`` (one pass over the texts), unless given."""
        self._record_statistics_source()  # a subclass may have set covariances since
        hp = self.hparams
        if self.covariances is None:
            from editkit.stats import second_moment

            source = self._stats_texts if self._stats_texts is not None else hp.mom2_dataset
            self.covariances = second_moment(
                self.model, list(layers), source, tokenizer=self.tokenizer,
                n_samples=hp.mom2_n_samples, max_length=self.statistics_length(),
                dtype=hp.mom2_dtype, adapter=self.adapter, cache_dir=self._cache("stats"))
        missing = [layer for layer in layers if layer not in self.covariances]
        if missing:
            raise StatsError(f"no key statistics for layers {missing}; pass covariances for "
                             f"every layer in {list(layers)}")
        # Once, onto the device of the layer each C serves (its solves run there).
        params = dict(self.model.named_parameters())
        self.covariances = {
            layer: c.to(solve_device(params[self.adapter.weight_name("mlp_out", layer)].device))
            if layer in layers else c for layer, c in self.covariances.items()}

    def statistics_length(self) -> int | None:
        """Tokens per statistics text: ``mom2_max_length`` clipped to the model's context.

        Texts for C are samples of generic text, so cutting them shorter changes nothing
        but the sample; a longer setting (the small-model defaults' 128 on the fact world's
        64 positions) would index past the position embedding.
        """
        wanted = self.hparams.mom2_max_length
        limit = context_length(self.model)
        if wanted is None or limit is None or wanted <= limit:
            return wanted
        logger.info("%s: statistics texts clipped from mom2_max_length=%d to the model's "
                    "context size of %d tokens", self.name, wanted, limit)
        return limit

    def context_reserve(self) -> int:
        """Tokens of the longest context prefix put before a prompt: measured on given
        templates, else the longest generated length plus the ``". "`` joining it."""
        if self.context_templates is not None:
            return max(len(encode(self.tokenizer, t.replace(PLAIN, "")))
                       for t in self.context_templates)
        lengths = [length for length, _ in self.hparams.value.context_template_length_params]
        return max(lengths, default=0) + 2 if lengths else 0

    def settings_metadata(self) -> dict[str, Any]:
        """What the constructor and preparation fixed, for ``patch.metadata["settings"]``:
        the templates used, whether they and C were given, fingerprints of C, the text
        source of C and the cache directory. Computed once (C can be large)."""
        if self._settings is None:
            self._settings = {
                "context_templates": list(self.context_templates or []),
                "context_templates_given": self._given["context_templates"],
                "covariances_given": self._given["covariances"],
                "covariance_fingerprints": (
                    None if self.covariances is None else
                    {str(k): tensor_fingerprint(c) for k, c in sorted(self.covariances.items())}),
                "stats_texts": describe_texts(self._stats_texts),
                "cache_dir": None if self._cache_dir is None else str(self._cache_dir),
            }
        return self._settings
