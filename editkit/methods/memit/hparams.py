"""Hyperparameters of MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer")."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from editkit.errors import InvalidHyperParamsError
from editkit.hparams import HyperParams
from editkit.methods.rome.hparams import DEFAULT_CONTEXT_LENGTHS, ROMEHyperParams

#: MEMIT's layers and λ for SmolLM2-135M (docs/smollm2.md).
SMOLLM2_MEMIT_LAYERS = (1, 2, 3, 4, 5)
SMOLLM2_MEMIT_LAMBDA = 100.0

_COMMON: dict[str, Any] = {
    "v_lr": 0.5,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "clamp_norm_factor": 0.75,
    "mom2_dataset": "wikitext",
    "mom2_n_samples": 100_000,
    "mom2_dtype": "float32",
}


@dataclasses.dataclass
class MEMITHyperParams(HyperParams):
    """MEMIT's hyperparameters.

    Attributes:
        layers: The critical MLP layers R, edited low to high. The target residual z is
            optimised at the output of the last of them.
        fact_token, context_template_length_params, context_template_seed: as in ROME.
        v_num_grad_steps, v_lr, v_loss_layer, v_weight_decay, clamp_norm_factor, kl_factor,
            v_early_stop_loss: the z optimisation (ROME's v* optimisation, with δ added to
            the residual stream instead of the MLP output; the clamp is relative to ‖h‖).
        mom2_update_weight: λ in Δ = R Kᵀ (λC + K Kᵀ)⁻¹ (paper eq. 14): how strongly the
            keys of generic text (second moment C) are preserved against the new keys K.
        mom2_dataset, mom2_n_samples, mom2_max_length, mom2_dtype: statistics of C
            (``editkit.stats``), computed for all layers in one pass.
    """

    layers: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    fact_token: str = "subject_last"
    context_template_length_params: tuple[tuple[int, int], ...] = DEFAULT_CONTEXT_LENGTHS
    context_template_seed: int = 0
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_early_stop_loss: float = 5e-2
    mom2_update_weight: float = 15_000.0
    mom2_dataset: str = "wikitext"
    mom2_n_samples: int = 100_000
    mom2_max_length: int | None = None
    mom2_dtype: str = "float32"

    # Reference values (MEMIT paper, Table/Appendix; the reference repository's hparams).
    PUBLISHED: ClassVar[dict[str, dict[str, Any]]] = {
        "gpt2-xl": {**_COMMON, "layers": (13, 14, 15, 16, 17), "v_num_grad_steps": 20,
                    "v_loss_layer": 47, "mom2_update_weight": 20_000.0},
        "gpt-j-6b": {**_COMMON, "layers": (3, 4, 5, 6, 7, 8), "v_num_grad_steps": 25,
                     "v_loss_layer": 27, "mom2_update_weight": 15_000.0},
        # editkit's choice for SmolLM2-135M (docs/smollm2.md): the early MLP site that
        # causal tracing finds at the subject's last token (layers 0-3) and the layers where a
        # ROME sweep edits well; λ from a small sweep.
        "smollm2-135m-instruct": {
            **_COMMON, "layers": SMOLLM2_MEMIT_LAYERS,
            "v_loss_layer": 29, "mom2_update_weight": SMOLLM2_MEMIT_LAMBDA,
            "mom2_dataset": "pydoc", "mom2_max_length": 256},
    }
    #: The offline fact world (4 layers, 128 hidden), statistics from its own corpus. A sweep
    #: on 20 records (batch of 20; ES/PS/NS): layers (0, 1) with λ 10 → 0.65/0.48/0.96 was
    #: the best; λ 1000 → 0.05/0.13/0.99, layers (1,) λ 1 → 0.40/0.40/0.80, (2,) λ 10 →
    #: 0.25/0.18/0.91, (1, 2) λ 10 → 0.40/0.28/0.88. See docs/methods/memit.md.
    FACT_WORLD: ClassVar[dict[str, Any]] = {
        "layers": (0, 1), "v_num_grad_steps": 25, "v_weight_decay": 0.0,
        "clamp_norm_factor": 4.0, "mom2_update_weight": 10.0, "mom2_dataset": "fact_world",
        "mom2_n_samples": 20_000, "mom2_max_length": 64,
    }

    def __post_init__(self) -> None:
        try:
            self.layers = tuple(int(x) for x in self.layers)
            self.context_template_length_params = tuple(
                (int(a), int(b)) for a, b in self.context_template_length_params)
        except (TypeError, ValueError) as exc:
            raise InvalidHyperParamsError(
                f"layers={self.layers!r} must be a list of integers and "
                "context_template_length_params a list of (length, count) pairs") from exc

    @classmethod
    def for_model(cls, model, adapter) -> MEMITHyperParams:
        from editkit.methods.rome.hparams import is_fact_world_model

        if is_fact_world_model(model):
            return cls(**cls.FACT_WORLD)
        return super().for_model(model, adapter)

    @classmethod
    def scaled(cls, n_layers: int) -> MEMITHyperParams:
        """Five consecutive layers ending at ≈ n/3 (GPT-2 XL: 13–17 of 48), fewer if shallow.

        Shallow models also take ROME's small-model choices (no weight decay, Python-docs
        statistics) and a smaller λ.
        """
        rome = ROMEHyperParams.scaled(n_layers)
        last = max(rome.layer, min(n_layers - 1, round(n_layers * 17 / 48)))
        width = 5 if n_layers >= 12 else max(1, min(2, last + 1))
        layers = tuple(range(last - width + 1, last + 1))
        if n_layers >= 12:
            return cls(layers=layers)
        return cls(layers=layers, v_weight_decay=0.0, clamp_norm_factor=4.0,
                   mom2_update_weight=1_000.0, mom2_dataset=rome.mom2_dataset,
                   mom2_n_samples=rome.mom2_n_samples, mom2_max_length=rome.mom2_max_length)

    def value_hparams(self) -> ROMEHyperParams:
        """The z optimisation's settings as ROME's value step reads them."""
        shared = {f.name for f in dataclasses.fields(ROMEHyperParams)} & {
            f.name for f in dataclasses.fields(self)}
        return ROMEHyperParams(layer=self.layers[-1],
                               **{n: getattr(self, n) for n in shared if n != "layers"})

    def validate(self, model, adapter) -> None:
        if not self.layers:
            raise InvalidHyperParamsError("layers is empty; give at least one layer index")
        for layer in self.layers:
            adapter.check_layer(model, layer, "layers entry")
        if list(self.layers) != sorted(set(self.layers)):
            raise InvalidHyperParamsError(
                f"layers={list(self.layers)} must be strictly increasing, e.g. [13, 14, 15]")
        self.value_hparams().validate(model, adapter)
        self.check_positive(mom2_update_weight=self.mom2_update_weight)
