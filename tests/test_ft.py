from __future__ import annotations

import pytest
import torch
from conftest import snapshot, state_equal

from editkit import EditRequest, InvalidHyperParamsError
from editkit.methods.ft import FT, FTL, FTHyperParams, FTLHyperParams

REQ = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def test_ftl_respects_linf_bound_exactly(gpt2_and_tok):
    model, tok = gpt2_and_tok
    eps = 1e-3
    hp = FTLHyperParams(layer=1, lr=5e-2, num_steps=10, norm_constraint=eps)
    editor = FTL(model, tok, hp)
    name = editor.edited_parameters()[0]
    w0 = dict(model.named_parameters())[name].detach().clone()
    patch = editor.compute_update(REQ)
    delta = patch.deltas[name].materialize()
    eps32 = torch.tensor(eps, dtype=delta.dtype)  # ε as the weights' dtype represents it
    assert delta.abs().max() <= eps32
    # The large learning rate pushes many entries to the boundary: the constraint is active.
    assert (delta.abs() == eps32).float().mean() > 0.1
    editor.apply(REQ)
    w1 = dict(model.named_parameters())[name].detach()
    assert (w1 - w0).abs().max().item() <= eps * (1 + 1e-6)


def test_ft_unconstrained_moves_further_and_restores_flags(gpt2_and_tok):
    model, tok = gpt2_and_tok
    model.transformer.wte.weight.requires_grad_(False)
    base = snapshot(model)
    ft = FT(model, tok, FTHyperParams(layer=1, lr=5e-2, num_steps=10))
    patch = ft.compute_update(REQ)
    assert state_equal(model, base)
    assert not model.transformer.wte.weight.requires_grad
    assert model.transformer.h[0].mlp.c_fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert patch.deltas[ft.edited_parameters()[0]].materialize().abs().max() > 1e-3


def test_ft_optimises_every_target_token(gpt2_and_tok):
    from editkit.tokens import build_scoring_batch, target_token_logprobs

    model, tok = gpt2_and_tok
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "New Amsterdam City")

    @torch.no_grad()
    def per_token():
        sb = build_scoring_batch(tok, [req.text], [req.target_new])
        return target_token_logprobs(model(**sb.batch.model_inputs()).logits, sb)[0]

    before = per_token()
    assert len(before) >= 3
    FT(model, tok, FTHyperParams(layer=2, lr=5e-2, num_steps=25)).apply(req)
    after = per_token()
    assert (after > before + 0.5).all(), (before, after)


@pytest.mark.parametrize("bad, needle", [
    ({"layer": -1}, "-1"), ({"layer": 3}, "3"), ({"lr": 0}, "lr"),
    ({"num_steps": 2.5}, "num_steps"), ({"norm_constraint": -1.0}, "norm_constraint"),
    ({"slot": "mlp_gate"}, "mlp_gate"),
])
def test_bad_hparams(gpt2_and_tok, bad, needle):
    model, tok = gpt2_and_tok
    with pytest.raises(InvalidHyperParamsError, match=needle):
        FT(model, tok, FTHyperParams(**{**FTHyperParams().__dict__, **bad}))


def test_published_defaults_by_name(gpt2_and_tok):
    model, tok = gpt2_and_tok
    model.config.name_or_path = "openai-community/gpt2-xl"
    from editkit import get_adapter

    adapter = get_adapter(model)
    assert FTLHyperParams.for_model(model, adapter).norm_constraint == 5e-4
    assert FTLHyperParams.for_model(model, adapter).layer == 0
    model.config.name_or_path = "my-own-model"
    with pytest.warns(UserWarning, match="scaled"):
        hp = FTHyperParams.for_model(model, adapter)
    assert 0 <= hp.layer < 3


def test_hparams_json_round_trip(tmp_path):
    hp = FTLHyperParams(layer=2, norm_constraint=1e-4)
    hp.to_json(tmp_path / "h.json")
    assert FTLHyperParams.from_json(tmp_path / "h.json") == hp
    with pytest.raises(InvalidHyperParamsError, match="bogus"):
        FTLHyperParams.from_dict({**hp.to_dict(), "bogus": 1})
    assert torch.is_tensor(torch.zeros(1))
