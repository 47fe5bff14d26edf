"""BLOOM: ALiBi positions, a layer norm right after the word embeddings, fused QKV, and
sublayers that add the residual themselves.

``BloomAttention`` and ``BloomMLP`` return ``residual + sublayer(x)``, not the sublayer's
contribution, so the ``attn``/``mlp`` slots (whose outputs causal tracing restores as "the
attention/MLP output") name their output projections, ``self_attention.dense`` and
``mlp.dense_4h_to_h``, whose outputs are exactly those contributions (dropout is off in
evaluation). The edited matrix is ``mlp.dense_4h_to_h`` (``nn.Linear``); its key is
``gelu(dense_h_to_4h(x))``. ``embedding`` is the word embedding module: causal tracing's
noise is added to its output, before ``word_embeddings_layernorm``.

The ALiBi tensor is an argument of every block call; :class:`AlibiAdapter` fits it to the
batch a recorded call is replayed on. Configs with ``pretraining_tp > 1`` and
``slow_but_exact=True`` compute both projections with sliced ``F.linear`` calls that bypass
the modules: editkit's hooks never see them, so such a config cannot be edited or traced
(load it with ``slow_but_exact=False``, the released default).
"""

from editkit.models.alibi import AlibiAdapter

ADAPTER = AlibiAdapter(
    name="bloom",
    layers="transformer.h",
    mlp="mlp.dense_4h_to_h",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out="mlp.dense_4h_to_h",
    attn="self_attention.dense",
    attn_out="self_attention.dense",
    embedding="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
)
