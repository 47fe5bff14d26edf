"""AlphaEdit: MEMIT with updates projected onto the null space of preserved knowledge."""

from editkit.methods.alphaedit import presets as _presets  # noqa: F401 - registers presets
from editkit.methods.alphaedit.alphaedit import (
    AlphaEdit,
    AlphaEditHyperParams,
    null_space_projector,
    solve_projected_update,
)

__all__ = ["AlphaEdit", "AlphaEditHyperParams", "null_space_projector", "solve_projected_update"]
