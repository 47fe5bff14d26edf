"""Block calls of ALiBi families (BLOOM, Falcon-RW): the bias tensor follows the batch.

ALiBi (Press et al., 2022, §3) adds ``m_h · j`` to the attention score of key position ``j`` in
head ``h``. The model builds that tensor once per forward with the batch folded in (BLOOM:
``(batch·heads, 1, keys)``; Falcon: ``(batch, heads, 1, keys)``) and hands it to every block.
A block call recorded on one prompt and replayed on ``n`` copies of it (causal tracing's noise
samples) must get the bias of ``n`` rows; every row of one prompt's bias is the same
(``m_h · j`` depends on the key position only), so the recorded row is repeated. A tensor
that already has the rows of the batch (a call recorded on the whole batch) is unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from editkit.models.adapter import Call, ModelAdapter


def alibi_for_batch(alibi: torch.Tensor, heads: int, batch: int) -> torch.Tensor:
    """``alibi`` of a model with ``heads`` attention heads, fitted to ``batch`` rows (same
    layout); unchanged unless it holds one prompt's bias and ``batch`` is larger."""
    if batch == 1:
        return alibi
    if alibi.dim() == 3 and alibi.shape[0] == heads:  # BLOOM: (1·heads, 1, keys), batch-major
        return alibi.repeat(batch, 1, 1)
    if alibi.dim() == 4 and alibi.shape[0] == 1:  # Falcon: (1, heads, 1, keys)
        return alibi.expand(batch, *alibi.shape[1:])
    return alibi


@dataclass(frozen=True)
class AlibiAdapter(ModelAdapter):
    """:class:`ModelAdapter` whose :meth:`call_block` fits the recorded ``alibi`` argument to
    the batch of the hidden state the block is called with. ``heads`` is the block-relative
    path of the attribute holding the number of attention heads (the batch is folded into
    the bias tensor's first dimension, so its size alone does not tell the batch)."""

    heads: str = "num_heads"

    def call_block(self, block: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
        args, kwargs = call
        alibi = kwargs.get("alibi")
        if isinstance(alibi, torch.Tensor):
            heads = functools.reduce(getattr, self.heads.split("."), block)
            kwargs = {**kwargs, "alibi": alibi_for_batch(alibi, int(heads), hidden.shape[0])}
        return super().call_block(block, hidden, (args, kwargs))
