"""Gemma (1): LLaMA's module names and gated MLP, embeddings scaled by √d.

The forward multiplies every embedding row by √``hidden_size`` before the first block (Gemma
report, §2.2; transformers ≥ 4.50 does it inside ``GemmaTextScaledWordEmbedding``,
:meth:`ModelAdapter.embed` handles both). The MLP is ``down(gelu(gate(x)) * up(x))``: the
edited matrix is ``down_proj`` and its key is ``gelu(gate(x)) * up(x)``. No logit soft-cap
(Gemma 2 added it, see :mod:`editkit.models.gemma2`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from torch import nn

from editkit.models.adapter import ModelAdapter
from editkit.models.llama import ADAPTER as LLAMA


@dataclass(frozen=True)
class GemmaAdapter(ModelAdapter):
    """:class:`ModelAdapter` with the Gemma families' √d embedding scale."""

    def embedding_scale(self, model: nn.Module) -> float:
        return math.sqrt(model.config.hidden_size)


def llama_map(**changes: object) -> dict[str, object]:
    """LLaMA's module map as constructor arguments, with ``changes`` applied."""
    return {**{f.name: getattr(LLAMA, f.name) for f in fields(LLAMA)}, **changes}


ADAPTER = GemmaAdapter(**llama_map(name="gemma"))
