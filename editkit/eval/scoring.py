"""Batched measurement of a model state on evaluation records.

All prompt × target rows of a record (rewrite, paraphrase and neighborhood prompts, each
with ``" " + target_new`` and ``" " + target_true``) go into one right-padded forward pass;
several records share a pass up to ``max_rows`` rows, and a record's rows are never split.
From each pass we read, per row, the mean per-token log-probability of the target (the
CounterFact probabilities, ROME eq. in §3: P = exp(−mean NLL)) and the teacher-forced argmax
predictions (zsRE token accuracy).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from editkit.eval.datasets import EvalRecord
from editkit.eval.generation import GenerationConfig, generate
from editkit.eval.metrics import RecordScores
from editkit.protocols import TokenizerLike
from editkit.tokens import build_scoring_batch

logger = logging.getLogger(__name__)

PROB_GROUPS = ("rewrite", "paraphrase", "neighborhood", "attribute")


@dataclass
class RowScore:
    """One prompt + target row: mean target log-prob, argmax ids and their correctness."""

    logprob: float
    predicted: list[int]
    correct: list[bool]


@dataclass(frozen=True)
class _Row:
    record: int
    group: str
    prompt_index: int
    slot: str  # "new", "true" (CounterFact) or "tok" (zsRE)
    prompt: str
    target: str


@torch.no_grad()
def score_rows(model: nn.Module, tokenizer: TokenizerLike, prompts: Sequence[str],
               targets: Sequence[str]) -> list[RowScore]:
    """Score ``" " + target`` after each prompt in ONE forward pass (rows right-padded)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    sb = build_scoring_batch(tokenizer, prompts, targets, device)
    logits = model(**sb.batch.model_inputs()).logits
    out = []
    for i, (tid, plen) in enumerate(zip(sb.target_ids, sb.prompt_lengths, strict=True)):
        pos = torch.arange(plen - 1, plen - 1 + len(tid), device=logits.device)
        row_logits = logits[i, pos].float()
        ids = torch.tensor(tid, device=logits.device)
        logp = torch.log_softmax(row_logits, dim=-1).gather(-1, ids[:, None]).squeeze(-1)
        pred = row_logits.argmax(dim=-1)
        out.append(RowScore(float(logp.mean()), pred.tolist(), (pred == ids).tolist()))
    return out


def _rows_of(record: EvalRecord, index: int, groups: Sequence[str]) -> list[_Row]:
    req = record.request
    rows: list[_Row] = []
    for group in groups:
        if record.kind == "zsre":
            if group == "neighborhood":
                if record.loc_prompt and record.loc_ans:
                    rows.append(_Row(index, group, 0, "tok", record.loc_prompt, record.loc_ans))
                continue
            for j, p in enumerate(record.prompts(group)):
                rows.append(_Row(index, group, j, "tok", p, req.target_new))
            continue
        if req.target_true is None:
            continue
        for j, p in enumerate(record.prompts(group)):
            rows.append(_Row(index, group, j, "new", p, req.target_new))
            rows.append(_Row(index, group, j, "true", p, req.target_true))
    return rows


def _pack(per_record: list[list[_Row]], max_rows: int) -> list[list[_Row]]:
    """Greedy packing of whole records into passes of at most ``max_rows`` rows."""
    passes: list[list[_Row]] = []
    current: list[_Row] = []
    for rows in per_record:
        if current and len(current) + len(rows) > max_rows:
            passes.append(current)
            current = []
        current = current + rows
    if current:
        passes.append(current)
    return passes


def score_records(model: nn.Module, tokenizer: TokenizerLike, records: Sequence[EvalRecord],
                  groups: Sequence[str], *, generation: GenerationConfig | None = None,
                  max_rows: int = 128, progress: bool = False,
                  desc: str = "scoring") -> list[RecordScores]:
    """Measure the current model on ``records``: one :class:`RecordScores` each.

    ``groups``: prompt groups to score (``rewrite``, ``paraphrase``, ``neighborhood``,
    ``attribute``). ``generation``: also generate texts from the generation prompts.
    ``max_rows``: rows per forward pass (a record with more rows gets a pass of its own).
    """
    results = [RecordScores() for _ in records]
    per_record = [_rows_of(r, i, groups) for i, r in enumerate(records)]
    passes = _pack(per_record, max_rows)
    was_training = model.training
    model.eval()
    try:
        for rows in tqdm(passes, desc=desc, unit="pass", disable=not progress, leave=False):
            scored = score_rows(model, tokenizer, [r.prompt for r in rows],
                                [r.target for r in rows])
            for row, s in zip(rows, scored, strict=True):
                res = results[row.record]
                if row.slot == "tok":
                    res.correct.setdefault(row.group, []).append(s.correct)
                    res.predicted.setdefault(row.group, []).append(s.predicted)
                    continue
                table = res.logprobs.setdefault(row.group, [])
                if row.slot == "new":
                    table.append([s.logprob, float("nan")])
                else:
                    table[row.prompt_index][1] = s.logprob
        if generation is not None:
            prompts = [(i, p) for i, r in enumerate(records) for p in r.generation_prompts]
            texts = generate(model, tokenizer, [p for _, p in prompts], generation) \
                if prompts else []
            for r in results:
                r.generations = []
            for (i, _), text in zip(prompts, texts, strict=True):
                results[i].generations.append(text)
    finally:
        model.train(was_training)
    return results
