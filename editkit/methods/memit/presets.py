"""MEMIT's published defaults, as presets (registered when ``editkit.methods.memit`` loads).

Values of the reference repository (kmeng01/memit, ``hparams/MEMIT/*.json``) as reported in
Meng et al. 2023 (§5 and App. B). Presets tuned by editkit on its testbed models are
registered by ``editkit.testbed.presets``.
"""

from __future__ import annotations

from typing import Any

from editkit.hparams import Preset, register_preset

#: The reference's statistics and z optimisation shared by its GPT-2 XL and GPT-J files.
REFERENCE: dict[str, Any] = {
    "mom2_dataset": "wikitext",
    "mom2_n_samples": 100_000,
    "mom2_dtype": "float32",
    "value": {"lr": 0.5, "weight_decay": 0.5, "kl_factor": 0.0625, "clamp_norm_factor": 0.75},
}

PUBLISHED: dict[str, tuple[dict[str, Any], str]] = {
    "gpt2-xl": ({"layers": (13, 14, 15, 16, 17), "mom2_update_weight": 20_000.0,
                 "value": {"num_grad_steps": 20, "loss_layer": 47}},
                "MEMIT paper §5; kmeng01/memit hparams/MEMIT/gpt2-xl.json"),
    "gpt-j-6b": ({"layers": (3, 4, 5, 6, 7, 8), "mom2_update_weight": 15_000.0,
                  "value": {"num_grad_steps": 25, "loss_layer": 27}},
                 "MEMIT paper §5; kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json"),
}


def published_values(model: str) -> dict[str, Any]:
    """The full published configuration of ``model`` (reference values merged in)."""
    own, _ = PUBLISHED[model]
    return {**REFERENCE, **own, "value": {**REFERENCE["value"], **own["value"]}}


def register() -> None:
    for name, (_, source) in PUBLISHED.items():
        register_preset(Preset("memit", name, published_values(name), source))


register()
