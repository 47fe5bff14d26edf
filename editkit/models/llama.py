"""LLaMA-style decoders (LLaMA, Mistral, Qwen2): gated MLP ``down(act(gate(x)) * up(x))``.

The edited matrix is ``down_proj``; its input key is ``act(gate(x)) * up(x)``.
"""

from editkit.models.adapter import ModelAdapter

ADAPTER = ModelAdapter(
    name="llama",
    layers="model.layers",
    mlp="mlp",
    mlp_in="mlp.up_proj",
    mlp_gate="mlp.gate_proj",
    mlp_out="mlp.down_proj",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    embedding="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)
