"""Subject noise: the corruption of causal tracing, shared by the tracers and the editing
objectives that train on it (Meng et al. 2022, §2.1; Hase et al. 2023, "fact forcing").

ε ~ N(0, ν²) is added to the embeddings of the subject's tokens, ν = 3σ with σ the standard
deviation of the subjects' token embeddings, 10 samples per prompt. The tracers
(:mod:`editkit.tracing.corruption`, which re-exports these names) and the ``force`` editing
objective (:mod:`editkit.methods._locate.objectives`) both draw it with :func:`make_noise`,
so the same seed gives the same noise in a trace and in an edit. It lives below the methods
so that an editing method can use it without importing the tracing package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from editkit.errors import InvalidHyperParamsError, InvalidRequestError
from editkit.tokens import encode, fill, subject_char_span, token_index_at_char

#: The paper's noise level: ν = 3σ.
DEFAULT_NOISE = 3.0
#: The paper's number of noise samples.
DEFAULT_SAMPLES = 10


def normalise_prompt(prompt: str, subject: str) -> str:
    """``prompt`` with ``{}`` where the subject goes. A filled prompt (the reference notebook's
    ``"The Eiffel Tower is in"`` with subject ``"The Eiffel Tower"``) gets ``{}`` at the
    subject's first occurrence."""
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
        raise InvalidRequestError(
            f"prompt {prompt!r} and subject {subject!r} must be strings, the subject non-empty")
    if prompt.count("{}") == 0 and subject in prompt:
        return prompt.replace(subject, "{}", 1)
    if prompt.count("{}") != 1:
        raise InvalidRequestError(
            f"prompt {prompt!r} must contain the subject {subject!r} or exactly one '{{}}' "
            "where it goes, e.g. '{} was born in'"
        )
    return prompt


def subject_token_range(tokenizer, prompt: str, subject: str) -> tuple[int, int]:
    """Token range ``[first, last + 1)`` of the subject in ``fill(prompt, subject)``.

    Character based (see :mod:`editkit.tokens`): the first subject token is the token that
    contains the subject's first character, the last one the last token that overlaps it.
    """
    start, end = subject_char_span(prompt, subject)
    text = fill(prompt, subject)
    first = token_index_at_char(tokenizer, text, start + 1, start)
    last = token_index_at_char(tokenizer, text, end, start)
    return first, last + 1


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters."""
    return next(model.parameters()).device


@torch.no_grad()
def embedding_std(model: nn.Module, tokenizer, texts: Sequence[str], adapter=None) -> float:
    """σ: standard deviation of the token embeddings of ``texts`` (all tokens, all dims).

    The corruption noise is ν = 3σ (paper §2.1; the paper measures σ over the subjects of its
    fact set). Embeddings as the residual stream receives them (the adapter's ``embed``: its
    ``embedding`` slot, scaled as the family scales it).
    """
    from editkit.registry import get_adapter

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise InvalidRequestError(
            "embedding_std needs at least one non-empty text; pass the subjects of your facts "
            "or any sample of ordinary text"
        )
    adapter = adapter or get_adapter(model)
    device = model_device(model)
    total = total_sq = 0.0
    count = 0
    for text in texts:
        ids = torch.tensor([encode(tokenizer, text)], device=device)
        e = adapter.embed(model, ids).double()
        total += float(e.sum())
        total_sq += float((e * e).sum())
        count += e.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1))


#: Random generators of :func:`make_noise`: torch's (default), or numpy's ``RandomState``,
#: the reference code's (with ``seed=1`` its draws exactly).
NOISE_RNGS = ("torch", "numpy")


def make_noise(samples: int, n_tokens: int, hidden: int, scale: float, seed: int, *,
               uniform: bool = False, rng: str = "torch") -> torch.Tensor:
    """The corruption ε ~ N(0, scale²) (``uniform``: U(−scale, scale), the reference's
    ``uniform_noise``) of shape (samples, subject tokens, hidden), seeded.

    Drawn on the CPU with its own ``torch.Generator`` so the same seed gives the same noise on
    every device, for every kind, and for the fast and the straightforward implementation.
    ``rng="numpy"`` draws as the reference does, ``numpy.random.RandomState(seed)`` in float64
    (the reference seeds it with 1 for every restoration): the same noise as the reference,
    for side-by-side comparisons.
    """
    shape = (samples, n_tokens, hidden)
    if rng not in NOISE_RNGS:
        raise InvalidHyperParamsError(f"noise_rng={rng!r} must be one of {NOISE_RNGS}")
    if rng == "numpy":
        import numpy as np

        rs = np.random.RandomState(int(seed))
        draw = rs.uniform(-1, 1, shape) if uniform else rs.randn(*shape)
        return torch.from_numpy(draw * scale).float()
    gen = torch.Generator().manual_seed(int(seed))
    if uniform:
        return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * scale
    return torch.randn(shape, generator=gen, dtype=torch.float32) * scale


def corrupt(hidden: torch.Tensor, noise: torch.Tensor, subject_range: tuple[int, int],
            replace: bool = False) -> torch.Tensor:
    """Embeddings ``hidden`` (n, T, d) with ``noise`` (n, s, d) added at the subject tokens
    (``replace``: written over them, the reference's ``replace=True``)."""
    b, e = subject_range
    out = hidden.clone()
    noise = noise.to(device=out.device, dtype=out.dtype)
    out[:, b:e] = noise if replace else out[:, b:e] + noise
    return out


def embedding_noise(model: nn.Module, adapter: Any, noise: torch.Tensor) -> torch.Tensor:
    """``noise`` (residual-stream units) as it must be added to the embedding module's output.

    Equal to ``noise`` unless the family's forward scales the module's output afterwards
    (Gemma's √d in transformers < 4.50): then divided by that scale, so the residual stream
    receives exactly ``noise``.
    """
    scale = adapter.embedding_output_scale(model)
    return noise if scale == 1.0 else noise / scale
