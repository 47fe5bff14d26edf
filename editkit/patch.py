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

from editkit._version import __version__
from editkit.errors import EditFailedError, PatchMismatchError
from editkit.export.peft import patch_to_peft
from editkit.layouts import Delta, Dense, LowRank

__all__ = ["Delta", "Dense", "LowRank", "Patch", "load_patch", "parameter_fingerprints",
           "tensor_fingerprint"]

FORMAT_VERSION = 1
_META_KEY = "editkit"


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
        """Write this patch as a PEFT LoRA adapter; see :func:`editkit.export.peft.patch_to_peft`."""
        return patch_to_peft(self, model, path, adapter_name)


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
