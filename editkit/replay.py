"""Block replay: run a model once, then re-run only its upper blocks and head.

Layers below block s do not depend on anything changed at or above s, so the v*
optimisation of ROME/MEMIT (which adds δ inside block s) and causal tracing (which restores
states inside block s) re-run only blocks s.. on the residual stream the model's own forward
fed block s. :class:`BlockCalls` records what every block was called with (hidden state,
attention mask, position ids, rotary tables, ...); :class:`BlockReplay` re-runs blocks
``start..stop`` from the recorded input, with any hooks inside them active, and applies the
head at chosen positions.

Everything about the family's forward goes through its adapter (``call_block``, ``head``), and
a replay checks itself once against the full forward: a family whose forward does something
the adapter does not declare (a logit soft-cap, say) raises
:class:`~editkit.errors.ReplayMismatchError` instead of optimising against the wrong logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from editkit.errors import ReplayMismatchError, UnsupportedModelError
from editkit.models.compat import map_leaves
from editkit.nethooks import HookSet

logger = logging.getLogger(__name__)

#: A block call as the model's forward made it: (positional args, keyword args).
Call = tuple[tuple[Any, ...], dict[str, Any]]
Positions = tuple[torch.Tensor, torch.Tensor]


class BlockCalls(HookSet):
    """Forward pre-hooks (with kwargs) that record what blocks ``layers`` are called with.

    ``with BlockCalls(blocks) as rec: model(...)``; then ``rec.calls[i]`` is block i's
    ``(args, kwargs)`` and :meth:`result` the list of all of them (a typed error if a block was
    not called). Hooks are removed when the ``with`` block ends.
    """

    def __init__(self, blocks: nn.ModuleList, layers: Iterable[int] | None = None) -> None:
        super().__init__()
        self.blocks = blocks
        self.layers = list(range(len(blocks)) if layers is None else layers)
        self.calls: dict[int, Call] = {}

    def install(self) -> None:
        for i in self.layers:
            def hook(module, args, kwargs, i=i):
                self.calls[i] = (tuple(args), dict(kwargs))
            self._handles.append(self.blocks[i].register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self) -> BlockCalls:
        super().__enter__()
        return self

    def result(self) -> list[Call]:
        """The recorded calls of ``layers``, in order."""
        missing = [i for i in self.layers if i not in self.calls]
        if missing:
            raise UnsupportedModelError(
                f"transformer block(s) {missing} were not called during the forward; this "
                "model's forward does not run every block, so its blocks cannot be replayed "
                "(for tracing use editkit.tracing.naive.trace_naive)"
            )
        return [self.calls[i] for i in self.layers]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` (nested tuples, lists, dicts) with ``fn`` applied to every tensor in it."""
    return map_leaves(obj, lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf)


def expand_batch(obj: Any, batch: int) -> Any:
    """Broadcast batch-1 tensors (ndim ≥ 2: masks, positions, rotary tables) to ``batch`` rows."""
    def expand(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2 and t.shape[0] == 1 and batch != 1:
            return t.expand(batch, *t.shape[1:])
        return t
    return map_tensors(obj, expand)


def replay_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a replay check: a few rounding steps of ``dtype``, at least 1e-5.

    A replay runs the same blocks on the same inputs; only the head's matrix product, run on
    fewer rows, may round differently.
    """
    return max(1e-5, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def check_replay(replayed: torch.Tensor, full: torch.Tensor, family: str, what: str) -> None:
    """Raise :class:`ReplayMismatchError` unless ``replayed`` equals the model's own ``full``
    logits to :func:`replay_tolerance` (relative to the largest logit)."""
    full = full.detach()
    scale = 1.0 + float(full.abs().max()) if full.numel() else 1.0
    err = float((replayed.detach().float() - full.float()).abs().max()) if full.numel() else 0.0
    tol = replay_tolerance(full.dtype) * scale
    if not err <= tol:  # also catches NaN
        raise ReplayMismatchError(
            f"replaying the blocks and head of this {family} model does not reproduce its own "
            f"forward ({what}: max |Δlogit| = {err:.3g} > {tol:.3g}); its ModelAdapter misses "
            "part of the family's forward (a logit soft-cap or scale, a block call "
            "convention). Register an adapter that declares it (see docs/adapters.md); "
            "nothing was edited"
        )


class BlockReplay:
    """Re-run blocks ``start..stop`` (and the head) of ``model`` on a fixed batch.

    Construction runs one forward pass (no gradient) and records, with forward pre-hooks, the
    hidden state entering block ``start`` and the arguments every block from ``start`` up
    received. :meth:`hidden_out` then recomputes only blocks ``start..stop`` from the recorded
    hidden state, so hooks inside them (e.g. an edit of an MLP output) take effect while the
    lower layers are never re-run; calling the object applies the adapter's head.

    ``verify`` (default on) checks once, with no hooks of the caller active, that replaying
    blocks ``start..`` to the last block and applying the head gives the model's own logits
    at ``check_at`` (``(rows, cols)``; default every position): see :meth:`verify`. A caller
    that constructs the replay inside its own hooks passes ``verify=False`` and calls
    :meth:`verify` once they are gone.
    """

    def __init__(self, model: nn.Module, adapter: Any, start: int, stop: int,
                 inputs: dict[str, torch.Tensor], *, check_at: Positions | None = None,
                 verify: bool = True) -> None:
        self.model, self.adapter, self.start, self.stop = model, adapter, start, stop
        self.blocks = adapter.blocks(model)
        last = len(self.blocks) - 1
        with torch.no_grad(), BlockCalls(self.blocks, range(start, last + 1)) as rec:
            logits = model(**inputs, use_cache=False).logits
        self.calls = dict(zip(rec.layers, rec.result(), strict=True))
        self.hidden = adapter.block_input(self.calls[start]).detach()
        self._check_at = check_at
        self._expected: torch.Tensor | None = (
            logits[check_at] if check_at is not None else logits).detach()
        if verify:
            self.verify()

    def hidden_out(self, stop: int | None = None) -> torch.Tensor:
        """Output hidden state of block ``stop`` (default ``self.stop``), recomputed."""
        stop = self.stop if stop is None else stop
        h = self.hidden
        for i in range(self.start, stop + 1):
            h = self.adapter.call_block(self.blocks[i], h, self.calls[i])
        return h

    def __call__(self, positions: Positions | None = None) -> torch.Tensor:
        """Logits (the adapter's head on block ``stop``'s output), at ``positions``
        ``(rows, cols)`` only if given (then shape (n, vocab)), else (batch, seq, vocab)."""
        return self.adapter.head(self.model, self.hidden_out(), positions)

    def verify(self) -> None:
        """The one-time check: the replay up to the last block and the head reproduce the
        model's own logits, else :class:`ReplayMismatchError`. Later calls do nothing."""
        if self._expected is None:
            return
        with torch.no_grad():
            got = self.adapter.head(self.model, self.hidden_out(len(self.blocks) - 1),
                                    self._check_at)
        check_replay(got, self._expected, self.adapter.name,
                     f"blocks {self.start}..{len(self.blocks) - 1} and the head")
        self._expected = None
