"""Text generation for the fluency and consistency metrics (GE, RS).

A small, architecture-independent decoding loop: prompts are grouped by token length so
that every batch is rectangular (no padding, so positions and attention need no special
care for any family), the prompt is run once, and new tokens are appended one at a time
through the model's own key/value cache. Greedy by default; ``top_k`` sampling (the ROME
evaluation sampled with top-k = 5) with a seeded generator is optional.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from editkit.models import compat
from editkit.tokens import encode


@dataclass(frozen=True)
class GenerationConfig:
    """How the GE/RS texts are generated.

    ``max_new_tokens``: continuation length (always generated in full; EOS does not stop it
    unless ``stop_at_eos``). ``top_k=None`` is greedy decoding; an integer samples from the
    ``top_k`` most likely tokens at ``temperature`` with ``torch.Generator`` seeded by
    ``seed``. ``batch_size``: prompts per forward pass.
    """

    max_new_tokens: int = 50
    top_k: int | None = None
    temperature: float = 1.0
    seed: int = 0
    stop_at_eos: bool = False
    batch_size: int = 32

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (stored in reports)."""
        return asdict(self)


def _choose(logits: torch.Tensor, config: GenerationConfig,
            generator: torch.Generator | None) -> torch.Tensor:
    if config.top_k is None:
        return logits.argmax(dim=-1)
    values, indices = logits.float().topk(min(config.top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(values / config.temperature, dim=-1)
    pick = torch.multinomial(probs.cpu(), 1, generator=generator).to(indices.device)
    return indices.gather(-1, pick).squeeze(-1)


def context_length(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config, if it declares one."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, prompts: Sequence[str],
                 config: GenerationConfig | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, new ids) for every prompt, in the order given.

    Generation stops early where prompt + continuation would exceed the model's context
    length (``config.max_position_embeddings``).
    """
    config = config or GenerationConfig()
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, p) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    generator = None
    if config.top_k is not None:
        generator = torch.Generator().manual_seed(config.seed)
    eos = tokenizer.eos_token_id
    cache_arg = compat.cache_argument(model) or "past_key_values"
    limit = context_length(model)
    result: list[tuple[list[int], list[int]]] = [([], [])] * len(prompts)
    for length in sorted(by_length):
        rows = by_length[length]
        steps = config.max_new_tokens if limit is None else \
            max(0, min(config.max_new_tokens, limit - length))
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start:start + config.batch_size]
            if steps == 0:
                for i in chunk:
                    result[i] = (encoded[i], [])
                continue
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            mask = torch.ones((len(chunk), length + steps), dtype=torch.long, device=device)
            out = model(input_ids=ids, attention_mask=mask[:, :length], use_cache=True)
            new: list[list[int]] = [[] for _ in chunk]
            done = torch.zeros(len(chunk), dtype=torch.bool)
            for step in range(steps):
                nxt = _choose(out.logits[:, -1, :], config, generator)
                for j, t in enumerate(nxt.tolist()):
                    if not done[j]:
                        new[j].append(t)
                if config.stop_at_eos and eos is not None:
                    done |= (nxt.cpu() == eos)
                    if bool(done.all()):
                        break
                if step + 1 < steps:
                    out = model(input_ids=nxt[:, None], use_cache=True,
                                attention_mask=mask[:, :length + step + 1],
                                **{cache_arg: compat.cache_of(out)})
            for j, i in enumerate(chunk):
                result[i] = (encoded[i], new[j])
    return result


def generate(model: nn.Module, tokenizer, prompts: Sequence[str],
             config: GenerationConfig | None = None, *, full_text: bool = True) -> list[str]:
    """Generate a continuation of every prompt.

    Returns the decoded prompt + continuation (``full_text=True``, what the ROME evaluation
    measures GE on) or the continuation alone. Special tokens are dropped when decoding.
    """
    texts = []
    for prompt_ids, new_ids in generate_ids(model, tokenizer, prompts, config):
        full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        if full_text:
            texts.append(full)
            continue
        head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        texts.append(full[len(head):] if full.startswith(head)
                     else tokenizer.decode(new_ids, skip_special_tokens=True))
    return texts
