"""Every transformers-version difference editkit depends on, in one place.

transformers renamed the key/value-cache argument (``past_key_values`` → ``cache`` in 5.x),
changed what decoder blocks return (a tuple ``(hidden, ...)`` in 4.x, the hidden-state tensor
in 5.x), reworked the cache classes several times, and moved Gemma's √d embedding scale from
the model's forward into the embedding module. Code elsewhere in editkit asks these helpers and
never looks at a version, a cache class or an argument name itself; supporting another
transformers release means editing this file only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from editkit.errors import UnsupportedModelError

#: Names of the key/value-cache argument of ``model.forward``, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values")

KV = tuple[torch.Tensor, torch.Tensor]


def block_output_hidden(output: Any) -> torch.Tensor:
    """The hidden state a decoder block returned (4.x: first item of a tuple; 5.x: the tensor)."""
    return output[0] if isinstance(output, tuple) else output


def cache_argument(model: nn.Module) -> str | None:
    """Name of the key/value-cache argument of ``model.forward``, or ``None`` if it has none."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in CACHE_ARGUMENTS if n in params), None)


def cache_of(output: Any) -> Any:
    """The key/value cache a model output carries (``cache`` or ``past_key_values``), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_tensors(output: Any, n_layers: int, n_tokens: int) -> list[KV] | None:
    """Per-layer (keys, values) of a model output's cache, or ``None`` if unusable."""
    cache = cache_of(output)
    try:
        kv = [(item[0], item[1]) for item in cache]
    except Exception:  # no cache, or a cache type we cannot read: no prefix reuse
        return None
    ok = len(kv) == n_layers and all(
        isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        and k.shape[-2] == n_tokens and v.shape[-2] == n_tokens for k, v in kv)
    return kv if ok else None


def is_cache(obj: Any) -> bool:
    """Whether ``obj`` is a transformers cache object."""
    from transformers.cache_utils import Cache

    return isinstance(obj, Cache)


def filled_cache(kv: Sequence[KV]) -> Any:
    """A ``DynamicCache`` already holding the given per-layer keys and values."""
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=list(kv))
    except TypeError:  # releases without the ``ddp_cache_data`` constructor argument
        cache = DynamicCache()
        for layer, (k, v) in enumerate(kv):
            cache.update(k, v, layer)
        return cache


def prefix_cache(keys: torch.Tensor, values: torch.Tensor) -> Any:
    """A cache for one block call holding the keys/values of the tokens before the ones being
    run: the attention gets them with its own tokens' keys/values appended. Nothing is stored,
    so building one is cheap (no per-layer objects)."""
    return _prefix_cache_class()(keys, values)


@functools.cache
def _prefix_cache_class() -> type:
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.prefix = (keys, values)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = self.prefix
            return (torch.cat([keys, key_states], dim=-2),
                    torch.cat([values, value_states], dim=-2))

    return PrefixCache


def map_leaves(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` (nested tuples, lists, dicts) with ``fn`` applied to every other object in it;
    cache objects are leaves."""
    if is_cache(obj):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_leaves(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_leaves(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_leaves(v, fn) for k, v in obj.items()}
    return fn(obj)


def swap_cache(obj: Any, cache: Any) -> Any:
    """``obj`` (nested tuples, lists, dicts) with every cache object in it replaced by ``cache``."""
    return map_leaves(obj, lambda leaf: cache if is_cache(leaf) else leaf)


def same_calls(a: Any, b: Any) -> bool:
    """Whether two captured block calls are the same (tensors equal; cache objects ignored)."""
    if is_cache(a) and is_cache(b):
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(map(same_calls, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_calls(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # incomparable objects: do not share
        return False


def embedding_module_scales(module: nn.Module) -> bool:
    """Whether an embedding module applies its family's scale itself.

    A plain ``nn.Embedding`` returns the weight rows, so a family with scaled embeddings
    multiplies them in the model's forward (Gemma before transformers 4.50); a subclass that
    overrides ``forward`` (``Gemma2TextScaledWordEmbedding``) returns them already scaled.
    """
    return type(module).forward is not nn.Embedding.forward


def parameter_value(model: nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """The data of parameter ``name``: ``param`` itself, or, when accelerate offloaded it (a
    placeholder on the meta device), the tensor its hook loads for each forward."""
    if param.device.type != "meta":
        return param
    module_name, _, key = name.rpartition(".")
    hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise UnsupportedModelError(
            f"parameter {name} is on the meta device and no offload hook holds its data; load "
            "the model with its weights (not on the meta device)")
    return weights[key]
