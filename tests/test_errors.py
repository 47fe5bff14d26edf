"""Bad input → the right EditkitError subclass, with the bad value named in the message."""

from __future__ import annotations

import pytest
import torch
from conftest import snapshot, state_equal, tiny_model

import editkit
from editkit import EditRequest
from editkit.methods.ft import FT, FTHyperParams
from editkit.tokens import subject_index_in_text

GOOD = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}


def _case(name):
    return pytest.param(name, id=name)


CASES = [
    _case("missing placeholder"), _case("two placeholders"), _case("empty target"),
    _case("non-string subject"), _case("subject absent"), _case("unknown model type"),
    _case("layer out of range"), _case("wrong patch base"), _case("unknown method"),
    _case("unknown edit id"), _case("not a patch file"), _case("malformed counterfact"),
    _case("no tokenizer"), _case("wrong hparams type"), _case("non-finite update"),
    _case("patch for another architecture"),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, gpt2_and_tok, tmp_path, sentencepiece_tokenizer):
    model, tok = gpt2_and_tok
    base = snapshot(model)

    def expect(error, needle, fn):
        with pytest.raises(error) as info:
            fn()
        assert isinstance(info.value, editkit.EditkitError)
        assert needle in str(info.value), str(info.value)

    small = FTHyperParams(layer=1, num_steps=2)
    if case == "missing placeholder":
        expect(editkit.InvalidRequestError, "plays football",
               lambda: EditRequest(**{**GOOD, "prompt": "plays football"}))
    elif case == "two placeholders":
        expect(editkit.InvalidRequestError, "found 2",
               lambda: EditRequest(**{**GOOD, "prompt": "{} and {}"}))
    elif case == "empty target":
        expect(editkit.InvalidRequestError, "target_new", lambda: EditRequest(**{**GOOD, "target_new": ""}))
    elif case == "non-string subject":
        expect(editkit.InvalidRequestError, "['LeBron']",
               lambda: EditRequest(**{**GOOD, "subject": ["LeBron"]}))
    elif case == "subject absent":
        expect(editkit.SubjectNotFoundError, "Zorblax",
               lambda: subject_index_in_text(tok, "LeBron James plays", "Zorblax"))
    elif case == "unknown model type":
        model.config.model_type = "mamba-ish"
        expect(editkit.UnsupportedModelError, "mamba-ish", lambda: FT(model, tok, small))
    elif case == "layer out of range":
        expect(editkit.InvalidHyperParamsError, "layer=7",
               lambda: FT(model, tok, FTHyperParams(layer=7)))
    elif case == "wrong patch base":
        ed = FT(model, tok, small).apply(EditRequest(**GOOD))
        path = ed.history[-1].patch.save(tmp_path / "p.safetensors")
        other = tiny_model("gpt2", len(tok), seed=3)
        expect(editkit.PatchMismatchError, "mlp.c_proj.weight",
               lambda: editkit.load_patch(path).apply_to(other))
        ed.revert()
    elif case == "unknown method":
        expect(editkit.UnknownMethodError, "rom3", lambda: editkit.get_method("rom3"))
    elif case == "unknown edit id":
        ed = FT(model, tok, small).apply(EditRequest(**GOOD))
        expect(editkit.HistoryError, "424242", lambda: ed.revert(424242))
        ed.revert()
    elif case == "not a patch file":
        (tmp_path / "x.safetensors").write_text("hello")
        expect(editkit.PatchMismatchError, "x.safetensors",
               lambda: editkit.load_patch(tmp_path / "x.safetensors"))
    elif case == "malformed counterfact":
        expect(editkit.DatasetFormatError, "record 99",
               lambda: EditRequest.from_counterfact({"case_id": 99, "requested_rewrite": {}}))
    elif case == "no tokenizer":
        model.config.name_or_path = str(tmp_path / "nowhere")
        expect(editkit.TokenizerError, "nowhere", lambda: FT(model, None, small))
    elif case == "wrong hparams type":
        expect(editkit.EditkitError, "FTHyperParams",
               lambda: FT(model, tok, editkit.HyperParams()))
    elif case == "non-finite update":
        ed = FT(model, tok, FTHyperParams(layer=1, lr=1e30, num_steps=3))  # finite, diverges
        expect(editkit.EditFailedError, "NaN", lambda: ed.apply(EditRequest(**GOOD)))
    elif case == "patch for another architecture":
        ed = FT(model, tok, small).apply(EditRequest(**GOOD))
        patch = ed.history[-1].patch
        ed.revert()
        llama = tiny_model("llama", len(sentencepiece_tokenizer))
        expect(editkit.PatchMismatchError, "transformer.h.1", lambda: patch.apply_to(llama))
    assert state_equal(model, base), f"{case}: the model changed"
    assert torch.is_grad_enabled()
