"""ROME: Rank-One Model Editing (Meng et al. 2022), with the r-ROME key fix as an option.

The steps ROME shares with MEMIT and AlphaEdit live in ``editkit.methods._locate``: context
prefixes sampled from the model (§3.1), the key k* averaged over them (eq. 3) and the value
v* found by optimising δ on the MLP output (eq. 4). This package is ROME itself:

- ``rome.py``: u = C⁻¹k* and the rank-one insertion Ŵ = W + (v* − Wk)uᵀ/(uᵀk) (eq. 2), and
  the ``ROME`` editor;
- ``hparams.py``: ``ROMEHyperParams`` (its own fields plus the shared ``value`` config);
- ``presets.py``: the published defaults, registered as presets.
"""

from editkit.methods._locate.hparams import ValueHyperParams
from editkit.methods._locate.keys import KeyResult, compute_key, keys_at
from editkit.methods._locate.templates import generate_context_templates
from editkit.methods._locate.values import (
    UpperLayers,
    ValueResult,
    ValueShortcuts,
    compute_value,
    compute_values,
)
from editkit.methods.rome import presets as _presets  # noqa: F401 - registers the presets
from editkit.methods.rome.hparams import ROMEHyperParams
from editkit.methods.rome.rome import (
    ROME,
    KeySolver,
    ROMEStep,
    left_vector,
    rank_one_update,
)

__all__ = [
    "ROME",
    "KeyResult",
    "KeySolver",
    "ROMEHyperParams",
    "ROMEStep",
    "UpperLayers",
    "ValueResult",
    "compute_key",
    "compute_value",
    "compute_values",
    "ValueShortcuts",
    "ValueHyperParams",
    "generate_context_templates",
    "keys_at",
    "left_vector",
    "rank_one_update",
]
