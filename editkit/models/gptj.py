"""GPT-J: parallel attention and MLP in each block; ``nn.Linear`` projections."""

from editkit.models.adapter import ModelAdapter

ADAPTER = ModelAdapter(
    name="gptj",
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
