"""``Patch``: named weight deltas, their application, and safetensors serialisation.

A patch maps parameter names (``transformer.h.5.mlp.c_proj.weight``) to deltas expressed in
the parameter's own storage layout, either ``LowRank(u, v)`` (``Δ = u @ v.T``) or
``Dense(Δ)``. It also records what produced it (method, hyperparameters, requests, editkit
version) and a fingerprint of the base weights it was computed against, so applying it to a
different model is refused instead of silently corrupting it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from editkit.errors import EditFailedError, EditkitError, PatchMismatchError

FORMAT_VERSION = 1
_META_KEY = "editkit"


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
        """Shape of Δ in the parameter's layout: (rows of u, rows of v)."""
        return (self.u.shape[0], self.v.shape[0])

    @property
    def rank(self) -> int:
        """Number of rank-one terms (columns of u and v)."""
        return self.u.shape[1]

    def materialize(self) -> torch.Tensor:
        """The full Δ = u @ v.T."""
        return self.u @ self.v.T

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what ``save`` writes)."""
        return {"u": self.u, "v": self.v}


@dataclass(frozen=True)
class Dense:
    """A full-size delta ``Δ`` with the parameter's shape."""

    delta: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of Δ (the parameter's shape)."""
        return tuple(self.delta.shape)

    def materialize(self) -> torch.Tensor:
        """The full Δ."""
        return self.delta

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what ``save`` writes)."""
        return {"dense": self.delta}


Delta = LowRank | Dense


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """Short content hash of a tensor (dtype, shape and bytes)."""
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def parameter_fingerprints(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    params = dict(model.named_parameters())
    return {name: tensor_fingerprint(params[name]) for name in names}


@dataclass
class Patch:
    """Named weight deltas plus the metadata needed to reapply, audit and revert them.

    Build one with :meth:`for_edit` (or ``editor.make_patch`` inside a method); read one
    with :func:`load_patch`.
    """

    deltas: dict[str, Delta]
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_edit(cls, model: nn.Module, deltas: dict[str, Delta], *, method: str,
                 hparams: Any = None, requests: Iterable[Any] = (), **metadata: Any) -> Patch:
        """The public constructor of an edit's patch, for methods and plugins.

        ``deltas`` maps parameter names of ``model`` to :class:`LowRank` / :class:`Dense`
        deltas in the parameter's layout (``adapter.lowrank_delta`` / ``dense_delta`` build
        them). The metadata records ``method``, ``hparams`` (a ``HyperParams`` or a dict),
        ``requests`` (``EditRequest``\\ s), the editkit version, the model type and the
        fingerprint of the touched parameters as they are now (so that applying the patch
        to other weights is refused); ``metadata`` adds entries.
        """
        from editkit import __version__

        if hparams is not None and not isinstance(hparams, dict):
            hparams = hparams.to_dict()
        meta = {
            "method": method,
            "hparams": hparams,
            "requests": [r.to_dict() if hasattr(r, "to_dict") else r for r in requests],
            "editkit_version": __version__,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "base_fingerprint": parameter_fingerprints(model, deltas),
            **metadata,
        }
        return cls(dict(deltas), meta)

    # --------------------------------------------------------------- checks
    @property
    def names(self) -> list[str]:
        """Names of the parameters this patch changes."""
        return list(self.deltas)

    @property
    def base_fingerprint(self) -> dict[str, str]:
        """Parameter name → content hash of the base weights the patch was computed on."""
        return dict(self.metadata.get("base_fingerprint", {}))

    def stamp_base(self, model: nn.Module) -> Patch:
        """Record the fingerprint of the parameters this patch touches, as they are now."""
        self.metadata["base_fingerprint"] = parameter_fingerprints(model, self.deltas)
        return self

    def check_finite(self) -> None:
        """Raise :class:`EditFailedError` if any delta holds NaN or inf."""
        for name, delta in self.deltas.items():
            for part, t in delta.tensors().items():
                if not torch.isfinite(t).all():
                    raise EditFailedError(
                        f"the update for {name} ({part}) contains NaN or inf; the model was "
                        "left unchanged. Lower the learning rate / step count, or check the "
                        "request and the statistics."
                    )

    def check_fits(self, model: nn.Module, force: bool = False) -> None:
        """Raise ``PatchMismatchError`` unless every delta fits a parameter of ``model``.

        Names and shapes must match. Unless ``force``, the touched parameters must also have
        the fingerprint recorded when the patch was made (the same base weights).
        """
        params = dict(model.named_parameters())
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise PatchMismatchError(
                f"the model has no parameter(s) {missing}; this patch was made for another "
                "architecture. Apply it to a model of the kind it was computed on."
            )
        for name, delta in self.deltas.items():
            if tuple(params[name].shape) != tuple(delta.shape):
                raise PatchMismatchError(
                    f"{name}: the patch's delta has shape {tuple(delta.shape)} but the model's "
                    f"parameter has {tuple(params[name].shape)}; apply it to the model it was "
                    "computed on."
                )
        if force or not self.base_fingerprint:
            return
        actual = parameter_fingerprints(model, self.deltas)
        differing = [n for n, fp in self.base_fingerprint.items() if actual.get(n) != fp]
        if differing:
            raise PatchMismatchError(
                f"the weights of {differing} differ from the base this patch was computed on "
                "(fingerprint mismatch). Apply it to that base model, or pass force=True to "
                "apply it anyway."
            )

    # -------------------------------------------------------------- applying
    @torch.no_grad()
    def apply_to(self, model: nn.Module, force: bool = False, sign: float = 1.0) -> nn.Module:
        """Add the deltas to ``model``'s parameters in place (in their own dtype)."""
        self.check_fits(model, force=force)
        self.check_finite()
        params = dict(model.named_parameters())
        for name, delta in self.deltas.items():
            p = params[name]
            update = delta.materialize().to(device=p.device, dtype=torch.float32)
            p.copy_((p.float() + sign * update).to(p.dtype))
        return model

    def remove_from(self, model: nn.Module) -> nn.Module:
        """Subtract the deltas (approximate in floating point; use ``Editor.revert`` for exact)."""
        return self.apply_to(model, force=True, sign=-1.0)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file: the delta tensors plus JSON metadata (no pickle)."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, str] = {}
        for name, delta in self.deltas.items():
            kinds[name] = "lowrank" if isinstance(delta, LowRank) else "dense"
            for part, t in delta.tensors().items():
                tensors[f"{name}::{part}"] = t.detach().contiguous().cpu()
        header = {"format_version": FORMAT_VERSION, "kinds": kinds, "metadata": self.metadata}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(header, default=str)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def to_dict_summary(self) -> dict[str, Any]:
        """A JSON-able overview: per parameter, the delta kind and shape."""
        return {
            name: {"kind": type(d).__name__, "shape": list(d.shape)}
            for name, d in self.deltas.items()
        }

    # ------------------------------------------------------------ PEFT export
    def to_peft(self, model: nn.Module, path: str | os.PathLike,
                adapter_name: str = "default") -> Path:
        """Write this patch as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads.

        Each delta becomes a LoRA pair on its module with ``lora_alpha = r`` (scaling 1), so
        ``B @ A`` is exactly the delta: for ``nn.Linear`` weights ``B = u``, ``A = vᵀ``; for
        GPT-2 ``Conv1D`` weights (stored (in, out), ``fan_in_fan_out=True``) ``B = v``,
        ``A = uᵀ``. A ``Dense`` delta is factored by SVD at its numerical rank (exact to
        float precision; for full-rank deltas the adapter is as large as the matrix).

        ``model`` is the base model the patch applies to (for module names and weight
        layouts). Files go to ``path`` (``adapter_name="default"``) or ``path/adapter_name``,
        as PEFT's ``save_pretrained`` lays them out. Returns that directory.
        """
        try:
            from peft import LoraConfig
        except ImportError as exc:
            raise EditkitError("Patch.to_peft needs the 'peft' package: pip install peft") from exc
        from editkit.models.adapter import WeightLayout
        from editkit.registry import get_adapter

        self.check_fits(model, force=True)
        fan_in_fan_out = get_adapter(model).layout is WeightLayout.CONV1D
        modules = dict(model.named_modules())
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for name, delta in self.deltas.items():
            module_name, _, leaf = name.rpartition(".")
            module = modules.get(module_name)
            if leaf != "weight" or module is None or getattr(module, "weight", None) is None \
                    or module.weight.dim() != 2:
                raise PatchMismatchError(
                    f"{name} is not the weight matrix of a linear layer, so it cannot be a LoRA "
                    "target; only patches of projection weights can be exported to PEFT"
                )
            u, v = _lowrank_factors(delta)
            b, a = (v, u.T) if fan_in_fan_out else (u, v.T)
            prefix = f"base_model.model.{module_name}"
            tensors[f"{prefix}.lora_A.weight"] = a.float().contiguous().cpu()
            tensors[f"{prefix}.lora_B.weight"] = b.float().contiguous().cpu()
            ranks[module_name] = int(u.shape[1])
        if not ranks:
            raise PatchMismatchError("the patch has no deltas; nothing to export")
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


def _lowrank_factors(delta: Delta) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)`` with ``u @ v.T`` = the delta (parameter layout); SVD for dense deltas."""
    if isinstance(delta, LowRank):
        return delta.u, delta.v
    d = delta.delta.detach().to(torch.float64)
    left, s, right_t = torch.linalg.svd(d, full_matrices=False)
    tol = s.max() * max(d.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    k = max(int((s > tol).sum()), 1)
    return left[:, :k] * s[:k], right_t[:k].T


def load_patch(path: str | os.PathLike) -> Patch:
    """Read a patch written by ``Patch.save``."""
    path = Path(path)
    if not path.is_file():
        raise PatchMismatchError(f"no patch file at {str(path)!r}; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise PatchMismatchError(f"{str(path)!r} is not a readable safetensors patch: {exc}") from exc
    if raw is None:
        raise PatchMismatchError(f"{str(path)!r} has no editkit metadata; it is not an editkit patch")
    header = json.loads(raw)
    deltas: dict[str, Delta] = {}
    for name, kind in header["kinds"].items():
        if kind == "lowrank":
            deltas[name] = LowRank(tensors[f"{name}::u"], tensors[f"{name}::v"])
        else:
            deltas[name] = Dense(tensors[f"{name}::dense"])
    return Patch(deltas, header.get("metadata", {}))
