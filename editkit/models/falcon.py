"""Falcon (7B/40B/180B and Falcon-RW): fused QKV, and three block layouts chosen by the config
(parallel attention and MLP from one or two layer norms, or sequential as in GPT-2), rotary or
ALiBi positions.

The edited matrix is ``mlp.dense_4h_to_h`` (``FalconLinear``, an ``nn.Linear`` stored
(out, in)); its key is ``gelu(dense_h_to_4h(x))``. With parallel attention the block adds the
attention output into the MLP's output tensor *in place* (``mlp_output += attention_output``)
after ``mlp`` returns: a value read from that tensor by reference would be MLP + attention, so
editkit's hooks copy the outputs they keep (:class:`editkit.nethooks.Trace`).
ALiBi variants get the bias tensor fitted to the replayed batch (:class:`AlibiAdapter`).
"""

from editkit.models.alibi import AlibiAdapter

ADAPTER = AlibiAdapter(
    name="falcon",
    layers="transformer.h",
    mlp="mlp",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out="mlp.dense_4h_to_h",
    attn="self_attention",
    attn_out="self_attention.dense",
    embedding="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    heads="self_attention.num_heads",
)
