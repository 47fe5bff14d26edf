"""Exact revert, transactional apply and patch persistence, on a tiny GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import snapshot, state_equal, tiny_model
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from editkit import (
    Dense,
    EditFailedError,
    Editor,
    EditRequest,
    HistoryError,
    HyperParams,
    InvalidRequestError,
    LowRank,
    PatchMismatchError,
    load_patch,
)


class RandomDeltaEditor(Editor):
    """Deterministic pseudo-edits: the request's target names a seed and a failure mode."""

    name = "random-delta"
    hparams_class = HyperParams

    def edited_parameters(self):
        return self.candidates()

    def candidates(self):
        return [self.adapter.weight_name(s, layer) for s in ("mlp_out", "attn_out")
                for layer in (0, 1)]

    def compute_update(self, requests):
        (req,) = requests
        seed = int(req.target_new.split(":")[1])
        g = torch.Generator().manual_seed(seed)
        names = self.candidates()
        chosen = [names[i] for i in torch.randperm(len(names), generator=g)[: 1 + seed % 3]]
        params = dict(self.model.named_parameters())
        deltas = {}
        for i, name in enumerate(chosen):
            rows, cols = params[name].shape
            if (seed + i) % 2:
                deltas[name] = LowRank(torch.randn(rows, 2, generator=g) * 0.01,
                                       torch.randn(cols, 2, generator=g))
            else:
                deltas[name] = Dense(torch.randn(rows, cols, generator=g) * 0.01)
        if req.target_new.startswith("midway"):  # corrupts the weights, then dies
            with torch.no_grad():
                params[chosen[0]].add_(1.0)
            raise RuntimeError("simulated crash in the middle of compute_update")
        if req.target_new.startswith("nan"):
            next(iter(deltas.values())).materialize()  # a real tensor, then poison it
            deltas[chosen[0]] = Dense(torch.full(params[chosen[0]].shape, float("nan")))
        return self._new_patch(deltas, requests)


def req(tag: str) -> EditRequest:
    return EditRequest("{} plays the sport of", "LeBron James", tag)


@pytest.fixture
def setup(bytelevel_tokenizer):
    model = tiny_model("gpt2", len(bytelevel_tokenizer))
    return model, RandomDeltaEditor(model, bytelevel_tokenizer, HyperParams())


def reference(base, patches):
    model = copy.deepcopy(base)
    for p in patches:
        p.apply_to(model, force=True)
    return snapshot(model)


def test_revert_middle_edit_is_bit_exact(setup):
    model, ed = setup
    base = copy.deepcopy(model)
    for s in (1, 2, 3, 4):
        ed.apply(req(f"seed:{s}"))
    ids = [e.id for e in ed.history]
    ed.revert(ids[1])
    kept = [e.patch for e in ed.history]
    assert len(kept) == 3 and state_equal(model, reference(base, kept))
    ed.revert("all")
    assert state_equal(model, snapshot(base)) and ed.history == []
    assert ed.adapter is not None


def test_revert_errors(setup):
    model, ed = setup
    with pytest.raises(HistoryError, match="nothing to revert"):
        ed.revert()
    ed.revert("all")  # a no-op on an unedited model
    ed.apply(req("seed:1"))
    with pytest.raises(HistoryError, match="12345"):
        ed.revert(12345)
    with pytest.raises(HistoryError, match="bogus"):
        ed.revert("bogus")


class HistoryMachine(RuleBasedStateMachine):
    """Any sequence of apply / revert(i) / revert("all") keeps weights = base + patches."""

    def __init__(self):
        super().__init__()
        from conftest import _fast_tokenizer

        tok = HistoryMachine.tok = getattr(HistoryMachine, "tok", None) or _fast_tokenizer(
            "bytelevel")
        self.model = tiny_model("gpt2", len(tok), n_layers=2)
        self.base = copy.deepcopy(self.model)
        self.editor = RandomDeltaEditor(self.model, tok, HyperParams())

    @rule(seed=st.integers(0, 10_000))
    def apply(self, seed):
        self.editor.apply(req(f"seed:{seed}"))

    @precondition(lambda self: self.editor.history)
    @rule(data=st.data())
    def revert_one(self, data):
        edit = data.draw(st.sampled_from(self.editor.history))
        self.editor.revert(edit.id)

    @rule()
    def revert_last(self):
        if self.editor.history:
            self.editor.revert()

    @rule()
    def revert_all(self):
        self.editor.revert("all")
        assert state_equal(self.model, snapshot(self.base))

    @invariant()
    def weights_are_base_plus_remaining_patches(self):
        patches = [e.patch for e in self.editor.history]
        assert state_equal(self.model, reference(self.base, patches))


TestHistoryMachine = HistoryMachine.TestCase
TestHistoryMachine.settings = settings(max_examples=50, stateful_step_count=8, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("tag, error", [
    ("midway:3", EditFailedError),
    ("nan:5", EditFailedError),
])
def test_failed_apply_leaves_model_unchanged(setup, tag, error):
    model, ed = setup
    ed.apply(req("seed:8"))
    before = snapshot(model)
    n = len(ed.history)
    with pytest.raises(error) as info:
        ed.apply(req(tag))
    assert state_equal(model, before) and len(ed.history) == n
    if tag.startswith("nan"):
        assert "NaN" in str(info.value)
    # A later revert still works exactly.
    ed.revert("all")


def test_failure_in_a_sequence_rolls_back_the_whole_call(setup):
    model, ed = setup
    before = snapshot(model)
    with pytest.raises(EditFailedError):
        ed.apply([req("seed:1"), req("seed:2"), req("midway:4")])
    assert state_equal(model, before) and ed.history == []


def test_bad_request_and_keyboard_interrupt_leave_model_unchanged(setup, monkeypatch):
    model, ed = setup
    before = snapshot(model)
    with pytest.raises(InvalidRequestError):
        ed.apply([req("seed:1"), {"prompt": "{} is"}])
    assert state_equal(model, before)

    def interrupted(self, requests):
        with torch.no_grad():
            dict(self.model.named_parameters())[self.edited_parameters()[0]].mul_(0)
        raise KeyboardInterrupt

    monkeypatch.setattr(RandomDeltaEditor, "compute_update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ed.apply(req("seed:1"))
    assert state_equal(model, before) and ed.history == []


def test_undeclared_parameter_is_refused(setup, monkeypatch):
    model, ed = setup
    before = snapshot(model)
    monkeypatch.setattr(RandomDeltaEditor, "edited_parameters",
                        lambda self: [self.adapter.weight_name("mlp_in", 0)])
    with pytest.raises(EditFailedError, match="edited_parameters"):
        ed.apply(req("seed:2"))
    assert state_equal(model, before)


def test_patch_save_load_reproduces_edit(setup, tmp_path, bytelevel_tokenizer):
    model, ed = setup
    fresh = copy.deepcopy(model)
    ed.apply(req("seed:7"))
    patch = ed.history[-1].patch
    path = patch.save(tmp_path / "edit.safetensors")
    assert path.read_bytes()[:8]  # a real file; safetensors, no pickle
    loaded = load_patch(path)
    assert loaded.metadata["method"] == "random-delta"
    assert loaded.metadata["requests"][0]["target_new"] == "seed:7"
    assert set(loaded.deltas) == set(patch.deltas)
    loaded.apply_to(fresh)
    assert state_equal(fresh, snapshot(model))
    # Applying again: the base no longer matches the stored fingerprint.
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        loaded.apply_to(fresh)
    other = tiny_model("gpt2", len(bytelevel_tokenizer), seed=1)
    with pytest.raises(PatchMismatchError, match="force=True"):
        loaded.apply_to(other)
    loaded.apply_to(other, force=True)  # allowed on request


def test_patch_shape_and_name_mismatch(setup, tmp_path, sentencepiece_tokenizer):
    model, ed = setup
    ed.apply(req("seed:3"))
    patch = ed.history[-1].patch
    llama = tiny_model("llama", len(sentencepiece_tokenizer))
    with pytest.raises(PatchMismatchError, match="no parameter"):
        patch.apply_to(llama)
    with pytest.raises(PatchMismatchError, match="not a readable"):
        (tmp_path / "junk.safetensors").write_bytes(b"not a patch")
        load_patch(tmp_path / "junk.safetensors")
    with pytest.raises(PatchMismatchError, match="no patch file"):
        load_patch(tmp_path / "missing.safetensors")


def test_history_is_shared_by_editors_of_one_model(setup, bytelevel_tokenizer):
    model, ed = setup
    other = RandomDeltaEditor(model, bytelevel_tokenizer, HyperParams())
    base = snapshot(model)
    ed.apply(req("seed:1"))
    other.apply(req("seed:2"))
    assert [e.id for e in ed.history] == [e.id for e in other.history]
    ed.revert("all")
    assert state_equal(model, base)
