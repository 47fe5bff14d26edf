"""AlphaEdit: updates confined to the null space of the preserved keys."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import snapshot, state_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import editkit
from editkit import EditRequest
from editkit.methods.alphaedit import (
    AlphaEdit,
    AlphaEditHyperParams,
    null_space_projector,
    solve_projected_update,
)
from editkit.nethooks import Trace


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(6, 16), rank=st.integers(1, 5),
       n=st.integers(1, 4), l2=st.floats(1e-3, 10.0), with_previous=st.booleans())
def test_update_lives_in_null_space(seed, d, rank, n, l2, with_previous):
    g = torch.Generator().manual_seed(seed)
    # Preserved keys span a rank-`rank` subspace; C is their second moment (+ tiny noise).
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    preserved = basis[:, :rank] @ torch.randn(rank, 50, generator=g, dtype=torch.float64)
    cov = preserved @ preserved.T / 50 + 1e-9 * torch.eye(d, dtype=torch.float64)
    p = null_space_projector(cov, 1e-3)
    torch.testing.assert_close(p @ p, p, atol=1e-9, rtol=0)
    keys = torch.randn(d, n, generator=g, dtype=torch.float64)
    resid = torch.randn(5, n, generator=g, dtype=torch.float64)
    prev = None
    if with_previous:
        kp = torch.randn(d, 2, generator=g, dtype=torch.float64)
        prev = kp @ kp.T
    left, right = solve_projected_update(keys, resid, p, prev, l2)
    delta = left @ right.T
    torch.testing.assert_close(delta @ p, delta, atol=1e-8, rtol=1e-8)
    # Preserved keys map exactly as before.
    scale = delta.norm() * preserved.norm(dim=0).max() + 1e-12
    assert (delta @ preserved).abs().max() / scale < 1e-8


def test_small_ridge_inserts_projected_keys():
    g = torch.Generator().manual_seed(0)
    d, n = 10, 3
    cov = torch.diag(torch.tensor([5.0, 4.0, 3.0] + [1e-8] * 7, dtype=torch.float64))
    p = null_space_projector(cov, 1e-3)
    keys = torch.randn(d, n, generator=g, dtype=torch.float64)
    resid = torch.randn(4, n, generator=g, dtype=torch.float64)
    left, right = solve_projected_update(keys, resid, p, None, 1e-9)
    # With α → 0 the update still reaches the targets through the null-space part of the keys.
    torch.testing.assert_close(left @ right.T @ keys, resid, atol=1e-5, rtol=1e-5)


def test_preserved_text_keys_unchanged_on_a_real_model(gpt2_and_tok):
    model, tok = gpt2_and_tok
    base = snapshot(model)
    texts = ["The harbor is busy in the summer.", "Numbers are written in base ten.",
             "A function returns a value."] * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = AlphaEditHyperParams.scaled(3)
    data = hp.to_dict()
    hp = AlphaEditHyperParams.from_dict({
        **data, "layers": [1], "mom2_n_samples": 12, "nullspace_threshold": 1e-6,
        "mom2_dtype": "float64",
        "value": {**data["value"], "context_template_length_params": [[5, 2]]}})
    editor = AlphaEdit(model, tok, hp, stats_texts=texts)
    editor.prepare()
    name = editor.adapter.module_name("mlp_out", 1)
    ids = tok(texts[0], return_tensors="pt")
    with Trace(model, [name], retain_input=True, retain_output=True) as tr, torch.no_grad():
        model(**ids)
    k0, v0 = tr.inputs[name][0], tr.outputs[name][0]
    editor.apply(EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"))
    delta = editor.history[-1].patch.deltas[editor.edited_parameters()[0]].materialize()
    kv_delta = editor.adapter.kv_view(delta)
    assert kv_delta.abs().max() > 0  # it did edit
    # The preserved text's keys are mapped as before (their part of Δk is ~0).
    change = (k0 @ kv_delta.T).norm(dim=-1)
    assert (change < 1e-3 * kv_delta.norm() * k0.norm(dim=-1)).all()
    with Trace(model, [name], retain_output=True) as tr2, torch.no_grad():
        model(**ids)
    torch.testing.assert_close(tr2.outputs[name][0], v0, atol=1e-4, rtol=1e-4)
    editor.revert()
    assert state_equal(model, base)


REQS = [EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
        EditRequest("{} plays the sport of", "LeBron James", "football"),
        EditRequest("{}'s mother tongue is", "Danielle Darrieux", "English")]


def _alphaedit(model, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = AlphaEditHyperParams.scaled(3)
    data = hp.to_dict()
    hp = AlphaEditHyperParams.from_dict({
        **data, "layers": [1], "mom2_n_samples": 100,
        "value": {**data["value"], "context_template_length_params": [[5, 2]],
                  "num_grad_steps": 4}})
    texts = ["The harbor is busy in the summer.", "A function returns a value."] * 30
    return AlphaEdit(model, tok, hp, stats_texts=texts)


def test_preserved_key_memory_follows_the_applied_edits(gpt2_and_tok, monkeypatch):
    """K_p is derived from the AlphaEdit patches in the history: compute_update and a
    rolled-back apply leave it unchanged, revert removes an edit's keys, and revert stays
    exact for edits made after it."""
    model, tok = gpt2_and_tok
    base = snapshot(model)
    editor = _alphaedit(model, tok)
    assert editor.edited_key_moments() == {}
    patch = editor.compute_update(REQS[0])
    keys = torch.tensor(patch.metadata["alphaedit"]["edited_keys"]["1"], dtype=torch.float64)
    assert keys.shape[0] == 1 and editor.edited_key_moments() == {}  # pure

    # A rolled-back apply (failure after the update was computed) does not grow K_p.
    monkeypatch.setattr(type(patch), "check_fits", lambda self, model, force=False: (
        _ for _ in ()).throw(editkit.PatchMismatchError("injected")))
    with pytest.raises(editkit.PatchMismatchError):
        editor.apply(REQS[0])
    monkeypatch.undo()
    assert editor.edited_key_moments() == {} and state_equal(model, base)

    editor.apply(REQS[0])
    first = editor.history[-1]
    torch.testing.assert_close(editor.edited_key_moments()[1], keys.T @ keys)
    after_first = snapshot(model)
    editor.apply(REQS[1])
    second_keys = torch.tensor(editor.history[-1].patch.metadata["alphaedit"]["edited_keys"]["1"],
                               dtype=torch.float64)
    torch.testing.assert_close(editor.edited_key_moments()[1],
                               keys.T @ keys + second_keys.T @ second_keys)
    # The second update was constrained by the first edit's keys: recomputing it without
    # them gives a different delta.
    constrained = editor.history[-1].patch
    editor.revert()
    assert state_equal(model, after_first)
    editor.revert(first)
    assert editor.edited_key_moments() == {} and state_equal(model, base)
    free = editor.compute_update(REQS[1])
    name = editor.edited_parameters()[0]
    assert not torch.allclose(free.deltas[name].materialize(),
                              constrained.deltas[name].materialize())

    # Revert of an earlier edit is exact for a later one: base + patch(2) bit for bit.
    editor.apply(REQS[0])
    editor.apply(REQS[1])
    later = editor.history[-1].patch
    editor.revert(editor.history[0])
    expected = copy.deepcopy(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in expected.items():
            if n in later.deltas:
                expected[n] = (t.float() + later.deltas[n].materialize()).to(t.dtype)
    assert all(torch.equal(params[n], expected[n]) for n in later.deltas)
    later_keys = torch.tensor(later.metadata["alphaedit"]["edited_keys"]["1"],
                              dtype=torch.float64)
    torch.testing.assert_close(editor.edited_key_moments()[1], later_keys.T @ later_keys)
    editor.revert("all")
    assert state_equal(model, base)
