"""``ModelAdapter``: where one architecture family keeps the modules editing needs.

An adapter is declarative: module paths relative to the model (embedding, final norm,
lm_head) or to one transformer block (MLP, attention, their projections), and the storage
layout of projection weights. It is the only place in editkit that knows module names, so
algorithms ask it for "the MLP output projection of layer 5" and for a keys→values view of
that matrix, and never transpose by hand.

It also owns the parts of a family's forward that editkit re-implements when it replays
blocks instead of calling the whole model (the v* optimisation, causal tracing):

- :meth:`ModelAdapter.head`: residual stream → logits. Default final norm, then ``lm_head``,
  then :meth:`ModelAdapter.final_logits` (the ``logit_softcap`` field: ``c·tanh(z/c)``).
- :meth:`ModelAdapter.call_block`: how a block is called with a hidden state and the
  arguments the model's forward gave it, and how its output hidden state is read.
- :meth:`ModelAdapter.embedding_scale`: the factor the family multiplies embedding rows by
  (Gemma: √d); :meth:`ModelAdapter.embed` returns embeddings as the residual stream gets them.

A family whose forward differs overrides these (a subclass, see ``editkit/models/gemma2.py``);
the replay checks itself against the model's own forward once, so a piece the adapter gets
wrong is a typed error, never a silently wrong edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editkit.errors import InvalidHyperParamsError
from editkit.layouts import Dense, LowRank, WeightLayout
from editkit.models import compat

#: A block call as the model's forward made it: (positional args, keyword args).
Call = tuple[tuple[Any, ...], dict[str, Any]]

#: Module slots inside one transformer block.
BLOCK_SLOTS = ("mlp", "mlp_in", "mlp_gate", "mlp_out", "attn", "attn_out", "block")
#: Module slots of the whole model.
MODEL_SLOTS = ("embedding", "final_norm", "lm_head")


@dataclass(frozen=True)
class ModelAdapter:
    """Module map of one architecture family, keyed by ``config.model_type``.

    Block-relative paths (``mlp_out="mlp.c_proj"``) are joined to ``layers.{i}``.
    ``mlp_out`` is "the edited matrix" of ROME/MEMIT: its input is the MLP key
    (after the nonlinearity, for gated MLPs ``act(gate(x)) * up(x)``), its output the value.
    ``logit_softcap`` names the config attribute holding the cap ``c`` of a soft-capped head
    (``logits = c·tanh(z/c)``, e.g. Gemma 2's ``final_logit_softcapping``); ``None``: no cap.

    Subclasses override :meth:`final_logits`, :meth:`call_block`, :meth:`embedding_scale`
    where a family's forward differs from "embed, blocks in order, final norm, lm_head".
    """

    name: str
    layers: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn: str
    attn_out: str
    embedding: str
    final_norm: str
    lm_head: str
    layout: WeightLayout = WeightLayout.LINEAR
    mlp_gate: str | None = None
    logit_softcap: str | None = None

    # ------------------------------------------------------------------ paths
    def module_name(self, slot: str, layer: int | None = None) -> str:
        """Dotted module path of ``slot`` (of block ``layer`` for block slots)."""
        if slot in MODEL_SLOTS:
            return getattr(self, slot)
        if slot not in BLOCK_SLOTS:
            raise KeyError(f"unknown adapter slot {slot!r}; known: {BLOCK_SLOTS + MODEL_SLOTS}")
        if layer is None:
            raise ValueError(f"slot {slot!r} needs a layer index")
        if slot == "block":
            return f"{self.layers}.{layer}"
        relative = getattr(self, slot)
        if relative is None:
            raise KeyError(f"the {self.name} adapter has no {slot!r} module")
        return f"{self.layers}.{layer}.{relative}"

    def weight_name(self, slot: str, layer: int | None = None) -> str:
        """Parameter name of the weight of a projection slot, e.g. ``...mlp.c_proj.weight``."""
        return f"{self.module_name(slot, layer)}.weight"

    def module(self, model: nn.Module, slot: str, layer: int | None = None) -> nn.Module:
        return model.get_submodule(self.module_name(slot, layer))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def check_layer(self, model: nn.Module, layer: int, what: str = "layer") -> int:
        """Return ``layer`` if it indexes a block of ``model``, else raise a typed error."""
        n = self.num_layers(model)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise InvalidHyperParamsError(
                f"{what}={layer!r} is out of range for this {self.name} model with {n} layers; "
                f"use an integer in [0, {n - 1}]"
            )
        return layer

    # ------------------------------------------------------------ behaviour
    def final_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """The family's transform of ``lm_head``'s output; default: the soft cap, if any.

        ``c·tanh(z/c)`` computed as transformers does (divide, tanh, multiply), so the replayed
        logits equal the model's own bit for bit.
        """
        cap = getattr(model.config, self.logit_softcap, None) if self.logit_softcap else None
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def head(self, model: nn.Module, hidden: torch.Tensor,
             positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of residual-stream states ``hidden`` (the last block's output), at
        ``positions`` ``(rows, cols)`` only if given: final norm, ``lm_head``, :meth:`final_logits`."""
        if positions is not None:
            hidden = hidden[positions]
        hidden = self.module(model, "final_norm")(hidden)
        return self.final_logits(model, self.module(model, "lm_head")(hidden))

    @staticmethod
    def block_input(call: Call) -> torch.Tensor:
        """The hidden state of a recorded block call (first positional or ``hidden_states``)."""
        args, kwargs = call
        return args[0] if args else kwargs["hidden_states"]

    def call_block(self, block: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
        """Run ``block`` on ``hidden`` with the other arguments of a recorded ``call``
        (masks, positions, rotary tables, cache) and return its output hidden state."""
        args, kwargs = call
        if args:
            out = block(hidden, *args[1:], **kwargs)
        else:
            out = block(**{**kwargs, "hidden_states": hidden})
        return compat.block_output_hidden(out)

    def embedding_scale(self, model: nn.Module) -> float:
        """Factor the family multiplies embedding rows by before the first block (default 1)."""
        return 1.0

    def embedding_output_scale(self, model: nn.Module) -> float:
        """Factor the forward still applies to the embedding *module's output*: the
        :meth:`embedding_scale` unless the module applies it itself (see
        :func:`editkit.models.compat.embedding_module_scales`)."""
        scale = self.embedding_scale(model)
        if scale == 1.0 or compat.embedding_module_scales(self.module(model, "embedding")):
            return 1.0
        return scale

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the residual stream receives them (scaled; positional
        embeddings, which some families add afterwards, not included)."""
        out = compat.block_output_hidden(self.module(model, "embedding")(input_ids))
        scale = self.embedding_output_scale(model)
        return out if scale == 1.0 else out * scale

    # ------------------------------------------------- keys -> values algebra
    def kv_view(self, weight: torch.Tensor) -> torch.Tensor:
        """View ``weight`` as the (values × keys) matrix ``W`` with ``v = W k`` (no copy)."""
        return weight if self.layout is WeightLayout.LINEAR else weight.T

    def dense_delta(self, delta_kv: torch.Tensor) -> Dense:
        """Wrap a (values × keys) update as a ``Dense`` delta in the parameter's layout."""
        return Dense(self.kv_view(delta_kv).contiguous())

    def lowrank_delta(self, left: torch.Tensor, right: torch.Tensor) -> LowRank:
        """Wrap ``Δ = left @ right.T`` (values × keys; ``left`` (d_out, r), ``right`` (d_in, r))."""
        if left.dim() == 1:
            left, right = left[:, None], right[:, None]
        if self.layout is WeightLayout.LINEAR:
            return LowRank(left.contiguous(), right.contiguous())
        return LowRank(right.contiguous(), left.contiguous())
