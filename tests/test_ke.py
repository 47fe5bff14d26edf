"""KE: the update formula, the constrained objective, and the Editor contract."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import snapshot, state_equal, tiny_model

import editkit
from editkit import EditRequest, load_patch
from editkit.errors import HypernetworkMismatchError, HypernetworkMissingError
from editkit.methods._learned.training import EditContext
from editkit.methods.ke import KE, KEHyperParams, KENet, KETrainConfig
from editkit.methods.ke.ke import KEObjective, edit_text
from editkit.tokens import target_nll

SPORTS = ("tennis", "golf", "rugby", "hockey", "cricket")


def make_requests(n: int = 30) -> list[EditRequest]:
    subjects = [f"Person {chr(65 + i % 26)}{i}" for i in range(n)]
    return [EditRequest("{} plays the sport of", s, SPORTS[(i + 1) % 5], SPORTS[i % 5],
                        paraphrases=(f"The favourite sport of {s} is",),
                        neighborhood=(f"{subjects[(i + 5) % n]} plays the sport of",),
                        case_id=i)
            for i, s in enumerate(subjects)]


@pytest.fixture(params=["gpt2", "llama"])
def fam_model(request, bytelevel_tokenizer, sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer if request.param == "llama" else bytelevel_tokenizer
    return request.param, tiny_model(request.param, len(tok)), tok


def weight_grads(model, tok, names, req):
    params = dict(model.named_parameters())
    loss = target_nll(model, tok, [req.text], [req.target_new]).sum()
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return dict(zip(names, grads, strict=True))


def test_edit_text_format():
    r = make_requests(1)[0]
    assert edit_text(r) == f"{r.target_true} >> {r.target_new} || {r.text}"


def test_update_is_sigma_eta_times_alpha_hadamard_grad_plus_beta(fam_model):
    """ΔW = σ(η)(α̂ ⊙ ∇W/‖∇W‖ + β̂) with α̂ = Σ_j σ(a_j) g'_jᵀ, β̂ = Σ_j σ(d_j) w_jᵀ."""
    family, model, tok = fam_model
    hp = KEHyperParams(layers=[-1], rank=2, lstm_hidden=8, head_hidden=8, init_scale=0.7)
    editor = KE(model, tok, hp)
    torch.manual_seed(1)
    net = editor._build_hypernet()
    with torch.no_grad():
        for head in net.heads:
            head[-1].weight.normal_(std=0.5)
            head[-1].bias.normal_(std=0.5)
    editor = KE(model, tok, hp, hypernet=net)
    req = make_requests(1)[0]
    before = snapshot(model)
    patch = editor.compute_update(req)
    assert state_equal(model, before)
    adapter = editor.adapter
    grads = weight_grads(model, tok, editor.edited_parameters(), req)
    with torch.no_grad():
        h = net.condition(EditContext([req], model, tok, adapter))
        for i, s in enumerate(editor.specs):
            out = net.heads[i](h)[0]
            k = 2
            a, g, d, w, eta = torch.split(out, [k * s.d_out, k * s.d_in, k * s.d_out,
                                                k * s.d_in, 1])
            a, d = a.view(k, s.d_out), d.view(k, s.d_out)
            g, w = g.view(k, s.d_in), w.view(k, s.d_in)
            g_prime = -net.log_scale[i].exp() * (1 + g)
            alpha = torch.sigmoid(a).T @ g_prime       # Σ_j σ(a_j) g'_jᵀ
            beta = torch.sigmoid(d).T @ w              # Σ_j σ(d_j) w_jᵀ
            grad = adapter.kv_view(grads[s.param])
            expected = torch.sigmoid(eta) * (alpha * grad / grad.norm() + beta)
            ours = adapter.kv_view(patch.deltas[s.param].materialize())
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)


def test_untrained_ke_takes_a_normalised_gradient_descent_step(gpt2_and_tok):
    model, tok = gpt2_and_tok
    hp = KEHyperParams(layers=[1, 2], lstm_hidden=8, head_hidden=8, init_scale=2.0)
    net = KE(model, tok, hp)._build_hypernet()
    with torch.no_grad():
        for head in net.heads:
            head[-1].weight.zero_()
    editor = KE(model, tok, hp, hypernet=net)
    req = make_requests(1)[0]
    patch = editor.compute_update(req)
    grads = weight_grads(model, tok, editor.edited_parameters(), req)
    for name, grad in grads.items():
        torch.testing.assert_close(patch.deltas[name].materialize(),
                                   -0.25 * 2.0 * grad / grad.norm(), rtol=1e-4, atol=1e-8)
    editor.apply(req)
    after = target_nll(model, tok, [req.text], [req.target_new])
    editor.revert()
    assert after < target_nll(model, tok, [req.text], [req.target_new])


def test_lagrange_multiplier_ascends_on_violation_and_descends_when_satisfied():
    obj = KEObjective(margin=0.1, init_lambda=1.0, val_kl_weight=10.0)
    phi = torch.nn.Parameter(torch.tensor(0.5))
    opt = torch.optim.SGD([{"params": [phi]}, {"params": [obj.rho]}], lr=0.1)
    lam0 = float(obj.lam.detach())
    kl = phi**2  # 0.25 > margin
    loss, logs = obj(torch.tensor(1.0), kl)
    opt.zero_grad()
    loss.backward()
    torch.testing.assert_close(phi.grad, torch.tensor(lam0 * 2 * 0.5))  # ∂(λ·kl)/∂φ
    opt.step()
    assert float(obj.lam.detach()) > lam0 and logs["lambda"] == pytest.approx(lam0)
    lam1 = float(obj.lam.detach())
    loss, _ = obj(torch.tensor(1.0), torch.tensor(0.01))  # constraint satisfied
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert float(obj.lam.detach()) < lam1
    assert obj.val_score({"edit_nll": 1.0, "loc_kl": 0.05}) == 1.0
    assert obj.val_score({"edit_nll": 1.0, "loc_kl": 0.3}) == pytest.approx(3.0)


# ---------------------------------------------------------------- contract
@pytest.fixture(scope="module")
def trained(tmp_path_factory, bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    model = tiny_model("gpt2", len(tok))
    reqs = make_requests(30)
    out = tmp_path_factory.mktemp("ke") / "hypernet"
    cfg = KETrainConfig(max_steps=16, batch_size=4, val_every=8, val_size=6,
                        checkpoint_every=8, out_dir=str(out), progress=False)
    editor = KE.train(model, tok, reqs[:24], reqs[24:], cfg,
                      hparams=KEHyperParams(layers=[1, 2], lstm_hidden=16, head_hidden=16))
    return editor, model, tok, out, reqs


def test_trained_ke_contract_and_files(trained, tmp_path):
    editor, model, tok, out, reqs = trained
    assert editkit.get_method("ke") is KE
    log = json.loads((out / "training_log.json").read_text())
    assert log["summary"]["steps"] == 16
    assert any("train_lambda" in e for e in log["log"])
    base = snapshot(model)
    patch = editor.compute_update(reqs[0])
    assert state_equal(model, base)
    editor.apply(reqs[0]).apply(reqs[1])
    edited_both = snapshot(model)
    editor.revert(editor.history[0].id)
    editor.revert(editor.history[0].id)
    assert state_equal(model, base)
    patch.save(tmp_path / "ke.safetensors")
    loaded = load_patch(tmp_path / "ke.safetensors")
    assert loaded.metadata["method"] == "ke"
    for name, delta in patch.deltas.items():
        torch.testing.assert_close(loaded.deltas[name].materialize(), delta.materialize())
    again = KE.load(out, model, tok).compute_update(reqs[0])
    for name, delta in patch.deltas.items():
        torch.testing.assert_close(again.deltas[name].materialize(), delta.materialize())
    assert any(not torch.equal(edited_both[n], base[n]) for n in editor.edited_parameters())


def test_loading_errors(trained, tmp_path):
    editor, model, tok, out, reqs = trained
    with pytest.raises(HypernetworkMissingError, match="editkit train-ke"):
        KE(model, tok, KEHyperParams()).apply(reqs[0])
    from editkit.methods.mend import MEND, MENDHyperParams, MENDNet

    mend = MEND(model, tok, MENDHyperParams(layers=[2], rank=2))
    mend = MEND(model, tok, mend.hparams, hypernet=MENDNet(mend.specs, mend.hparams))
    mend.save_hypernet(tmp_path / "mend")
    with pytest.raises(HypernetworkMismatchError, match="'mend' hypernetwork"):
        KE.load(tmp_path / "mend", model, tok)
    with pytest.raises(HypernetworkMismatchError, match="lstm_hidden"):
        KE(model, tok, KEHyperParams(hypernet_path=str(out), lstm_hidden=4)).prepare()


def test_ke_net_shapes_are_low_rank(trained):
    editor, model, tok, out, reqs = trained
    assert isinstance(editor.hypernet, KENet)
    patch = editor.compute_update(reqs[2])
    n_tokens = len(tok(f"{reqs[2].text} {reqs[2].target_new}")["input_ids"]) - 1
    for delta in patch.deltas.values():  # rank · (tokens + 1) columns at most
        assert delta.materialize().shape in {(48, 192), (192, 48)}
        assert torch.linalg.matrix_rank(delta.materialize()) <= n_tokens + 1


@pytest.mark.slow
def test_ke_learns_to_edit_the_fact_world():
    from editkit.eval import edit_quality
    from editkit.methods._learned.data import as_requests, split_by_subject
    from editkit.testbed import FactWorld, load_fact_world

    model, tok = load_fact_world()
    reqs = as_requests(FactWorld().records())
    train, val, _ = split_by_subject(reqs, (0.8, 0.1, 0.1), seed=0)
    hp = KEHyperParams(lstm_hidden=64, head_hidden=32)
    torch.manual_seed(0)
    untrained = KE(model, tok, hp, hypernet=KE(model, tok, hp)._build_hypernet())
    before = edit_quality(untrained, train[:20], n_neighbors=5)
    cfg = KETrainConfig(max_steps=40, batch_size=8, val_every=20, val_size=12, progress=False)
    editor = KE.train(model, tok, train, val[:12], cfg, hparams=hp)
    after = edit_quality(editor, train[:20], n_neighbors=5)
    # the untrained editor is a normalised gradient step: it moves some facts, not most
    assert after["ES"] >= 0.85 and after["PS"] >= 0.8 and after["NS"] >= 0.6, after
    assert after["PS"] >= before["PS"] + 0.2, (before, after)
