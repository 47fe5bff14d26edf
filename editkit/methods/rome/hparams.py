"""Hyperparameters of ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Every knob of the paper and of its reference implementation is a typed field; module paths
are not (the adapter owns them). The key/value settings shared with MEMIT are the nested
``value`` config (:class:`~editkit.methods._locate.hparams.ValueHyperParams`). Published
defaults are presets (``editkit.methods.rome.presets``); other models get defaults scaled to
their depth (with a warning).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from editkit.methods._locate.hparams import (
    DEFAULT_CONTEXT_LENGTHS,
    MOM2_DTYPES,
    SMALL_MODEL_STATISTICS,
    LocateHyperParams,
    ValueHyperParams,
    accepts_flat_fields,
    check_statistics,
    scaled_layer,
)

__all__ = ["DEFAULT_CONTEXT_LENGTHS", "MOM2_DTYPES", "ROMEHyperParams"]


@accepts_flat_fields
@dataclasses.dataclass
class ROMEHyperParams(LocateHyperParams):
    """ROME's hyperparameters.

    Attributes:
        layer: Block whose MLP output projection (the adapter's ``mlp_out``) is edited.
        mom2_adjustment: Use ``u = C⁻¹k*`` (True, the paper) or plain ``u = k*``.
        mom2_dataset: Text source of C: ``"wikitext"``, ``"pydoc"``, ``"fact_world"``,
            ``"generated"`` (text sampled from the model) or a path to a local .txt/.jsonl
            file (see ``editkit.stats``).
        mom2_n_samples: Number of texts for C.
        mom2_max_length: Tokens per text for C (``None``: min(context length, 1024)).
        mom2_dtype: Precision C is kept in (``float32`` as in the reference, or ``float64``).
        mom2_update_weight: Scale λ applied to C before solving (``u = (λC)⁻¹k*``). ROME's
            rank-one update is invariant to it (u/uᵀk is scale free); kept for parity with
            MEMIT-style configurations.
        key_consistent: r-ROME (Gupta et al. 2024): insert the template-averaged key k* in
            the update, so that ``Ŵk* = v*``. ``False`` follows the reference, which uses the
            key of the bare prompt in the numerator and denominator of the update.
        value: The key/value settings shared with MEMIT (edited token, context prefixes, the
            v* optimisation of eq. 4); see ``ValueHyperParams``.
    """

    PRESET_METHOD: ClassVar[str] = "rome"

    layer: int = 5
    mom2_adjustment: bool = True
    mom2_dataset: str = "wikitext"
    mom2_n_samples: int = 100_000
    mom2_max_length: int | None = None
    mom2_dtype: str = "float32"
    mom2_update_weight: float = 1.0
    key_consistent: bool = False
    value: ValueHyperParams = dataclasses.field(default_factory=ValueHyperParams)

    @classmethod
    def scaled(cls, n_layers: int) -> ROMEHyperParams:
        """Defaults for a model without a preset.

        Layer ≈ n/3 (the published layers sit at 0.33 of the depth for GPT-2 medium, large
        and XL). Deep models read statistics from wikitext like the paper. Shallow (tiny or
        test) models read the offline Python docs with fewer samples, and drop the weight
        decay: the reference's term ``‖δ‖/‖v₀‖²`` is not scale free, and with the small MLP
        outputs of small models (‖v₀‖ ~ 0.01–0.1) its gradient outweighs the NLL's by orders
        of magnitude, so δ could not move; the norm clamp still bounds δ.
        """
        layer = scaled_layer(n_layers)
        if n_layers >= 12:
            return cls(layer=layer)
        return cls(layer=layer, value=ValueHyperParams(weight_decay=0.0),
                   **SMALL_MODEL_STATISTICS)

    # -------------------------------------------------------------- validation
    def validate(self, model, adapter) -> None:
        adapter.check_layer(model, self.layer, "layer")
        self.value.validate(model, adapter, edit_layer=self.layer)
        check_statistics(self)
        self.check_positive(mom2_update_weight=self.mom2_update_weight)
