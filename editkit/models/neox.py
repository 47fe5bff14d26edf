"""GPT-NeoX / Pythia: ``dense_4h_to_h`` is the edited matrix."""

from editkit.models.adapter import ModelAdapter

ADAPTER = ModelAdapter(
    name="gpt_neox",
    layers="gpt_neox.layers",
    mlp="mlp",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out="mlp.dense_4h_to_h",
    attn="attention",
    attn_out="attention.dense",
    embedding="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",
)
