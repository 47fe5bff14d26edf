"""Editing objectives of Hase et al. (2023), "Does Localization Inform Editing?", §3.

A request's :class:`~editkit.requests.Objective` decides three things in ROME's v*, MEMIT's z
and FT's loss; this module holds each of them so the optimisation loops only ask:

* **which object** is optimised (:attr:`EditRequest.optimised_target`): ``target_new`` for
  error injection (``inject``) and tracing reversal (``reverse_tracing``, after
  :func:`resolve_request` has put o_noise there), ``target_true`` for ``erase``, ``amplify``
  and ``force``;
* **the target term** of the loss (:func:`target_term`): the mean NLL −log p(o) for every
  objective but ``erase``, whose term is the probability itself, ``max(p̄ − floor, 0)`` with
  p̄ = exp(−mean NLL) (the released code of the paper minimises p̄, ``exp(-nll_loss)``; the
  floor is the threshold of issue 18, 0 by default: minimise);
* **the inputs** (:class:`SubjectNoise`): for ``force`` every prompt row is repeated
  ``samples`` times and its subject's token embeddings get causal tracing's noise
  (ε ~ N(0, ν²), drawn by :func:`editkit.noise.make_noise` with the objective's seed, so a
  prompt with the same subject tokens gets exactly the noise of its trace); the KL prompt
  (``"{} is a"``) stays clean.

Deviations from the paper's released code (google/belief-localization): it adds the noise
at the rewrite prompt's subject positions in every row of the v* batch, prefixed rows and the
KL row included, so in prefixed rows it noises the wrong tokens; here each row's own subject
tokens are noised and the KL row is not. Tracing reversal there generates a continuation of
the noised prompt under one noise draw; here o_noise is the top-1 next token of the noised
run averaged over ``samples`` draws (the quantity a trace reads), restricted to tokens that
read back as a word target (``" " + word``) and differ from ``target_true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from editkit.errors import InvalidRequestError
from editkit.noise import embedding_noise, embedding_std, make_noise, subject_token_range
from editkit.requests import EditRequest, Objective
from editkit.tokens import encode, fill, pad_id, prompt_target_ids, right_pad

__all__ = ["SubjectNoise", "noise_std_of", "noised_distribution", "replicas", "resolve_request",
           "reverse_tracing_target", "subject_noise", "target_term"]


def replicas(request: EditRequest) -> int:
    """Rows per prompt in an optimisation: ``samples`` noise draws for ``force``, else 1."""
    return request.objective.samples if request.objective.name == "force" else 1


def noise_std_of(model: nn.Module, tokenizer, adapter, request: EditRequest) -> float:
    """ν of the request's objective: ``noise_std``, else ``noise_multiple`` · σ of the
    subject's token embeddings (what a tracer without ``texts`` uses)."""
    ob = request.objective
    if ob.noise_std is not None:
        return float(ob.noise_std)
    return ob.noise_multiple * embedding_std(model, tokenizer, [request.subject], adapter)


def target_term(nll: torch.Tensor, objectives: Sequence[Objective]) -> torch.Tensor:
    """The target part of each request's loss from its mean NLL ``nll`` (n,).

    ``erase``: ``max(exp(−nll) − floor, 0)`` (minimise the probability of target_true, the
    paper's fact-erasure loss); every other objective: ``nll`` itself. With no ``erase`` in
    ``objectives`` the tensor is returned unchanged (error injection stays bit-for-bit).
    """
    erase = [ob.name == "erase" for ob in objectives]
    if not any(erase):
        return nll
    mask = torch.tensor(erase, device=nll.device)
    floor = torch.tensor([ob.floor for ob in objectives], device=nll.device, dtype=nll.dtype)
    prob_term = (torch.exp(-nll) - floor).clamp_min(0.0)
    return torch.where(mask, prob_term, nll)


@dataclasses.dataclass
class _Entry:
    subject_range: tuple[int, int]
    noise: torch.Tensor  # (samples, subject tokens, d), residual-stream units


class SubjectNoise:
    """Adds causal tracing's subject noise to the prompts registered with :meth:`add`.

    Used as a context manager around forwards: a forward hook on the embedding module finds,
    for every row of the batch, the registered prompt its ids start with (rows are
    right-padded token sequences of a prompt, optionally followed by target tokens) and adds
    that prompt's noise at its subject tokens. The k-th row of a forward that carries a given
    prompt gets noise sample ``k mod samples``, so a batch holding each prompt ``samples``
    times sees every draw once. Rows of other prompts are left alone.
    """

    def __init__(self, model: nn.Module, tokenizer, adapter) -> None:
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.hidden = adapter.module(model, "embedding").weight.shape[-1]
        self._entries: dict[int, dict[tuple[int, ...], _Entry]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def add(self, prompt: str, subject: str, noise_std: float, samples: int, seed: int) -> None:
        """Noise ``fill(prompt, subject)`` (``prompt`` with ``{}``) as a trace of it would."""
        b, e = subject_token_range(self.tokenizer, prompt, subject)
        ids = tuple(encode(self.tokenizer, fill(prompt, subject)))
        noise = make_noise(samples, e - b, self.hidden, noise_std, seed)
        self._entries.setdefault(len(ids), {})[ids] = _Entry(
            (b, e), embedding_noise(self.model, self.adapter, noise))

    def add_request(self, request: EditRequest, prompts: Sequence[str], noise_std: float
                    ) -> None:
        """Register ``prompts`` (each with ``{}``) of a request with its objective's noise."""
        ob = request.objective
        for p in prompts:
            self.add(p, request.subject, noise_std, ob.samples, ob.seed)

    def _match(self, row: list[int]) -> tuple[tuple[int, ...], _Entry] | None:
        best = None
        for length in sorted(self._entries, reverse=True):  # longest registered prompt first
            if length <= len(row):
                key = tuple(row[:length])
                entry = self._entries[length].get(key)
                if entry is not None:
                    best = (key, entry)
                    break
        return best

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not args or not torch.is_tensor(args[0]) or args[0].dim() != 2:
            return output
        ids = args[0].tolist()
        seen: dict[tuple[int, ...], int] = {}
        out = None
        for i, row in enumerate(ids):
            found = self._match(row)
            if found is None:
                continue
            key, entry = found
            k = seen.get(key, 0)
            seen[key] = k + 1
            if out is None:
                out = output.clone()
            b, e = entry.subject_range
            noise = entry.noise[k % entry.noise.shape[0]].to(device=out.device, dtype=out.dtype)
            out[i, b:e] = out[i, b:e] + noise
        return output if out is None else out

    @contextlib.contextmanager
    def active(self) -> Iterator[SubjectNoise]:
        """Install the hook for the duration of the block (removed in ``finally``)."""
        if not len(self):
            yield self
            return
        handle = self.adapter.module(self.model, "embedding").register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


@contextlib.contextmanager
def subject_noise(model: nn.Module, tokenizer, adapter, requests: Sequence[EditRequest],
                  prompts_of: Any) -> Iterator[SubjectNoise]:
    """:class:`SubjectNoise` active for the ``force`` requests among ``requests``, each with
    the prompts ``prompts_of(request)`` (a nullcontext-like no-op when there is none)."""
    noise = SubjectNoise(model, tokenizer, adapter)
    for r in requests:
        if r.objective.name == "force":
            noise.add_request(r, prompts_of(r), noise_std_of(model, tokenizer, adapter, r))
    with noise.active():
        yield noise


@torch.no_grad()
def noised_distribution(model: nn.Module, tokenizer, adapter, request: EditRequest,
                        noise_std: float | None = None) -> torch.Tensor:
    """Mean next-token distribution after the request's prompt over ``samples`` subject-noised
    runs (the corrupted run of a trace: tracer seed = the objective's seed); (vocab,)."""
    ob = request.objective
    nu = noise_std_of(model, tokenizer, adapter, request) if noise_std is None else noise_std
    noise = SubjectNoise(model, tokenizer, adapter)
    noise.add(request.prompt, request.subject, nu, ob.samples, ob.seed)
    ids = encode(tokenizer, request.text)
    batch = right_pad([ids] * ob.samples, pad_id(tokenizer), next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with noise.active():
            logits = model(**batch.model_inputs(), use_cache=False).logits[:, len(ids) - 1]
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=-1).mean(0)


def reverse_tracing_target(model: nn.Module, tokenizer, adapter, request: EditRequest,
                           noise_std: float | None = None, candidates: int = 50) -> str:
    """o_noise: the most probable next token of the subject-noised run that reads back as a
    target word (``" " + word`` tokenizes to that token first) and is not ``target_true``."""
    probs = noised_distribution(model, tokenizer, adapter, request, noise_std)
    true = (request.target_true or "").strip()
    for tid in torch.argsort(probs, descending=True)[:candidates].tolist():
        word = tokenizer.decode([tid]).strip()
        if not word or word == true or not any(ch.isalnum() for ch in word):
            continue
        _, target_ids = prompt_target_ids(tokenizer, request.text, word)
        if target_ids and target_ids[0] == tid:
            return word
    raise InvalidRequestError(
        f"no word-like token among the {candidates} most probable next tokens of the "
        f"subject-noised run of {request.text!r}; tracing reversal needs one (lower the noise "
        "or choose another request)")


def resolve_request(model: nn.Module, tokenizer, adapter, request: EditRequest) -> EditRequest:
    """The request as the optimisation sees it: for ``reverse_tracing`` its ``target_new`` is
    o_noise of the unedited model (:func:`reverse_tracing_target`); others unchanged."""
    if request.objective.name != "reverse_tracing":
        return request
    o_noise = reverse_tracing_target(model, tokenizer, adapter, request)
    return dataclasses.replace(request, target_new=o_noise)
