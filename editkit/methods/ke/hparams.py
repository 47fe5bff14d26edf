"""Hyperparameters of KnowledgeEditor (KE; De Cao et al. 2021, "Editing Factual Knowledge in
Language Models").

The paper edits BERT / BART with a bi-LSTM over the edit text, per-parameter feed-forward
heads producing low-rank factors, and a constrained objective (edit loss subject to a KL
margin, Lagrangian relaxation). Its numbers are for those models; the defaults here are for
small GPT-style models (the same weights as MEND: MLP in/out projections of the last 3 blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from editkit.errors import InvalidHyperParamsError
from editkit.methods._learned.hparams import LearnedHyperParams, LearnedTrainConfig


@dataclass
class KEHyperParams(LearnedHyperParams):
    """Editor hyperparameters of KE (see :class:`LearnedHyperParams` for the shared ones).

    ``lstm_hidden``: hidden size of each direction of the bi-LSTM over the edit text.
    ``head_hidden``: hidden size of each edited weight's feed-forward head.
    ``rank``: number of rank-one terms in α̂ and β̂ (the paper: 1).
    ``normalize_grad``: divide ∇W by its Frobenius norm before the head scales it, so one
    learned per-layer scale fits models of any size (the paper feeds the raw gradient).
    ``init_scale``: initial per-layer scale; the untrained editor then takes a normalised
    gradient-descent step of Frobenius norm ``init_scale / 4``.
    ``max_condition_tokens``: the edit text is cut to this many tokens.
    """

    METHOD: ClassVar[str] = "ke"
    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "layers", "slots", "lstm_hidden", "head_hidden", "rank", "normalize_grad")
    PUBLISHED: ClassVar[dict[str, dict[str, Any]]] = {}

    lstm_hidden: int = 128
    head_hidden: int = 64
    rank: int = 1
    normalize_grad: bool = True
    init_scale: float = 1.0
    max_condition_tokens: int = 64

    def validate(self, model, adapter) -> None:
        super().validate(model, adapter)
        for name in ("lstm_hidden", "head_hidden", "rank", "max_condition_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidHyperParamsError(
                    f"KEHyperParams.{name}={value!r} must be a positive integer")
        self.check_positive(init_scale=self.init_scale)


@dataclass
class KETrainConfig(LearnedTrainConfig):
    """Training configuration of KE (see :class:`LearnedTrainConfig` for the shared fields).

    Constrained objective: minimise the edit loss subject to ``L_loc ≤ margin``, as the
    Lagrangian ``L_edit + λ (L_loc − margin)``; the hypernetwork descends it, λ = softplus(ρ)
    ascends it (Adam on ρ with ``lr_lambda``), starting from ``init_lambda``.
    ``val_kl_weight``: validation objective for early stopping,
    ``L_edit + val_kl_weight · max(0, L_loc − margin)``.
    """

    lr: float = 1e-3
    margin: float = 1e-3
    init_lambda: float = 1.0
    lr_lambda: float = 1e-2
    val_kl_weight: float = 10.0

    def validate(self) -> None:
        super().validate()
        for name in ("margin", "init_lambda", "lr_lambda"):
            if not getattr(self, name) > 0:
                raise InvalidHyperParamsError(
                    f"KETrainConfig.{name}={getattr(self, name)!r} must be positive")
        if self.val_kl_weight < 0:
            raise InvalidHyperParamsError(
                f"KETrainConfig.val_kl_weight={self.val_kl_weight!r} must be ≥ 0")
