"""OPT: the MLP is not a module of its own: ``fc1`` and ``fc2`` sit directly in the decoder
layer, so ``fc2`` (whose output is the MLP's contribution to the residual stream) is both the
``mlp`` slot and the edited matrix (``nn.Linear``), and its key is ``relu(fc1(x))``.

The head differs by size: OPT-350m normalises *after* each sublayer and has no final norm
(``final_layer_norm`` is ``None``), and projects the residual stream down to the embedding
width before ``lm_head`` (``project_out``, 1024 → 512); the other sizes have the final norm
and no projection. :meth:`OPTAdapter.head` applies whichever exist, in the decoder's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editkit.models.adapter import ModelAdapter


def _optional_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``, or ``None`` where the family leaves that attribute ``None``."""
    parent, _, attr = path.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, attr, None)


@dataclass(frozen=True)
class OPTAdapter(ModelAdapter):
    """:class:`ModelAdapter` whose head skips a missing final norm and applies ``project_out``."""

    project_out: str = "model.decoder.project_out"

    def head(self, model: nn.Module, hidden: torch.Tensor,
             positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if positions is not None:
            hidden = hidden[positions]
        for path in (self.final_norm, self.project_out):  # OPTDecoder.forward's order
            module = _optional_module(model, path)
            if module is not None:
                hidden = module(hidden)
        return self.final_logits(model, self.module(model, "lm_head")(hidden))


ADAPTER = OPTAdapter(
    name="opt",
    layers="model.decoder.layers",
    mlp="fc2",
    mlp_in="fc1",
    mlp_out="fc2",
    attn="self_attn",
    attn_out="self_attn.out_proj",
    embedding="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
)
