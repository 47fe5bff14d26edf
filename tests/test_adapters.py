from __future__ import annotations

import pytest
import torch
from conftest import replayed_logits

import editkit
from editkit import Patch, UnsupportedModelError, get_adapter
from editkit.nethooks import Trace

PROJECTIONS = ("mlp_in", "mlp_out", "attn_out")


def _inputs(tok):
    return torch.tensor([tok("The Eiffel Tower is located in the city of")["input_ids"]])


def test_every_slot_resolves(family_model):
    fam, model, tok = family_model
    adapter = get_adapter(model)
    n = adapter.num_layers(model)
    assert n == 3
    for slot in ("embedding", "final_norm", "lm_head"):
        assert isinstance(adapter.module(model, slot), torch.nn.Module)
    for layer in range(n):
        for slot in ("block", "mlp", "attn", *PROJECTIONS):
            adapter.module(model, slot, layer)
        if adapter.mlp_gate is not None:
            adapter.module(model, "mlp_gate", layer)
    assert adapter.module(model, "embedding").weight.shape[0] == len(tok)


@pytest.mark.parametrize("slot", PROJECTIONS)
def test_kv_view_maps_captured_keys_to_outputs(family_model, slot):
    fam, model, tok = family_model
    adapter = get_adapter(model)
    name = adapter.module_name(slot, 1)
    module = model.get_submodule(name)
    with Trace(model, [name], retain_input=True, retain_output=True) as tr, torch.no_grad():
        model(_inputs(tok))
    keys, values = tr.inputs[name], tr.outputs[name]
    W = adapter.kv_view(module.weight)
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    torch.testing.assert_close(keys @ W.T + bias, values, atol=1e-5, rtol=1e-5)


def test_lowrank_delta_orientation(family_model):
    fam, model, tok = family_model
    adapter = get_adapter(model)
    name = adapter.module_name("mlp_out", 0)
    W = adapter.kv_view(model.get_submodule(name).weight).detach().clone()
    d_out, d_in = W.shape
    left, right = torch.randn(d_out), torch.randn(d_in)
    patch = Patch({f"{name}.weight": adapter.lowrank_delta(left, right)})
    patch.apply_to(model)
    new_W = adapter.kv_view(model.get_submodule(name).weight)
    k = torch.randn(d_in)
    torch.testing.assert_close(new_W @ k, W @ k + left * (right @ k), atol=1e-4, rtol=1e-4)
    dense = adapter.dense_delta(torch.outer(left, right))
    torch.testing.assert_close(dense.materialize(), patch.deltas[f"{name}.weight"].materialize())


def test_gated_mlp_key_is_act_gate_times_up(sentencepiece_tokenizer):
    from conftest import tiny_model

    model = tiny_model("llama", len(sentencepiece_tokenizer))
    adapter = get_adapter(model)
    names = [adapter.module_name(s, 1) for s in ("mlp", "mlp_out")]
    with Trace(model, names, retain_input=True) as tr, torch.no_grad():
        model(_inputs(sentencepiece_tokenizer))
    mlp = adapter.module(model, "mlp", 1)
    x = tr.inputs[names[0]]
    expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    torch.testing.assert_close(tr.inputs[names[1]], expected)


def test_unknown_model_type():
    class Cfg:
        model_type = "bert-ish"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(M())
    msg = str(info.value)
    assert "bert-ish" in msg and "gpt2" in msg and "llama" in msg and "editkit.adapters" in msg
    with pytest.raises(UnsupportedModelError, match="model_type"):
        get_adapter(torch.nn.Linear(2, 2))


def test_builtin_families_registered():
    assert {"gpt2", "gptj", "phi", "llama", "mistral", "qwen2", "gpt_neox"} <= set(
        editkit.list_adapters())
    assert {"ft", "ft_l"} <= set(editkit.list_methods())
    assert editkit.get_method("ft") is editkit.FT
    assert editkit.get_method("FT-L") is editkit.get_method("ft+l") is editkit.FTL
    with pytest.raises(editkit.UnknownMethodError, match="Did you mean"):
        editkit.get_method("fx_l")


# ------------------------------------------------------ behaviour: head, block call, embedding
def test_block_calls_and_head_reproduce_the_forward(family_model):
    fam, model, tok = family_model
    adapter = get_adapter(model)
    ids = _inputs(tok)
    replayed, full, calls = replayed_logits(model, adapter, ids)
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-5)
    rows, cols = torch.tensor([0, 0]), torch.tensor([1, ids.shape[1] - 1])
    with torch.no_grad():  # at chosen positions only
        last = adapter.call_block(adapter.blocks(model)[-1], adapter.block_input(calls[-1]),
                                  calls[-1])
        torch.testing.assert_close(adapter.head(model, last, (rows, cols)), full[rows, cols],
                                   rtol=1e-5, atol=1e-5)
    # no family here scales its embeddings: embed() is the embedding module's output
    assert adapter.embedding_scale(model) == 1.0
    with torch.no_grad():
        emb = adapter.embed(model, ids)
        torch.testing.assert_close(emb, adapter.module(model, "embedding")(ids))
        if fam not in ("gpt2",):  # GPT-2 adds learned positions before block 0
            torch.testing.assert_close(adapter.block_input(calls[0]), emb)


# ----------------------------------------------- a family whose head differs: Gemma 2
SOFTCAP = 10.0  # these logits reach ~8: the cap changes them by far more than rounding


def tiny_gemma2(vocab_size: int, n_layers: int = 3, seed: int = 0):
    import transformers as T

    cfg = T.Gemma2Config(num_hidden_layers=n_layers, hidden_size=48, intermediate_size=96,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                         vocab_size=vocab_size, final_logit_softcapping=SOFTCAP,
                         initializer_range=0.3)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def gemma2(sentencepiece_tokenizer):
    return tiny_gemma2(len(sentencepiece_tokenizer)), sentencepiece_tokenizer


def _uncapped():
    """The Gemma 2 adapter as a plain LLaMA-like map would be: no soft-cap declared."""
    import dataclasses

    from editkit.models.gemma2 import ADAPTER

    return dataclasses.replace(ADAPTER, logit_softcap=None)


def test_gemma2_entry_point_names_its_adapter():
    import importlib
    from pathlib import Path

    from editkit.models.gemma2 import ADAPTER

    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module, attr = meta["project"]["entry-points"]["editkit.adapters"]["gemma2"].split(":")
    assert getattr(importlib.import_module(module), attr) is ADAPTER


def test_gemma2_adapter_declares_the_soft_cap_and_the_embedding_scale(gemma2):
    from editkit.models.gemma2 import ADAPTER
    from editkit.tracing.corruption import embedding_std, weight_embedding_std

    model, tok = gemma2
    ids = _inputs(tok)
    replayed, full, calls = replayed_logits(model, ADAPTER, ids)
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-5)
    assert float(full.abs().max()) < SOFTCAP  # the cap is in force
    plain, _, _ = replayed_logits(model, _uncapped(), ids)
    assert float((plain - full).abs().max()) > 0.05  # and it matters: the test has teeth
    # embeddings: √d times the rows, as block 0 receives them
    scale = ADAPTER.embedding_scale(model)
    assert scale == pytest.approx(48 ** 0.5)
    with torch.no_grad():
        emb = ADAPTER.embed(model, ids)
        weight = ADAPTER.module(model, "embedding").weight
        torch.testing.assert_close(emb, weight[ids] * scale)
        torch.testing.assert_close(adapter_input := ADAPTER.block_input(calls[0]), emb)
    assert adapter_input.shape == emb.shape
    # σ of the corruption noise is in the same (scaled) units either way it is measured
    words = [tok.decode([i]) for i in range(3, len(tok))]
    by_text = embedding_std(model, tok, words, ADAPTER)
    by_weight = weight_embedding_std(model, ADAPTER)
    assert by_weight == pytest.approx(float(weight.detach().double().std()) * scale)
    assert by_text == pytest.approx(by_weight, rel=0.2)


def test_replay_refuses_an_adapter_that_misses_the_soft_cap(gemma2):
    from editkit.errors import EditkitError, ReplayMismatchError
    from editkit.models.gemma2 import ADAPTER
    from editkit.replay import BlockReplay

    model, tok = gemma2
    inputs = {"input_ids": _inputs(tok)}
    with torch.no_grad():
        full = model(**inputs, use_cache=False).logits
        ok = BlockReplay(model, ADAPTER, 1, 2, inputs)  # checks itself: passes
        torch.testing.assert_close(ok(), full, rtol=1e-5, atol=1e-5)
        with pytest.raises(ReplayMismatchError, match="soft-cap") as info:
            BlockReplay(model, _uncapped(), 1, 2, inputs)
    assert isinstance(info.value, EditkitError) and "gemma2" in str(info.value)
    # a caller that verifies later gets the same error from verify()
    late = BlockReplay(model, _uncapped(), 0, 1, inputs, verify=False)
    with pytest.raises(ReplayMismatchError):
        late.verify()


def _rome(model, tok, adapter, tmp_path):
    import warnings

    from editkit.methods.rome import ROME, ROMEHyperParams

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, adapter)
    # every state of Gemma 2 is re-normalised, so on a 3-layer random model one MLP value moves
    # P(new) slowly: a larger step than the default makes 25 steps enough
    hp.mom2_n_samples, hp.value.num_grad_steps, hp.value.lr = 300, 25, 5.0
    return ROME(model, tok, hp, adapter=adapter, stats_texts="pydoc", cache_dir=str(tmp_path),
                context_templates=["{}", "Once upon a time. {}"])


GEMMA_REQUEST = editkit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome",
                                    "Paris")


def test_rome_edits_gemma2_against_its_capped_logits(gemma2, tmp_path):
    from conftest import snapshot, state_equal

    from editkit.models.gemma2 import ADAPTER
    from editkit.tokens import score_targets

    model, tok = gemma2
    base = snapshot(model)
    editor = _rome(model, tok, ADAPTER, tmp_path)

    def logp_new() -> float:
        return float(score_targets(model, tok, [GEMMA_REQUEST.text],
                                   [GEMMA_REQUEST.target_new])[0])

    def mean_nll_over_templates() -> float:  # the v* loss's NLL term, on the real model
        prompts = [t.replace("{}", GEMMA_REQUEST.text, 1) for t in editor.context_templates]
        return -float(score_targets(model, tok, prompts,
                                    [GEMMA_REQUEST.target_new] * len(prompts)).mean())

    before, nll_before = logp_new(), mean_nll_over_templates()
    editor.apply(GEMMA_REQUEST)
    step = editor.last_step
    # v* was optimised against the model's own, capped, logits: its first NLL (δ = 0) is the
    # real model's (without the cap, log p(new) of this prompt reads -9.8 instead of -7.9)
    assert step.value.nll[0] == pytest.approx(nll_before, abs=1e-4)
    # Ŵ k* = v*: the edited matrix maps the inserted key to the optimised value
    module = ADAPTER.module(model, "mlp_out", editor.hparams.layer)
    with torch.no_grad():
        out = module(step.key_inserted[None])[0]
    scale = float(step.value.v_star.norm())
    torch.testing.assert_close(out, step.value.v_star, rtol=1e-4, atol=1e-4 * scale)
    assert logp_new() > before + 0.1  # the (capped) model now gives the new object more mass
    editor.revert()
    assert state_equal(model, base)


def test_rome_refuses_gemma2_without_the_soft_cap(gemma2, tmp_path):
    from conftest import snapshot, state_equal

    from editkit.errors import ReplayMismatchError

    model, tok = gemma2
    base = snapshot(model)
    editor = _rome(model, tok, _uncapped(), tmp_path)
    with pytest.raises(ReplayMismatchError, match="adapter"):
        editor.apply(GEMMA_REQUEST)
    assert state_equal(model, base) and not editor.history


def test_tracing_gemma2_equals_the_oracle_and_refuses_a_wrong_adapter(gemma2):
    import numpy as np

    from editkit.errors import ReplayMismatchError
    from editkit.models.gemma2 import ADAPTER
    from editkit.tracing import ALL_KINDS, causal_trace, trace_naive

    model, tok = gemma2
    kw = dict(kinds=ALL_KINDS, window=2, samples=3, noise_std=1.0, seed=1)
    fast = causal_trace(model, tok, "The city of {} is in", "Paris", adapter=ADAPTER, **kw)
    naive = trace_naive(model, tok, "The city of {} is in", "Paris", adapter=ADAPTER, **kw)
    for k in ALL_KINDS:
        assert float(np.abs(fast[k].scores - naive[k].scores).max()) < 1e-4
        assert fast[k].p_clean == pytest.approx(naive[k].p_clean, abs=1e-6)
    assert float(np.ptp(fast["hidden"].scores)) > 1e-3  # restorations do move P(answer)
    with pytest.raises(ReplayMismatchError, match="trace_naive"):
        causal_trace(model, tok, "The city of {} is in", "Paris", adapter=_uncapped(), **kw)


# ------------------------------------------------------------- transformers-version shims
def test_compat_shims(gpt2_and_tok, gemma2):
    from editkit.models import compat

    model, tok = gpt2_and_tok
    ids = _inputs(tok)
    name = compat.cache_argument(model)
    assert name in compat.CACHE_ARGUMENTS
    with torch.no_grad():
        out = model(ids, use_cache=True)
        n_layers, n = get_adapter(model).num_layers(model), ids.shape[1]
        kv = compat.cache_tensors(out, n_layers, n)
        assert kv is not None and len(kv) == n_layers and kv[0][0].shape[-2] == n
        assert compat.cache_tensors(out, n_layers, n + 1) is None  # wrong length: unusable
        # a filled cache continues the forward exactly as the model's own cache does
        nxt = ids[:, -1:]
        own = model(nxt, use_cache=True, **{name: compat.cache_of(out)}).logits
        out = model(ids, use_cache=True)  # the previous call extended its cache in place
        ours = model(nxt, use_cache=True, **{name: compat.filled_cache(
            compat.cache_tensors(out, n_layers, n))}).logits
        torch.testing.assert_close(ours, own)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    keys, values = compat.prefix_cache(k, v).update(k[:, :, :1], v[:, :, :1], 0)
    assert torch.equal(keys, torch.cat([k, k[:, :, :1]], dim=-2)) and values.shape[-2] == 4
    cache = compat.filled_cache([(k, v)])
    assert compat.is_cache(cache) and not compat.is_cache((k, v))
    swapped = compat.swap_cache(((1, cache), {"cache": cache, "x": k}), "new")
    assert swapped == ((1, "new"), {"cache": "new", "x": k})
    assert compat.same_calls(((k,), {"c": cache}), ((k.clone(),), {"c": "other"})) is False
    assert compat.same_calls(((k,), {"c": cache}), ((k.clone(),), {"c": compat.filled_cache([])}))
    t = torch.zeros(2)
    assert compat.block_output_hidden((t, None)) is t and compat.block_output_hidden(t) is t
    assert not compat.embedding_module_scales(torch.nn.Embedding(3, 2))
    gemma, _ = gemma2
    assert compat.embedding_module_scales(gemma.get_input_embeddings())
