"""Saving and loading trained hypernetworks: one directory, safetensors + JSON, no pickle.

A hypernetwork directory holds

- ``hypernet.safetensors``: every parameter and buffer of the hypernetwork;
- ``hypernet.json``: format version, method, editkit version, the editor hyperparameters it
  was trained with (which weights it edits, its architecture), a fingerprint of the base
  model (content hash of every edited weight, model type, number of blocks) and a training
  summary.

A hypernetwork only makes sense for the weights it was trained on, so loading it for a model
whose edited weights have another fingerprint raises :class:`HypernetworkMismatchError`.
The fingerprint is taken of the *unedited* weights: if the model already carries edits, the
originals recorded by its edit history are hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from editkit.errors import HypernetworkMismatchError, HypernetworkMissingError
from editkit.patch import tensor_fingerprint

HYPERNET_FILE = "hypernet.safetensors"
CONFIG_FILE = "hypernet.json"
FORMAT_VERSION = 1


def base_fingerprint(model: nn.Module, adapter, param_names: Sequence[str]) -> dict[str, Any]:
    """Fingerprint of the base weights a hypernetwork edits (originals if already edited)."""
    from editkit.editor import EditHistory

    history = model.__dict__.get(EditHistory._ATTR)
    originals = history.originals if history is not None else {}
    params = dict(model.named_parameters())
    fps = {n: tensor_fingerprint(originals.get(n, params[n])) for n in param_names}
    desc = {
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "n_layers": adapter.num_layers(model),
        "parameters": fps,
    }
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]
    return {"digest": digest, **desc}


def check_fingerprint(stored: Mapping[str, Any], actual: Mapping[str, Any], where: str) -> None:
    """Raise ``HypernetworkMismatchError`` naming what differs between two fingerprints."""
    if stored.get("digest") == actual.get("digest"):
        return
    if stored.get("model_type") != actual.get("model_type") or \
            stored.get("n_layers") != actual.get("n_layers"):
        what = (f"it was trained for a {stored.get('model_type')} model with "
                f"{stored.get('n_layers')} blocks, this is a {actual.get('model_type')} model "
                f"with {actual.get('n_layers')} blocks")
    else:
        sp, ap = stored.get("parameters", {}), actual.get("parameters", {})
        differing = sorted(n for n in set(sp) | set(ap) if sp.get(n) != ap.get(n))
        what = f"the weights {differing} differ from those it was trained on"
    raise HypernetworkMismatchError(
        f"the hypernetwork in {where} does not fit this model: {what}. Train one for this "
        "model (Editor.train(...) or `editkit train-<method> --model ...`), or pass "
        "hparams with check_fingerprint=False to use it anyway"
    )


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are shareable artefacts
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, atomically (temp file + rename)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(flat, tmp, metadata=dict(metadata or {})))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_json(path: str | os.PathLike, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str)

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    _atomic_write(Path(path), write)


def save_hypernet(path: str | os.PathLike, hypernet: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``hypernet``'s parameters and buffers and its JSON description into ``path``."""
    from editkit._version import __version__

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / HYPERNET_FILE, hypernet.state_dict(), {"format": "pt"})
    write_json(out / CONFIG_FILE, {"format_version": FORMAT_VERSION,
                                   "editkit_version": __version__, **meta})
    return out


def load_hypernet_files(path: str | os.PathLike, method: str
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, description)`` of the hypernetwork directory ``path``."""
    p = Path(path)
    if p.is_file() and p.name in (HYPERNET_FILE, CONFIG_FILE):
        p = p.parent
    if not (p / CONFIG_FILE).is_file() or not (p / HYPERNET_FILE).is_file():
        raise HypernetworkMissingError(
            f"no trained {method} hypernetwork in {str(p)!r} (expected {HYPERNET_FILE} and "
            f"{CONFIG_FILE}); train one with {method.upper()}.train(model, tokenizer, "
            f"train_records, val_records, config) or `editkit train-{method} --model MODEL "
            f"--data DATA --out {p}`"
        )
    try:
        meta = json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))
        state = load_tensors(p / HYPERNET_FILE)
    except Exception as exc:  # unreadable JSON or safetensors
        raise HypernetworkMismatchError(
            f"{str(p)!r} does not hold a readable hypernetwork ({type(exc).__name__}: {exc}); "
            "retrain it"
        ) from exc
    if meta.get("method") != method:
        raise HypernetworkMismatchError(
            f"{str(p)!r} holds a {meta.get('method')!r} hypernetwork, not a {method!r} one; "
            f"load it with the {meta.get('method')!r} editor or train a {method} hypernetwork"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise HypernetworkMismatchError(
            f"{str(p)!r} was written by a newer editkit (format {meta.get('format_version')}); "
            "upgrade editkit"
        )
    return state, meta


def shipped_dir(method: str) -> Path:
    """``editkit/methods/<method>/data``: hypernetworks shipped with the package."""
    return Path(__file__).resolve().parent.parent / method / "data"


def find_shipped_hypernet(method: str, model: nn.Module, adapter
                          ) -> tuple[Path, dict[str, Any]] | None:
    """A shipped hypernetwork trained for exactly ``model``'s weights: ``(dir, hparams)``."""
    root = shipped_dir(method)
    if not root.is_dir():
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    params = dict(model.named_parameters())
    for cfg in sorted(root.glob(f"*/{CONFIG_FILE}")):
        try:
            meta = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        base = meta.get("base", {})
        names = list(base.get("parameters", {}))
        if base.get("model_type") != model_type or base.get("n_layers") != \
                adapter.num_layers(model) or not names or any(n not in params for n in names):
            continue
        if base_fingerprint(model, adapter, names)["digest"] == base.get("digest"):
            return cfg.parent, dict(meta.get("hparams", {}))
    return None
