"""Gemma 3, text-only models (``model_type`` ``gemma3_text``: ``Gemma3ForCausalLM``).

As Gemma 2: LLaMA's module names, √d-scaled embeddings, and a head soft-cap read from
``final_logit_softcapping`` (Gemma 3's released configs set it to ``None``, so the head is
plain ``lm_head``; a config that sets it is capped). Blocks alternate sliding-window and
global attention with different rotary tables; both arrive as arguments of the block call
and are replayed as recorded. The multimodal ``gemma3`` wrapper (vision tower, the language
model under ``model.language_model``) has no adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from editkit.models.gemma import GemmaAdapter, llama_map


@dataclass(frozen=True)
class Gemma3Adapter(GemmaAdapter):
    """:class:`ModelAdapter` with Gemma's √d embedding scale (as :class:`GemmaAdapter`)."""


ADAPTER = Gemma3Adapter(**llama_map(name="gemma3_text", logit_softcap="final_logit_softcapping"))
