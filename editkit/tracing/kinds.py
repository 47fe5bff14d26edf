"""What a causal trace restores: the kinds, the MLP/attention window (Meng et al. 2022, §2).

Shared by the fast tracer (:mod:`editkit.tracing.trace`) and the straightforward one
(:mod:`editkit.tracing.naive`).
"""

from __future__ import annotations

from collections.abc import Iterable

from editkit.errors import InvalidHyperParamsError

#: Restoration kinds: hidden state (block output), MLP output, attention output.
KINDS = ("hidden", "mlp", "attn")
#: Hidden-state restoration with the MLP / attention outputs of the restored token above the
#: restored layer frozen at their corrupted values (paper Fig. 7).
SEVERED_KINDS = ("hidden_sever_mlp", "hidden_sever_attn")
ALL_KINDS = KINDS + SEVERED_KINDS

#: The paper's MLP/attention window (GPT-2 XL, 48 layers).
PAPER_WINDOW = 10

#: Module slot restored by each kind (``block``: the hidden state, the block's output).
SLOT_OF_KIND = {"hidden": "block", "mlp": "mlp", "attn": "attn",
                "hidden_sever_mlp": "block", "hidden_sever_attn": "block"}
#: Slot whose outputs a severed kind freezes at their corrupted values.
FREEZE_OF_KIND = {"hidden_sever_mlp": "mlp", "hidden_sever_attn": "attn"}


def check_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise ``kinds`` to a tuple of known kinds, raising a typed error otherwise."""
    items = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in items if k not in ALL_KINDS]
    if bad or not items:
        raise InvalidHyperParamsError(
            f"unknown tracing kind(s) {bad or items!r}; use any of {ALL_KINDS}"
        )
    return tuple(dict.fromkeys(items))


def default_window(n_layers: int) -> int:
    """MLP/attention window for a model with ``n_layers`` blocks.

    The paper uses w = 10 on GPT-2 XL (48 layers). On a small model a window of 10 would cover
    the whole network and every column of the trace would be the same, so the window is scaled
    to keep the paper's fraction of the depth: ``round(10 · L / 48)``, between 1 and 10.
    """
    return max(1, min(PAPER_WINDOW, round(PAPER_WINDOW * n_layers / 48)))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for a window of ``window`` layers centred on ``layer``.

    ``[layer − ⌊w/2⌋, layer + ⌈w/2⌉)`` clipped to ``[0, n_layers)``, as in the paper's code
    (for w = 10: the five layers below ``layer``, ``layer`` itself and the four above it).
    """
    return range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))


def check_window(window: int | None, n_layers: int) -> int:
    """``window`` checked (a positive integer), or the default for ``n_layers``."""
    if window is None:
        return default_window(n_layers)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise InvalidHyperParamsError(f"window={window!r} must be a positive integer")
    return window
