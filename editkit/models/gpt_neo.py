"""GPT-Neo: GPT-2's block structure (learned positions, ``ln_1``/``ln_2``, ``c_fc``/``c_proj``)
but ``nn.Linear`` projections, stored (out, in), and attention one level deeper
(``attn.attention``). Local (windowed) attention layers get their mask as a block argument and
are replayed as recorded."""

from editkit.models.adapter import ModelAdapter, WeightLayout

ADAPTER = ModelAdapter(
    name="gpt_neo",
    layers="transformer.h",
    mlp="mlp",
    mlp_in="mlp.c_fc",
    mlp_out="mlp.c_proj",
    attn="attn",
    attn_out="attn.attention.out_proj",
    embedding="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    layout=WeightLayout.LINEAR,  # unlike GPT-2's Conv1D, whose names these are
)
