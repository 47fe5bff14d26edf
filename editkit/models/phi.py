"""Phi-1 / Phi-1.5 / Phi-2: parallel attention and MLP; the edited matrix is ``mlp.fc2``."""

from editkit.models.adapter import ModelAdapter

ADAPTER = ModelAdapter(
    name="phi",
    layers="model.layers",
    mlp="mlp",
    mlp_in="mlp.fc1",
    mlp_out="mlp.fc2",
    attn="self_attn",
    attn_out="self_attn.dense",
    embedding="model.embed_tokens",
    final_norm="model.final_layernorm",
    lm_head="lm_head",
)
