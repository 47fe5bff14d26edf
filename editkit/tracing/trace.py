"""Causal tracing (Meng et al. 2022, §2): where does a model recall a fact?

Three runs of the model on a prompt whose subject is known, e.g. "{} was born in" with
subject "Ada Lovelace" and answer o = " London":

1. **clean** run: record every hidden state h_i^(l) (block output), MLP output m_i^(l) and
   attention output a_i^(l), and P(o) (``p_clean``).
2. **corrupted** run: add Gaussian noise ε ~ N(0, ν²) to the embeddings of the subject tokens,
   ν = 3σ with σ the standard deviation of token embeddings over a text sample (paper:
   ν = 3σ, n = 10 noise samples), and read P*(o) averaged over the samples (``p_corrupt``).
3. **corrupted-with-restoration** runs: corrupt as in 2 but overwrite one state with its clean
   value, for every token i and layer l: the hidden state h_i^(l) (kind ``"hidden"``), or the
   MLP / attention outputs of token i in a window of ``w`` layers centred on l (kinds
   ``"mlp"``, ``"attn"``; paper w = 10, clipped at the first and last layer). The score of
   (i, l) is P*_{clean h_i^(l)}(o); its **indirect effect** is
   IE = P*_{clean h_i^(l)}(o) − P*(o) (paper Eq. in §2.1).

The "severed" kinds (paper Fig. 7) restore h_i^(l) as ``"hidden"`` does while freezing the
MLP (``"hidden_sever_mlp"``) or attention (``"hidden_sever_attn"``) outputs of the same token
i in the layers above l at their corrupted values, so those modules cannot respond to the
restored state: how much of the effect of h_i^(l) flows through the MLPs (or attention) of
token i in later layers.

The **average indirect effect** (AIE) over many facts is reported per token group (first,
middle and last subject token, first subsequent token, further tokens, last token).

Speed. The straightforward method (:mod:`editkit.tracing.naive`, the test oracle) runs one
full forward of ``n`` noise samples per (token, layer, kind): ~3·T·L forwards per prompt.
:class:`CausalTracer` computes exactly the same numbers much faster:

- A restoration whose lowest restored layer is s leaves every state below block s equal to
  the corrupted run's, so its forward starts at block s from the corrupted run's cached
  residual input of that block; the keyword arguments each block received (rotary position
  embeddings, attention masks) are captured once with forward pre-hooks and reused. A hidden
  state restored at layer l is block l's output: its forward starts at block l + 1.
- A restoration at token t leaves tokens before t unchanged: only tokens t..T-1 are run, the
  earlier tokens' keys and values coming from the corrupted run through the model's cache.
- Within a block, MLP and attention outputs only feed their own token, so one forward of block
  s with the MLP (attention) output restored at every token gives the first block of every
  MLP (attention) restoration starting at s.
- All restorations of one token (every layer and kind) share one batch (restorations × noise
  samples rows), each joining at its own first block; duplicates (windows clipped at the ends)
  are computed once.
- Tokens before the subject are identical in the clean and corrupted runs, so restoring them
  changes nothing: their score is P*(o) without a forward. Likewise a state of the last block
  at any token but the last feeds nothing that reaches the logits: P*(o).
- The first block of MLP/attention restorations runs from the first subject token (the last
  block's from the last token only), earlier tokens' keys and values coming from the cache.
- The last block's MLP and attention output projection run on the last token only, and only
  that token goes through the final norm and the unembedding.
- Overheads are kept per trace, not per batch: the module hooks are installed once and act on
  whatever batch is running; the block arguments of a suffix forward (masks, positions) are
  captured once per (start, length) and shared by all prompts of a tracer (checked to depend
  on the lengths only); the prefix keys/values go in a light cache object; Python's cyclic
  garbage collector is paused during a trace.

Each shortcut is checked numerically on a model's first prompt and switched off if it does not
reproduce the model.

Everything goes through the model's :class:`~editkit.models.adapter.ModelAdapter` (slots
``embedding``, ``block``, ``mlp``, ``attn``, ``attn_out``; its ``call_block`` and ``head``), so
every registered family works, and a family whose forward is more than its blocks and head is
refused with :class:`~editkit.errors.ReplayMismatchError` (use the straightforward tracer).

This module is the fast tracer. The experiment's definition lives beside it:
:mod:`~editkit.tracing.kinds` (what is restored), :mod:`~editkit.tracing.corruption` (noise,
prompt preparation), :mod:`~editkit.tracing.results` (results, AIE); the recording of block
calls is :mod:`editkit.replay`'s and the transformers cache plumbing is
:mod:`editkit.models.compat`'s.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import importlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from editkit.distributed import gather_in_order, rank_and_world, shard_indices
from editkit.errors import InvalidHyperParamsError, InvalidRequestError, ReplayMismatchError
from editkit.models import compat
from editkit.nethooks import Trace, as_tokens, first_tensor, hidden_of, with_hidden
from editkit.replay import BlockCalls, Call, expand_batch
from editkit.requests import EditRequest
from editkit.tracing.corruption import (
    DEFAULT_SAMPLES,
    WEAK_EFFECT,
    TracePrompt,
    answer_probs,
    corrupt,
    embedding_noise,
    embedding_std,
    eval_mode,
    model_device,
    noise_std_for,
    normalise_prompt,
    prepare_prompt,
    resolve_noise,
    subject_embeddings,
)
from editkit.tracing.kinds import (
    FREEZE_OF_KIND,
    KINDS,
    SLOT_OF_KIND,
    check_kinds,
    check_window,
    resolve_token_range,
    window_layers,
)
from editkit.tracing.results import (
    TraceResult,
)

logger = logging.getLogger(__name__)

#: Names that lived here before the module was split, served from their new modules (PEP 562)
#: so that ``from editkit.tracing.trace import TraceResult`` and the like keep working.
_MOVED = {
    **dict.fromkeys(("embedding_std", "make_noise", "subject_token_range",
                     "weight_embedding_std", "DEFAULT_NOISE"), "corruption"),
    **dict.fromkeys(("ALL_KINDS", "SEVERED_KINDS", "default_window"), "kinds"),
    **dict.fromkeys(("GROUPS", "AIEResult", "aie_by_kind", "average_indirect_effect",
                     "token_groups"), "results"),
}

__all__ = ["CausalTracer", "TracedRecords", "as_trace_requests", "causal_trace",
           "resolve_token_range", "trace_records"]


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"editkit.tracing.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a ``with`` block (restored afterwards).

    A trace allocates many short-lived Python objects (hook calls, cache objects, argument
    tuples); each full collection then walks every object of the model and the libraries,
    about a tenth of a small model's tracing time. Reference counting still frees everything
    acyclic at once; cycles made meanwhile are collected after the block.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _BatchHooks:
    """Hooks on every MLP and attention module for the duration of one trace.

    They pass everything through until ``edit`` is set. Then every MLP/attention output goes
    through ``edit(slot, layer, h)`` (restore / freeze rows at one token), and the modules in
    ``trim`` (the last block's MLP and attention output projection: position-wise, and only the
    last position of the last block reaches the logits) run on the last position only, their
    output zero-padded back to full length. Installed once per trace rather than per batch.
    """

    def __init__(self) -> None:
        self.edit: Any = None
        self.trim: set[str] = set()
        self._length: dict[str, int] = {}
        self._handles: list[Any] = []
        self._grid: dict[int, torch.Size] = {}  # layer -> (batch, tokens) of its block call

    def install(self, edited: Mapping[tuple[str, int], nn.Module],
                trimmed: Mapping[str, nn.Module], blocks: nn.ModuleList | None = None) -> None:
        for layer, block in enumerate(blocks or ()):  # see editkit.nethooks.as_tokens
            self._handles.append(block.register_forward_pre_hook(
                functools.partial(self._record_grid, layer), with_kwargs=True))
        for name, module in trimmed.items():  # before the edit hooks: they see full length
            self._handles.append(module.register_forward_pre_hook(
                functools.partial(self._trim_input, name)))
            self._handles.append(module.register_forward_hook(
                functools.partial(self._pad_output, name)))
        for (slot, layer), module in edited.items():
            self._handles.append(module.register_forward_hook(
                functools.partial(self._edit_output, slot, layer)))
        self.trim = set(trimmed)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _trim_input(self, name: str, module, args):
        self._length[name] = 0
        if self.edit is None or name not in self.trim or not args:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] == 1:
            return None  # unexpected call signature or nothing to trim: run in full
        self._length[name] = x.shape[1]
        return (x[:, -1:], *args[1:])

    def _pad_output(self, name: str, module, args, output):
        length = self._length.pop(name, 0)
        h = hidden_of(output)
        if not length or h.shape[1] != 1:
            return None
        full = h.new_zeros(h.shape[0], length, *h.shape[2:])
        full[:, -1:] = h
        return with_hidden(output, full)

    def _record_grid(self, layer: int, module, args, kwargs) -> None:
        x = first_tensor(args, kwargs)
        if x is not None and x.dim() >= 3:
            self._grid[layer] = x.shape[:-1]

    def _edit_output(self, slot: str, layer: int, module, args, output):
        if self.edit is None:
            return None
        h = hidden_of(output)
        viewed = as_tokens(h, self._grid.get(layer))  # rows of a flattened sublayer (OPT)
        new = self.edit(slot, layer, viewed)
        if new is viewed:
            return None
        return with_hidden(output, new.reshape(h.shape) if viewed is not h else new)


@dataclass
class _Runs:
    """Clean and corrupted runs of one prompt: what the fast path reuses."""

    p_clean: float
    p_corrupt: float
    top1: int
    clean: dict[str, list[torch.Tensor]]       # slot -> per layer (T, d)
    corrupt_in: list[torch.Tensor]             # block inputs, then last output: (n, T, d)
    corrupt: dict[str, list[torch.Tensor]]     # "mlp"/"attn" -> per layer (n, T, d)
    calls: list[Call]                          # block calls of the full prompt (no cache)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # corrupted keys/values per layer
    suffix_calls: dict[tuple[int, int], list[Call]] = field(default_factory=dict)
    # (slot, layer, lo) -> block output (n, T - lo, d), tokens lo.., with the slot's output
    # restored at every token
    first_block: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Restore:
    """One restoration: the clean value of ``slot`` at ``token`` in ``layers`` (+ freezing).

    ``freeze``: a slot whose outputs at ``token`` in layers > ``freeze_above`` are set to
    their corrupted values (severed kinds). Slot ``"none"`` restores nothing (self-check).
    """

    slot: str
    token: int
    layers: tuple[int, ...]
    freeze: str | None = None
    freeze_above: int = -1

    @property
    def entry(self) -> int:
        """First block that must run: a hidden state restored at layer l is block l's output,
        so only blocks above l run; MLP/attention outputs live inside their block."""
        return self.layers[0] + 1 if self.slot == "block" else self.layers[0]


@dataclass
class CausalTracer:
    """Fast causal tracing of one model (see the module docstring for the method).

    Corruption (paper §2.1; see :mod:`~editkit.tracing.corruption`): ν is ``noise_std`` when
    given (an absolute standard deviation: the reference code's ``noise=``), else
    ``noise_multiple`` · σ (default 3, the paper's) with σ = :func:`embedding_std` of
    ``texts``, or, without texts, of the traced prompt's subject (the paper measures σ over
    subjects); ``noise`` is the deprecated name of ``noise_multiple``. ``uniform_noise`` draws
    U(−ν, ν) instead of N(0, ν²); ``replace=True`` writes the noise over the subject's
    embeddings instead of adding it, ``replace="another subject"`` writes that subject's
    embeddings (the reference's options); ``noise_rng="numpy"`` with ``seed=1`` draws the
    reference's noise exactly. ``samples`` noise draws per prompt (paper 10);
    ``seed`` seeds the noise of every prompt; ``batch_size`` caps the rows (restorations ×
    samples) of one forward; ``reuse_prefix`` runs a restoration at token t on tokens ≥ t only,
    with the corrupted run's keys/values of the earlier tokens (off: whole prompt);
    ``first_blocks`` precomputes the first block of MLP/attention restorations (see
    :meth:`_first_block`); ``verify`` checks once per tracer that the block-by-block forward
    and the shortcuts reproduce the model (a shortcut that does not is switched off).
    """

    model: nn.Module
    tokenizer: Any
    noise_std: float | None = None
    texts: Sequence[str] | None = None
    samples: int = DEFAULT_SAMPLES
    noise: float | None = None
    seed: int = 0
    batch_size: int = 512
    adapter: Any = None
    progress: bool = False
    reuse_prefix: bool = True
    first_blocks: bool = True
    verify: bool = True
    noise_multiple: float | None = None
    uniform_noise: bool = False
    replace: bool | str = False
    noise_rng: str = "torch"
    _verified: bool = field(default=False, init=False, repr=False)
    _first_block_ok: bool = field(default=True, init=False, repr=False)
    _trim_attn_ok: bool = field(default=True, init=False, repr=False)
    _hooks: _BatchHooks | None = field(default=None, init=False, repr=False)
    # block calls of a forward over tokens start:start+length after a cached prefix, shared by
    # the prompts of this tracer (they depend on the lengths only; checked on first reuse)
    _span_calls: dict[tuple[int, int], list[Call]] = field(default_factory=dict, init=False,
                                                           repr=False)
    _share_calls: bool | None = field(default=None, init=False, repr=False)
    _weak: int = field(default=0, init=False, repr=False)
    #: the model's top-1 next token (decoded) on the last traced prompt
    last_prediction: str = field(default="", init=False)

    def __post_init__(self) -> None:
        from editkit.registry import get_adapter

        self.adapter = self.adapter or get_adapter(self.model)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidHyperParamsError(f"batch_size={self.batch_size!r} must be ≥ 1")
        self.noise_multiple, self.noise_std = resolve_noise(self.noise, self.noise_multiple,
                                                            self.noise_std)
        self.noise = None  # warned once; ``noise_multiple`` holds its value
        self._replacement = None
        if isinstance(self.replace, str):
            if not self.replace.strip():
                raise InvalidRequestError("replace='' is empty; give another subject's name "
                                          "(or replace=True to write the noise over it)")
            self._replacement = subject_embeddings(self.model, self.tokenizer, self.replace,
                                                   self.adapter)
            self.sigma_source = f"none: subject replaced by the embeddings of {self.replace!r}"
            self.noise_std = 0.0 if self.noise_std is None else self.noise_std
        elif self.noise_std is not None:
            self.sigma_source = "none: noise_std given (absolute)"
            self.noise_multiple = None
        elif self.texts:
            self.noise_std = noise_std_for(self.model, self.tokenizer, self.adapter,
                                           self.noise_multiple, self.texts)
            self.sigma_source = f"token embeddings of {len(self.texts)} given text(s)"
        else:  # per prompt, from its subject (see :meth:`prepare`)
            self.sigma_source = "token embeddings of the traced prompt's subject"
        self.n_layers = self.adapter.num_layers(self.model)
        self._cache_arg = compat.cache_argument(self.model) if self.reuse_prefix else None
        self._first_block_ok = self.first_blocks
        self._blocks = self.adapter.blocks(self.model)

    # ------------------------------------------------------------------ public
    @property
    def shortcuts(self) -> dict[str, bool]:
        """Which optional shortcuts are on (after the first trace: which passed the check)."""
        return {"reuse_prefix": self._cache_arg is not None,
                "first_blocks": self._first_block_ok}

    def prompt_noise_std(self, subject: str) -> float:
        """ν for a prompt with ``subject``: the tracer's, or ``noise_multiple`` · σ of the
        subject's token embeddings when the tracer was given neither texts nor ν."""
        if self.noise_std is not None:
            return float(self.noise_std)
        return self.noise_multiple * embedding_std(self.model, self.tokenizer, [subject],
                                                   self.adapter)

    @property
    def corruption(self) -> str:
        """The kind of corruption, in words (recorded in every result)."""
        if self._replacement is not None:
            return f"replace with {self.replace!r}"
        dist = "uniform" if self.uniform_noise else "gaussian"
        return f"replace with {dist} noise" if self.replace else dist

    def prepare(self, prompt: str, subject: str, target: str | None = None,
                noise_std: float | None = None) -> TracePrompt:
        hidden = self.adapter.module(self.model, "embedding").weight.shape[-1]
        prompt = normalise_prompt(prompt, subject)
        if noise_std is None:
            noise_std = 0.0 if self._replacement is not None else self.prompt_noise_std(subject)
        return prepare_prompt(self.tokenizer, prompt, subject, target, hidden_size=hidden,
                              samples=self.samples, noise_std=noise_std,
                              seed=self.seed, uniform=self.uniform_noise,
                              replace=bool(self.replace), replacement=self._replacement,
                              rng=self.noise_rng)

    def trace(self, prompt: str, subject: str, target: str | None = None, *,
              kinds: str | Iterable[str] | None = KINDS, window: int | None = None,
              token_range: str | Iterable[int] | None = None, skip_wrong: bool = False
              ) -> dict[str, TraceResult]:
        """Trace ``fill(prompt, subject)`` for each of ``kinds``; ``{kind: TraceResult}``.

        ``prompt`` has ``{}`` for the subject, or contains the subject (the reference
        notebook's form). ``target`` is the answer whose probability is read (its first
        token); ``None`` uses the model's own top-1 next token. ``token_range``: the tokens
        to restore (default all; ``"subject_last"`` as the reference, ``"subject"``,
        ``"last"``, or token indices); the other rows are NaN. ``skip_wrong``: return ``{}``
        without tracing when the model's top-1 token is not ``target``'s first token (the
        reference's ``expect=``).
        """
        kinds = check_kinds(kinds)
        window = check_window(window, self.n_layers)
        normalise_prompt(prompt, subject)  # a bad prompt fails before σ is measured
        nu = 0.0 if self._replacement is not None else self.prompt_noise_std(subject)
        tp = self.prepare(prompt, subject, target, nu)
        tokens = resolve_token_range(token_range, tp.n_tokens, tp.subject_range)
        with eval_mode(self.model), _gc_paused():
            runs = self._runs(tp)
            self.last_prediction = self.tokenizer.decode([runs.top1])
            if skip_wrong and runs.top1 != tp.answer_id:
                return {}
            with self._hooked():
                if self.verify and not self._verified:
                    self._check_partial_forward(tp, runs)
                scores = self._restorations(tp, runs, kinds, window, tokens)
        weak = self._check_effect(tp, runs, nu)
        return {
            k: TraceResult(
                kind=k, scores=scores[k], p_clean=runs.p_clean, p_corrupt=runs.p_corrupt,
                tokens=tp.tokens, subject_range=tp.subject_range,
                window=1 if SLOT_OF_KIND[k] == "block" else window, prompt=tp.prompt,
                subject=subject, answer=tp.answer, answer_id=tp.answer_id,
                samples=self.samples, noise_std=nu,
                correct_prediction=runs.top1 == tp.answer_id,
                noise_multiple=(None if self.sigma_source.startswith("none")
                                else self.noise_multiple),
                sigma_source=self.sigma_source, corruption=self.corruption,
                weak_corruption=weak,
                token_range=None if tokens is None else sorted(tokens),
            )
            for k in kinds
        }

    def _check_effect(self, tp: TracePrompt, runs: _Runs, nu: float) -> bool:
        """Whether the corruption barely moved P(answer); logged (the first time as a warning,
        with the likely cause)."""
        weak = abs(runs.p_clean - runs.p_corrupt) < WEAK_EFFECT * runs.p_clean
        if weak:
            self._weak += 1
            log = logger.warning if self._weak == 1 else logger.debug
            log("the corruption barely moves the prediction on %r (P(%r) %.4f clean, %.4f "
                "corrupted; ν = %.4g, σ from %s): indirect effects will be ~0. If you passed "
                "the reference code's noise= value, it is an absolute std: use noise_std=, "
                "or noise_multiple= for a multiple of σ", tp.text, tp.answer, runs.p_clean,
                runs.p_corrupt, nu, self.sigma_source)
        return weak

    @contextlib.contextmanager
    def _hooked(self) -> Iterator[_BatchHooks]:
        """Install the batch hooks (:class:`_BatchHooks`) for the duration of a ``with``."""
        if self._hooks is not None:  # already installed by an enclosing call
            yield self._hooks
            return
        L, model, adapter = self.n_layers, self.model, self.adapter
        edited = {(slot, layer): adapter.module(model, slot, layer)
                  for layer in range(L) for slot in ("mlp", "attn")}
        trimmed = {"mlp": edited[("mlp", L - 1)]}
        if self._trim_attn_ok:
            with contextlib.suppress(Exception):  # a family without an output projection slot
                trimmed["attn_out"] = adapter.module(model, "attn_out", L - 1)
        hooks = _BatchHooks()
        self._hooks = hooks
        try:
            hooks.install(edited, trimmed, self._blocks)
            yield hooks
        finally:
            hooks.remove()
            self._hooks = None

    # ------------------------------------------------------------- clean / corrupted
    def _names(self, slot: str) -> list[str]:
        return [self.adapter.module_name(slot, i) for i in range(self.n_layers)]

    def _runs(self, tp: TracePrompt) -> _Runs:
        model, device = self.model, model_device(self.model)
        ids = torch.tensor([tp.input_ids], device=device)
        blocks, mlps, attns = self._names("block"), self._names("mlp"), self._names("attn")
        emb = self.adapter.module_name("embedding")
        with BlockCalls(self.adapter.blocks(model)) as captured, \
                Trace(model, blocks + mlps + attns, retain_output=True) as clean:
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        top1 = int(logits[0].argmax())
        if tp.answer_id is None:  # no target given: trace the model's own prediction
            tp.answer_id, tp.answer = top1, self.tokenizer.decode([top1]).strip()
        p_clean = float(answer_probs(logits, tp.answer_id)[0])

        noise = embedding_noise(model, self.adapter, tp.noise)

        def add_noise(name: str, h: torch.Tensor) -> torch.Tensor:
            return corrupt(h, noise, tp.subject_range, tp.replace) if name == emb else h

        use_cache = self._cache_arg is not None
        with Trace(model, blocks, retain_input=True) as c_in, \
                Trace(model, blocks[-1:], retain_output=True) as c_last, \
                Trace(model, mlps + attns, retain_output=True) as c_out, \
                Trace(model, [emb], edit_output=add_noise):
            out = model(input_ids=ids.expand(self.samples, -1), use_cache=use_cache)
        p_corrupt = float(answer_probs(out.logits[:, -1], tp.answer_id).mean())
        kv = compat.cache_tensors(out, self.n_layers, tp.n_tokens) if use_cache else None
        if use_cache and kv is None:
            logger.info("could not read this model's key/value cache: no prefix reuse")
            self._cache_arg = None
        return _Runs(
            p_clean=p_clean, p_corrupt=p_corrupt, top1=top1,
            clean={"block": [clean.outputs[b][0] for b in blocks],
                   "mlp": [clean.outputs[m][0] for m in mlps],
                   "attn": [clean.outputs[a][0] for a in attns]},
            corrupt_in=[c_in.inputs[b] for b in blocks] + [c_last.outputs[blocks[-1]]],
            corrupt={"mlp": [c_out.outputs[m] for m in mlps],
                     "attn": [c_out.outputs[a] for a in attns]},
            calls=captured.result(), kv=kv,
        )

    def _calls(self, tp: TracePrompt, runs: _Runs, start: int, length: int
               ) -> list[Call] | None:
        """Block calls (masks, positions, ...) of a forward over tokens ``start:start+length``
        that sees the corrupted run's keys/values of tokens ``< start`` through the model's
        cache; captured once per span from a batch-1 forward with such a cache. ``None`` if
        this model's cache cannot be driven that way (then whole prompts are traced)."""
        if start == 0 and length == tp.n_tokens:
            return runs.calls
        if start > 0 and (runs.kv is None or self._cache_arg is None):
            return None
        key = (start, length)
        shared = self._span_calls.get(key) if self._share_calls is not False else None
        if key not in runs.suffix_calls and shared is not None and self._share_calls:
            runs.suffix_calls[key] = shared
        if key not in runs.suffix_calls:
            ids = torch.tensor([tp.input_ids[start:start + length]],
                               device=model_device(self.model))
            kwargs: dict[str, Any] = {"use_cache": False}
            if start > 0:
                kwargs = {"use_cache": True, self._cache_arg: compat.filled_cache([
                    (k[:1].narrow(-2, 0, start), v[:1].narrow(-2, 0, start))
                    for k, v in runs.kv])}
            try:
                with BlockCalls(self.adapter.blocks(self.model)) as captured:
                    self.model(input_ids=ids, **kwargs)
                runs.suffix_calls[key] = captured.result()
            except Exception as exc:  # a family whose cache we cannot drive
                logger.info("prefix reuse unavailable for this model (%s); tracing whole "
                            "prompts", exc)
                self._cache_arg = None
                return None
            if shared is not None:  # first reuse of another prompt's calls: check it once
                self._share_calls = all(  # the hidden states (first argument) aside
                    compat.same_calls((a[1:], kw), (b[1:], kw_b)) for (a, kw), (b, kw_b)
                    in zip(shared, runs.suffix_calls[key], strict=True))
                if not self._share_calls:
                    logger.info("block calls depend on the prompt's tokens: not shared")
            self._span_calls[key] = runs.suffix_calls[key]
        return runs.suffix_calls[key]

    def _suffix(self, tp: TracePrompt, runs: _Runs, token: int) -> tuple[int, list[Call]]:
        """(offset, block calls) of the forward for restorations at ``token``: tokens
        ``offset..T-1``, with ``offset = token`` when prefix reuse works, else 0."""
        calls = self._calls(tp, runs, token, tp.n_tokens - token)
        return (token, calls) if calls is not None else (0, runs.calls)

    # ------------------------------------------------------------- restorations
    def _plan(self, tp: TracePrompt, kinds: Sequence[str], window: int,
              tokens: set[int] | None = None
              ) -> tuple[dict[str, dict[tuple[int, int], _Restore]], list[_Restore]]:
        """Every (kind, token, layer) cell → its restoration; unique restorations."""
        L, (b, _) = self.n_layers, tp.subject_range
        cells: dict[str, dict[tuple[int, int], _Restore]] = {}
        unique: dict[_Restore, None] = {}
        for kind in kinds:
            slot, freeze = SLOT_OF_KIND[kind], FREEZE_OF_KIND.get(kind)
            cells[kind] = {}
            for t in range(b, tp.n_tokens):  # tokens before the subject: no effect
                if tokens is not None and t not in tokens:
                    continue
                for layer in range(L):
                    layers = (layer,) if slot == "block" else tuple(
                        window_layers(layer, window, L))
                    if layers[0] == L - 1 and t < tp.n_tokens - 1:
                        continue  # the last block's states of t feed no later token: no effect
                    r = _Restore(slot, t, layers, freeze, layer if freeze else -1)
                    cells[kind][(t, layer)] = r
                    unique[r] = None
        return cells, list(unique)

    def _entry(self, r: _Restore, first_block: bool) -> int:
        """First block run for ``r`` in the shared batch. With ``first_block``, the first block
        of an MLP/attention window comes precomputed (see :meth:`_first_block`), so the
        restoration joins one block later."""
        if first_block and r.slot in ("mlp", "attn"):
            return r.layers[0] + 1
        return r.entry

    def _first_block(self, tp: TracePrompt, runs: _Runs, slot: str, layer: int, token: int
                     ) -> tuple[int, torch.Tensor]:
        """Block ``layer``'s output in the corrupted run with ``slot``'s output restored at
        *every* token at once: ``(lo, out)`` with ``out`` (n, T − lo, d) for tokens lo..T-1.

        Its token t is the block output of the restoration "``slot`` at t from ``layer``":
        within a block, MLP and attention outputs only feed their own token's residual stream
        (the attention mixes tokens before its output, the MLP is per token), so restoring the
        other tokens too does not change token t. One forward per (slot, layer) thus replaces
        the first block of every such restoration (checked numerically on first use). It runs
        from the first subject token (earlier tokens are never restored; their keys/values come
        from the corrupted run), in the last block from ``token`` (only the last token's
        restorations there have an effect).
        """
        start = token if layer == self.n_layers - 1 else min(token, tp.subject_range[0])
        lo, calls = self._suffix(tp, runs, start)
        key = (slot, layer, lo)
        if key not in runs.first_block:
            clean = runs.clean[slot][layer]

            def restore(s: str, i: int, h: torch.Tensor) -> torch.Tensor:
                if (s, i) != (slot, layer):
                    return h
                return clean[clean.shape[0] - h.shape[1]:].to(h.dtype).expand_as(h).clone()

            with self._hooked() as hooks:
                saved = hooks.edit, hooks.trim
                hooks.edit, hooks.trim = restore, set()  # every token: nothing trimmed
                try:
                    h = runs.corrupt_in[layer][:, lo:]
                    samples = torch.arange(h.shape[0], device=h.device)
                    runs.first_block[key] = self._block(layer, h, calls, runs, samples, lo)
                finally:
                    hooks.edit, hooks.trim = saved
        return lo, runs.first_block[key]

    def _batches(self, restorations: Iterable[_Restore], first_block: bool
                 ) -> list[list[_Restore]]:
        """Restorations grouped by token, sorted by entry block, chunked."""
        by_token: dict[int, list[_Restore]] = {}
        for r in restorations:
            by_token.setdefault(r.token, []).append(r)
        per_batch = max(1, self.batch_size // self.samples)
        out = []
        for _, group in sorted(by_token.items()):
            group.sort(key=lambda r: self._entry(r, first_block))
            out += [group[i:i + per_batch] for i in range(0, len(group), per_batch)]
        return out

    def _restorations(self, tp: TracePrompt, runs: _Runs, kinds: Sequence[str], window: int,
                      tokens: set[int] | None = None) -> dict[str, np.ndarray]:
        cells, unique = self._plan(tp, kinds, window, tokens)
        value: dict[_Restore, float] = {}
        first_block = self._first_block_ok
        batches = self._batches(unique, first_block)
        for batch in tqdm(batches, desc="restorations", disable=not self.progress, leave=False):
            probs = self._run_batch(tp, runs, batch, first_block)
            value.update(zip(batch, probs.tolist(), strict=True))
        out = {}
        for kind in kinds:
            scores = np.full((tp.n_tokens, self.n_layers), runs.p_corrupt, dtype=np.float64)
            for (t, layer), r in cells[kind].items():
                scores[t, layer] = value[r]  # cells not planned: no effect, P*(o)
            if tokens is not None:  # rows not asked for: not traced
                scores[[t for t in range(tp.n_tokens) if t not in tokens]] = np.nan
            out[kind] = scores
        return out

    def _run_batch(self, tp: TracePrompt, runs: _Runs, batch: Sequence[_Restore],
                   first_block: bool = False) -> torch.Tensor:
        """P(answer) of each restoration in ``batch`` (one token, sorted by entry block).

        Rows are (restoration, noise sample). A restoration's rows join the batch at its entry
        block with the corrupted run's input of that block (a hidden state restored at layer l
        is block l's output, so it enters at block l + 1 with its token's clean state written
        in; with ``first_block`` an MLP/attention window likewise enters after its first block,
        see :meth:`_first_block`). Below its entry block nothing is computed for it. Only tokens ≥
        ``offset`` are computed (see :meth:`_suffix`), and the last block's MLP only at the
        last token (no other token of the last block reaches the logits).
        """
        n, L = self.samples, self.n_layers
        token = batch[0].token
        offset, calls = self._suffix(tp, runs, token)
        pos = token - offset
        device = runs.corrupt_in[0].device
        sample = torch.arange(n, device=device).repeat(len(batch))
        entries = [self._entry(r, first_block) for r in batch]
        # per (slot, layer): rows whose module output is restored (at ``token``) or frozen
        restore: dict[tuple[str, int], list[int]] = {}
        freeze: dict[tuple[str, int], list[int]] = {}
        for ri, (r, entry) in enumerate(zip(batch, entries, strict=True)):
            rows = range(ri * n, (ri + 1) * n)
            if r.slot in ("mlp", "attn"):
                for layer in r.layers:
                    if layer >= entry:
                        restore.setdefault((r.slot, layer), []).extend(rows)
            if r.freeze is not None:
                for layer in range(r.freeze_above + 1, L):
                    freeze.setdefault((r.freeze, layer), []).extend(rows)
        restore_idx = {k: torch.tensor(v, device=device) for k, v in restore.items()}
        freeze_idx = {k: torch.tensor(v, device=device) for k, v in freeze.items()}

        def apply(slot: str, layer: int, h: torch.Tensor) -> torch.Tensor:
            f, rst = freeze_idx.get((slot, layer)), restore_idx.get((slot, layer))
            if f is None and rst is None:
                return h
            h = h.clone()
            first = tp.n_tokens - h.shape[1]  # token of position 0 of ``h``
            if f is not None:
                h[f, token - first] = runs.corrupt[slot][layer][sample[f], token].to(h.dtype)
            if rst is not None:
                h[rst, token - first] = runs.clean[slot][layer][token].to(h.dtype)
            return h

        if first_block:  # computed before any of this batch's hooks is in place
            for r in batch:
                if r.slot in ("mlp", "attn"):
                    self._first_block(tp, runs, r.slot, r.layers[0], token)

        def enter(layer: int, lo: int, hi: int) -> torch.Tensor:
            """Rows ``lo:hi`` joining at block ``layer`` (``L``: after the last block)."""
            fresh = runs.corrupt_in[layer][sample[lo:hi], offset:]
            restored = [ri for ri in range(lo // n, hi // n) if batch[ri].slot == "block"
                        or (first_block and batch[ri].slot in ("mlp", "attn"))]
            if restored:
                fresh = fresh.clone()
            for ri in restored:
                r, rows = batch[ri], slice(ri * n - lo, (ri + 1) * n - lo)
                if r.slot == "block":  # the clean hidden state itself
                    fresh[rows, pos] = runs.clean["block"][layer - 1][token].to(fresh.dtype)
                else:  # the first block's output with the MLP/attention output restored
                    start, out = self._first_block(tp, runs, r.slot, layer - 1, token)
                    fresh[rows, pos] = out[:, token - start].to(fresh.dtype)
            return fresh

        h: torch.Tensor | None = None
        active = 0
        with self._hooked() as hooks:
            hooks.edit = apply
            try:
                for layer in range(entries[0], L + 1):
                    joined = n * bisect.bisect_right(entries, layer)
                    if joined > active:  # restorations entering here join the batch
                        fresh = enter(layer, active, joined)
                        h = fresh if h is None else torch.cat([h, fresh])
                        active = joined
                    if layer == L:
                        break
                    h = self._block(layer, h, calls, runs, sample[:active], offset)
            finally:
                hooks.edit = None
        return self._head(h[:, -1:], tp.answer_id).view(len(batch), n).mean(dim=1)

    def _block(self, layer: int, h: torch.Tensor, calls: list[Call], runs: _Runs,
               samples: torch.Tensor, prefix: int) -> torch.Tensor:
        """Block ``layer`` on ``h`` (rows × tokens ``prefix..``), the first ``prefix`` tokens'
        keys/values taken from the corrupted run (noise sample ``samples[row]``)."""
        args, kwargs = expand_batch(calls[layer], h.shape[0])
        if prefix:
            k, v = runs.kv[layer]
            cache = compat.prefix_cache(k.narrow(-2, 0, prefix)[samples],
                                  v.narrow(-2, 0, prefix)[samples])
            args, kwargs = compat.swap_cache((args, kwargs), cache)
        return self.adapter.call_block(self._blocks[layer], h, (args, kwargs))

    def _head(self, last_hidden: torch.Tensor, answer_id: int) -> torch.Tensor:
        logits = self.adapter.head(self.model, last_hidden)[:, -1]
        return answer_probs(logits, answer_id)

    def _check_partial_forward(self, tp: TracePrompt, runs: _Runs) -> None:
        """Check the fast path's assumptions on this model once.

        The corrupted prompt run block by block from block 0 (restoring nothing) must give the
        full model's P*(o): for the whole prompt, and with prefix reuse for every suffix start;
        and MLP/attention restorations must come out the same with and without the precomputed
        first blocks. A shortcut that disagrees is switched off; if the whole-prompt replay
        fails, the model's forward is not "blocks in order, final norm, unembedding" and the
        fast path cannot be used.
        """
        def close(p: float, q: float) -> bool:
            return abs(p - q) <= 1e-5 * max(1.0, abs(q)) + 1e-6

        def replay() -> float:
            try:
                return float(self._run_batch(tp, runs, [_Restore("none", 0, (0,))])[0])
            except Exception as exc:  # e.g. a trimmed module that needs every position
                logger.info("block-by-block replay failed (%s)", exc)
                return math.nan

        b = tp.subject_range[0]
        p = replay()
        if not close(p, runs.p_corrupt) and self._hooks is not None \
                and "attn_out" in self._hooks.trim:
            logger.info("trimming the last attention output projection does not reproduce "
                        "this model; off")
            self._trim_attn_ok = False
            self._hooks.trim.discard("attn_out")
            p = replay()
        if not close(p, runs.p_corrupt):
            raise ReplayMismatchError(
                f"the block-by-block forward of this {self.adapter.name} model gives "
                f"P={p:.6g} but the full forward gives P={runs.p_corrupt:.6g}; its forward "
                "does more than its ModelAdapter declares (blocks in order, then the adapter's "
                "head: a logit soft-cap or scale?); declare it in the adapter "
                "(docs/adapters.md) or use editkit.tracing.naive.trace_naive"
            )
        for t in range(max(b, 1), tp.n_tokens):
            if self._cache_arg is None:
                break
            try:
                p = float(self._run_batch(tp, runs, [_Restore("none", t, (0,))])[0])
            except Exception as exc:  # blocks that cannot take the prefix cache
                logger.info("prefix reuse failed on this model (%s); tracing whole prompts",
                            exc)
                self._cache_arg = None
                break
            if not close(p, runs.p_corrupt):
                logger.warning("prefix reuse does not reproduce this %s model (P=%.6g vs "
                               "%.6g); tracing whole prompts instead", self.adapter.name, p,
                               runs.p_corrupt)
                self._cache_arg = None
        if self._first_block_ok:
            for t in range(b, tp.n_tokens):
                probe = [_Restore("mlp", t, (0,)), _Restore("attn", t, (0,))]
                try:
                    with_shortcut = self._run_batch(tp, runs, probe, first_block=True)
                    ok = all(map(close, with_shortcut.tolist(),
                                 self._run_batch(tp, runs, probe).tolist()))
                except Exception as exc:  # unusual block structure
                    logger.info("first-block shortcut failed on this model (%s)", exc)
                    ok = False
                if not ok:
                    logger.info("precomputed first blocks do not reproduce this model; off")
                    self._first_block_ok = False
                    break
        self._verified = True


# --------------------------------------------------------------------------- conveniences
def causal_trace(model: nn.Module, tokenizer, prompt: str, subject: str,
                 target: str | None = None, *, kinds: str | Iterable[str] | None = KINDS,
                 window: int | None = None, samples: int = DEFAULT_SAMPLES,
                 noise: float | None = None, noise_std: float | None = None,
                 noise_multiple: float | None = None, uniform_noise: bool = False,
                 replace: bool | str = False, token_range: str | Iterable[int] | None = None,
                 texts: Sequence[str] | None = None, seed: int = 0, noise_rng: str = "torch",
                 batch_size: int = 512, adapter=None, progress: bool = False
                 ) -> dict[str, TraceResult]:
    """Causal trace of one prompt (fast). See :class:`CausalTracer` for the arguments and
    :meth:`CausalTracer.trace` for ``token_range``.

    Defaults reproduce the paper: ν = 3σ with σ over the subject's token embeddings (pass
    ``texts=`` for σ over more subjects), 10 Gaussian samples, window 10 (clipped to the
    depth). ``prompt`` may be filled ("The Eiffel Tower is in" with subject "The Eiffel
    Tower") or have ``{}`` for the subject.
    """
    tracer = CausalTracer(model, tokenizer, noise_std=noise_std, texts=texts, samples=samples,
                          noise=noise, noise_multiple=noise_multiple,
                          uniform_noise=uniform_noise, replace=replace, seed=seed,
                          noise_rng=noise_rng, batch_size=batch_size, adapter=adapter,
                          progress=progress)
    return tracer.trace(prompt, subject, target, kinds=kinds, window=window,
                        token_range=token_range)


def as_trace_requests(records: Iterable[Any]) -> list[EditRequest]:
    """CounterFact dicts, ``EditRequest`` dicts or ``EditRequest`` objects → requests."""
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, EditRequest):
            out.append(rec)
        elif isinstance(rec, Mapping) and "requested_rewrite" in rec:
            out.append(EditRequest.from_counterfact(rec))
        elif isinstance(rec, Mapping):
            out.append(EditRequest.from_dict(rec))
        else:
            raise InvalidRequestError(
                f"records[{i}] is a {type(rec).__name__}; give CounterFact-format dicts or "
                "EditRequest objects"
            )
    return out


class TracedRecords(list):
    """The traces of :func:`trace_records` (a list of ``{kind: TraceResult}``, in record
    order), with ``skipped``: ``(index, request, predicted token)`` of each record not traced
    because the model does not predict its ``target_true``, and ``indices``: the record index
    of each trace."""

    def __init__(self, traces=(), skipped=(), indices=()):
        super().__init__(traces)
        self.skipped: list[tuple[int, EditRequest, str]] = list(skipped)
        self.indices: list[int] = list(indices)


#: What :func:`trace_records` traces: the model's top-1 token, skipping facts it gets wrong
#: (the reference), or every record's ``target_true``.
ANSWERS = ("predicted", "target_true")


def trace_records(model: nn.Module, tokenizer, records: Iterable[Any], *,
                  kinds: str | Iterable[str] | None = KINDS, window: int | None = None,
                  n: int | None = None, samples: int = DEFAULT_SAMPLES,
                  noise: float | None = None, noise_std: float | None = None,
                  noise_multiple: float | None = None, uniform_noise: bool = False,
                  replace: bool | str = False, token_range: str | Iterable[int] | None = None,
                  answer: str = "predicted", texts: Sequence[str] | None = None,
                  seed: int = 0, noise_rng: str = "torch", batch_size: int = 512,
                  adapter=None, progress: bool = True, group: Any = None) -> TracedRecords:
    """Trace the rewrite prompt of each record.

    ``answer="predicted"`` (default, the reference's ``calculate_hidden_flow(...,
    expect=...)``): trace the model's own top-1 token, and skip the records whose
    ``target_true`` (first token) is not that prediction: they are listed in the result's
    ``skipped`` and logged. ``answer="target_true"``: trace ``target_true`` on every record,
    predicted or not (``correct_prediction`` says which). Records without ``target_true``
    are traced on the model's prediction.

    σ defaults to :func:`embedding_std` over the records' subjects, as in the paper.

    With an initialised ``torch.distributed`` process ``group`` (e.g.
    ``torch.distributed.group.WORLD`` under torchrun), every rank traces every
    ``world``-th record (σ is still estimated from all the records' subjects, so the noise
    is the same as in one process) and every rank returns the full result in record order,
    equal to the one-process result; only rank 0 shows progress.
    """
    if answer not in ANSWERS:
        raise InvalidHyperParamsError(f"answer={answer!r} must be one of {ANSWERS}")
    requests = as_trace_requests(records)[:n] if n is not None else as_trace_requests(records)
    if not requests:
        raise InvalidRequestError("no records to trace; pass at least one record")
    if noise_std is None and texts is None:
        texts = [r.subject for r in requests]
    rank, world = rank_and_world(group)
    tracer = CausalTracer(model, tokenizer, noise_std=noise_std, texts=texts, samples=samples,
                          noise=noise, noise_multiple=noise_multiple,
                          uniform_noise=uniform_noise, replace=replace, seed=seed,
                          noise_rng=noise_rng, batch_size=batch_size, adapter=adapter)

    def trace_one(r: EditRequest) -> tuple[dict[str, TraceResult] | None, str]:
        skip = answer == "predicted" and r.target_true is not None
        res = tracer.trace(r.prompt, r.subject, r.target_true, kinds=kinds, window=window,
                           token_range=token_range, skip_wrong=skip)
        return (res or None), tracer.last_prediction

    # Each trace seeds its own noise (seed=), so a record's result does not depend on which
    # records were traced before it: sharding changes nothing but who computes it.
    mine = shard_indices(len(requests), rank, world)
    local = {i: trace_one(requests[i])
             for i in tqdm(mine, desc="causal trace", disable=not progress or rank != 0)}
    out = TracedRecords()
    for i, (res, predicted) in enumerate(gather_in_order(local, len(requests), group)):
        if res:
            out.append(res)
            out.indices.append(i)
        else:
            out.skipped.append((i, requests[i], predicted))
    weak = sum(next(iter(t.values())).weak_corruption for t in out)
    if weak > 1:
        logger.warning("the corruption barely moved the prediction on %d of %d traced records "
                       "(see their weak_corruption field)", weak, len(out))
    if out.skipped:
        logger.warning("skipped %d of %d records whose target_true the model does not predict "
                       "(as the reference does; answer='target_true' traces them too)",
                       len(out.skipped), len(requests))
    if not out:
        raise InvalidRequestError(
            f"the model predicts none of the {len(requests)} records' target_true, so nothing "
            "was traced; pass answer='target_true' to trace them anyway")
    return out
