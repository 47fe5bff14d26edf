"""Gemma 2: gated MLP like LLaMA, plus two departures from "blocks, final norm, lm_head".

- Embeddings are multiplied by √d (``hidden_size``) before the first block (transformers ≥ 4.50
  does it inside ``Gemma2TextScaledWordEmbedding``; :meth:`ModelAdapter.embed` handles both).
- The head soft-caps its logits: ``logits = c·tanh(z/c)`` with ``c = final_logit_softcapping``
  (Gemma 2 report, §2). v* optimised against the un-capped ``lm_head`` output would be
  optimised against the wrong distribution, so the cap is declared here.

Each block normalises its attention and MLP outputs again (``post_*_layernorm``) before adding
them to the residual stream; the MLP output ``mlp.down_proj`` is still "the edited matrix".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from torch import nn

from editkit.models.adapter import ModelAdapter
from editkit.models.llama import ADAPTER as LLAMA


@dataclass(frozen=True)
class Gemma2Adapter(ModelAdapter):
    """:class:`ModelAdapter` with Gemma's √d embedding scale."""

    def embedding_scale(self, model: nn.Module) -> float:
        return math.sqrt(model.config.hidden_size)


#: LLaMA's module map (Gemma's module names are LLaMA's), the soft cap declared.
ADAPTER = Gemma2Adapter(**{
    **{f.name: getattr(LLAMA, f.name) for f in fields(LLAMA)},
    "name": "gemma2",
    "logit_softcap": "final_logit_softcapping",
})
