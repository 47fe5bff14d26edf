"""Token-level helpers: subject positions, right-padded batches, target scoring.

Subject location works on characters, not token ids: the subject's character span in the
prompt is known from the ``{}`` placeholder, and the subject's last token is the last token
whose character span overlaps it. That is robust to BPE merges across the subject boundary
(the merged token is the last token that still contains subject characters), to BOS tokens,
and to a subject that occurs twice (the placeholder's occurrence is the one edited).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editkit.errors import InvalidRequestError, SubjectNotFoundError

PLACEHOLDER = "{}"

#: Config fields that hold a model's maximum sequence length, in the order families use them.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")


def context_length(model) -> int | None:
    """The model's maximum sequence length (positions) from its config, if it declares one."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_fits_context(tokenizer, model, texts: Sequence[str], what: str,
                       reserve: int = 0) -> None:
    """Refuse a text whose tokens (plus ``reserve`` more) exceed the model's context.

    Clipping a prompt would change what is edited, so an over-long prompt is an
    :class:`InvalidRequestError` naming the limit rather than a raw ``IndexError`` from the
    position embedding deep inside a forward pass.
    """
    limit = context_length(model)
    if limit is None:
        return
    for text in texts:
        n = len(encode(tokenizer, text)) + reserve
        if n > limit:
            extra = f" (+{reserve} for context prefixes)" if reserve else ""
            raise InvalidRequestError(
                f"{what} {text[:80]!r} needs {n} tokens{extra} but the model's context size "
                f"is {limit} positions; shorten it to fit the limit of {limit}")


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees a prompt (with the tokenizer's BOS, if any)."""
    return list(tokenizer(text)["input_ids"])


@dataclass
class Batch:
    """Right-padded token batch. ``lengths[i]`` real tokens, then padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def right_pad(sequences: Sequence[Sequence[int]], pad: int, device=None) -> Batch:
    """Stack id sequences into a right-padded batch (positions stay 0..n-1 for every row)."""
    if not sequences:
        raise ValueError("cannot build a batch from no sequences")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    batch = Batch(ids, mask, [len(s) for s in sequences])
    return batch.to(device) if device is not None else batch


def fill(prompt: str, subject: str) -> str:
    return prompt.replace(PLACEHOLDER, subject, 1)


def subject_char_span(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of the subject once it is filled into ``prompt``'s ``{}``."""
    start = prompt.find(PLACEHOLDER)
    if start < 0:
        raise SubjectNotFoundError(f"prompt {prompt!r} has no '{{}}' placeholder for the subject")
    return start, start + len(subject)


def _token_spans(tokenizer, text: str) -> list[tuple[int, int]] | None:
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    return [tuple(o) for o in enc["offset_mapping"]]


def token_index_at_char(tokenizer, text: str, char_end: int, char_start: int = 0) -> int:
    """Index of the last token that overlaps ``text[char_start:char_end]``.

    Uses the fast tokenizer's offsets; slow tokenizers fall back to tokenizing the prefix
    ``text[:char_end]`` (the reference implementation's method).
    """
    spans = _token_spans(tokenizer, text)
    if spans is not None:
        hits = [i for i, (a, b) in enumerate(spans) if b > a and a < char_end and b > char_start]
        if hits:
            return hits[-1]
    else:
        n = len(encode(tokenizer, text[:char_end]))
        if n > 0 and char_end > char_start:
            return n - 1
    raise SubjectNotFoundError(
        f"no token covers characters {char_start}:{char_end} ({text[char_start:char_end]!r}) of "
        f"{text!r}; check that the subject is non-empty and survives tokenization"
    )


def subject_last_index(tokenizer, prompt: str, subject: str) -> int:
    """Token index of the subject's last token in ``fill(prompt, subject)``."""
    start, end = subject_char_span(prompt, subject)
    return token_index_at_char(tokenizer, fill(prompt, subject), end, start)


def subject_positions(tokenizer, prompts: Sequence[str], subjects: Sequence[str],
                      padding_side: str | None = None) -> tuple[dict, list[int]]:
    """Tokenize filled ``prompts`` as one padded batch and locate each subject's last token.

    ``padding_side`` (default: the tokenizer's) may be ``"left"``: positions then include
    the row's padding offset, so they index the returned batch directly.
    Returns ``(batch encoding, positions)``.
    """
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    texts = [fill(p, s) for p, s in zip(prompts, subjects, strict=True)]
    ids = [encode(tokenizer, t) for t in texts]
    width = max(len(x) for x in ids)
    rows, masks, positions = [], [], []
    for prompt, subject, row in zip(prompts, subjects, ids, strict=True):
        pad = width - len(row)
        offset = pad if side == "left" else 0
        rows.append([pad_id(tokenizer)] * pad + row if side == "left"
                    else row + [pad_id(tokenizer)] * pad)
        masks.append([0] * pad + [1] * len(row) if side == "left" else [1] * len(row) + [0] * pad)
        positions.append(offset + subject_last_index(tokenizer, prompt, subject))
    batch = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
    return batch, positions


def subject_index_in_text(tokenizer, text: str, subject: str, occurrence: str = "last") -> int:
    """Subject's last-token index in an already filled ``text``.

    If the subject occurs several times, ``occurrence`` picks ``"first"`` or ``"last"``
    (default ``"last"``, the occurrence nearest to the prediction).
    """
    if not subject or subject not in text:
        raise SubjectNotFoundError(
            f"subject {subject!r} does not occur in {text!r}; pass the prompt with the subject "
            "spelled exactly as in the request"
        )
    start = text.rfind(subject) if occurrence == "last" else text.find(subject)
    return token_index_at_char(tokenizer, text, start + len(subject), start)


def prompt_target_ids(tokenizer, prompt_text: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) for scoring ``" " + target`` after ``prompt_text``.

    Tokenizes the whole ``prompt_text + " " + target`` and splits it where the prompt's own
    tokens end, so tokenizers with a leading-space convention (GPT-2 byte level) and without
    one (SentencePiece) both see the text they would see in running prose. If the tokenizer
    merges across the boundary, the target is tokenized on its own instead.
    """
    target = target.strip()
    prompt_ids = encode(tokenizer, prompt_text)
    full_ids = encode(tokenizer, f"{prompt_text} {target}")
    eos = tokenizer.eos_token_id
    if eos is not None and full_ids and full_ids[-1] == eos and prompt_ids and prompt_ids[-1] == eos:
        full_ids, prompt_ids = full_ids[:-1], prompt_ids[:-1]  # tokenizers that append EOS
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids):]
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    return prompt_ids, list(target_ids)


@dataclass
class ScoringBatch:
    """Prompt+target sequences with the positions whose logits predict each target token."""

    batch: Batch
    target_ids: list[list[int]]
    prompt_lengths: list[int]


def build_scoring_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str],
                        device=None) -> ScoringBatch:
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    seqs, tids, plens = [], [], []
    for p, t in zip(prompts, targets, strict=True):
        pid, tid = prompt_target_ids(tokenizer, p, t)
        seqs.append(pid + tid)
        tids.append(tid)
        plens.append(len(pid))
    return ScoringBatch(right_pad(seqs, pad_id(tokenizer), device), tids, plens)


def target_token_logprobs(logits: torch.Tensor, sb: ScoringBatch) -> list[torch.Tensor]:
    """Per-token log-probs of each row's target, from the batch's logits (keeps the graph)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (tid, plen) in enumerate(zip(sb.target_ids, sb.prompt_lengths, strict=True)):
        pos = torch.arange(plen - 1, plen - 1 + len(tid), device=logits.device)
        ids = torch.tensor(tid, device=logits.device)
        out.append(logp[i, pos, ids])
    return out


def target_nll(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],
               device=None) -> torch.Tensor:
    """Mean per-token NLL of each ``" " + target`` after its prompt; differentiable, (n,)."""
    device = device or next(model.parameters()).device
    sb = build_scoring_batch(tokenizer, prompts, targets, device)
    logits = model(**sb.batch.model_inputs()).logits
    return torch.stack([-lp.mean() for lp in target_token_logprobs(logits, sb)])


@torch.no_grad()
def score_targets(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                  batch_size: int = 64) -> torch.Tensor:
    """Mean per-token log-prob of ``" " + target`` after each prompt, batched; shape (n,)."""
    scores = []
    for i in range(0, len(prompts), batch_size):
        nll = target_nll(model, tokenizer, prompts[i:i + batch_size], targets[i:i + batch_size])
        scores.append(-nll.cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


@torch.no_grad()
def greedy_next_tokens(model: nn.Module, tokenizer, prompts: Sequence[str]) -> list[int]:
    """The argmax next token after each prompt."""
    device = next(model.parameters()).device
    seqs = [encode(tokenizer, p) for p in prompts]
    b = right_pad(seqs, pad_id(tokenizer), device)
    logits = model(**b.model_inputs()).logits
    return [int(logits[i, n - 1].argmax()) for i, n in enumerate(b.lengths)]
