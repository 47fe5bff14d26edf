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
from editkit.errors import EditFailedError, EditkitError, PatchMismatchError
from editkit.export.peft import patch_to_peft
from editkit.layouts import Delta, Dense, LowRank

__all__ = ["Delta", "Dense", "LowRank", "Patch", "load_patch", "parameter_fingerprints",
           "tensor_fingerprint", "tensors_digest"]

#: Version 2 added ``digest`` (sha256 of every tensor); version 1 files carry no digest.
FORMAT_VERSION = 2
_LEGACY_VERSIONS = (1,)
_META_KEY = "editkit"
#: Parts each delta kind stores in the file, as ``<parameter>::<part>`` tensors.
_PARTS = {"lowrank": ("u", "v"), "dense": ("dense",)}
#: Deepest nesting of the JSON header we read; editkit writes fewer than ten levels.
_MAX_DEPTH = 32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_fingerprint(tensor: torch.Tensor, as_dtype: torch.dtype | None = None) -> str:
    """Short content hash of a tensor (dtype, shape and bytes); with ``as_dtype``, the hash
    the tensor would have after ``tensor.to(as_dtype)``."""
    t = tensor.detach()
    t = (t.to(as_dtype) if as_dtype is not None else t).contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape: a 0-dim tensor cannot be viewed as bytes directly
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _write_parameter(param: torch.Tensor, value: torch.Tensor) -> None:
    # One seam for every weight write, so tests can inject a failure mid-transaction.
    param.copy_(value)


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
    def check_dtypes(self) -> None:
        """Raise ``PatchMismatchError`` if a delta is not a floating-point tensor."""
        for name, delta in self.deltas.items():
            for part, t in delta.tensors().items():
                if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
                    what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                    raise PatchMismatchError(
                        f"the delta for {name} ({part}) has dtype {what}; a patch holds "
                        "floating-point deltas only (float16, bfloat16, float32 or float64)"
                    )

    @torch.no_grad()
    def apply_to(self, model: nn.Module, force: bool = False, sign: float = 1.0) -> nn.Module:
        """Add the deltas to ``model``'s parameters in place (in their own dtype).

        All or nothing: every delta is checked and every new value computed before the
        first write, and if a write still fails the parameters already written are restored,
        so on any error the model is bit-for-bit unchanged.
        """
        self.check_fits(model, force=force)
        self.check_dtypes()
        self.check_finite()
        params = dict(model.named_parameters())
        new_values: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            p = params[name]
            update = delta.materialize().to(device=p.device, dtype=torch.float32)
            value = (p.float() + sign * update).to(p.dtype)
            # A finite delta can still overflow a half-precision weight to inf.
            if not bool((torch.isfinite(value) | ~torch.isfinite(p)).all()):
                raise EditFailedError(
                    f"adding the delta to {name} overflows its dtype {p.dtype} (the result "
                    "holds inf); the model was left unchanged. Load the model in float32 "
                    "or bfloat16 to apply this patch."
                )
            new_values[name] = value
        written: dict[str, torch.Tensor] = {}
        try:
            for name, value in new_values.items():
                written[name] = params[name].detach().clone()
                _write_parameter(params[name], value)
        except BaseException as exc:
            for name, old in written.items():
                params[name].copy_(old)
            if isinstance(exc, (EditkitError, KeyboardInterrupt, SystemExit)):
                raise
            raise EditFailedError(
                f"writing the delta of {name} failed ({type(exc).__name__}: {exc}); the "
                "parameters already written were restored, so the model is unchanged"
            ) from exc
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
        header = {"format_version": FORMAT_VERSION, "kinds": kinds,
                  "digest": tensors_digest(tensors), "metadata": self.metadata}
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


def load_patch(path: str | os.PathLike, *, force: bool = False) -> Patch:
    """Read a patch written by ``Patch.save``, refusing any file that fails validation.

    The header is checked against the format's schema, the tensors against the recorded
    sha256 digest (a flipped byte is refused), and every delta must be a finite
    floating-point tensor referenced by the header. A patch without a base fingerprint for
    every delta (so the wrong-base refusal could not work), or of the digest-less format 1,
    is refused unless ``force=True``. Every refusal is a :class:`PatchMismatchError`.
    """
    path = Path(path)
    where = repr(str(path))
    if not path.is_file():
        raise PatchMismatchError(f"no patch file at {where}; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise PatchMismatchError(f"{where} is not a readable safetensors patch: {exc}") from exc
    if raw is None:
        raise PatchMismatchError(f"{where} has no editkit metadata; it is not an editkit patch")
    header = _parse_header(raw, where)
    version = header["format_version"]
    if version in _LEGACY_VERSIONS:
        if not force:
            raise PatchMismatchError(
                f"{where} has format_version {version}, which carries no digest of its "
                f"tensors, so corruption cannot be detected; save the patch again with this "
                f"editkit (format {FORMAT_VERSION}), or pass force=True (--force) to load it "
                "unverified"
            )
    else:
        actual = tensors_digest(tensors)
        if actual != header["digest"]:
            raise PatchMismatchError(
                f"{where}: the tensors do not match the digest recorded in the header "
                f"(digest {header['digest'][:16]}…, tensors {actual[:16]}…); the file was "
                "modified or corrupted after it was saved. Use an intact copy of the patch"
            )
    deltas = _deltas_from(header["kinds"], tensors, where)
    patch = Patch(deltas, header["metadata"])
    fingerprint = header["metadata"].get("base_fingerprint") or {}
    unguarded = sorted(set(deltas) - set(fingerprint))
    if unguarded and not force:
        raise PatchMismatchError(
            f"{where} has no base_fingerprint for {unguarded[:3]}, so applying it to the wrong "
            "base model could not be refused; use the original patch file, or pass force=True "
            "(--force) to load it without that guard"
        )
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise PatchMismatchError(
                f"{where}: tensor {key!r} contains NaN or inf, which no edit should apply; "
                "use the original patch file or compute the edit again")
    return patch


def _depth(value: Any) -> int:
    # Iterative, so a hostile header cannot exhaust the interpreter stack here either.
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > _MAX_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _parse_header(raw: str, where: str) -> dict[str, Any]:
    """The header as a dict that satisfies the schema, else ``PatchMismatchError``."""
    try:
        header = json.loads(raw)
    except RecursionError as exc:
        raise PatchMismatchError(
            f"{where}: the editkit header is nested too deeply to read; it was not written by "
            "editkit. Use the original patch file") from exc
    except ValueError as exc:
        raise PatchMismatchError(
            f"{where}: the editkit header is not valid JSON ({exc}); the file is damaged. Use "
            "the original patch file") from exc
    if not isinstance(header, dict):
        raise PatchMismatchError(
            f"{where}: the editkit header must be a JSON object, got {type(header).__name__}; "
            "use the original patch file")
    if _depth(header) > _MAX_DEPTH:
        raise PatchMismatchError(
            f"{where}: the editkit header is nested deeper than {_MAX_DEPTH} levels; it was "
            "not written by editkit. Use the original patch file")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PatchMismatchError(
            f"{where}: format_version must be an integer, got {version!r}; use the original "
            "patch file")
    if version != FORMAT_VERSION and version not in _LEGACY_VERSIONS:
        raise PatchMismatchError(
            f"{where} has format_version {version}; this editkit reads format "
            f"{FORMAT_VERSION} (and {', '.join(map(str, _LEGACY_VERSIONS))} with force=True). "
            "Upgrade editkit if the patch comes from a newer one")
    required: dict[str, type] = {"kinds": dict, "metadata": dict}
    if version == FORMAT_VERSION:
        required["digest"] = str
    for key, kind in required.items():
        if key not in header:
            raise PatchMismatchError(
                f"{where}: the editkit header has no {key!r}; the file is damaged or not an "
                "editkit patch. Use the original patch file")
        if not isinstance(header[key], kind):
            raise PatchMismatchError(
                f"{where}: {key!r} must be a {kind.__name__}, got "
                f"{type(header[key]).__name__}; use the original patch file")
    for name, kind in header["kinds"].items():
        if kind not in _PARTS:
            raise PatchMismatchError(
                f"{where}: kinds[{name!r}] is {kind!r}; it must be one of {sorted(_PARTS)}. "
                "Use the original patch file")
    meta = header["metadata"]
    fingerprint = meta.get("base_fingerprint")
    if fingerprint is not None and not (
            isinstance(fingerprint, dict)
            and all(isinstance(v, str) for v in fingerprint.values())):
        raise PatchMismatchError(
            f"{where}: metadata.base_fingerprint must map parameter names to hash strings, "
            f"got {str(fingerprint)[:80]!r}; use the original patch file")
    stray = sorted(set(fingerprint or {}) - set(header["kinds"]))
    if stray:
        raise PatchMismatchError(
            f"{where}: metadata.base_fingerprint names {stray[:3]}, which the patch has no "
            "delta for; use the original patch file")
    for key, kinds in (("method", (str,)), ("requests", (list,)), ("hparams", (dict,)),
                       ("editkit_version", (str,)), ("model_type", (str,))):
        if meta.get(key) is not None and not isinstance(meta[key], kinds):
            raise PatchMismatchError(
                f"{where}: metadata.{key} must be a {kinds[0].__name__}, got "
                f"{type(meta[key]).__name__}; use the original patch file")
    if any(not isinstance(r, dict) for r in meta.get("requests") or ()):
        raise PatchMismatchError(
            f"{where}: metadata.requests must be a list of request objects; use the original "
            "patch file")
    return header


def _deltas_from(kinds: dict[str, str], tensors: dict[str, torch.Tensor],
                 where: str) -> dict[str, Delta]:
    """The deltas the header's ``kinds`` describe; every tensor must be used exactly once."""
    expected = {f"{name}::{part}" for name, kind in kinds.items() for part in _PARTS[kind]}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise PatchMismatchError(
            f"{where}: the header and the tensors disagree (missing tensors {missing[:3]}, "
            f"tensors the header does not list {extra[:3]}); use the original patch file")
    for key, t in tensors.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise PatchMismatchError(
                f"{where}: tensor {key!r} has dtype {t.dtype}; a patch holds floating-point "
                "deltas only. Use the original patch file")
    deltas: dict[str, Delta] = {}
    for name, kind in kinds.items():
        if kind == "lowrank":
            u, v = tensors[f"{name}::u"], tensors[f"{name}::v"]
            if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
                raise PatchMismatchError(
                    f"{where}: the low-rank delta of {name} has u {tuple(u.shape)} and v "
                    f"{tuple(v.shape)}; they must be (rows, r) and (cols, r). Use the original "
                    "patch file")
            deltas[name] = LowRank(u, v)
        else:
            deltas[name] = Dense(tensors[f"{name}::dense"])
    return deltas
