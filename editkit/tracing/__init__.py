"""Causal tracing (Meng et al. 2022, §2): where a model recalls a fact, and where to edit it.

>>> from editkit.tracing import causal_trace, plot_traces
>>> results = causal_trace(model, tokenizer, "{} was born in", "Ada Lovelace",
...                        "London")                                # doctest: +SKIP
>>> plot_traces(results, "ada.png")                                 # doctest: +SKIP

- :func:`causal_trace` / :class:`CausalTracer`: the fast trace of one prompt (kinds ``hidden``,
  ``mlp``, ``attn`` and the severed ``hidden_sever_mlp`` / ``hidden_sever_attn``);
  :func:`editkit.tracing.naive.trace_naive` is the straightforward oracle.
- :func:`trace_records`, :func:`average_indirect_effect`, :func:`aie_by_kind`: AIE over facts.
- :func:`suggest_layer`, :func:`layer_sweep`: which layer to edit.
- :mod:`editkit.tracing.plots`: heatmaps, AIE curves, severed bars, sweep plots.

Modules: ``kinds`` (what is restored, windows), ``corruption`` (noise, prompt preparation),
``results`` (``TraceResult``, AIE), ``trace`` (the fast tracer), ``naive`` (the oracle),
``layers`` (layer choice), ``plots``; block replay is :mod:`editkit.replay`.
"""

from editkit.tracing.corruption import embedding_std, make_noise, subject_token_range
from editkit.tracing.kinds import (
    ALL_KINDS,
    KINDS,
    SEVERED_KINDS,
    default_window,
    resolve_token_range,
    scaled_window,
    window_layers,
)
from editkit.tracing.layers import (
    LayerSuggestion,
    SweepResult,
    edit_success,
    layer_from_aie,
    layer_sweep,
    mlp_aie,
    suggest_layer,
)
from editkit.tracing.naive import trace_naive
from editkit.tracing.plots import (
    plot_aie,
    plot_aie_heatmaps,
    plot_layer_sweep,
    plot_severed,
    plot_trace,
    plot_traces,
    save_figure,
)
from editkit.tracing.results import (
    GROUPS,
    AIEResult,
    TraceResult,
    aie_by_kind,
    average_indirect_effect,
    token_groups,
)
from editkit.tracing.trace import CausalTracer, TracedRecords, causal_trace, trace_records

__all__ = [
    "ALL_KINDS", "GROUPS", "KINDS", "SEVERED_KINDS", "AIEResult", "CausalTracer",
    "LayerSuggestion", "SweepResult", "TraceResult", "aie_by_kind", "average_indirect_effect",
    "default_window", "edit_success", "embedding_std", "layer_from_aie", "layer_sweep",
    "make_noise", "mlp_aie", "plot_aie", "plot_aie_heatmaps", "plot_layer_sweep",
    "plot_severed", "plot_trace", "plot_traces", "save_figure", "subject_token_range",
    "suggest_layer", "token_groups", "causal_trace", "trace_naive", "trace_records",
    "window_layers", "scaled_window", "resolve_token_range", "TracedRecords",
]
