"""Every registered built-in method, on every tiny model family: the Editor contract."""

from __future__ import annotations

import copy
import warnings

import pytest
from conftest import snapshot, state_equal

import editkit
from editkit import EditRequest, load_patch
from editkit.tokens import score_targets

# Methods that need a trained artifact before they can edit are covered by their own tests.
NEEDS_TRAINING = {"mend", "ke"}
METHODS = [m for m in editkit.list_methods()
           if m not in NEEDS_TRAINING and editkit.get_method(m).__module__.startswith("editkit.")]

# AlphaEdit confines each update to the least-used directions of the keys; on tiny *random*
# models the target's key has almost no component there, so efficacy is not expected (its
# math is covered by tests/test_alphaedit.py). Every other part of the contract still runs.
EFFICACY_NOT_EXPECTED = {"alphaedit"}

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def make_editor(method, model, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scaled-defaults warning for tiny models
        return editkit.get_method(method)(model, tok)


@pytest.mark.parametrize("method", METHODS)
def test_method_contract(method, family_model, tmp_path):
    fam, model, tok = family_model
    base = snapshot(model)
    editor = make_editor(method, model, tok)

    patch = editor.compute_update(REQUEST)
    assert state_equal(model, base), "compute_update must not change the model"
    assert set(patch.deltas) <= set(editor.edited_parameters())

    before = score_targets(model, tok, [REQUEST.text], [REQUEST.target_new])
    editor.apply(REQUEST)
    after = score_targets(model, tok, [REQUEST.text], [REQUEST.target_new])
    if method not in EFFICACY_NOT_EXPECTED:
        assert after > before, f"{method} on {fam} did not raise log p(new): {before} -> {after}"
    assert len(editor.history) == 1

    edited = snapshot(model)
    path = editor.history[-1].patch.save(tmp_path / "p.safetensors")
    editor.revert()
    assert state_equal(model, base)

    fresh = copy.deepcopy(model)
    load_patch(path).apply_to(fresh)
    assert state_equal(fresh, edited)


@pytest.mark.parametrize("method", METHODS)
def test_method_leaves_model_unchanged_on_bad_input(method, gpt2_and_tok):
    model, tok = gpt2_and_tok
    base = snapshot(model)
    editor = make_editor(method, model, tok)
    with pytest.raises(editkit.InvalidRequestError):
        editor.apply([REQUEST, "not a request"])
    assert state_equal(model, base)
    with pytest.raises(editkit.InvalidHyperParamsError, match="99"):
        fields = editor.hparams.to_dict()
        bad = {"layers": [99]} if "layers" in fields else {"layer": 99}
        hp = editor.hparams_class.from_dict({**fields, **bad})
        editkit.get_method(method)(model, tok, hp)
    assert state_equal(model, base)
