"""MEND (Mitchell et al. 2022): gradient-decomposition hypernetwork editor."""

from editkit.methods.mend.hparams import MENDHyperParams, MENDTrainConfig
from editkit.methods.mend.mend import MEND, MENDNet

__all__ = ["MEND", "MENDHyperParams", "MENDNet", "MENDTrainConfig"]
