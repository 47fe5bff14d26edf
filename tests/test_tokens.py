from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from editkit import SubjectNotFoundError
from editkit.tokens import (
    encode,
    prompt_target_ids,
    score_targets,
    subject_index_in_text,
    subject_last_index,
)


@pytest.fixture(params=["bytelevel", "sentencepiece"])
def tok(request, bytelevel_tokenizer, sentencepiece_tokenizer):
    return bytelevel_tokenizer if request.param == "bytelevel" else sentencepiece_tokenizer


def _decoded_upto(tok, text, idx):
    return tok.decode(encode(tok, text)[: idx + 1], skip_special_tokens=True)


def test_subject_last_token(tok):
    prompt, subject = "{} is located in the city of", "The Eiffel Tower"
    idx = subject_last_index(tok, prompt, subject)
    assert _decoded_upto(tok, prompt.format(subject), idx).strip() == subject


def test_subject_mid_prompt_and_twice(tok):
    prompt = "Everyone knows that {} plays the sport of"
    idx = subject_last_index(tok, prompt, "LeBron James")
    assert _decoded_upto(tok, prompt.format("LeBron James"), idx).endswith("LeBron James")
    # The subject appears twice; the placeholder's occurrence is the one returned.
    twice = "{} and LeBron James play the sport of"
    first = subject_last_index(tok, twice, "LeBron James")
    assert _decoded_upto(tok, twice.format("LeBron James"), first).strip() == "LeBron James"
    text = twice.format("LeBron James")
    assert subject_index_in_text(tok, text, "LeBron James", "first") == first
    assert subject_index_in_text(tok, text, "LeBron James", "last") > first


def test_boundary_merge_picks_token_containing_last_subject_char(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    # No space after the subject: BPE may merge "Paris" with the following "'s".
    prompt, subject = "{}'s mayor is", "Paris"
    idx = subject_last_index(tok, prompt, subject)
    text = prompt.format(subject)
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    start, end = offsets[idx]
    assert start < len(subject) <= end or end == len(subject)
    assert all(s >= len(subject) for s, _ in offsets[idx + 1:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_subject_positions_in_padded_batches(tok, side):
    from editkit.tokens import subject_positions

    prompts = ["{} is located in", "Everyone knows that {} plays the sport of", "{}"]
    subjects = ["The Eiffel Tower", "LeBron James", "Paris"]
    batch, pos = subject_positions(tok, prompts, subjects, padding_side=side)
    for row, mask, p, subject in zip(batch["input_ids"], batch["attention_mask"], pos,
                                     subjects, strict=True):
        assert mask[p] == 1
        real = row[mask.bool()].tolist()
        offset = int((~mask.bool()).sum()) if side == "left" else 0
        text = tok.decode(real[: p - offset + 1], skip_special_tokens=True)
        assert text.strip().endswith(subject)
    if side == "left":
        assert (batch["attention_mask"][:, -1] == 1).all()


def test_subject_not_found(tok):
    with pytest.raises(SubjectNotFoundError, match="Zorblax"):
        subject_index_in_text(tok, "Paris is a city", "Zorblax")
    with pytest.raises(SubjectNotFoundError):
        subject_last_index(tok, "no placeholder", "Paris")


def test_prompt_target_split_reassembles(tok):
    p_ids, t_ids = prompt_target_ids(tok, "The Eiffel Tower is located in the city of", "Paris")
    assert t_ids and tok.decode(t_ids).strip() == "Paris"
    assert p_ids == encode(tok, "The Eiffel Tower is located in the city of")


def test_batched_scores_equal_one_at_a_time(tok):
    model = tiny_model("gpt2", len(tok))
    prompts = ["The Eiffel Tower is in", "LeBron James plays", "A", "Danielle Darrieux speaks"]
    targets = ["Paris", "basketball", "multi word target", "French"]
    batched = score_targets(model, tok, prompts, targets)
    single = torch.cat([score_targets(model, tok, [p], [t]) for p, t in zip(prompts, targets, strict=True)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    # Against a direct computation for one row.
    p_ids, t_ids = prompt_target_ids(tok, prompts[2], targets[2])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p_ids + t_ids])).logits[0], -1)
    manual = torch.stack([logp[len(p_ids) - 1 + i, t] for i, t in enumerate(t_ids)]).mean()
    assert abs(manual.item() - batched[2].item()) < 1e-5
