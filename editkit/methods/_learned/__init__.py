"""Shared machinery of the hypernetwork editors (MEND, KE).

- :mod:`.factors`: rank-one-per-token gradient factors ``(u, δ)`` of linear layers, factored
  weight deltas and the hooks that evaluate a batch of different edits in one pass;
- :mod:`.data`: records → edit examples, subject-disjoint splits, training batches;
- :mod:`.training`: the training loop (validation, early stopping, resumable checkpoints,
  logs and curves);
- :mod:`.io`: hypernetwork directories (safetensors + JSON) and base-model fingerprints;
- :mod:`.editor`: ``LearnedEditor``, the ``Editor`` base class of MEND and KE;
- :mod:`.cli`: the shared implementation of `editkit train-mend` and `editkit train-ke`.
"""

from editkit.methods._learned.data import (
    EditExample,
    as_requests,
    build_examples,
    split_by_subject,
)
from editkit.methods._learned.editor import LearnedEditor
from editkit.methods._learned.factors import (
    FactoredDelta,
    GradFactors,
    WeightSpec,
    capture_factors,
    rowwise_deltas,
)
from editkit.methods._learned.hparams import LearnedHyperParams, LearnedTrainConfig
from editkit.methods._learned.training import EditContext, HypernetTrainer, Objective

__all__ = [
    "EditContext", "EditExample", "FactoredDelta", "GradFactors", "HypernetTrainer",
    "LearnedEditor", "LearnedHyperParams", "LearnedTrainConfig", "Objective", "WeightSpec",
    "as_requests", "build_examples", "capture_factors", "rowwise_deltas",
    "split_by_subject",
]
