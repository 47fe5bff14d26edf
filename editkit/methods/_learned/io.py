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
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from editkit.errors import HypernetworkMismatchError, HypernetworkMissingError
from editkit.patch import tensor_fingerprint, tensors_digest

logger = logging.getLogger(__name__)

HYPERNET_FILE = "hypernet.safetensors"
CONFIG_FILE = "hypernet.json"
#: Version 2 added ``tensors_digest`` (sha256 of every tensor of the hypernetwork).
FORMAT_VERSION = 2
#: Hyperparameters that are the caller's policy, never the file's: a hypernetwork directory
#: must not be able to switch off the guard that checks it.
POLICY_FIELDS = ("check_fingerprint", "hypernet_path")


#: Half-precision copies of a float32 base model that a hypernetwork trained on it accepts.
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def base_fingerprint(model: nn.Module, adapter, param_names: Sequence[str],
                     as_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Fingerprint of the base weights a hypernetwork edits (originals if already edited).

    ``digests_as`` holds the digest a bfloat16 / float16 copy of float32 weights would have
    (``as_dtype`` computes one such digest): the copy's weights are these rounded, so a
    hypernetwork trained on the float32 model accepts them (its numerics stay float32).
    """
    from editkit.editor import EditHistory

    history = model.__dict__.get(EditHistory._ATTR)
    originals = history.originals if history is not None else {}
    params = dict(model.named_parameters())
    base = {n: originals.get(n, params[n]) for n in param_names}
    desc = {
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "n_layers": adapter.num_layers(model),
        "parameters": {n: tensor_fingerprint(t, as_dtype) for n, t in base.items()},
    }
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]
    if as_dtype is not None or any(t.dtype not in (torch.float32, torch.float64)
                                   for t in base.values()):
        return {"digest": digest, **desc}
    return {"digest": digest, **desc, "digests_as": {
        name: base_fingerprint(model, adapter, param_names, dt)["digest"]
        for name, dt in HALF_DTYPES.items()}}


def check_fingerprint(stored: Mapping[str, Any], actual: Mapping[str, Any], where: str) -> None:
    """Raise ``HypernetworkMismatchError`` naming what differs between two fingerprints."""
    accepted = {stored.get("digest"), *(stored.get("digests_as") or {}).values()}
    if actual.get("digest") in accepted:
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
    state = hypernet.state_dict()
    write_json(out / CONFIG_FILE, {"format_version": FORMAT_VERSION,
                                   "editkit_version": __version__, **meta,
                                   "tensors_digest": tensors_digest(dict(state))})
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
    except Exception as exc:  # unreadable JSON (also nested too deep) or safetensors
        raise HypernetworkMismatchError(
            f"{str(p)!r} does not hold a readable hypernetwork ({type(exc).__name__}: {exc}); "
            "retrain it"
        ) from exc
    meta = _checked_meta(meta, p, method)
    digest = meta.get("tensors_digest")
    if digest is not None and tensors_digest(state) != digest:
        raise HypernetworkMismatchError(
            f"the tensors in {str(p / HYPERNET_FILE)!r} do not match the tensors_digest of "
            f"{CONFIG_FILE}; the files were modified or corrupted after saving. Use an intact "
            "copy or retrain the hypernetwork"
        )
    if digest is None:
        logger.warning("%s has format_version 1 and no tensors_digest; its tensors cannot be "
                       "verified (save it again to add one)", p)
    for key, t in state.items():
        if not t.is_floating_point():
            raise HypernetworkMismatchError(
                f"{str(p / HYPERNET_FILE)!r}: tensor {key!r} has dtype {t.dtype}; a "
                "hypernetwork holds floating-point tensors only. Use an intact copy or retrain"
            )
    return state, meta


def _checked_meta(meta: Any, p: Path, method: str) -> dict[str, Any]:
    """``hypernet.json`` checked against its schema, policy fields removed."""
    where = repr(str(p / CONFIG_FILE))
    if not isinstance(meta, dict):
        raise HypernetworkMismatchError(
            f"{where} must hold a JSON object, got {type(meta).__name__}; retrain the "
            "hypernetwork")
    if meta.get("method") != method:
        raise HypernetworkMismatchError(
            f"{str(p)!r} holds a {meta.get('method')!r} hypernetwork, not a {method!r} one; "
            f"load it with the {meta.get('method')!r} editor or train a {method} hypernetwork"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise HypernetworkMismatchError(
            f"{where}: format_version must be a positive integer, got {version!r}; retrain "
            "the hypernetwork")
    if version > FORMAT_VERSION:
        raise HypernetworkMismatchError(
            f"{str(p)!r} was written by a newer editkit (format {version}, this one reads up "
            f"to {FORMAT_VERSION}); upgrade editkit"
        )
    for key, kind in (("hparams", dict), ("base", dict), ("edited_parameters", dict),
                      ("training", dict), ("tensors_digest", str)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise HypernetworkMismatchError(
                f"{where}: {key!r} must be a {kind.__name__}, got {type(meta[key]).__name__}; "
                "retrain the hypernetwork")
    if version >= 2 and not meta.get("tensors_digest"):
        raise HypernetworkMismatchError(
            f"{where} has format_version {version} but no tensors_digest, so its tensors "
            "cannot be verified; use an intact copy or retrain the hypernetwork")
    hparams = dict(meta.get("hparams") or {})
    ignored = [k for k in POLICY_FIELDS if k in hparams]
    if ignored:
        logger.info("%s: ignoring %s from the file; that policy is the caller's", where, ignored)
    meta = dict(meta)
    meta["hparams"] = {k: v for k, v in hparams.items() if k not in POLICY_FIELDS}
    return meta


def check_hypernet_fits(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor],
                        hparams: Any, widths: Sequence[tuple[int, int]], where: str) -> None:
    """Refuse, before anything is allocated, a hypernetwork whose sizes do not fit.

    ``rank`` may not exceed the widest edited weight (``d_out + d_in``): beyond it a
    low-rank layer stops being low rank, and a tampered value would otherwise allocate
    gigabytes. Then the architecture is built on the ``meta`` device (no memory) and its
    tensor names and shapes compared with the file's.
    """
    limit = max((d_out + d_in for d_out, d_in in widths), default=0)
    rank = getattr(hparams, "rank", None)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)
                             or not 1 <= rank <= limit):
        raise HypernetworkMismatchError(
            f"the hypernetwork in {where} asks for rank={rank!r}; for this model it must be an "
            f"integer between 1 and {limit} (the widest edited weight, d_out + d_in). Use an "
            "intact copy or retrain the hypernetwork"
        )
    blocks = getattr(hparams, "n_blocks", None)
    if blocks is not None and (not isinstance(blocks, int) or isinstance(blocks, bool)
                               or not 1 <= blocks <= len(state)):
        # Each block owns tensors, so the file bounds the count (and the time to build it).
        raise HypernetworkMismatchError(
            f"the hypernetwork in {where} asks for n_blocks={blocks!r}; its file holds "
            f"{len(state)} tensors, so it must be an integer between 1 and {len(state)}. Use "
            "an intact copy or retrain the hypernetwork"
        )
    try:
        with torch.device("meta"):
            skeleton = build()
    except Exception as exc:  # an op without a meta kernel: load_state_dict still checks
        logger.debug("cannot build the hypernetwork on the meta device (%s); skipping the "
                     "shape pre-check", exc)
        return
    expected = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    stored = {k: tuple(t.shape) for k, t in state.items()}
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or extra or wrong:
        detail = (f"tensor {wrong[0]!r} should have shape {expected[wrong[0]]} but the file "
                  f"holds {stored[wrong[0]]}" if wrong else
                  f"missing tensors {missing[:3]}, unexpected tensors {extra[:3]}")
        raise HypernetworkMismatchError(
            f"the hypernetwork in {where} does not fit the architecture its hyperparameters "
            f"build ({detail}); use an intact copy or retrain it"
        )


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
        accepted = {base.get("digest"), *(base.get("digests_as") or {}).values()}
        if base_fingerprint(model, adapter, names)["digest"] in accepted:
            hparams = meta.get("hparams") if isinstance(meta.get("hparams"), dict) else {}
            return cfg.parent, {k: v for k, v in hparams.items() if k not in POLICY_FIELDS}
    return None
