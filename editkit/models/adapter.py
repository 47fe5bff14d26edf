"""``ModelAdapter``: where one architecture family keeps the modules editing needs.

An adapter is declarative: module paths relative to the model (embedding, final norm,
lm_head) or to one transformer block (MLP, attention, their projections), and the storage
layout of projection weights. It is the only place in editkit that knows module names, so
algorithms ask it for "the MLP output projection of layer 5" and for a keys→values view of
that matrix, and never transpose by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editkit.errors import InvalidHyperParamsError
from editkit.layouts import Dense, LowRank, WeightLayout

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
