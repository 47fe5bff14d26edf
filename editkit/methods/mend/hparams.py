"""Hyperparameters of MEND (Mitchell et al. 2022, "Fast Model Editing at Scale").

Reference values (eric-mitchell/mend, GPT-2 XL / GPT-J): the MLP input and output projections
of the last 3 blocks; a per-shape editor MLP with one hidden low-rank layer of rank 1920,
identity initialisation, running normalisation of u and δ; initial edit step size 1e-4
trained with its own learning rate ("lr-lr") 1e-4; Adam 1e-6 on the editor; loss
``cedit · L_edit + cloc · L_loc`` with cedit = 0.1, cloc = 1.0. Small models tolerate (and
need, to train in minutes) a larger editor learning rate and a smaller rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from editkit.errors import InvalidHyperParamsError
from editkit.methods._learned.hparams import LearnedHyperParams, LearnedTrainConfig


@dataclass
class MENDHyperParams(LearnedHyperParams):
    """Editor hyperparameters of MEND (see :class:`LearnedHyperParams` for the shared ones).

    ``rank``: rank of the low-rank residual layers of each per-shape editor network.
    ``n_blocks``: number of residual blocks ``z ← z + U·relu(V z + c) + d`` (U starts at 0,
    so the network starts as the identity).
    ``normalize``: divide u and δ feature-wise by running mean / standard deviation (kept
    per edited weight, updated while training) before the editor network.
    ``init_edit_lr``: initial value of each weight's learned step size η.
    """

    METHOD: ClassVar[str] = "mend"
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("layers", "slots", "rank", "n_blocks", "normalize")
    PUBLISHED: ClassVar[dict[str, dict[str, Any]]] = {}

    rank: int = 64
    n_blocks: int = 1
    normalize: bool = True
    init_edit_lr: float = 1e-3

    def validate(self, model, adapter) -> None:
        super().validate(model, adapter)
        self.check_positive(rank=self.rank, init_edit_lr=self.init_edit_lr)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool):
            raise InvalidHyperParamsError(f"MENDHyperParams.rank={self.rank!r} must be an integer")
        if not isinstance(self.n_blocks, int) or isinstance(self.n_blocks, bool) \
                or self.n_blocks < 0:
            raise InvalidHyperParamsError(
                f"MENDHyperParams.n_blocks={self.n_blocks!r} must be an integer ≥ 0")


@dataclass
class MENDTrainConfig(LearnedTrainConfig):
    """Training configuration of MEND (see :class:`LearnedTrainConfig` for the shared fields).

    ``lr``: Adam learning rate of the editor networks; ``lr_lr``: of the step sizes η.
    ``cedit`` / ``cloc``: weights of the edit loss and of the locality KL (reference 0.1 / 1).
    """

    lr: float = 1e-3
    lr_lr: float = 1e-3
    cedit: float = 0.1
    cloc: float = 1.0

    def validate(self) -> None:
        super().validate()
        for name in ("lr_lr", "cedit"):
            if not getattr(self, name) > 0:
                raise InvalidHyperParamsError(
                    f"MENDTrainConfig.{name}={getattr(self, name)!r} must be positive")
        if self.cloc < 0:
            raise InvalidHyperParamsError(f"MENDTrainConfig.cloc={self.cloc!r} must be ≥ 0")
