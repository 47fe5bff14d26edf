from __future__ import annotations

import pytest
import torch

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
