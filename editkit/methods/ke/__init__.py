"""KnowledgeEditor (KE; De Cao et al. 2021): bi-LSTM-conditioned hypernetwork editor."""

from editkit.methods.ke.hparams import KEHyperParams, KETrainConfig
from editkit.methods.ke.ke import KE, KENet

__all__ = ["KE", "KEHyperParams", "KENet", "KETrainConfig"]
