"""A third-party plugin: a CodeGen adapter and a rank-one fine-tuning method.

Nothing here touches editkit's own files; both reach editkit through entry points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editkit import Editor, HyperParams, ModelAdapter
from editkit.requests import as_request_list
from editkit.tokens import target_nll

# CodeGen (not built into editkit): GPT-J-like blocks with a fused QKV projection.
CODEGEN_ADAPTER = ModelAdapter(
    name="codegen",
    layers="transformer.h",
    mlp="mlp",
    mlp_in="mlp.fc_in",
    mlp_out="mlp.fc_out",
    attn="attn",
    attn_out="attn.out_proj",
    embedding="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
)


@dataclass
class RankOneFTHyperParams(HyperParams):
    layer: int = 0
    lr: float = 0.05
    num_steps: int = 30

    def validate(self, model, adapter) -> None:
        adapter.check_layer(model, self.layer)


class RankOneFT(Editor):
    """Fine-tune a rank-one update ``u vᵀ`` of one MLP output matrix."""

    name = "rank1_ft"
    hparams_class = RankOneFTHyperParams

    def edited_parameters(self) -> list[str]:
        return [self.adapter.weight_name("mlp_out", self.hparams.layer)]

    def compute_update(self, requests):
        items = as_request_list(requests)
        module = self.adapter.module(self.model, "mlp_out", self.hparams.layer)
        d_out, d_in = self.adapter.kv_view(module.weight).shape
        g = torch.Generator().manual_seed(0)
        u = torch.zeros(d_out, requires_grad=True)
        v = (torch.randn(d_in, generator=g) / d_in**0.5).requires_grad_(True)

        def add_rank_one(mod, args, output):
            return output + (args[0] @ v)[..., None] * u

        handle = module.register_forward_hook(add_rank_one)
        try:
            opt = torch.optim.Adam([u, v], lr=self.hparams.lr)
            for _ in range(self.hparams.num_steps):
                opt.zero_grad()
                loss = target_nll(self.model, self.tokenizer, [r.text for r in items],
                                  [r.target_new for r in items]).mean()
                loss.backward()
                opt.step()
        finally:
            handle.remove()
            for p in self.model.parameters():
                p.grad = None
        delta = self.adapter.lowrank_delta(u.detach(), v.detach())
        return self.make_patch({self.edited_parameters()[0]: delta}, items)


def toy_texts(**_: object):
    """A statistics text source (entry point group ``editkit.text_sources``)."""
    from editkit.stats import TextSource

    texts = [f"Toy sentence number {i} about nothing in particular." for i in range(40)]
    return TextSource("toy_texts:v1", "the toy plugin's sentences", lambda: texts)
