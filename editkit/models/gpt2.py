"""GPT-2 (``transformers.GPT2LMHeadModel``): Conv1D projections stored (in, out)."""

from editkit.models.adapter import ModelAdapter, WeightLayout

ADAPTER = ModelAdapter(
    name="gpt2",
    layers="transformer.h",
    mlp="mlp",
    mlp_in="mlp.c_fc",
    mlp_out="mlp.c_proj",
    attn="attn",
    attn_out="attn.c_proj",
    embedding="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    layout=WeightLayout.CONV1D,
)
