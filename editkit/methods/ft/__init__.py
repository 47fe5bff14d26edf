"""FT / FT+L fine-tuning baselines."""

from editkit.methods.ft.ft import FT, FTL
from editkit.methods.ft.hparams import FTHyperParams, FTLHyperParams

__all__ = ["FT", "FTL", "FTHyperParams", "FTLHyperParams"]
