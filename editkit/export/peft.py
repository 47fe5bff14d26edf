"""A :class:`~editkit.patch.Patch` as a PEFT LoRA adapter (``Patch.to_peft`` calls this).

Each delta becomes a LoRA pair on its module with ``lora_alpha = r`` (scaling 1), so
``B @ A`` is exactly the delta: for ``nn.Linear`` weights ``B = u``, ``A = vᵀ``; for GPT-2
``Conv1D`` weights (stored (in, out), ``fan_in_fan_out=True``) ``B = v``, ``A = uᵀ``. A
``Dense`` delta is factored by SVD at its numerical rank (exact to float precision; for
full-rank deltas the adapter is as large as the matrix).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from editkit.errors import EditkitError, PatchMismatchError
from editkit.layouts import Delta, LowRank, WeightLayout
from editkit.registry import get_adapter

if TYPE_CHECKING:  # typing only: patch imports this module to offer Patch.to_peft
    from editkit.patch import Patch

__all__ = ["lowrank_factors", "patch_to_peft"]


def patch_to_peft(patch: Patch, model: nn.Module, path: str | os.PathLike,
                  adapter_name: str = "default") -> Path:
    """Write ``patch`` as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads.

    ``model`` is the base model the patch applies to (for module names and weight layouts).
    Files go to ``path`` (``adapter_name="default"``) or ``path/adapter_name``, as PEFT's
    ``save_pretrained`` lays them out. Returns that directory.
    """
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise EditkitError("Patch.to_peft needs the 'peft' package: pip install peft") from exc

    patch.check_fits(model, force=True)
    fan_in_fan_out = get_adapter(model).layout is WeightLayout.CONV1D
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, delta in patch.deltas.items():
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf != "weight" or module is None or getattr(module, "weight", None) is None \
                or module.weight.dim() != 2:
            raise PatchMismatchError(
                f"{name} is not the weight matrix of a linear layer, so it cannot be a LoRA "
                "target; only patches of projection weights can be exported to PEFT"
            )
        u, v = lowrank_factors(delta)
        b, a = (v, u.T) if fan_in_fan_out else (u, v.T)
        prefix = f"base_model.model.{module_name}"
        tensors[f"{prefix}.lora_A.weight"] = a.float().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = b.float().contiguous().cpu()
        ranks[module_name] = int(u.shape[1])
    if not ranks:
        raise PatchMismatchError("the patch has no deltas; nothing to export")
    # PEFT has one default rank; modules of another rank go into its rank/alpha patterns.
    base_r = max(set(ranks.values()), key=list(ranks.values()).count)
    others = {m: r for m, r in ranks.items() if r != base_r}
    config = LoraConfig(
        r=base_r, lora_alpha=base_r, target_modules=sorted(ranks), lora_dropout=0.0,
        bias="none", fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM",
        rank_pattern=others, alpha_pattern=dict(others), inference_mode=True,
        base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None),
    )
    out = Path(path) if adapter_name == "default" else Path(path) / adapter_name
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, out / "adapter_model.safetensors")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def lowrank_factors(delta: Delta) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)`` with ``u @ v.T`` = the delta (parameter layout); SVD for dense deltas."""
    if isinstance(delta, LowRank):
        return delta.u, delta.v
    d = delta.delta.detach().to(torch.float64)
    left, s, right_t = torch.linalg.svd(d, full_matrices=False)
    tol = s.max() * max(d.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    k = max(int((s > tol).sum()), 1)
    return left[:, :k] * s[:k], right_t[:k].T
