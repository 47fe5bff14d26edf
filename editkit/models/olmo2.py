"""OLMo 2: LLaMA's module names and gated MLP, but normalisation *after* each sublayer
(``post_attention_layernorm``, ``post_feedforward_layernorm`` applied to the attention and MLP
outputs before the residual add; no input norm). The edited matrix is still ``mlp.down_proj``:
its output is the MLP value before that norm, which the block's own forward applies."""

from __future__ import annotations

import dataclasses

from editkit.models.llama import ADAPTER as LLAMA

ADAPTER = dataclasses.replace(LLAMA, name="olmo2")
