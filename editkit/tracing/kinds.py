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

#: How a column of an MLP/attention trace is labelled: by the centre of its window (see
#: :func:`window_layers`), the reference's convention.
WINDOW_LABEL = "centre"

#: Module slot restored by each kind (``block``: the hidden state, the block's output).
SLOT_OF_KIND = {"hidden": "block", "mlp": "mlp", "attn": "attn",
                "hidden_sever_mlp": "block", "hidden_sever_attn": "block"}
#: Slot whose outputs a severed kind freezes at their corrupted values.
FREEZE_OF_KIND = {"hidden_sever_mlp": "mlp", "hidden_sever_attn": "attn"}


def check_kinds(kinds: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise ``kinds`` to a tuple of known kinds (``None``: :data:`KINDS`, the paper's
    three), raising a typed error otherwise."""
    if kinds is None:
        return KINDS
    try:
        items = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    except TypeError:
        raise InvalidHyperParamsError(
            f"kinds={kinds!r} must be a kind name or a list of them; use any of {ALL_KINDS}"
        ) from None
    bad = [k for k in items if k not in ALL_KINDS]
    if bad or not items:
        raise InvalidHyperParamsError(
            f"unknown tracing kind(s) {bad or items!r}; use any of {ALL_KINDS}"
        )
    return tuple(dict.fromkeys(items))


def default_window(n_layers: int) -> int:
    """MLP/attention window for a model with ``n_layers`` blocks: the paper's 10 (GPT-2 XL,
    48 layers; also the reference code's default), clipped to the model's depth:
    ``min(10, L)``. From 10 layers on this is the reference's window; below, the reference's
    literal 10 would restore every layer in every column of a ≤ 5-layer model.

    On a shallow model such a window spans most of the network, so neighbouring columns of an
    MLP/attention trace overlap heavily; :func:`scaled_window` keeps the paper's *fraction* of
    the depth instead (editkit's default before 0.x; pass ``window=scaled_window(L)``).
    """
    return max(1, min(PAPER_WINDOW, n_layers))


def scaled_window(n_layers: int) -> int:
    """The paper's window as a fraction of the depth: ``round(10 · L / 48)``, between 1 and
    10 (1 on a 4-layer model, 6 on a 30-layer one)."""
    return max(1, min(PAPER_WINDOW, round(PAPER_WINDOW * n_layers / 48)))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for a window of ``window`` layers centred on ``layer``.

    ``[layer − ⌊w/2⌋, layer + ⌈w/2⌉)`` clipped to ``[0, n_layers)``, as in the paper's code
    (for w = 10: the five layers below ``layer``, ``layer`` itself and the four above it).
    A window is *labelled by its centre* ``layer``, as in the reference's plots ("center of
    interval of 10 restored layers"); :data:`WINDOW_LABEL` records this in every result.
    """
    return range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))


def check_window(window: int | None, n_layers: int) -> int:
    """``window`` checked (a positive integer), or the default for ``n_layers``."""
    if window is None:
        return default_window(n_layers)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise InvalidHyperParamsError(f"window={window!r} must be a positive integer")
    return window


#: Named token ranges of ``token_range=`` (the reference accepts ``"subject_last"``).
TOKEN_RANGES = ("subject_last", "subject", "last")


def resolve_token_range(token_range: str | Iterable[int] | None, n_tokens: int,
                        subject_range: tuple[int, int]) -> set[int] | None:
    """The token indices ``token_range`` names (``None``: every token)."""
    if token_range is None:
        return None
    b, e = subject_range
    if isinstance(token_range, str):
        named = {"subject_last": [e - 1], "subject": list(range(b, e)),
                 "last": [n_tokens - 1]}
        if token_range not in named:
            raise InvalidHyperParamsError(
                f"token_range={token_range!r} is unknown; use one of {TOKEN_RANGES}, a list "
                "of token indices, or None for every token")
        return set(named[token_range])
    try:
        idx = [int(t) for t in token_range]
    except (TypeError, ValueError):
        raise InvalidHyperParamsError(
            f"token_range={token_range!r} must be one of {TOKEN_RANGES} or token indices"
        ) from None
    bad = [t for t in idx if not -n_tokens <= t < n_tokens]
    if bad or not idx:
        raise InvalidHyperParamsError(
            f"token_range={token_range!r}: indices must lie in [0, {n_tokens}) for this "
            f"{n_tokens}-token prompt")
    return {t % n_tokens for t in idx}
