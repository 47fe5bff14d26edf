"""Presets tuned by editkit on its testbed models: the offline fact world and SmolLM2-135M.

They are registered when ``editkit.testbed`` is imported, and also through the
``editkit.presets`` entry-point group (``register``), so a model loaded without importing
the testbed still gets them. The algorithms never import the testbed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from editkit.hparams import IDENTITY_FIELD, Preset, model_name, register_preset
from editkit.testbed.train import FACT_WORLD_ID, META_FILE

#: SmolLM2-135M's ROME layer (of 30), MEMIT's layers and λ: see docs/smollm2.md.
SMOLLM2_ROME_LAYER = 3
SMOLLM2_MEMIT_LAYERS = (1, 2, 3, 4, 5)
SMOLLM2_MEMIT_LAMBDA = 100.0
SMOLLM2 = "smollm2-135m-instruct"
FACT_WORLD = FACT_WORLD_ID


def is_fact_world_model(model) -> bool:
    """Whether ``model`` is the fact-world model: its config says so (also after
    ``save_pretrained``), or it was loaded from a directory with ``fact_world.json``."""
    config = getattr(model, "config", None)
    if getattr(config, IDENTITY_FIELD, None) == FACT_WORLD_ID:
        return True
    name = str(getattr(config, "name_or_path", "") or "")
    if not name:
        return False
    try:
        return (Path(name) / META_FILE).is_file()
    except OSError:
        return False


#: What SmolLM2-135M *is*, whatever directory it was loaded from: its LLaMA sizes and the
#: norms of a few rows of its (tied) embedding, measured on the float32 weights. Names are
#: not enough: a copy saved to ``/models/x`` has no name to match and would fall back to
#: scaled defaults (a different layer, wikitext statistics waiting on hub retries offline).
SMOLLM2_CONFIG: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152,
    "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
SMOLLM2_EMBEDDING_NORMS: dict[int, float] = {
    0: 2.931773, 1: 3.309603, 2: 3.361943, 100: 2.645158, 1000: 2.649128, 10000: 2.723671,
    49151: 3.897946}
#: Relative tolerance on those norms: bf16/fp16 copies (~3 significant digits per entry,
#: errors averaging out over 576 entries) still match; another fine-tune of the same
#: architecture moves them by far more.
SMOLLM2_NORM_RTOL = 2e-3


def is_smollm2_model(model) -> bool:
    """Whether ``model`` is SmolLM2-135M(-Instruct): its identity field or name says so,
    or its configuration and embedding fingerprint match (a copy in any directory)."""
    if model_name(model).endswith(SMOLLM2):
        return True
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) != v for k, v in SMOLLM2_CONFIG.items()):
        return False
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if callable(get) else None
    if weight is None or tuple(weight.shape) != (49152, 576) or weight.device.type == "meta":
        return False
    with torch.no_grad():
        rows = weight[list(SMOLLM2_EMBEDDING_NORMS)].float().norm(dim=-1).cpu()
    want = torch.tensor(list(SMOLLM2_EMBEDDING_NORMS.values()))
    return bool(torch.allclose(rows, want, rtol=SMOLLM2_NORM_RTOL, atol=0.0))


#: The testbed presets were tuned, and their committed results measured, with context
#: prefixes sampled from start words. The reference's start (the end-of-text token, lengths in
#: tokens; the default elsewhere) scores lower on the fact world's 1,024-token vocabulary,
#: where 5 tokens are 2-3 words: ROME ES/PS/NS 0.967/0.883/0.967 → 0.900/0.833/0.977 and
#: MEMIT 0.600/0.483/0.997 → 0.533/0.433/0.990 on 30 records (benchmarks/template_start.py).
WORDS = "words"

#: Tuned on the offline fact world (4 layers, 128 hidden) over the first 50 records,
#: independent edits (ES / PS / NS): the subject's last token at layer 0 works, later
#: layers do not (layer 1: 0.23 / 0.30 / 0.99 on 30 records); the model is so sure of
#: its facts (log p(true) ≈ −0.003, log p(new) ≈ −10 to −23) that 20 Adam steps leave v*
#: short of the target (0.83 / 0.72 / 0.98), 60 reach 0.98 / 0.88 / 0.97. Editing the
#: prompt's last token instead (fact_token="last", layer 2) scores 1.00 / 0.99 / 0.90 but
#: is not ROME's subject-keyed edit. Statistics come from the world's own corpus.
ROME_FACT_WORLD: dict[str, Any] = {
    "layer": 0, "mom2_dataset": "fact_world", "mom2_n_samples": 20_000, "mom2_max_length": 64,
    "value": {"num_grad_steps": 60, "context_template_start": WORDS},
}
#: A sweep on 20 records (batch of 20; ES/PS/NS): layers (0, 1) with λ 10 → 0.65/0.48/0.96
#: was the best; λ 1000 → 0.05/0.13/0.99, layers (1,) λ 1 → 0.40/0.40/0.80, (2,) λ 10 →
#: 0.25/0.18/0.91, (1, 2) λ 10 → 0.40/0.28/0.88. See docs/methods/memit.md.
MEMIT_FACT_WORLD: dict[str, Any] = {
    "layers": (0, 1), "mom2_update_weight": 10.0, "mom2_dataset": "fact_world",
    "mom2_n_samples": 20_000, "mom2_max_length": 64,
    "value": {"num_grad_steps": 25, "weight_decay": 0.0, "clamp_norm_factor": 4.0,
              "context_template_start": WORDS},
}
#: Chosen for editkit from causal tracing and a ROME layer sweep on the shipped real facts
#: (docs/smollm2.md): the early MLP site at the subject's last token; statistics from the
#: offline Python docs (no hub here); the loss is read at the last of 30 blocks.
ROME_SMOLLM2: dict[str, Any] = {
    "layer": SMOLLM2_ROME_LAYER, "mom2_dataset": "pydoc", "mom2_max_length": 256,
    "value": {"loss_layer": 29, "context_template_start": WORDS},
}
#: MEMIT on SmolLM2: the layers where a ROME sweep edits well, λ from a small sweep
#: (docs/smollm2.md); MEMIT's reference z optimisation otherwise.
MEMIT_SMOLLM2: dict[str, Any] = {
    "layers": SMOLLM2_MEMIT_LAYERS, "mom2_update_weight": SMOLLM2_MEMIT_LAMBDA,
    "mom2_dataset": "pydoc", "mom2_max_length": 256,
    "value": {"loss_layer": 29, "context_template_start": WORDS},
}

_SWEEPS = "docs/results/factworld.md and the sweeps in docs/methods/"


def register() -> None:
    """Register the fact-world and SmolLM2 presets of ROME, MEMIT and AlphaEdit."""
    fw = is_fact_world_model
    for preset in (
        Preset("rome", FACT_WORLD, ROME_FACT_WORLD, f"tuned on the fact world ({_SWEEPS})", fw),
        Preset("memit", FACT_WORLD, MEMIT_FACT_WORLD, f"tuned on the fact world ({_SWEEPS})",
               fw),
        Preset("alphaedit", FACT_WORLD, {**MEMIT_FACT_WORLD, "l2": 1.0},
               "MEMIT's fact-world values with l2 = 1", fw),
        Preset("rome", SMOLLM2, ROME_SMOLLM2, "docs/smollm2.md (tracing and a layer sweep)",
               is_smollm2_model),
        Preset("memit", SMOLLM2, MEMIT_SMOLLM2, "docs/smollm2.md (layers and a λ sweep)",
               is_smollm2_model),
        Preset("alphaedit", SMOLLM2, {**MEMIT_SMOLLM2, "l2": 1.0},
               "MEMIT's SmolLM2 values with l2 = 1", is_smollm2_model),
    ):
        register_preset(preset)
