"""The corrupted run of a causal trace: noise on the subject's embeddings (paper §2.1).

ε ~ N(0, ν²) is added to the embeddings of the subject tokens, ν = 3σ with σ the standard
deviation of token embeddings. Both σ and ν are in the residual stream's units: a family that
scales its embeddings (Gemma: ×√d, declared by its adapter's ``embedding_scale``) has σ
measured after the scale, and the noise is added where the scaled embeddings enter the model.
Shared by the fast tracer and the straightforward one, so both corrupt identically.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editkit.errors import InvalidHyperParamsError, InvalidRequestError
from editkit.tokens import encode, fill, prompt_target_ids, subject_char_span, token_index_at_char

logger = logging.getLogger(__name__)

#: The paper's noise level: ν = 3σ.
DEFAULT_NOISE = 3.0
#: The paper's number of noise samples.
DEFAULT_SAMPLES = 10


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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while tracing; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


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


def weight_embedding_std(model: nn.Module, adapter=None) -> float:
    """Fallback σ when no text sample is given: std of the embedding matrix's entries, times
    the family's embedding scale (the residual stream receives the rows scaled)."""
    from editkit.registry import get_adapter

    adapter = adapter or get_adapter(model)
    sigma = float(adapter.module(model, "embedding").weight.detach().double().std())
    scale = adapter.embedding_scale(model)
    return sigma if scale == 1.0 else sigma * scale


def noise_std_for(model: nn.Module, tokenizer, adapter, noise: float,
                  texts: Sequence[str] | None = None) -> float:
    """ν = ``noise`` · σ, with σ the std of the subject embeddings of ``texts`` (the paper's
    choice), or of the embedding matrix when no text is given."""
    if texts:
        return noise * embedding_std(model, tokenizer, texts, adapter)
    logger.info("no text sample for σ: using the std of the embedding matrix")
    return noise * weight_embedding_std(model, adapter)


def make_noise(samples: int, n_tokens: int, hidden: int, scale: float, seed: int) -> torch.Tensor:
    """The corruption ε ~ N(0, scale²) of shape (samples, subject tokens, hidden), seeded.

    Drawn on the CPU with its own ``torch.Generator`` so the same seed gives the same noise on
    every device, for every kind, and for the fast and the straightforward implementation.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((samples, n_tokens, hidden), generator=gen, dtype=torch.float32) * scale


def corrupt(hidden: torch.Tensor, noise: torch.Tensor, subject_range: tuple[int, int]
            ) -> torch.Tensor:
    """Embeddings ``hidden`` (n, T, d) with ``noise`` (n, s, d) added at the subject tokens."""
    b, e = subject_range
    out = hidden.clone()
    out[:, b:e] = out[:, b:e] + noise.to(device=out.device, dtype=out.dtype)
    return out


def embedding_noise(model: nn.Module, adapter: Any, noise: torch.Tensor) -> torch.Tensor:
    """``noise`` (residual-stream units) as it must be added to the embedding module's output.

    Equal to ``noise`` unless the family's forward scales the module's output afterwards
    (Gemma's √d in transformers < 4.50): then divided by that scale, so the residual stream
    receives exactly ``noise``.
    """
    scale = adapter.embedding_output_scale(model)
    return noise if scale == 1.0 else noise / scale


def answer_probs(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) per row from last-position ``logits`` (rows × vocab), in float32."""
    return torch.softmax(logits.float(), dim=-1)[:, answer_id]


@dataclass
class TracePrompt:
    """A tokenized prompt ready to trace: subject range, answer token, corruption noise."""

    prompt: str
    subject: str
    text: str
    input_ids: list[int]
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int | None
    noise: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def prepare_prompt(tokenizer, prompt: str, subject: str, target: str | None, *,
                   hidden_size: int, samples: int, noise_std: float, seed: int) -> TracePrompt:
    """Tokenize, locate the subject, pick the answer's first token, draw the noise.

    ``target=None`` leaves ``answer_id`` unset: the caller uses the model's own prediction.
    """
    if prompt.count("{}") != 1:
        raise InvalidRequestError(
            f"prompt {prompt!r} must contain exactly one '{{}}' where the subject goes, "
            "e.g. '{} was born in'"
        )
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidRequestError(f"subject {subject!r} must be a non-empty string")
    if not isinstance(samples, int) or samples < 1:
        raise InvalidHyperParamsError(f"samples={samples!r} must be a positive integer")
    text = fill(prompt, subject)
    ids = encode(tokenizer, text)
    b, e = subject_token_range(tokenizer, prompt, subject)
    answer, answer_id = "", None
    if target is not None:
        if not target.strip():
            raise InvalidRequestError(f"target {target!r} is empty; give the expected answer")
        _, target_ids = prompt_target_ids(tokenizer, text, target)
        answer, answer_id = target.strip(), int(target_ids[0])
    return TracePrompt(
        prompt=prompt, subject=subject, text=text, input_ids=ids,
        tokens=[tokenizer.decode([i]) for i in ids], subject_range=(b, e),
        answer=answer, answer_id=answer_id,
        noise=make_noise(samples, e - b, hidden_size, noise_std, seed),
    )
