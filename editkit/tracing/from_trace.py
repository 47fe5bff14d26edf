"""Hyperparameters whose edited layer is chosen by causal tracing.

This lives in ``tracing`` (which may import the methods) rather than on the algorithms'
hyperparameter classes, which must not import tracing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from editkit.methods.rome.hparams import ROMEHyperParams
from editkit.registry import get_adapter
from editkit.tracing import suggest_layer


def rome_hparams_from_tracing(model, tokenizer, records, adapter=None,
                              **trace_kwargs: Any) -> ROMEHyperParams:
    """ROME defaults for ``model`` (scaled to its depth) with ``layer`` chosen by tracing.

    The layer is :func:`editkit.tracing.suggest_layer` on ``records`` (CounterFact-format
    dicts): the maximum of the MLP AIE at the subject's last token. Hase et al. (2023)
    found this need not be where editing works best (on the fact world it is not; see
    ``docs/tracing.md``), so compare with ``editkit.tracing.layer_sweep``.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    layer = suggest_layer(model, tokenizer, records, adapter=adapter, **trace_kwargs).layer
    return dataclasses.replace(ROMEHyperParams.scaled(adapter.num_layers(model)), layer=layer)
