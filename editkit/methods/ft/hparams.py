"""Hyperparameters of fine-tuning baselines FT and FT+L (Zhu et al. 2020; ROME paper §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from editkit.errors import InvalidHyperParamsError
from editkit.hparams import HyperParams

_SLOTS = ("mlp_out", "mlp_in", "attn_out")


@dataclass
class FTHyperParams(HyperParams):
    """Fine-tune one weight matrix on the target's NLL.

    ``layer``: block whose ``slot`` weight is trained (default the MLP output projection).
    ``norm_constraint``: ε of FT+L; after every Adam step each entry of ``W − W₀`` is clamped
    to [−ε, ε]. ``None`` (FT) leaves the change unconstrained.
    ``early_stop_loss``: stop once the mean target NLL falls below it.
    """

    layer: int = 0
    slot: str = "mlp_out"
    lr: float = 5e-4
    num_steps: int = 25
    weight_decay: float = 0.0
    norm_constraint: float | None = None
    early_stop_loss: float = 1e-2

    # ROME paper's FT baseline: GPT-2 XL layer 1, Adam 5e-4, 25 steps; GPT-J layer 21.
    PUBLISHED: ClassVar[dict[str, dict[str, Any]]] = {
        "gpt2-xl": {"layer": 1, "lr": 5e-4, "num_steps": 25},
        "gpt-j-6b": {"layer": 21, "lr": 5e-4, "num_steps": 25},
    }

    @classmethod
    def scaled(cls, n_layers: int) -> FTHyperParams:
        # Small models tolerate (and need) a larger step to move a fact in 25 steps.
        return cls(layer=min(1, n_layers - 1), lr=5e-3, num_steps=25)

    def validate(self, model, adapter) -> None:
        adapter.check_layer(model, self.layer, "layer")
        if self.slot not in _SLOTS:
            raise InvalidHyperParamsError(f"slot={self.slot!r}; use one of {_SLOTS}")
        self.check_positive(lr=self.lr, num_steps=self.num_steps)
        if not isinstance(self.num_steps, int):
            raise InvalidHyperParamsError(f"num_steps={self.num_steps!r} must be an integer")
        if self.norm_constraint is not None:
            self.check_positive(norm_constraint=self.norm_constraint)
        if self.weight_decay < 0:
            raise InvalidHyperParamsError(f"weight_decay={self.weight_decay!r} must be ≥ 0")


@dataclass
class FTLHyperParams(FTHyperParams):
    """FT+L: fine-tuning with an L∞ bound ε on the weight change (default on)."""

    norm_constraint: float | None = 5e-4

    # ROME paper's FT+L: GPT-2 XL layer 0, ε = 5e-4; GPT-J layer 21, ε = 5e-5.
    PUBLISHED: ClassVar[dict[str, dict[str, Any]]] = {
        "gpt2-xl": {"layer": 0, "lr": 5e-4, "num_steps": 25, "norm_constraint": 5e-4},
        "gpt-j-6b": {"layer": 21, "lr": 5e-4, "num_steps": 25, "norm_constraint": 5e-5},
    }

    @classmethod
    def scaled(cls, n_layers: int) -> FTLHyperParams:
        return cls(layer=min(1, n_layers - 1), lr=5e-3, num_steps=25, norm_constraint=5e-3)
