"""The corrupted run of a causal trace: noise on the subject's embeddings (paper §2.1).

ε ~ N(0, ν²) is added to the embeddings of the subject tokens, ν = 3σ with σ the standard
deviation of the subjects' token embeddings. The noise level is given either as a multiple of
σ (``noise_multiple``, paper 3) or as an absolute standard deviation (``noise_std``: the
reference code's ``noise=``). The reference's other corruptions are available too: uniform
noise U(−ν, ν) (its ``uniform_noise``), and replacing the subject's embeddings instead of
adding to them (its ``replace``), with the noise or with another subject's embeddings.

Both σ and ν are in the residual stream's units: a family that
scales its embeddings (Gemma: ×√d, declared by its adapter's ``embedding_scale``) has σ
measured after the scale, and the noise is added where the scaled embeddings enter the model.
Shared by the fast tracer and the straightforward one, so both corrupt identically. The
noise primitives (:func:`make_noise`, :func:`embedding_std`, :func:`corrupt`, ...) are defined
in :mod:`editkit.noise` and re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editkit.errors import InvalidHyperParamsError, InvalidRequestError

# The noise primitives live in editkit.noise (below the methods, which train on the same
# corruption for the "force" objective); re-exported here under their historical names.
from editkit.noise import (  # noqa: F401
    DEFAULT_NOISE,
    DEFAULT_SAMPLES,
    NOISE_RNGS,
    corrupt,
    embedding_noise,
    embedding_std,
    make_noise,
    model_device,
    normalise_prompt,
    subject_token_range,
)
from editkit.tokens import encode, fill, prompt_target_ids

logger = logging.getLogger(__name__)

#: A corruption that moves P(answer) by less than this fraction of the clean P(answer) has
#: barely any effect (e.g. the reference's absolute ``noise=0.1`` passed as a multiple of σ:
#: P 0.969 clean, 0.967 corrupted); the result says so and a warning is logged.
WEAK_EFFECT = 0.1


def resolve_noise(noise: float | None, noise_multiple: float | None,
                  noise_std: float | None) -> tuple[float, float | None]:
    """``(noise_multiple, noise_std)`` from the arguments of a tracing function.

    ``noise_std`` is the absolute standard deviation ν (the reference's ``noise=``);
    ``noise_multiple`` is ν/σ (default 3, the paper's). The old ``noise=`` meant the multiple:
    it still does, with a :class:`DeprecationWarning` that says so.
    """
    import warnings

    if noise is not None:
        warnings.warn(
            f"noise={noise!r} is a multiple of σ (ν = noise·σ), unlike the reference code's "
            "absolute noise=; write noise_multiple= for this meaning, or noise_std= for an "
            "absolute standard deviation", DeprecationWarning, stacklevel=3)
        if noise_multiple is not None and noise_multiple != noise:
            raise InvalidHyperParamsError(
                f"noise={noise!r} and noise_multiple={noise_multiple!r} disagree; give only "
                "noise_multiple=")
        noise_multiple = noise
    multiple = DEFAULT_NOISE if noise_multiple is None else noise_multiple
    for name, value in (("noise_multiple", multiple), ("noise_std", noise_std)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or value < 0):
            raise InvalidHyperParamsError(f"{name}={value!r} must be a finite number ≥ 0")
    return float(multiple), None if noise_std is None else float(noise_std)


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


def weight_embedding_std(model: nn.Module, adapter=None) -> float:
    """std of the embedding matrix's entries, times the family's embedding scale (the
    residual stream receives the rows scaled). Not a default of the tracers any more: on the
    fact world it is 26 % below the subjects' σ the paper uses."""
    from editkit.registry import get_adapter

    adapter = adapter or get_adapter(model)
    sigma = float(adapter.module(model, "embedding").weight.detach().double().std())
    scale = adapter.embedding_scale(model)
    return sigma if scale == 1.0 else sigma * scale


def noise_std_for(model: nn.Module, tokenizer, adapter, noise: float,
                  texts: Sequence[str] | None = None) -> float:
    """ν = ``noise`` · σ, with σ the std of the token embeddings of ``texts`` (the paper: the
    subjects of the traced facts)."""
    if not texts:
        raise InvalidRequestError(
            "σ needs a text sample: pass texts= (the subjects of your facts) or an absolute "
            "noise_std=")
    return noise * embedding_std(model, tokenizer, texts, adapter)


@torch.no_grad()
def subject_embeddings(model: nn.Module, tokenizer, subject: str, adapter=None
                       ) -> torch.Tensor:
    """Embeddings (tokens, d) of ``subject`` tokenized alone, as the residual stream receives
    them: what the reference's ``replace`` puts in place of another subject (float32, CPU)."""
    from editkit.registry import get_adapter

    adapter = adapter or get_adapter(model)
    ids = torch.tensor([encode(tokenizer, subject)], device=model_device(model))
    return adapter.embed(model, ids)[0].float().cpu()


def fit_tokens(emb: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Another subject's embeddings (s', d) fitted to ``n_tokens`` subject positions: cut
    after ``n_tokens``, or padded by repeating its last token."""
    if emb.shape[0] >= n_tokens:
        return emb[:n_tokens]
    return torch.cat([emb, emb[-1:].expand(n_tokens - emb.shape[0], -1)])


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
    replace: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def prepare_prompt(tokenizer, prompt: str, subject: str, target: str | None, *,
                   hidden_size: int, samples: int, noise_std: float, seed: int,
                   uniform: bool = False, replace: bool = False,
                   replacement: torch.Tensor | None = None, rng: str = "torch"
                   ) -> TracePrompt:
    """Tokenize, locate the subject, pick the answer's first token, draw the noise.

    ``prompt`` has ``{}`` for the subject or contains it (:func:`normalise_prompt`).
    ``target=None`` leaves ``answer_id`` unset: the caller uses the model's own prediction.
    ``replacement`` (another subject's embeddings, (s', d)) replaces the subject's embeddings
    in every sample instead of noise.
    """
    prompt = normalise_prompt(prompt, subject)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
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
    if replacement is not None:
        noise = fit_tokens(replacement, e - b).unsqueeze(0).expand(samples, -1, -1).clone()
        replace = True
    else:
        noise = make_noise(samples, e - b, hidden_size, noise_std, seed, uniform=uniform,
                           rng=rng)
    return TracePrompt(
        prompt=prompt, subject=subject, text=text, input_ids=ids,
        tokens=[tokenizer.decode([i]) for i in ids], subject_range=(b, e),
        answer=answer, answer_id=answer_id, noise=noise, replace=replace,
    )
