"""ROME's published defaults, as presets (registered when ``editkit.methods.rome`` loads).

Every published configuration edits one MLP layer at about a third of the depth and reads
the v* loss at the last block; the v* optimisation and the statistics are the reference
repository's (``hparams/ROME/*.json`` of kmeng01/rome), which are also the defaults of
``ROMEHyperParams``. Presets tuned by editkit on its own testbed models (the fact world,
SmolLM2-135M) are registered by ``editkit.testbed.presets``.
"""

from __future__ import annotations

from typing import Any

from editkit.hparams import Preset, register_preset

#: The reference's v* optimisation and statistics (kmeng01/rome, hparams/ROME/*.json).
REFERENCE: dict[str, Any] = {
    "mom2_dataset": "wikitext",
    "mom2_n_samples": 100_000,
    "mom2_dtype": "float32",
    "value": {"num_grad_steps": 20, "lr": 0.5, "weight_decay": 0.5, "clamp_norm_factor": 4.0,
              "kl_factor": 0.0625},
}

#: model name → (edited layer, loss layer). Meng et al. 2022 (ROME paper, §3 and App.) and
#: the reference hparams for GPT-2 and GPT-J; phi-1.5 and LLaMA-2-7B from later ports that
#: keep layer 5 and read the loss at the last block.
PUBLISHED_LAYERS: dict[str, tuple[int, int, str]] = {
    "gpt2-medium": (8, 23, "ROME paper; kmeng01/rome hparams/ROME/gpt2-medium.json"),
    "gpt2-large": (12, 35, "ROME paper; kmeng01/rome hparams/ROME/gpt2-large.json"),
    "gpt2-xl": (17, 47, "ROME paper; kmeng01/rome hparams/ROME/gpt2-xl.json"),
    "gpt-j-6b": (5, 27, "ROME paper; kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json"),
    "phi-1_5": (5, 23, "ROME port to phi-1.5 (layer 5 of 24, loss at the last block)"),
    "phi-1.5": (5, 23, "ROME port to phi-1.5 (layer 5 of 24, loss at the last block)"),
    "llama-2-7b": (5, 31, "ROME port to LLaMA-2-7B (layer 5 of 32, loss at the last block)"),
    "llama-2-7b-hf": (5, 31, "ROME port to LLaMA-2-7B (layer 5 of 32, loss at the last block)"),
}


def published_values(layer: int, loss_layer: int) -> dict[str, Any]:
    """The reference configuration at ``layer`` with the loss read at ``loss_layer``."""
    return {**REFERENCE, "layer": layer,
            "value": {**REFERENCE["value"], "loss_layer": loss_layer}}


def register() -> None:
    for name, (layer, loss_layer, source) in PUBLISHED_LAYERS.items():
        register_preset(Preset("rome", name, published_values(layer, loss_layer), source))


register()
