"""MEMIT: the closed form of eq. 14, batch editing, conflicts, and the Editor contract."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from conftest import snapshot, state_equal
from hypothesis import given, settings
from hypothesis import strategies as st

from editkit import EditRequest, InvalidHyperParamsError, InvalidRequestError
from editkit.methods.memit import MEMIT, MEMITHyperParams, solve_layer_update
from editkit.tokens import score_targets


def _spd(g, d):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), d_in=st.integers(3, 12), d_out=st.integers(2, 10),
       n=st.integers(1, 6), lam=st.floats(1e-2, 1e2))
def test_closed_form_minimises_objective(seed, d_in, d_out, n, lam):
    """Δ = R Kᵀ(λC + KKᵀ)⁻¹ minimises ‖ΔK − R‖² + λ tr(Δ C Δᵀ): compare with lstsq."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    c = _spd(g, d_in)
    left, right = solve_layer_update(k, r, c, lam)
    delta = left @ right.T
    # The same objective as one least-squares problem: stack [Kᵀ; √λ Lᵀ] with C = L Lᵀ.
    chol = torch.linalg.cholesky(c)
    a = torch.cat([k.T, lam ** 0.5 * chol.T])
    b = torch.cat([r.T, torch.zeros(d_in, d_out, dtype=torch.float64)])
    ref = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(delta, ref, atol=1e-7, rtol=1e-6)

    def objective(d):
        return ((d @ k - r) ** 2).sum() + lam * torch.trace(d @ c @ d.T)

    bump = 1e-3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    assert objective(delta) <= objective(delta + bump) + 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5))
def test_tiny_lambda_inserts_keys_exactly(seed, n):
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 8, 6
    k = torch.randn(d_in, n, generator=g, dtype=torch.float64)  # full column rank (n ≤ d_in)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    left, right = solve_layer_update(k, r, _spd(g, d_in), 1e-9)
    torch.testing.assert_close(left @ right.T @ k, r, atol=1e-5, rtol=1e-5)


REQS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("{} plays the sport of", "LeBron James", "football", "basketball"),
    EditRequest("{}'s mother tongue is", "Danielle Darrieux", "English", "French"),
]


def _memit(model, tok, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = MEMITHyperParams.scaled(3)
    data = hp.to_dict()
    hp = MEMITHyperParams.from_dict({**data, "mom2_n_samples": 200, **kw, "value": {
        **data["value"], "context_template_length_params": [[5, 2]], **kw.get("value", {})}})
    return MEMIT(model, tok, hp)


def test_batch_edit_is_one_history_entry_and_reverts(gpt2_and_tok):
    model, tok = gpt2_and_tok
    base = snapshot(model)
    editor = _memit(model, tok, layers=[0, 1])
    before = score_targets(model, tok, [r.text for r in REQS], [r.target_new for r in REQS])
    editor.apply(REQS)
    after = score_targets(model, tok, [r.text for r in REQS], [r.target_new for r in REQS])
    assert (after > before).all()
    assert len(editor.history) == 1
    patch = editor.history[-1].patch
    assert sorted(patch.deltas) == sorted(editor.edited_parameters()) and len(patch.deltas) == 2
    # Few edits: each layer's delta is kept low rank, rank = number of requests.
    assert all(d.rank == len(REQS) for d in patch.deltas.values())
    edited = snapshot(model)
    editor.revert()
    assert state_equal(model, base)
    fresh = copy.deepcopy(model)
    patch.apply_to(fresh)
    assert state_equal(fresh, edited)


def test_conflicting_requests_rejected_before_any_work(gpt2_and_tok):
    model, tok = gpt2_and_tok
    editor = _memit(model, tok)
    clash = EditRequest("{} plays the sport of", "LeBron James", "golf")
    with pytest.raises(InvalidRequestError, match="golf"):
        editor.apply([REQS[1], clash])
    assert not editor._prepared  # refused before statistics or templates were computed
    editor.compute_update([REQS[1], REQS[1]])  # the same target twice is fine


@pytest.mark.parametrize("layers, needle", [([5], "5"), ([1, 0], "increasing"), ([], "empty")])
def test_bad_layers(gpt2_and_tok, layers, needle):
    model, tok = gpt2_and_tok
    with pytest.raises(InvalidHyperParamsError, match=needle):
        _memit(model, tok, layers=layers)


def test_published_defaults():
    from editkit.hparams import find_preset

    xl = find_preset("memit", types.SimpleNamespace(config=types.SimpleNamespace(
        name_or_path="openai-community/gpt2-xl")))
    assert xl is not None and "gpt2-xl.json" in xl.source
    assert xl.values["layers"] == (13, 14, 15, 16, 17)
    assert xl.values["mom2_update_weight"] == 20_000
    assert xl.values["value"]["num_grad_steps"] == 20 and xl.values["value"]["loss_layer"] == 47
    gptj = find_preset("memit", types.SimpleNamespace(config=types.SimpleNamespace(
        name_or_path="EleutherAI/gpt-j-6B")))
    assert gptj.values["layers"] == (3, 4, 5, 6, 7, 8)
    assert gptj.values["mom2_update_weight"] == 15_000
    hp = MEMITHyperParams.scaled(48)
    assert hp.layers == (13, 14, 15, 16, 17)
    assert MEMITHyperParams.from_json(hp.to_json()) == hp


def test_every_family_reaches_target_residuals(family_model):
    """After the edit, the residual at the last edit layer is the optimised z (eq. 16)."""
    fam, model, tok = family_model
    base = snapshot(model)
    editor = _memit(model, tok, layers=[0, 1], mom2_update_weight=1.0)
    editor.prepare()
    h0 = editor._residuals_at_last_layer(REQS[:2])
    editor.apply(REQS[:2])
    z, h = editor.last_targets, editor._residuals_at_last_layer(REQS[:2])
    assert ((z - h).norm(dim=1) < 0.1 * (z - h0).norm(dim=1)).all(), fam
    editor.revert()
    assert state_equal(model, base)


def _old_compute_update_deltas(editor, items):
    """The pre-hook MEMIT loop: each layer's Δ written into the weights before the next
    layer's keys are read, then the weights restored (the reference's way)."""
    hp = editor.hparams
    z = editor.last_targets
    params = dict(editor.model.named_parameters())
    names = editor.edited_parameters()
    originals = {n: params[n].detach().clone() for n in names}
    out = {}
    try:
        for i, layer in enumerate(hp.layers):
            keys = editor._keys(layer, items)
            resid = (z - editor._residuals_at_last_layer(items)).T / (len(hp.layers) - i)
            left, right = editor.layer_update(layer, keys, resid)
            delta = editor.adapter.kv_view((left @ right.T).float())
            out[names[i]] = delta
            with torch.no_grad():
                params[names[i]].copy_(params[names[i]] + delta)
    finally:
        with torch.no_grad():
            for n, v in originals.items():
                params[n].copy_(v)
    return out


def test_compute_update_never_writes_weights_and_matches_the_written_form(gpt2_and_tok):
    """MEMIT's lower-layer updates act through output hooks: no parameter is written (its
    version counter does not move), and the deltas equal those of writing the weights."""
    model, tok = gpt2_and_tok
    editor = _memit(model, tok, layers=[0, 1])
    editor.prepare()
    params = dict(model.named_parameters())
    versions = {n: params[n]._version for n in editor.edited_parameters()}
    patch = editor.compute_update(REQS)
    assert {n: params[n]._version for n in versions} == versions
    reference = _old_compute_update_deltas(editor, REQS)
    for name, delta in patch.deltas.items():
        torch.testing.assert_close(delta.materialize(), reference[name], rtol=1e-4, atol=1e-6)
    assert all(not editor.adapter.module(model, "mlp_out", layer)._forward_hooks
               for layer in (0, 1))


def test_interrupted_compute_update_leaves_no_trace(gpt2_and_tok, monkeypatch):
    model, tok = gpt2_and_tok
    base = snapshot(model)
    editor = _memit(model, tok, layers=[0, 1])
    editor.prepare()
    calls = []

    def failing(layer, keys, resid):
        calls.append(layer)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return MEMIT.layer_update(editor, layer, keys, resid)

    monkeypatch.setattr(editor, "layer_update", failing)
    with pytest.raises(KeyboardInterrupt):
        editor.compute_update(REQS)
    assert calls == [0, 1] and state_equal(model, base)
    assert not editor.adapter.module(model, "mlp_out", 0)._forward_hooks


def test_patch_records_the_constructor_settings(gpt2_and_tok):
    model, tok = gpt2_and_tok
    texts = ["The harbor is busy in the summer.", "A function returns a value."] * 30
    hp = _memit(model, tok, layers=[1]).hparams
    editor = MEMIT(model, tok, hp, context_templates=["Hello. {}"], stats_texts=texts,
                   cache_dir=None)
    settings = editor.compute_update(REQS[:1]).metadata["settings"]
    assert settings["context_templates"] == ["{}", "Hello. {}"]
    assert settings["context_templates_given"] is True and settings["covariances_given"] is False
    assert settings["stats_texts"]["texts"] == 60 and len(settings["stats_texts"]["sha256"]) == 16
    assert set(settings["covariance_fingerprints"]) == {"1"}
    other = MEMIT(model, tok, hp, context_templates=["Hello. {}"], stats_texts=texts[:-1])
    assert other.compute_update(REQS[:1]).metadata["settings"]["stats_texts"]["sha256"] != \
        settings["stats_texts"]["sha256"]


# ------------------------------------------------------------------ batched z
def test_batched_z_equals_one_request_at_a_time(gpt2_and_tok):
    """MEMIT's z of a batch optimised together equal the per-request ones, and so does the
    patch (z_batch_size=1 is the sequential path)."""
    model, tok = gpt2_and_tok
    together = _memit(model, tok, layers=[0, 1])
    assert together.z_batch_size >= len(REQS)
    patch = together.compute_update(REQS)
    one_by_one = _memit(model, tok, layers=[0, 1])
    one_by_one.z_batch_size = 1
    reference = one_by_one.compute_update(REQS)
    torch.testing.assert_close(together.last_targets, one_by_one.last_targets,
                               rtol=1e-4, atol=1e-4)
    for name, delta in patch.deltas.items():
        torch.testing.assert_close(delta.materialize(), reference.deltas[name].materialize(),
                                   rtol=1e-3, atol=1e-5)
    # chunks of two: the same targets again
    two = _memit(model, tok, layers=[0, 1])
    two.z_batch_size = 2
    two.compute_update(REQS)
    torch.testing.assert_close(two.last_targets, one_by_one.last_targets, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_z_batch_size_is_refused(gpt2_and_tok, size):
    model, tok = gpt2_and_tok
    hp = _memit(model, tok).hparams
    with pytest.raises(InvalidHyperParamsError, match="z_batch_size"):
        MEMIT(model, tok, hp, z_batch_size=size)


@pytest.mark.parametrize("n", [1, 40])  # 1: the factors' path; 40 > 8·4/(8 + 4): the product's
def test_added_outputs_equal_the_updated_weight_on_both_paths(n):
    from editkit.methods.memit.memit import added_outputs

    g = torch.Generator().manual_seed(n)
    layer = torch.nn.Linear(8, 4)
    left, right = torch.randn(4, n, generator=g), torch.randn(8, n, generator=g)
    x = torch.randn(5, 8, generator=g)
    with added_outputs({layer: (left, right)}):
        hooked = layer(x)
    expected = x @ (layer.weight + left @ right.T).T + layer.bias
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), x @ layer.weight.T + layer.bias)  # the hook is gone


def test_residuals_read_in_chunks_equal_one_forward(family_model, monkeypatch):
    import editkit.methods.memit.memit as memit_module

    fam, model, tok = family_model
    editor = _memit(model, tok, layers=[0, 1], mom2_update_weight=1.0)
    editor.prepare()
    whole = editor._residuals_at_last_layer(REQS)
    monkeypatch.setattr(memit_module, "RESIDUAL_BATCH", 1)
    torch.testing.assert_close(editor._residuals_at_last_layer(REQS), whole, rtol=1e-5, atol=1e-5)


def test_freed_heap_is_returned_on_glibc():
    import platform

    from editkit.methods.memit.memit import _malloc_trim, return_freed_heap

    if platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None
    assert return_freed_heap() is None  # never raises, wherever it runs
