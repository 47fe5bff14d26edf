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

from dataclasses import dataclass

from editkit.models.gemma import GemmaAdapter, llama_map


@dataclass(frozen=True)
class Gemma2Adapter(GemmaAdapter):
    """:class:`ModelAdapter` with Gemma's √d embedding scale (as :class:`GemmaAdapter`)."""


#: LLaMA's module map (Gemma's module names are LLaMA's), the soft cap declared.
ADAPTER = Gemma2Adapter(**llama_map(name="gemma2", logit_softcap="final_logit_softcapping"))
