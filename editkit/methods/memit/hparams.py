"""Hyperparameters of MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer")."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from editkit.errors import InvalidHyperParamsError
from editkit.methods._locate import hparams as locate
from editkit.methods._locate.hparams import LocateHyperParams, ValueHyperParams


def memit_value() -> ValueHyperParams:
    """MEMIT's z optimisation: 25 steps and ‖δ‖ ≤ 0.75 ‖h‖ (the reference's GPT-J values)."""
    return ValueHyperParams(num_grad_steps=25, clamp_norm_factor=0.75)


@locate.accepts_flat_fields
@dataclasses.dataclass
class MEMITHyperParams(LocateHyperParams):
    """MEMIT's hyperparameters.

    Attributes:
        layers: The critical MLP layers R, edited low to high. The target residual z is
            optimised at the output of the last of them.
        mom2_update_weight: λ in Δ = R Kᵀ (λC + K Kᵀ)⁻¹ (paper eq. 14): how strongly the
            keys of generic text (second moment C) are preserved against the new keys K.
        mom2_dataset, mom2_n_samples, mom2_max_length, mom2_dtype: statistics of C
            (``editkit.stats``), computed for all layers in one pass.
        value: The key/value settings shared with ROME; here δ is added to the residual
            stream at the last layer of ``layers`` (z, paper eq. 16), and the clamp is
            relative to ‖h‖.
    """

    PRESET_METHOD: ClassVar[str] = "memit"

    layers: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    mom2_update_weight: float = 15_000.0
    mom2_dataset: str = "wikitext"
    mom2_n_samples: int = 100_000
    mom2_max_length: int | None = None
    mom2_dtype: str = "float32"
    value: ValueHyperParams = dataclasses.field(default_factory=memit_value)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.layers = tuple(int(x) for x in self.layers)
        except (TypeError, ValueError) as exc:
            raise InvalidHyperParamsError(
                f"layers={self.layers!r} must be a list of integers") from exc

    @classmethod
    def scaled(cls, n_layers: int) -> MEMITHyperParams:
        """Five consecutive layers ending at ≈ n/3 (GPT-2 XL: 13–17 of 48), fewer if shallow.

        Shallow models also take ROME's small-model choices (no weight decay, Python-docs
        statistics) and a smaller λ.
        """
        last = max(locate.scaled_layer(n_layers), min(n_layers - 1, round(n_layers * 17 / 48)))
        width = 5 if n_layers >= 12 else max(1, min(2, last + 1))
        layers = tuple(range(last - width + 1, last + 1))
        if n_layers >= 12:
            return cls(layers=layers)
        return cls(layers=layers,
                   value=dataclasses.replace(memit_value(), weight_decay=0.0,
                                             clamp_norm_factor=4.0),
                   mom2_update_weight=1_000.0, **locate.SMALL_MODEL_STATISTICS)

    def validate(self, model, adapter) -> None:
        if not self.layers:
            raise InvalidHyperParamsError("layers is empty; give at least one layer index")
        for layer in self.layers:
            adapter.check_layer(model, layer, "layers entry")
        if list(self.layers) != sorted(set(self.layers)):
            raise InvalidHyperParamsError(
                f"layers={list(self.layers)} must be strictly increasing, e.g. [13, 14, 15]")
        self.value.validate(model, adapter, edit_layer=self.layers[-1])
        locate.check_statistics(self)
        self.check_positive(mom2_update_weight=self.mom2_update_weight)
