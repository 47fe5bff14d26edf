"""Models dispatched by accelerate with an offloaded layer (CPU here): what works, what is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model

import editkit
from editkit.methods.ft import FT, FTHyperParams
from editkit.tracing import causal_trace, trace_naive

accelerate = pytest.importorskip("accelerate")

REQUEST = editkit.EditRequest(prompt="{} plays the sport of", subject="LeBron James",
                              target_new="football")


def resident(model) -> dict[str, torch.Tensor]:
    """The parameters that hold data (offloaded ones are meta placeholders)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.device.type != "meta"}


def unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    now = resident(model)
    return now.keys() == before.keys() and all(torch.equal(now[n], before[n]) for n in now)


@pytest.fixture
def dispatched(bytelevel_tokenizer, tmp_path):
    """A 3-layer GPT-2 whose block 1 is offloaded to disk (weights on the meta device)."""
    model = tiny_model("gpt2", len(bytelevel_tokenizer))
    reference = tiny_model("gpt2", len(bytelevel_tokenizer))
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
                  "transformer.h.1": "disk", "transformer.h.2": "cpu",
                  "transformer.ln_f": "cpu", "lm_head": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = accelerate.dispatch_model(model, device_map=device_map,
                                          offload_dir=str(tmp_path / "offload"))
    assert model.transformer.h[1].mlp.c_proj.weight.device.type == "meta"
    return model, reference, bytelevel_tokenizer


def test_a_resident_layer_is_edited_and_reverted_exactly(dispatched):
    model, reference, tok = dispatched
    before = resident(model)
    editor = FT(model, tok, FTHyperParams(layer=2, num_steps=5, lr=0.05)).apply(REQUEST)
    name = editor.edited_parameters()[0]
    assert not torch.equal(dict(model.named_parameters())[name], before[name])
    editor.revert()
    assert unchanged(model, before)
    ids = torch.tensor([tok("LeBron James plays")["input_ids"]])
    with torch.no_grad():  # the offloaded layer still computes what the plain model does
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def test_an_offloaded_layer_is_refused_with_a_typed_error(dispatched):
    model, _, tok = dispatched
    before = resident(model)
    with pytest.raises(editkit.UnsupportedModelError) as info:
        FT(model, tok, FTHyperParams(layer=1, num_steps=2)).apply(REQUEST)
    message = str(info.value)
    assert "transformer.h.1.mlp.c_proj.weight" in message and "offloaded" in message
    assert "another layer" in message
    assert unchanged(model, before) and not editkit.EditHistory.of(model).edits


def test_tracing_a_dispatched_model_equals_the_oracle(dispatched):
    model, _, tok = dispatched
    fast = causal_trace(model, tok, "{} plays the sport of", "LeBron James", kinds="hidden",
                        samples=3, noise_std=0.1)
    slow = trace_naive(model, tok, "{} plays the sport of", "LeBron James", kinds="hidden",
                       samples=3, noise_std=0.1)
    assert abs(fast["hidden"].scores - slow["hidden"].scores).max() < 1e-4


def test_statistics_of_a_dispatched_model_equal_the_plain_model(dispatched):
    from editkit.stats import second_moment

    model, reference, tok = dispatched
    texts = ["LeBron James plays basketball.", "The Eiffel Tower is in Paris."] * 4
    got = second_moment(model, [1, 2], texts, tokenizer=tok, n_samples=8, use_cache=False)
    want = second_moment(reference, [1, 2], texts, tokenizer=tok, n_samples=8, use_cache=False)
    for layer in (1, 2):  # the offloaded block's keys are computed like any other
        assert torch.allclose(got[layer], want[layer], rtol=1e-5, atol=1e-7)


def test_float64_solves_run_on_the_layer_device_where_supported():
    """The closed-form solves stay on the keys' device (CPU, CUDA); MPS has no float64, so
    there, and only there, they run on the CPU."""
    from editkit.methods._locate.linalg import float64_on, solve_device

    assert solve_device("cpu") == torch.device("cpu")
    assert solve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert solve_device("mps") == torch.device("cpu")
    assert solve_device("meta") == torch.device("cpu")
    t = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    out = float64_on(t, torch.device("cpu"))
    assert out.dtype == torch.float64 and not out.requires_grad
