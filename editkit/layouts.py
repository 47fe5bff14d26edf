"""Weight layouts and weight deltas: the leaf vocabulary ``patch`` and the adapters share.

``WeightLayout`` says how a projection stores its matrix; ``LowRank`` and ``Dense`` are deltas
expressed in that stored layout. Both :mod:`editkit.patch` (which applies and saves deltas)
and :mod:`editkit.models.adapter` (which turns keys→values updates into deltas) import them
from here, so neither needs the other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["Delta", "Dense", "LowRank", "WeightLayout"]


class WeightLayout(enum.Enum):
    """How a projection stores its weight.

    ``LINEAR``: ``torch.nn.Linear``, weight shape (out, in); ``y = W x``.
    ``CONV1D``: GPT-2's ``Conv1D``, weight shape (in, out); ``y = x W``.
    A square weight is ambiguous, so the layout is declared, never guessed from shapes.
    """

    LINEAR = "linear"
    CONV1D = "conv1d"


@dataclass(frozen=True)
class LowRank:
    """``Δ = u @ v.T`` with ``u`` (rows, r) and ``v`` (cols, r) in the parameter's layout."""

    u: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        if self.u.dim() != 2 or self.v.dim() != 2 or self.u.shape[1] != self.v.shape[1]:
            raise ValueError(
                f"LowRank needs u (rows, r) and v (cols, r); got {tuple(self.u.shape)} "
                f"and {tuple(self.v.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[0])

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def materialize(self) -> torch.Tensor:
        return self.u @ self.v.T

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "v": self.v}


@dataclass(frozen=True)
class Dense:
    """A full-size delta ``Δ`` with the parameter's shape."""

    delta: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    def materialize(self) -> torch.Tensor:
        return self.delta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"dense": self.delta}


Delta = LowRank | Dense
