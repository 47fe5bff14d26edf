"""ROME: rank-one algebra (hypothesis), k*/v* on every family, the fast v* path, templates,
hyperparameters, PEFT export, and quality on the fact world."""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import warnings

import pytest
import torch
from conftest import FAMILIES, snapshot, state_equal, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import editkit
from editkit import EditRequest
from editkit.methods.rome import (
    ROME,
    KeySolver,
    ROMEHyperParams,
    UpperLayers,
    ValueHyperParams,
    ValueShortcuts,
    compute_value,
    generate_context_templates,
    left_vector,
    rank_one_update,
)
from editkit.tokens import right_pad

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
TEMPLATES = ["{}", "Once upon a time. {}", "The weather was nice today and. {}"]
STATS_TEXTS = "pydoc"  # offline Python docs; 300 paragraphs give a full-rank C here


def tok_for(family, bytelevel, sentencepiece):
    return sentencepiece if family in ("llama", "mistral", "qwen2") else bytelevel


VALUE_FIELDS = {f.name for f in dataclasses.fields(ValueHyperParams)}


def quick_hparams(model, **overrides) -> ROMEHyperParams:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
    for k, v in overrides.items():  # the v* settings live in the nested ``value`` config
        setattr(hp.value if k in VALUE_FIELDS else hp, k, v)
    return hp


def quick_editor(model, tok, tmp_path, **overrides) -> ROME:
    """ROME with fixed templates and statistics from a few sentences (fast)."""
    hp = quick_hparams(model, mom2_n_samples=300, **overrides)
    return ROME(model, tok, hp, context_templates=TEMPLATES, stats_texts=STATS_TEXTS,
                cache_dir=str(tmp_path))


# ---------------------------------------------------------------- rank-one algebra
@st.composite
def problems(draw):
    d_out = draw(st.integers(2, 12))
    d_in = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(d_in, d_in + 3, generator=g, dtype=torch.float64)
    cov = a @ a.T / (d_in + 3) + 0.1 * torch.eye(d_in, dtype=torch.float64)  # SPD
    k = torch.randn(d_in, generator=g, dtype=torch.float64)
    v = torch.randn(d_out, generator=g, dtype=torch.float64)
    other = torch.randn(d_in, generator=g, dtype=torch.float64)
    return w, cov, k, v, other


@settings(max_examples=60, deadline=None)
@given(problems())
def test_update_inserts_the_pair_with_rank_one(problem):
    w, cov, k, v, _ = problem
    u = left_vector(cov, k)
    left, right = rank_one_update(w, u, k, v)
    w_new = w + torch.outer(left, right)
    torch.testing.assert_close(w_new @ k, v, rtol=1e-9, atol=1e-9)
    s = torch.linalg.svdvals(w_new - w)
    assert s[0] > 0 and (s[1:] <= 1e-10 * s[0]).all()  # rank(Ŵ − W) = 1


@settings(max_examples=60, deadline=None)
@given(problems())
def test_keys_orthogonal_in_the_covariance_metric_are_unchanged(problem):
    w, cov, k, v, other = problem
    u = left_vector(cov, k)  # C⁻¹k*
    k_perp = other - (other @ u) / (u @ u) * u  # kᵀC⁻¹k* = 0
    left, right = rank_one_update(w, u, k, v)
    w_new = w + torch.outer(left, right)
    torch.testing.assert_close(w_new @ k_perp, w @ k_perp, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(1e-3, 1e4))
def test_factorised_solver_and_covariance_scale(problem, weight):
    w, cov, k, v, _ = problem
    u = left_vector(cov, k)
    torch.testing.assert_close(KeySolver(cov).solve(k), u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cov @ u, k, rtol=1e-9, atol=1e-9)
    # mom2_update_weight scales C; the rank-one update is invariant to it
    ref = torch.outer(*rank_one_update(w, u, k, v))
    scaled = torch.outer(*rank_one_update(w, KeySolver(cov, weight).solve(k), k, v))
    torch.testing.assert_close(scaled, ref, rtol=1e-7, atol=1e-9)


def test_degenerate_key_is_refused():
    w = torch.eye(3, dtype=torch.float64)
    with pytest.raises(editkit.EditFailedError, match="uᵀk"):
        rank_one_update(w, torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), torch.ones(3))


# ----------------------------------------------------------------- fast v* path
@pytest.mark.parametrize("family", FAMILIES)
def test_upper_layers_reproduce_the_full_forward(family, bytelevel_tokenizer,
                                                 sentencepiece_tokenizer):
    tok = tok_for(family, bytelevel_tokenizer, sentencepiece_tokenizer)
    model = tiny_model(family, len(tok), n_layers=4)
    adapter = editkit.get_adapter(model)
    texts = ["The Eiffel Tower is located in the city of", "Rome", "LeBron James plays"]
    batch = right_pad([tok(t)["input_ids"] for t in texts], 0)
    with torch.no_grad():
        full = model(**batch.model_inputs(), use_cache=False).logits
        for start in (0, 2, 3):
            fast = UpperLayers(model, adapter, start, 3, batch.model_inputs())()
            torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_fast_and_naive_value_optimisation_agree(gpt2_and_tok):
    model, tok = gpt2_and_tok
    hp = quick_hparams(model, num_grad_steps=6)
    fast = compute_value(model, tok, editkit.get_adapter(model), hp, REQUEST, TEMPLATES)
    slow = compute_value(model, tok, editkit.get_adapter(model), hp, REQUEST, TEMPLATES,
                         skip_lower_layers=False)
    assert fast.steps == slow.steps == 6
    torch.testing.assert_close(fast.losses, slow.losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.v_star, slow.v_star, rtol=1e-4, atol=1e-5)


def test_fast_path_never_reruns_lower_layers(bytelevel_tokenizer):
    model = tiny_model("gpt2", len(bytelevel_tokenizer), n_layers=5)
    hp = quick_hparams(model, layer=2, num_grad_steps=5)
    calls = [0] * 5
    blocks = editkit.get_adapter(model).blocks(model)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks)]
    try:
        # whole rows, the edited block re-run each step (prefix reuse adds one cached-suffix
        # capture pass, edit_block_once moves the edited block out of the loop:
        # tests/test_values.py counts those cases)
        res = compute_value(model, bytelevel_tokenizer, editkit.get_adapter(model), hp,
                            REQUEST, TEMPLATES,
                            shortcuts=ValueShortcuts(reuse_prefix=False, edit_block_once=False))
    finally:
        for h in handles:
            h.remove()
    # one capture pass, then only the upper blocks: once for the replay's self-check against
    # the full forward, once up to the edited block to read v₀, then at every step
    assert calls[0] == calls[1] == 1
    assert calls[2] == 3 + len(res.losses)
    assert calls[3] == calls[4] == 2 + len(res.losses)


# ------------------------------------------------------ k*, v* on every family
@pytest.mark.parametrize("key_consistent", [False, True])
def test_edited_module_maps_key_to_value_on_every_family(family_model, tmp_path, key_consistent):
    family, model, tok = family_model
    base = snapshot(model)
    editor = quick_editor(model, tok, tmp_path, key_consistent=key_consistent)
    patch = editor.compute_update(REQUEST)
    assert state_equal(model, base), "compute_update must leave the model unchanged"
    (delta,) = patch.deltas.values()
    assert isinstance(delta, editkit.LowRank) and delta.rank == 1
    editor.apply(REQUEST)
    step = editor.last_step
    keys = step.keys
    inserted = keys.k_star if key_consistent else keys.k_plain
    assert torch.equal(step.key_inserted, inserted)
    assert not torch.allclose(keys.k_star, keys.k_plain)  # the prefixes do change the key
    module = editor.adapter.module(model, "mlp_out", editor.hparams.layer)
    with torch.no_grad():
        out = module(inserted[None])[0]
    scale = float(step.value.v_star.norm())
    torch.testing.assert_close(out, step.value.v_star, rtol=1e-4, atol=1e-4 * scale)
    # and through the model: the key of the bare prompt now produces v* (reference mode)
    if not key_consistent:
        from editkit.nethooks import Trace

        name = editor.adapter.module_name("mlp_out", editor.hparams.layer)
        from editkit.methods._locate.keys import fact_token_index

        idx = fact_token_index(tok, REQUEST.prompt, REQUEST.subject, "subject_last")
        with torch.no_grad(), Trace(model, [name], retain_output=True, stop=True) as tr:
            model(torch.tensor([tok(REQUEST.text)["input_ids"]]))
        torch.testing.assert_close(tr.outputs[name][0, idx], step.value.v_star, rtol=1e-4,
                                   atol=1e-4 * scale)


def test_value_respects_the_norm_clamp(gpt2_and_tok):
    model, tok = gpt2_and_tok
    hp = quick_hparams(model, clamp_norm_factor=0.5, num_grad_steps=8)
    res = compute_value(model, tok, editkit.get_adapter(model), hp, REQUEST, TEMPLATES)
    assert res.delta.norm() <= 0.5 * res.v0.norm() * (1 + 1e-5)
    assert res.delta.norm() > 0


def test_sequential_apply_and_revert(gpt2_and_tok, tmp_path):
    model, tok = gpt2_and_tok
    base = snapshot(model)
    editor = quick_editor(model, tok, tmp_path)
    second = EditRequest("{} plays the sport of", "LeBron James", "football", "basketball")
    editor.apply([REQUEST, second])
    assert [len(e.requests) for e in editor.history] == [1, 1]
    with pytest.raises(editkit.InvalidRequestError, match="one rank-one update"):
        editor.compute_update([REQUEST, second])
    editor.revert("all")
    assert state_equal(model, base)


# ------------------------------------------------------------------- templates
def test_generated_templates_are_seeded_and_cached(gpt2_and_tok, tmp_path):
    model, tok = gpt2_and_tok
    params = ((3, 2), (5, 3))
    first = generate_context_templates(model, tok, params, seed=1, cache_dir=tmp_path)
    assert first[0] == "{}" and len(first) == 1 + 2 + 3
    assert all(t.count("{}") == 1 and t.endswith("{}") for t in first)
    cached = list(tmp_path.glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["templates"] == first
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        again = generate_context_templates(model, tok, params, seed=1, cache_dir=tmp_path)
    finally:
        handle.remove()
    assert again == first and not calls
    fresh = generate_context_templates(model, tok, params, seed=1, use_cache=False)
    assert fresh == first  # seeded sampling is reproducible
    other = generate_context_templates(model, tok, params, seed=2, cache_dir=tmp_path)
    assert other != first


def test_editor_generates_templates_once(gpt2_and_tok, tmp_path):
    model, tok = gpt2_and_tok
    hp = quick_hparams(model, context_template_length_params=((3, 2), (4, 2)))
    editor = ROME(model, tok, hp, covariance=torch.eye(192), cache_dir=str(tmp_path))
    editor.prepare()
    assert len(editor.context_templates) == 5 and editor.context_templates[0] == "{}"
    assert list((tmp_path / "context_templates").glob("*.json"))


def test_passed_templates_are_used_with_plain_prompt_first(gpt2_and_tok):
    model, tok = gpt2_and_tok
    editor = ROME(model, tok, quick_hparams(model), context_templates=["Hi there. {}"],
                  covariance=torch.eye(192))
    assert editor.context_templates == ["{}", "Hi there. {}"]
    with pytest.raises(editkit.InvalidHyperParamsError, match="exactly one"):
        ROME(model, tok, quick_hparams(model), context_templates=["no placeholder"])


# --------------------------------------------------------------- hyperparameters
def fake_model(name: str, n_layers: int):
    config = types.SimpleNamespace(name_or_path=name, model_type="gpt2")
    return types.SimpleNamespace(config=config, n=n_layers)


class FakeAdapter:
    def num_layers(self, model):
        return model.n


@pytest.mark.parametrize("name,layer,loss_layer", [
    ("openai-community/gpt2-xl", 17, 47), ("gpt2-medium", 8, 23), ("gpt2-large", 12, 35),
    ("EleutherAI/gpt-j-6B", 5, 27), ("microsoft/phi-1_5", 5, 23),
    ("meta-llama/Llama-2-7b-hf", 5, 31),
])
def test_published_defaults(name, layer, loss_layer):
    hp = ROMEHyperParams.for_model(fake_model(name, 48), FakeAdapter())
    v = hp.value
    assert (hp.layer, v.loss_layer) == (layer, loss_layer)
    assert (v.num_grad_steps, v.lr, v.weight_decay) == (20, 0.5, 0.5)
    assert (v.clamp_norm_factor, v.kl_factor) == (4.0, 0.0625)
    assert (hp.mom2_n_samples, hp.mom2_dtype) == (100_000, "float32")
    assert v.context_template_length_params == ((5, 10), (10, 10))
    assert hp.key_consistent is False


def test_scaled_defaults_warn_and_scale():
    with pytest.warns(UserWarning, match="no published"):
        hp = ROMEHyperParams.for_model(fake_model("my-model", 24), FakeAdapter())
    assert hp.layer == 8 and hp.mom2_dataset == "wikitext"
    tiny = ROMEHyperParams.scaled(3)
    assert tiny.layer == 1 and tiny.mom2_dataset == "pydoc" and tiny.mom2_n_samples < 100_000


def test_hparams_round_trip_and_validation(gpt2_and_tok):
    model, tok = gpt2_and_tok
    hp = quick_hparams(model, key_consistent=True)
    back = ROMEHyperParams.from_json(hp.to_json())
    assert back == hp and isinstance(back.value, ValueHyperParams)
    assert back.value.context_template_length_params == hp.value.context_template_length_params
    adapter = editkit.get_adapter(model)
    bad = [({"layer": 3}, "layer=3"), ({"value": {"loss_layer": 0}, "layer": 1}, "loss_layer"),
           ({"value": {"fact_token": "first"}}, "fact_token"), ({"value": {"lr": 0}}, "lr"),
           ({"mom2_dtype": "int8"}, "mom2_dtype"),
           ({"value": {"num_grad_steps": 2.5}}, "num_grad"),
           ({"value": {"context_template_length_params": [[5, 0]]}}, "counts"),
           ({"value": {"lr_typo": 1}}, "unknown keys")]
    for change, message in bad:
        with pytest.raises(editkit.InvalidHyperParamsError, match=message):
            ROMEHyperParams.from_dict({**hp.to_dict(), **change}).validate(model, adapter)


def test_registered_as_a_method():
    assert editkit.get_method("rome") is ROME


# ------------------------------------------------------------------ PEFT export
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["rome", "ft_l"])
def test_peft_export_matches_edited_model(family, method, bytelevel_tokenizer,
                                          sentencepiece_tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    tok = tok_for(family, bytelevel_tokenizer, sentencepiece_tokenizer)
    model = tiny_model(family, len(tok))
    base = copy.deepcopy(model)
    if method == "rome":
        editor = quick_editor(model, tok, tmp_path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            editor = editkit.get_method(method)(model, tok)
    patch = editor.compute_update(REQUEST)
    out = patch.to_peft(model, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["target_modules"] == [n.rsplit(".", 1)[0] for n in patch.deltas]
    assert config["r"] == config["lora_alpha"]
    editor.apply(REQUEST)
    x = torch.tensor([tok(REQUEST.text + " Rome, of course")["input_ids"]])
    with torch.no_grad():
        want = model(x).logits
        lora = peft.PeftModel.from_pretrained(base, str(out))
        torch.testing.assert_close(lora(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_export_rejects_non_matrix_deltas(gpt2_and_tok, tmp_path):
    model, _ = gpt2_and_tok
    name = "transformer.h.0.ln_1.weight"
    patch = editkit.Patch({name: editkit.Dense(torch.zeros(48))})
    with pytest.raises(editkit.PatchMismatchError, match="linear layer"):
        patch.to_peft(model, tmp_path)


# ------------------------------------------------------------ fact-world quality
@pytest.fixture(scope="module")
def fact_world():
    from editkit.testbed import load_fact_world

    try:
        return load_fact_world(train_if_missing=False)
    except FileNotFoundError as exc:
        pytest.skip(f"fact-world model not built: {exc}")


@pytest.mark.slow
def test_quality_on_the_fact_world(fact_world):
    """ROME with the fact-world defaults edits, generalises and stays local.

    Ten records (the first ten of the 50 that ``benchmarks/quality_fact_world.py --methods
    rome`` scores: ES 0.98, PS 0.88, NS 0.97 there; 1.0 / 0.9 / 0.99 on these ten), so one
    failed rewrite or two failed paraphrases still pass.
    """
    from editkit.eval import edit_quality
    from editkit.testbed import FactWorld

    model, tok = fact_world
    records = FactWorld().records(n=50, seed=0)[:10]
    editor = ROME(model, tok)  # fact-world defaults are picked from the model directory
    assert editor.hparams.mom2_dataset == "fact_world"
    base = snapshot(model)
    q = edit_quality(editor, [EditRequest.from_counterfact(r) for r in records])
    assert state_equal(model, base) and not editor.history
    assert q["n"] == 10
    assert q["ES"] >= 0.9 and q["PS"] >= 0.7 and q["NS"] >= 0.9, q


@pytest.mark.slow
def test_peft_export_on_the_fact_world(fact_world, tmp_path):
    peft = pytest.importorskip("peft")
    from editkit.testbed import FactWorld

    model, tok = fact_world
    base = copy.deepcopy(model)
    rec = FactWorld().records(n=1, seed=3)[0]
    editor = ROME(model, tok)
    patch = editor.compute_update(EditRequest.from_counterfact(rec))
    out = patch.to_peft(model, tmp_path / "adapter")
    editor.apply(EditRequest.from_counterfact(rec))
    try:
        x = torch.tensor([tok(rec["paraphrase_prompts"][0])["input_ids"]])
        with torch.no_grad():
            want = model(x).logits
            merged = peft.PeftModel.from_pretrained(base, str(out)).merge_and_unload()
            torch.testing.assert_close(merged(x).logits, want, rtol=1e-5, atol=1e-5)
    finally:
        editor.revert()


def test_hparams_from_tracing_take_the_suggested_layer():
    from editkit.testbed import FactWorld, load_fact_world
    from editkit.tracing import suggest_layer
    from editkit.tracing.from_trace import rome_hparams_from_tracing

    model, tok = load_fact_world()
    records = FactWorld().records(n=3)
    kw = {"samples": 2, "progress": False}
    hp = rome_hparams_from_tracing(model, tok, records, **kw)
    assert hp.layer == suggest_layer(model, tok, records, **kw).layer
    assert 0 <= hp.layer < 4


def test_patch_records_how_it_was_made(gpt2_and_tok, tmp_path):
    """Constructor settings go into the patch: the templates used, whether C was given and
    its fingerprint, the statistics' text source and the cache directory."""
    from editkit.patch import load_patch, tensor_fingerprint

    model, tok = gpt2_and_tok
    cov = torch.eye(192) * 2
    editor = ROME(model, tok, quick_hparams(model, num_grad_steps=2),
                  context_templates=TEMPLATES, covariance=cov, cache_dir=str(tmp_path))
    patch = editor.compute_update(REQUEST)
    path = patch.save(tmp_path / "p.safetensors")
    settings = load_patch(path).metadata["settings"]
    assert settings["context_templates"] == TEMPLATES
    assert settings["context_templates_given"] and settings["covariances_given"]
    layer = str(editor.hparams.layer)
    assert settings["covariance_fingerprints"] == {layer: tensor_fingerprint(cov)}
    assert settings["cache_dir"] == str(tmp_path) and settings["stats_texts"] is None
    assert load_patch(path).metadata["hparams"]["value"]["num_grad_steps"] == 2
