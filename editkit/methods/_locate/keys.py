"""Step 1 of ROME: the key k* that selects the subject (paper §3.1, eq. 3).

    k* = 1/N Σⱼ k(xⱼ + s)

the input of the edited matrix (the MLP key) at the subject's last token, averaged over the
subject placed behind N context prefixes xⱼ. The key of the bare prompt (no prefix) is
returned too: the reference inserts that one in the update, r-ROME inserts k*.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editkit.methods._locate.templates import PLAIN, apply_template
from editkit.nethooks import Trace
from editkit.requests import EditRequest
from editkit.tokens import encode, fill, pad_id, right_pad, subject_last_index


def fact_token_index(tokenizer, prompt: str, subject: str, fact_token: str) -> int:
    """Index of the edited token in ``fill(prompt, subject)``: the subject's last token
    (``"subject_last"``) or the prompt's last token (``"last"``)."""
    if fact_token == "last":
        return len(encode(tokenizer, fill(prompt, subject))) - 1
    return subject_last_index(tokenizer, prompt, subject)


@torch.no_grad()
def keys_at(model: nn.Module, tokenizer, adapter, layer: int, prompts: Sequence[str],
            subject: str, fact_token: str = "subject_last") -> torch.Tensor:
    """Keys (inputs of ``mlp_out`` at ``layer``) at the edited token of each prompt; (n, d_in).

    ``prompts`` contain ``{}`` for the subject. One batched forward, stopped after ``layer``.
    """
    device = next(model.parameters()).device
    idx = [fact_token_index(tokenizer, p, subject, fact_token) for p in prompts]
    batch = right_pad([encode(tokenizer, fill(p, subject)) for p in prompts], pad_id(tokenizer),
                      device)
    name = adapter.module_name("mlp_out", layer)
    with Trace(model, [name], retain_input=True, stop=True) as tr:
        model(**batch.model_inputs(), use_cache=False)
    keys = tr.inputs[name]
    return keys[torch.arange(len(prompts), device=device), torch.tensor(idx, device=device)].float()


@dataclass
class KeyResult:
    """k* (template average) and the bare prompt's key, both float32 on the model's device."""

    k_star: torch.Tensor
    k_plain: torch.Tensor
    n_templates: int


def compute_key(model: nn.Module, tokenizer, adapter, layer: int, request: EditRequest,
                templates: Sequence[str], fact_token: str = "subject_last") -> KeyResult:
    """k* = mean over ``templates`` of the key at the subject's last token (eq. 3)."""
    prompts = [apply_template(t, request.prompt) for t in templates]
    if PLAIN not in templates:
        prompts.append(request.prompt)
    keys = keys_at(model, tokenizer, adapter, layer, prompts, request.subject, fact_token)
    n = len(templates)
    plain = keys[list(templates).index(PLAIN)] if PLAIN in templates else keys[-1]
    return KeyResult(k_star=keys[:n].mean(0), k_plain=plain, n_templates=n)
