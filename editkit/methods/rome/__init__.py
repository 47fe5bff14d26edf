"""ROME: Rank-One Model Editing (Meng et al. 2022), with the r-ROME key fix as an option.

Files follow the paper's steps:

- ``templates.py``: context prefixes sampled from the model (§3.1);
- ``compute_k.py``: the key k*, averaged over prefixes (eq. 3);
- ``compute_v.py``: the value v*, by optimising δ on the MLP output (eq. 4), re-running only
  the layers above the edited one;
- ``rome.py``: u = C⁻¹k* and the rank-one insertion Ŵ = W + (v* − Wk)uᵀ/(uᵀk) (eq. 2), and
  the ``ROME`` editor;
- ``hparams.py``: ``ROMEHyperParams`` with published and scaled defaults.
"""

from editkit.methods._locate.keys import KeyResult, compute_key, keys_at
from editkit.methods._locate.templates import generate_context_templates
from editkit.methods._locate.values import UpperLayers, ValueResult, compute_value
from editkit.methods.rome.hparams import ROMEHyperParams, is_fact_world_model
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
    "generate_context_templates",
    "is_fact_world_model",
    "keys_at",
    "left_vector",
    "rank_one_update",
]
