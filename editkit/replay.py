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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from editkit.errors import ReplayMismatchError, UnsupportedModelError
from editkit.models import compat
from editkit.models.compat import map_leaves
from editkit.nethooks import HookSet, Trace

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


def _top_level_cache_key(call: Call) -> str | None:
    """The keyword under which a recorded block call passes its only cache object, or
    ``None`` if it has none or passes one elsewhere (then :func:`compat.swap_cache` walks it)."""
    found: list[Any] = []
    map_leaves(call, lambda leaf: found.append(leaf) if compat.is_cache(leaf) else None)
    keys = [key for key, value in call[1].items() if compat.is_cache(value)]
    return keys[0] if len(found) == 1 and len(keys) == 1 else None


def _ragged_suffix(ids: torch.Tensor, mask: torch.Tensor | None,
                   row_prefix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs that run each row from its own column ``row_prefix[r]`` on, after a cache
    of ``max(row_prefix)`` columns of which row r keeps its first ``row_prefix[r]``."""
    n_rows, width = ids.shape
    lengths = (mask.sum(1) if mask is not None
               else torch.full((n_rows,), width, device=ids.device))
    run = int((lengths - row_prefix).max())
    cols = row_prefix[:, None] + torch.arange(run, device=ids.device)[None, :]
    real = cols < lengths[:, None]
    cols = cols.clamp(max=width - 1)  # padding past a row's end: masked, any token will do
    cached = torch.arange(int(row_prefix.max()), device=ids.device)[None, :] < row_prefix[:, None]
    dtype = mask.dtype if mask is not None else torch.long
    return {"input_ids": ids.gather(1, cols), "position_ids": cols,
            "attention_mask": torch.cat([cached, real], dim=1).to(dtype)}


#: Rows per forward pass of :class:`BlockReplay`'s whole-row pass in prefix mode.
PREFIX_PASS_ROWS = 32


class PrefixUnavailable(Exception):
    """This model's key/value cache cannot be driven to replay a suffix (internal signal)."""


class BlockReplay:
    """Re-run blocks ``start..stop`` (and the head) of ``model`` on a fixed batch.

    Construction runs one forward pass (no gradient) and records, with forward pre-hooks, the
    hidden state entering block ``start`` and the arguments every block from ``start`` up
    received. :meth:`hidden_out` then recomputes only blocks ``start..stop`` from the recorded
    hidden state, so hooks inside them (e.g. an edit of an MLP output) take effect while the
    lower layers are never re-run; calling the object applies the adapter's head.

    ``prefix`` (> 0): the first ``prefix`` tokens of every row are never changed by the
    caller's hooks (ROME's δ sits at the subject's last token, at or after them), so their
    keys and values at every block are fixed. They are read once from the model's own
    key/value cache, and the replay runs only tokens ``prefix..`` with those keys/values given
    to each block through :func:`editkit.models.compat.prefix_cache` (the mechanism of the
    fast tracer). Positions passed to :meth:`__call__` are then *suffix* columns (column −
    ``prefix``). Rows must not be padded inside the prefix (right padding is fine). A model
    whose cache cannot be driven this way raises :class:`PrefixUnavailable`.

    ``row_prefix`` (instead of ``prefix``): one prefix length per row, so every row runs from
    its own column on (ROME's rows each from their own δ column) in one batch. Each row's
    suffix is moved to the front of the run part (right-padded to the longest suffix); the
    cached part holds ``max(row_prefix)`` columns, of which row r attends to its first
    ``row_prefix[r]`` (an attention mask over cached + run columns), and the run tokens get
    their true position ids. Positions passed to :meth:`__call__` are then column −
    ``row_prefix[row]``. A model whose forward does not take ``position_ids`` and a 2-D mask
    over the cached columns raises :class:`PrefixUnavailable`, and one that takes them but
    does not honour them fails :meth:`verify`.

    ``verify`` (default on) checks once, with no hooks of the caller active, that replaying
    blocks ``start..`` to the last block and applying the head gives the model's own logits
    at ``check_at`` (``(rows, cols)`` in full-prompt columns; default every position): see
    :meth:`verify`. A caller that constructs the replay inside its own hooks passes
    ``verify=False`` and calls :meth:`verify` once they are gone. :attr:`reference` keeps the
    model's own logits at ``check_at`` (computed by the construction pass, no gradient).
    """

    def __init__(self, model: nn.Module, adapter: Any, start: int, stop: int,
                 inputs: dict[str, torch.Tensor], *, check_at: Positions | None = None,
                 verify: bool = True, prefix: int = 0,
                 row_prefix: Sequence[int] | None = None) -> None:
        self.model, self.adapter, self.start, self.stop = model, adapter, start, stop
        ids = inputs["input_ids"]
        self.row_prefix: torch.Tensor | None = None
        if row_prefix is not None:
            if prefix:
                raise ValueError("give prefix or row_prefix, not both")
            self.row_prefix = torch.tensor(list(row_prefix), dtype=torch.long,
                                           device=ids.device)
            prefix = int(self.row_prefix.max()) if len(row_prefix) else 0
        self.prefix = prefix
        self.blocks = adapter.blocks(model)
        last = len(self.blocks) - 1
        cache_arg = compat.cache_argument(model) if prefix else None
        if prefix and cache_arg is None:
            raise PrefixUnavailable("the model's forward takes no key/value cache")
        self._check_at = check_at
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if prefix and check_at is not None:
            # the whole rows are run only for the prefix cache and the reference logits:
            # in chunks of rows, so that the logits (vocabulary × every position) of a large
            # batch (MEMIT's z for many requests at once) are never all held at once
            kv, self.reference = self._prefix_pass(model, inputs, prefix, check_at)
        else:
            with torch.no_grad(), BlockCalls(self.blocks, range(start, last + 1)) as rec:
                out = model(**inputs, use_cache=bool(prefix))
            self.reference = (
                out.logits[check_at] if check_at is not None else out.logits).detach()
            if prefix:
                kv = compat.cache_tensors(out, len(self.blocks), ids.shape[1])
                if kv is None:
                    raise PrefixUnavailable("the model's key/value cache could not be read")
                kv = [(k[..., :prefix, :].clone(), v[..., :prefix, :].clone()) for k, v in kv]
            del out
        if prefix:
            if self.row_prefix is not None:
                suffix = _ragged_suffix(ids, inputs.get("attention_mask"), self.row_prefix)
            else:
                suffix = {"input_ids": ids[:, prefix:]}
                if inputs.get("attention_mask") is not None:  # prefix + suffix columns
                    suffix["attention_mask"] = inputs["attention_mask"]
            suffix.update({"use_cache": True, cache_arg: compat.filled_cache(kv)})
            # the suffix pass only records the block calls: it stops after the last block,
            # before the head
            stop_at = adapter.module_name("block", last)
            try:
                with torch.no_grad(), BlockCalls(self.blocks, range(start, last + 1)) as rec, \
                        Trace(model, [stop_at], stop=True):
                    model(**suffix)
            except Exception as exc:  # a family whose cache we cannot drive
                raise PrefixUnavailable(str(exc)) from exc
            self.kv = [(k.detach(), v.detach()) for k, v in kv]
        self.calls = dict(zip(rec.layers, rec.result(), strict=True))
        if prefix:  # the recorded cache grew by the suffix pass: keep only the prefix
            self.calls = {i: compat.swap_cache(call, compat.prefix_cache(*self.kv[i]))
                          for i, call in self.calls.items()}
        # Where each block call takes its cache, found once: a step then swaps in the
        # prefix cache with one dict update instead of walking the whole call (which cost
        # ~4 % of a small model's v* step in Python).
        self._cache_key = {i: _top_level_cache_key(call) for i, call in self.calls.items()}
        self.hidden = adapter.block_input(self.calls[start]).detach()
        self._expected: torch.Tensor | None = self.reference
        if verify:
            self.verify()

    def _prefix_pass(self, model, inputs: dict[str, torch.Tensor], prefix: int,
                     check_at: Positions) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                   torch.Tensor]:
        """The whole rows run ``PREFIX_PASS_ROWS`` at a time: per layer the keys/values of the
        first ``prefix`` columns (copies), and the model's logits at ``check_at``."""
        rows, cols = check_at
        n_rows, width = inputs["input_ids"].shape
        kv_parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        reference = None
        for r0 in range(0, n_rows, PREFIX_PASS_ROWS):
            r1 = min(n_rows, r0 + PREFIX_PASS_ROWS)
            chunk = {k: (v[r0:r1] if isinstance(v, torch.Tensor) and v.dim() >= 1
                         and v.shape[0] == n_rows else v) for k, v in inputs.items()}
            with torch.no_grad():
                out = model(**chunk, use_cache=True)
            kv = compat.cache_tensors(out, len(self.blocks), width)
            if kv is None:
                raise PrefixUnavailable("the model's key/value cache could not be read")
            kv_parts.append([(k[..., :prefix, :].clone(), v[..., :prefix, :].clone())
                             for k, v in kv])
            mine = ((rows >= r0) & (rows < r1)).nonzero().flatten()
            logits = out.logits[rows[mine] - r0, cols[mine]].detach()
            if reference is None:
                reference = logits.new_empty((rows.shape[0], logits.shape[-1]))
            reference[mine] = logits
            del out
        kv = [(torch.cat([part[i][0] for part in kv_parts]),
               torch.cat([part[i][1] for part in kv_parts])) for i in range(len(kv_parts[0]))]
        return kv, reference

    def suffix_cols(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Full-prompt columns ``cols`` of ``rows`` as columns of the part the replay runs."""
        if self.row_prefix is not None:
            return cols - self.row_prefix.to(cols.device)[rows]
        return cols - self.prefix

    def _call(self, i: int) -> Call:
        """Block ``i``'s recorded call; with a prefix, a fresh cache holding its keys/values."""
        if not self.prefix:
            return self.calls[i]
        k, v = self.kv[i]
        key = self._cache_key[i]
        if key is None:  # the cache sits deeper in the call (or nowhere): walk it
            return compat.swap_cache(self.calls[i], compat.prefix_cache(k, v))
        args, kwargs = self.calls[i]
        return args, {**kwargs, key: compat.prefix_cache(k, v)}

    def hidden_out(self, stop: int | None = None, *, first: int | None = None,
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Output hidden state of block ``stop`` (default ``self.stop``), recomputed (tokens
        ``prefix..`` only) from block ``first`` (default ``self.start``) on. ``hidden`` is
        the state entering block ``first`` (default: the recorded input of ``self.start``,
        so give it whenever ``first`` is above ``self.start``)."""
        stop = self.stop if stop is None else stop
        first = self.start if first is None else first
        if first != self.start and hidden is None:
            raise ValueError(f"hidden_out(first={first}) needs the hidden state entering "
                             f"block {first}")
        h = self.hidden if hidden is None else hidden
        for i in range(first, stop + 1):
            h = self.adapter.call_block(self.blocks[i], h, self._call(i))
        return h

    def __call__(self, positions: Positions | None = None, *, first: int | None = None,
                 hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (the adapter's head on block ``stop``'s output), at ``positions``
        ``(rows, cols)`` only if given (then shape (n, vocab); cols counted from ``prefix``),
        else (batch, seq − prefix, vocab). ``first``/``hidden``: as in :meth:`hidden_out`."""
        return self.adapter.head(self.model, self.hidden_out(first=first, hidden=hidden),
                                 positions)

    def verify(self) -> None:
        """The one-time check: the replay up to the last block and the head reproduce the
        model's own logits, else :class:`ReplayMismatchError`. Later calls do nothing."""
        if self._expected is None:
            return
        with torch.no_grad():
            hidden = self.hidden_out(len(self.blocks) - 1)
            if self._check_at is None:
                if self.row_prefix is not None:
                    raise ValueError("a replay with row_prefix needs check_at positions")
                got = self.adapter.head(self.model, hidden)
                expected = self._expected[:, self.prefix:]
            else:
                rows, cols = self._check_at
                got = self.adapter.head(self.model, hidden, (rows, self.suffix_cols(rows, cols)))
                expected = self._expected
        what = f"blocks {self.start}..{len(self.blocks) - 1} and the head"
        if self.row_prefix is not None:
            what += f", each row after its own cached prefix (at most {self.prefix})"
        elif self.prefix:
            what += f", tokens after a cached prefix of {self.prefix}"
        check_replay(got, expected, self.adapter.name, what)
        self._expected = None
