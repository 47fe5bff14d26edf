"""AlphaEdit's defaults, as presets (registered when ``editkit.methods.alphaedit`` loads).

AlphaEdit (Fang et al. 2025) keeps MEMIT's layers, statistics and z optimisation for each
model and adds the null-space projection; editkit's ``l2`` is a relative ridge (see
``AlphaEditHyperParams``), 1.0 for every model.
"""

from __future__ import annotations

from editkit.hparams import Preset, register_preset
from editkit.methods.memit.presets import PUBLISHED, published_values


def register() -> None:
    for name, (_, source) in PUBLISHED.items():
        register_preset(Preset("alphaedit", name, {**published_values(name), "l2": 1.0},
                               f"MEMIT's values ({source}) with AlphaEdit's projection, l2 = 1"))


register()
