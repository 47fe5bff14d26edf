"""The straightforward causal trace: one full forward per (token, layer, kind).

This is the paper's procedure written as plainly as possible (Meng et al. 2022, §2.1): for
every token i and layer l, run the whole model on the ``n`` corrupted copies of the prompt
(noise on the subject embeddings) with hooks that overwrite the restored state(s) with their
clean values, and read P(answer) at the last position. The severed kinds additionally overwrite
the MLP (or attention) output of the restored token in every layer with its value in the
corrupted run, as the paper's Fig. 7 experiment does (at layers at or below l this changes
nothing, so the fast implementation only freezes the layers above l).

It shares only the set-up (kinds and windows, tokenization, subject range, answer token,
noise: :mod:`~editkit.tracing.kinds`, :mod:`~editkit.tracing.corruption`) and the result type
(:mod:`~editkit.tracing.results`) with the fast tracer :mod:`editkit.tracing.trace`, so the two
compute the same quantity through independent forward machinery; the test-suite checks they
agree to 1e-4. It is slow (~3·T·L forwards per prompt) and meant as the oracle and the
baseline of ``benchmarks/bench_tracing.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from editkit.nethooks import Trace
from editkit.tracing import corruption
from editkit.tracing import kinds as kind_table
from editkit.tracing.results import TraceResult


def trace_naive(model: nn.Module, tokenizer, prompt: str, subject: str,
                target: str | None = None, *,
                kinds: str | Iterable[str] | None = kind_table.KINDS,
                window: int | None = None, samples: int = corruption.DEFAULT_SAMPLES,
                noise: float | None = None, noise_std: float | None = None,
                noise_multiple: float | None = None, uniform_noise: bool = False,
                replace: bool | str = False, token_range=None, texts=None, seed: int = 0,
                noise_rng: str = "torch", adapter=None) -> dict[str, TraceResult]:
    """Same arguments and results as :func:`~editkit.tracing.causal_trace`, one cell at a time."""
    from editkit.registry import get_adapter

    adapter = adapter or get_adapter(model)
    kinds = kind_table.check_kinds(kinds)
    L = adapter.num_layers(model)
    window = kind_table.check_window(window, L)
    multiple, noise_std = corruption.resolve_noise(noise, noise_multiple, noise_std)
    prompt = corruption.normalise_prompt(prompt, subject)
    replacement = None
    if isinstance(replace, str):
        replacement = corruption.subject_embeddings(model, tokenizer, replace, adapter)
        noise_std = 0.0
    elif noise_std is None:  # σ over the given texts, else over this prompt's subject
        noise_std = corruption.noise_std_for(model, tokenizer, adapter, multiple,
                                             texts or [subject])
    emb_name = adapter.module_name("embedding")
    hidden = adapter.module(model, "embedding").weight.shape[-1]
    tp = corruption.prepare_prompt(tokenizer, prompt, subject, target, hidden_size=hidden,
                                   samples=samples, noise_std=float(noise_std), seed=seed,
                                   uniform=uniform_noise, replace=bool(replace),
                                   replacement=replacement, rng=noise_rng)
    T = tp.n_tokens
    tokens = kind_table.resolve_token_range(token_range, T, tp.subject_range)
    ids = torch.tensor([tp.input_ids], device=corruption.model_device(model))
    noisy_ids = ids.expand(samples, -1)
    names = {slot: [adapter.module_name(slot, i) for i in range(L)]
             for slot in ("block", "mlp", "attn")}

    noise = corruption.embedding_noise(model, adapter, tp.noise)

    def add_noise(h: torch.Tensor) -> torch.Tensor:
        return corruption.corrupt(h, noise, tp.subject_range, tp.replace)

    with corruption.eval_mode(model):
        # clean run: every state we may restore
        all_names = names["block"] + names["mlp"] + names["attn"]
        with Trace(model, all_names, retain_output=True) as clean:
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        top1 = int(logits[0].argmax())
        if tp.answer_id is None:
            tp.answer_id, tp.answer = top1, tokenizer.decode([top1]).strip()
        p_clean = float(corruption.answer_probs(logits, tp.answer_id)[0])

        # corrupted run: P*(o), and the corrupted MLP/attention outputs the severed kinds freeze
        with Trace(model, names["mlp"] + names["attn"], retain_output=True) as bad, \
                Trace(model, [emb_name], edit_output=lambda _, h: add_noise(h)):
            logits = model(input_ids=noisy_ids, use_cache=False).logits[:, -1]
        p_corrupt = float(corruption.answer_probs(logits, tp.answer_id).mean())

        def restored_prob(slot: str, token: int, layers: Iterable[int], freeze: str | None
                          ) -> float:
            patch = {names[slot][i]: i for i in layers}
            frozen = set(names[freeze]) if freeze else set()

            def edit(name: str, h: torch.Tensor) -> torch.Tensor:
                if name == emb_name:
                    return add_noise(h)
                h = h.clone()
                if name in frozen:
                    h[:, token] = bad.outputs[name][:, token]
                if name in patch:
                    h[:, token] = clean.outputs[name][0, token]
                return h

            with Trace(model, [emb_name, *patch, *frozen], edit_output=edit):
                logits = model(input_ids=noisy_ids, use_cache=False).logits[:, -1]
            return float(corruption.answer_probs(logits, tp.answer_id).mean())

        results = {}
        for kind in kinds:
            slot, freeze = kind_table.SLOT_OF_KIND[kind], kind_table.FREEZE_OF_KIND.get(kind)
            scores = np.full((T, L), np.nan, dtype=np.float64)
            for t in range(T) if tokens is None else sorted(tokens):
                for layer in range(L):
                    layers = [layer] if slot == "block" else kind_table.window_layers(layer, window, L)
                    scores[t, layer] = restored_prob(slot, t, layers, freeze)
            results[kind] = TraceResult(
                kind=kind, scores=scores, p_clean=p_clean, p_corrupt=p_corrupt,
                tokens=tp.tokens, subject_range=tp.subject_range,
                window=1 if slot == "block" else window, prompt=prompt, subject=subject,
                answer=tp.answer, answer_id=tp.answer_id, samples=samples,
                noise_std=float(noise_std), correct_prediction=top1 == tp.answer_id,
                token_range=None if tokens is None else sorted(tokens),
            )
    return results
