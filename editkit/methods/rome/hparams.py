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

from editkit.errors import InvalidHyperParamsError
from editkit.methods._locate.hparams import (
    DEFAULT_CONTEXT_LENGTHS,
    LocateHyperParams,
    ValueHyperParams,
    accepts_flat_fields,
)

MOM2_DTYPES = ("float32", "float64")

__all__ = ["DEFAULT_CONTEXT_LENGTHS", "MOM2_DTYPES", "ROMEHyperParams", "check_statistics"]


def check_statistics(hp) -> None:
    """Validate the ``mom2_*`` fields ROME and MEMIT share (statistics of C)."""
    if hp.mom2_dtype not in MOM2_DTYPES:
        raise InvalidHyperParamsError(f"mom2_dtype={hp.mom2_dtype!r}; use one of {MOM2_DTYPES}")
    n = hp.mom2_n_samples
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise InvalidHyperParamsError(f"mom2_n_samples={n!r} must be a positive integer")
    if hp.mom2_max_length is not None and (
            not isinstance(hp.mom2_max_length, int) or hp.mom2_max_length <= 0):
        raise InvalidHyperParamsError(
            f"mom2_max_length={hp.mom2_max_length!r} must be a positive integer or None")
    if not isinstance(hp.mom2_dataset, str) or not hp.mom2_dataset:
        raise InvalidHyperParamsError(
            f"mom2_dataset={hp.mom2_dataset!r}; use 'wikitext', 'pydoc', 'fact_world', "
            "'generated' or a path to a .txt/.jsonl file")


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
        layer = min(n_layers - 1, max(0, round(n_layers / 3)))
        if n_layers >= 12:
            return cls(layer=layer)
        return cls(layer=layer, value=ValueHyperParams(weight_decay=0.0), mom2_dataset="pydoc",
                   mom2_n_samples=10_000, mom2_max_length=128)

    # -------------------------------------------------------------- validation
    def validate(self, model, adapter) -> None:
        adapter.check_layer(model, self.layer, "layer")
        self.value.validate(model, adapter, edit_layer=self.layer)
        check_statistics(self)
        self.check_positive(mom2_update_weight=self.mom2_update_weight)
