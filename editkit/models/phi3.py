"""Phi-3: fused projections. Attention has one ``qkv_proj``; the MLP one ``gate_up_proj``
whose output is split into gate and up halves, ``down(silu(gate) * up)``.

The edited matrix is ``mlp.down_proj``; its key is ``silu(gate) * up``, its input, exactly as
for LLaMA. ``mlp_in`` names the fused ``gate_up_proj`` (a real ``nn.Linear``: methods that
train or edit ``mlp_in`` treat gate and up rows together); there is no separate gate module,
so ``mlp_gate`` is ``None``.
"""

from editkit.models.adapter import ModelAdapter

ADAPTER = ModelAdapter(
    name="phi3",
    layers="model.layers",
    mlp="mlp",
    mlp_in="mlp.gate_up_proj",
    mlp_out="mlp.down_proj",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    embedding="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)
