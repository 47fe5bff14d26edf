"""The user-facing API of an editor: ``applied``, ``last_edit``, the public patch constructor
and the protocol types of tokenizers and adapters (tiny GPT-2, pseudo-edits)."""

from __future__ import annotations

import pytest
import torch
from conftest import snapshot, state_equal, tiny_model

import editkit
from editkit import Dense, Editor, EditRequest, HistoryError, HyperParams, LowRank, Patch
from editkit.protocols import AdapterLike, TokenizerLike


class SeededEditor(Editor):
    """Adds a seeded random delta to one MLP output weight; ``target_new`` = ``"seed:<n>"``,
    ``"boom"`` raises inside compute_update after scribbling on the weights."""

    name = "seeded"
    hparams_class = HyperParams

    def edited_parameters(self):
        return [self.adapter.weight_name("mlp_out", 0), self.adapter.weight_name("mlp_out", 1)]

    def compute_update(self, requests):
        (req,) = requests
        if req.target_new == "boom":
            with torch.no_grad():
                dict(self.model.named_parameters())[self.edited_parameters()[0]].add_(1.0)
            raise RuntimeError("simulated failure")
        seed = int(req.target_new.split(":")[1])
        g = torch.Generator().manual_seed(seed)
        name = self.edited_parameters()[seed % 2]
        rows, cols = dict(self.model.named_parameters())[name].shape
        delta = LowRank(torch.randn(rows, 1, generator=g), torch.randn(cols, 1, generator=g))
        return self.make_patch({name: delta}, requests, note=f"seed {seed}")


def req(tag: str) -> EditRequest:
    return EditRequest("{} plays the sport of", "LeBron James", tag)


@pytest.fixture
def editor(bytelevel_tokenizer):
    model = tiny_model("gpt2", len(bytelevel_tokenizer))
    return SeededEditor(model, bytelevel_tokenizer, HyperParams())


def test_applied_yields_the_edit_and_reverts_it_bit_for_bit(editor):
    base = snapshot(editor.model)
    with editor.applied(req("seed:3")) as edit:
        assert editor.history == [edit] and editor.last_edit is edit
        assert edit.requests == [req("seed:3")] and edit.patch.metadata["note"] == "seed 3"
        assert not state_equal(editor.model, base)
    assert editor.history == []
    assert state_equal(editor.model, base)


def test_applied_reverts_on_exception_and_keeps_earlier_edits(editor):
    base = snapshot(editor.model)
    editor.apply(req("seed:1"))
    with_first = snapshot(editor.model)
    with pytest.raises(ValueError, match="inside the block"):
        with editor.applied(req("seed:2")):
            raise ValueError("inside the block")
    assert [e.requests[0].target_new for e in editor.history] == ["seed:1"]
    assert state_equal(editor.model, with_first)
    editor.revert()
    assert state_equal(editor.model, base)


def test_applied_nests_and_takes_sequences(editor):
    base = snapshot(editor.model)
    with editor.applied([req("seed:1"), req("seed:2")]) as outer:
        assert isinstance(outer, list) and len(outer) == 2  # sequential: one entry each
        after_outer = snapshot(editor.model)
        with editor.applied(req("seed:5")) as inner:
            assert [e.id for e in editor.history] == [*(e.id for e in outer), inner.id]
        assert state_equal(editor.model, after_outer)
        assert editor.history == outer
    assert editor.history == [] and state_equal(editor.model, base)


def test_applied_tolerates_a_revert_inside_the_block(editor):
    base = snapshot(editor.model)
    with editor.applied([req("seed:1"), req("seed:4")]) as edits:
        editor.revert(edits[0])
    assert editor.history == [] and state_equal(editor.model, base)


def test_failed_apply_never_enters_the_block(editor):
    base = snapshot(editor.model)
    entered = False
    with pytest.raises(editkit.EditFailedError, match="simulated failure"):
        with editor.applied(req("boom")):
            entered = True
    assert not entered and editor.history == [] and state_equal(editor.model, base)


def test_last_edit_without_edits_is_a_typed_error(editor):
    with pytest.raises(HistoryError, match="editor.apply"):
        editor.last_edit  # noqa: B018


def test_public_patch_constructor_records_provenance(editor):
    model = editor.model
    name = editor.edited_parameters()[0]
    weight = dict(model.named_parameters())[name]
    patch = Patch.for_edit(model, {name: Dense(torch.ones_like(weight))}, method="toy",
                           hparams={"k": 1}, requests=[req("seed:0")], extra="yes")
    meta = patch.metadata
    assert meta["method"] == "toy" and meta["hparams"] == {"k": 1} and meta["extra"] == "yes"
    assert meta["requests"] == [req("seed:0").to_dict()]
    assert meta["editkit_version"] == editkit.__version__ and meta["model_type"] == "gpt2"
    assert meta["base_fingerprint"] == {name: editkit.patch.tensor_fingerprint(weight)}
    # the editor's constructor is the same, stamped with the editor's own method/hparams
    made = editor.make_patch({name: Dense(torch.ones_like(weight))}, [req("seed:0")])
    assert made.metadata["method"] == "seeded" and made.metadata["hparams"] == {}
    assert made.base_fingerprint == patch.base_fingerprint


def test_protocols_describe_the_real_objects(editor, bytelevel_tokenizer):
    assert isinstance(bytelevel_tokenizer, TokenizerLike)
    assert isinstance(editor.adapter, AdapterLike)
    assert not isinstance(object(), TokenizerLike)
