"""Structural types of what editkit receives from the outside: tokenizers and adapters.

They name, for type checkers and readers, the part of a HuggingFace tokenizer and of a
:class:`~editkit.models.ModelAdapter` that editkit actually uses, so that public signatures
say ``tokenizer: TokenizerLike`` instead of leaving the parameter untyped and so that a
plugin can pass its own object without subclassing anything. Both are
``runtime_checkable``; ``isinstance`` checks only that the members exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["AdapterLike", "TokenizerLike"]


@runtime_checkable
class TokenizerLike(Protocol):
    """What editkit calls on a tokenizer (a ``transformers`` fast tokenizer satisfies it).

    ``tokenizer(text, add_special_tokens=..., return_offsets_mapping=...)`` returns a
    mapping with ``"input_ids"`` (and ``"offset_mapping"`` when asked; subject positions
    need a fast tokenizer); ``decode(ids)`` turns ids back into text; ``eos_token_id`` and
    ``pad_token_id`` may be ``None``.
    """

    eos_token_id: int | None
    pad_token_id: int | None

    def __call__(self, text: str, **kwargs: Any) -> Mapping[str, Any]: ...

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str: ...


@runtime_checkable
class AdapterLike(Protocol):
    """What editing methods ask of an architecture adapter (see ``editkit.models``).

    Module lookup by slot (``"mlp_out"``, ``"attn_out"``, ``"embedding"``, ...) and layer,
    the number of layers and a checked layer index, and the keys→values view of a
    projection weight with the deltas built in its storage layout.
    """

    name: str

    def module_name(self, slot: str, layer: int | None = None) -> str: ...

    def weight_name(self, slot: str, layer: int | None = None) -> str: ...

    def module(self, model: nn.Module, slot: str, layer: int | None = None) -> nn.Module: ...

    def num_layers(self, model: nn.Module) -> int: ...

    def check_layer(self, model: nn.Module, layer: int, what: str = "layer") -> int: ...

    def kv_view(self, weight: torch.Tensor) -> torch.Tensor: ...

    def dense_delta(self, delta_kv: torch.Tensor) -> Any: ...

    def lowrank_delta(self, left: torch.Tensor, right: torch.Tensor) -> Any: ...
