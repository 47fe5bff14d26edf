"""MEMIT: mass editing of many facts at once across several MLP layers."""

from editkit.methods.memit import presets as _presets  # noqa: F401 - registers the presets
from editkit.methods.memit.hparams import MEMITHyperParams
from editkit.methods.memit.memit import MEMIT, check_no_conflicts, solve_layer_update

__all__ = ["MEMIT", "MEMITHyperParams", "check_no_conflicts", "solve_layer_update"]
