"""Where the float64 linear algebra of the closed-form updates runs.

ROME's ``C⁻¹k`` and MEMIT/AlphaEdit's ``(λC + KKᵀ)⁻¹K`` are solved in float64 (DESIGN:
numerics). They run on the device that holds the layer's keys, so that an edit of a model on
a GPU makes no round trip through host memory; a device without float64 (Apple's MPS) falls
back to the CPU, which is the one transfer editkit makes there.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT64_DEVICE_TYPES", "float64_on", "solve_device"]

#: Device types whose kernels support float64 solves and factorisations.
FLOAT64_DEVICE_TYPES = ("cpu", "cuda")


def solve_device(device: torch.device | str) -> torch.device:
    """``device`` itself when it supports float64, else the CPU."""
    device = torch.device(device)
    return device if device.type in FLOAT64_DEVICE_TYPES else torch.device("cpu")


def float64_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` detached, as float64, on ``device``."""
    return t.detach().to(device=device, dtype=torch.float64)
