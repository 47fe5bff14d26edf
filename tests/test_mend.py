"""MEND: gradient identity, identity initialisation, Editor contract, training machinery."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import snapshot, state_equal, tiny_model

import editkit
from editkit import EditRequest, load_patch
from editkit.errors import HypernetworkMismatchError, HypernetworkMissingError
from editkit.eval import counterfact_metrics, load_requests
from editkit.methods._learned.data import (
    build_examples,
    make_batch,
    mentions_any,
    split_by_subject,
    subjects_of,
)
from editkit.methods._learned.factors import capture_factors, frozen_parameters, weight_specs
from editkit.methods._learned.training import (
    HypernetTrainer,
    optimizer_state_from_files,
    optimizer_state_to_files,
)
from editkit.methods.mend import MEND, MENDHyperParams, MENDNet, MENDTrainConfig
from editkit.methods.mend.mend import RunningNorm
from editkit.patch import LowRank

SPORTS = ("tennis", "golf", "rugby", "hockey", "cricket")


def make_requests(n: int = 30) -> list[EditRequest]:
    subjects = [f"Person {chr(65 + i % 26)}{i}" for i in range(n)]
    out = []
    for i, s in enumerate(subjects):
        out.append(EditRequest(
            "{} plays the sport of", s, SPORTS[(i + 1) % 5], SPORTS[i % 5],
            paraphrases=(f"The favourite sport of {s} is", f"Every weekend {s} plays"),
            neighborhood=(f"{subjects[(i + 5) % n]} plays the sport of",
                          f"{subjects[(i + 10) % n]} plays the sport of"),
            case_id=i,
        ))
    return out


def models_and_tokenizers(request, bytelevel_tokenizer, sentencepiece_tokenizer):
    family = request.param
    tok = sentencepiece_tokenizer if family == "llama" else bytelevel_tokenizer
    return family, tiny_model(family, len(tok)), tok


@pytest.fixture(params=["gpt2", "llama"])
def fam_model(request, bytelevel_tokenizer, sentencepiece_tokenizer):
    return models_and_tokenizers(request, bytelevel_tokenizer, sentencepiece_tokenizer)


def autograd_weight_grads(model, tok, specs, prompt, target):
    """Autograd gradient of one request's mean target NLL w.r.t. each edited weight."""
    from editkit.tokens import target_nll

    params = dict(model.named_parameters())
    weights = [params[s.param] for s in specs]
    loss = target_nll(model, tok, [prompt], [target]).sum()
    grads = torch.autograd.grad(loss, weights)
    return dict(zip([s.param for s in specs], grads, strict=True))


# ------------------------------------------------------------- the MEND math
def test_rank_one_per_token_factors_equal_autograd_weight_gradient(fam_model):
    family, model, tok = fam_model
    adapter = editkit.get_adapter(model)
    specs = weight_specs(model, adapter, [1, 2], ("mlp_in", "mlp_out"))
    reqs = make_requests(3)[:2]  # two rows of different lengths: padding must not leak
    with frozen_parameters(model):
        factors, _ = capture_factors(model, tok, specs, [reqs[0].text, "A much longer prompt "
                                                         "about " + reqs[1].text],
                                     [reqs[0].target_new, "ice hockey"])
    for row, (prompt, target) in enumerate([(reqs[0].text, reqs[0].target_new),
                                            ("A much longer prompt about " + reqs[1].text,
                                             "ice hockey")]):
        expected = autograd_weight_grads(model, tok, specs, prompt, target)
        for s in specs:
            ours = adapter.kv_view(factors[s.param].weight_grad()[row])
            # kv_view is its own inverse: back to the parameter's layout
            assert ours.shape == expected[s.param].shape
            torch.testing.assert_close(ours, expected[s.param], rtol=1e-4, atol=1e-7)
            assert expected[s.param].abs().max() > 0


def test_identity_initialised_mend_is_a_plain_gradient_step(fam_model):
    family, model, tok = fam_model
    lr = 0.05
    hp = MENDHyperParams(layers=[-2, -1], init_edit_lr=lr)
    editor = MEND(model, tok, hp)
    net = MENDNet(editor.specs, hp)  # untrained: identity network, identity normalisation
    editor = MEND(model, tok, hp, hypernet=net)
    req = make_requests(1)[0]
    before = snapshot(model)
    patch = editor.compute_update(req)
    assert state_equal(model, before)
    grads = autograd_weight_grads(model, tok, editor.specs, req.text, req.target_new)
    for name, grad in grads.items():
        torch.testing.assert_close(patch.deltas[name].materialize(), -lr * grad,
                                   rtol=1e-4, atol=1e-8)
    # The edited model is the model after one SGD step of size lr on those weights.
    stepped = tiny_model(family, len(tok))
    with torch.no_grad():
        params = dict(stepped.named_parameters())
        for name, grad in grads.items():
            params[name] -= lr * grad
    editor.apply(req)
    for name in grads:
        torch.testing.assert_close(dict(model.named_parameters())[name], params[name],
                                   rtol=1e-5, atol=1e-7)


def test_running_norm_equals_batch_statistics():
    torch.manual_seed(0)
    x = torch.randn(257, 6) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1e-3, 10.0]) + 4.0
    norm = RunningNorm(6)
    for chunk in x.split(37):
        norm.update(chunk)
    assert int(norm.count) == 257
    torch.testing.assert_close(norm.mean.float(), x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.std().float(), x.std(0), rtol=1e-4, atol=1e-6)
    y = norm(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(6), atol=1e-4, rtol=0)


# -------------------------------------------------------------- hypernet files
def test_no_hypernetwork_raises_with_training_instructions(gpt2_and_tok):
    model, tok = gpt2_and_tok
    editor = MEND(model, tok, MENDHyperParams())
    before = snapshot(model)
    with pytest.raises(HypernetworkMissingError) as err:
        editor.apply(make_requests(1)[0])
    msg = str(err.value)
    assert "MEND.train(" in msg and "editkit train-mend" in msg and "hypernet_path" in msg
    assert state_equal(model, before)
    with pytest.raises(HypernetworkMissingError, match="train-mend"):
        MEND(model, tok, MENDHyperParams(hypernet_path="/nonexistent/dir")).prepare()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bytelevel_tokenizer):
    """A tiny MEND hypernetwork trained in the test (tiny GPT-2, synthetic edits)."""
    tok = bytelevel_tokenizer
    model = tiny_model("gpt2", len(tok))
    reqs = make_requests(30)
    out = tmp_path_factory.mktemp("mend") / "hypernet"
    cfg = MENDTrainConfig(max_steps=24, batch_size=4, val_every=8, val_size=6, lr=1e-3,
                          checkpoint_every=8, out_dir=str(out), progress=False)
    editor = MEND.train(model, tok, reqs[:24], reqs[24:], cfg,
                        hparams=MENDHyperParams(layers=[1, 2], rank=8),
                        record_metrics=counterfact_metrics)
    return editor, model, tok, out, reqs


def test_training_writes_loadable_hypernetwork_log_curves_and_no_pickle(trained):
    editor, model, tok, out, reqs = trained
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"hypernet.safetensors", "hypernet.json", "training_log.json", "training_curves.png",
            "checkpoint/state.safetensors", "checkpoint/state.json"} <= files
    assert all(f.endswith((".safetensors", ".json", ".png")) for f in files)
    log = json.loads((out / "training_log.json").read_text())
    assert log["summary"]["steps"] == 24
    vals = [e for e in log["log"] if "val_score" in e]
    assert [e["step"] for e in vals] == [0, 8, 16, 24]
    assert {"val_ES", "val_PS", "val_NS", "val_loc_kl", "val_edit_nll"} <= set(vals[-1])
    assert all(0.0 <= vals[-1][k] <= 1.0 for k in ("val_ES", "val_PS", "val_NS"))
    meta = json.loads((out / "hypernet.json").read_text())
    assert meta["method"] == "mend" and meta["base"]["digest"] == editor.fingerprint()["digest"]
    loaded = MEND.load(out, model, tok)
    req = reqs[0]
    a, b = editor.compute_update(req), loaded.compute_update(req)
    for name in a.deltas:
        torch.testing.assert_close(a.deltas[name].materialize(), b.deltas[name].materialize())


def test_editor_contract_pure_update_exact_revert_and_patch_roundtrip(trained, tmp_path):
    editor, model, tok, out, reqs = trained
    base = snapshot(model)
    patch = editor.compute_update(reqs[1])
    assert state_equal(model, base), "compute_update changed the model"
    assert set(patch.deltas) == set(editor.edited_parameters())
    n_tokens = len(tok(f"{reqs[1].text} {reqs[1].target_new}")["input_ids"]) - 1
    for delta in patch.deltas.values():
        assert isinstance(delta, LowRank) and delta.rank <= n_tokens
    editor.apply(reqs[1])
    edited = snapshot(model)
    editor.apply(reqs[2])
    editor.revert(editor.history[0].id)  # revert the first of two edits
    editor.revert()
    assert state_equal(model, base)
    patch.save(tmp_path / "p.safetensors")
    loaded = load_patch(tmp_path / "p.safetensors")
    loaded.apply_to(model)
    try:
        assert all(torch.allclose(p, edited[n], atol=1e-7, rtol=0)
                   for n, p in model.named_parameters())
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n])


def test_batch_update_is_the_sum_of_single_edit_updates(trained):
    editor, model, tok, out, reqs = trained
    both = editor.compute_update([reqs[4], reqs[5]])
    one, two = editor.compute_update(reqs[4]), editor.compute_update(reqs[5])
    for name in both.deltas:
        torch.testing.assert_close(both.deltas[name].materialize(),
                                   one.deltas[name].materialize() + two.deltas[name].materialize(),
                                   rtol=1e-4, atol=1e-7)


def test_fingerprint_mismatch_is_a_typed_error(trained, bytelevel_tokenizer):
    editor, model, tok, out, reqs = trained
    other = tiny_model("gpt2", len(tok), seed=1)
    with pytest.raises(HypernetworkMismatchError, match="differ from those it was trained on"):
        MEND.load(out, other, tok)
    lenient = MEND.load(out, other, tok, check_fingerprint=False)
    assert set(lenient.compute_update(reqs[0]).deltas) == set(editor.edited_parameters())
    with pytest.raises(HypernetworkMismatchError, match="blocks"):
        MEND.load(out, tiny_model("gpt2", len(tok), n_layers=4), tok)
    with pytest.raises(HypernetworkMismatchError, match="rank"):
        MEND(model, tok, MENDHyperParams(hypernet_path=str(out), rank=4)).prepare()


def test_fingerprint_uses_originals_of_an_already_edited_model(trained):
    editor, model, tok, out, reqs = trained
    editor.apply(reqs[3])
    try:
        again = MEND.load(out, model, tok)  # the weights moved, the base did not
        assert again.fingerprint()["digest"] == editor.fingerprint()["digest"]
    finally:
        editor.revert("all")


def test_registered_and_excluded_from_generic_conformance():
    assert editkit.get_method("mend") is MEND


# ---------------------------------------------------------------- training
def test_checkpoint_resume_after_interruption_matches_uninterrupted_run(
        tmp_path, bytelevel_tokenizer, monkeypatch):
    tok = bytelevel_tokenizer
    reqs = make_requests(20)
    hp = MENDHyperParams(layers=[2], slots=("mlp_out",), rank=4)
    cfg = MENDTrainConfig(max_steps=9, batch_size=3, val_every=3, val_size=4,
                          checkpoint_every=3, progress=False)
    full = MEND.train(tiny_model("gpt2", len(tok)), tok, reqs[:16], reqs[16:],
                      dataclasses.replace(cfg, out_dir=str(tmp_path / "a")), hparams=hp)

    calls = {"n": 0}
    original = HypernetTrainer._train_step

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(HypernetTrainer, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MEND.train(tiny_model("gpt2", len(tok)), tok, reqs[:16], reqs[16:],
                   dataclasses.replace(cfg, out_dir=str(tmp_path / "b")), hparams=hp)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    monkeypatch.setattr(HypernetTrainer, "_train_step", original)
    resumed = MEND.train(tiny_model("gpt2", len(tok)), tok, reqs[:16], reqs[16:],
                         dataclasses.replace(cfg, out_dir=str(tmp_path / "b")), hparams=hp)
    a, b = full.hypernet.state_dict(), resumed.hypernet.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    log_a = json.loads((tmp_path / "a" / "training_log.json").read_text())["log"]
    log_b = json.loads((tmp_path / "b" / "training_log.json").read_text())["log"]
    assert [e["step"] for e in log_a] == [e["step"] for e in log_b]


def test_early_stopping_keeps_the_best_validated_hypernetwork(bytelevel_tokenizer, monkeypatch):
    tok = bytelevel_tokenizer
    reqs = make_requests(12)
    scores = iter([1.0, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1])  # best at the 2nd validation (step 2)
    seen = {}

    def fake_validate(self):
        score = next(scores)
        if score == 0.5:
            seen["best"] = {k: v.clone() for k, v in self.hypernet.state_dict().items()}
        return {"edit_nll": score, "loc_kl": 0.0, "score": score}

    monkeypatch.setattr(HypernetTrainer, "validate", fake_validate)
    cfg = MENDTrainConfig(max_steps=50, batch_size=2, val_every=2, val_size=2, patience=2,
                          progress=False)
    editor = MEND.train(tiny_model("gpt2", len(tok)), tok, reqs[:10], reqs[10:], cfg,
                        hparams=MENDHyperParams(layers=[2], rank=4))
    summary = editor.training_summary
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] == 6 and summary["best_step"] == 2
    for k, v in editor.hypernet.state_dict().items():
        assert torch.equal(v, seen["best"][k])


def test_optimizer_state_roundtrips_through_tensors_and_json():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    extra = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": 1e-2},
                            {"params": [extra], "lr": 5e-3}])
    for _ in range(3):
        opt.zero_grad()
        (net(torch.randn(5, 4)).pow(2).sum() + extra.pow(2).sum() + extra.sum()).backward()
        opt.step()
    tensors, meta = optimizer_state_to_files(opt)
    meta = json.loads(json.dumps(meta))  # through JSON, as on disk
    fresh = torch.optim.Adam([{"params": net.parameters(), "lr": 1.0},
                              {"params": [extra], "lr": 1.0}])
    optimizer_state_from_files(fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert [g["lr"] for g in b["param_groups"]] == [1e-2, 5e-3]
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][pid][key]))


# -------------------------------------------------------------------- data
def test_split_by_subject_is_disjoint_and_filters_held_out_mentions():
    reqs = make_requests(40)
    train, val, test = split_by_subject(reqs, (0.7, 0.15, 0.15), seed=3)
    assert len(train) + len(val) + len(test) == 40
    assert not subjects_of(train) & subjects_of(val)
    assert not subjects_of(train) & subjects_of(test)
    assert 24 <= len(train) <= 32 and len(test) >= 4
    held = subjects_of(test) | subjects_of(val)
    examples = build_examples(train, exclude_subjects=held)
    for e in examples:
        for text in e.edit_prompts + e.locality:
            assert not mentions_any(text, held), text
    # the neighbourhood of make_requests points at other subjects: some must have been dropped
    assert sum(len(e.locality) for e in examples) < 2 * len(examples)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(examples[:3], ["An unrelated sentence."], gen, n_paraphrases=1,
                       n_locality=2)
    assert len(batch.edit_rows) == 6 and {i for _, i in batch.edit_rows} == {0, 1, 2}


def test_load_requests_reads_counterfact_json(tmp_path):
    from editkit.testbed import FactWorld

    path = tmp_path / "cf.json"
    path.write_text(json.dumps(FactWorld().records(5)))
    reqs = load_requests(path)
    assert len(reqs) == 5 and all(r.target_true and r.paraphrases for r in reqs)


def test_trains_on_zsre_records(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    records = [{"subject": f"River {chr(65 + i)}{i}", "src": f"Which sea does River {chr(65 + i)}{i} "
                "flow into?", "alt": SPORTS[i % 5], "answers": ["the Baltic"],
                "rephrase": f"River {chr(65 + i)}{i} flows into which sea?",
                "loc": "who wrote the song yesterday", "loc_ans": "Paul McCartney"}
               for i in range(12)]
    cfg = MENDTrainConfig(max_steps=3, batch_size=4, val_every=3, val_size=3, progress=False)
    editor = MEND.train(tiny_model("gpt2", len(tok)), tok, records[:9], records[9:], cfg,
                        hparams=MENDHyperParams(layers=[2], rank=4))
    assert editor.training_summary["n_train_examples"] == 9
    assert set(editor.compute_update(EditRequest.from_zsre(records[0])).deltas) == {
        "transformer.h.2.mlp.c_fc.weight", "transformer.h.2.mlp.c_proj.weight"}


def test_cli_trains_and_scores_a_saved_model(tmp_path, bytelevel_tokenizer, capsys):
    import argparse

    from transformers import AutoModelForCausalLM

    from editkit import cli

    tok = bytelevel_tokenizer
    model_dir = tmp_path / "model"
    tiny_model("gpt2", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "edits.jsonl"
    data.write_text("\n".join(json.dumps(r.to_dict()) for r in make_requests(20)))
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args([
        "train-mend", "--model", str(model_dir), "--data", str(data),
        "--out", str(tmp_path / "out"), "--steps", "4", "--val-every", "2", "--eval-n", "2",
        "--hparams", '{"layers": [2], "rank": 4}', "--quiet"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "held-out test subjects" in out and "| mend" in out
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert not set(split["subjects"]["train"]) & set(split["subjects"]["test"])
    assert (tmp_path / "out" / "test_metrics.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert MEND.load(tmp_path / "out", reloaded, tok).hypernet is not None


# ------------------------------------------------------------------ quality
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shipped_fact_world_hypernetwork_fits_the_shipped_fact_world(dtype):
    """``MEND(model, tok)`` on the fact world finds the hypernetwork shipped as package data,
    also for a bfloat16 copy of the model (its weights are the float32 ones rounded)."""
    from editkit.methods._learned.io import shipped_dir
    from editkit.testbed import FactWorld, load_fact_world
    from editkit.tokens import score_targets

    if not (shipped_dir("mend") / "fact_world" / "hypernet.json").is_file():
        pytest.skip("no MEND hypernetwork shipped for the fact world")
    model, tok = load_fact_world(train_if_missing=False)
    model = model.to(dtype)
    editor = MEND(model, tok)
    assert editor.hparams.hypernet_path is not None, (
        "the shipped MEND hypernetwork does not fit the shipped fact world (stale); rerun "
        "benchmarks/learned_quality.py --ship")
    req = EditRequest.from_counterfact(FactWorld().records(1)[0])
    base = snapshot(model)
    editor.apply(req)
    new, true = score_targets(model, tok, [req.text] * 2, [req.target_new, req.target_true])
    editor.revert()
    assert new > true and state_equal(model, base)


@pytest.mark.slow
def test_mend_learns_to_edit_the_fact_world():
    """A short training run turns an identity-initialised MEND into a working editor."""
    from editkit.eval import edit_quality
    from editkit.methods._learned.data import as_requests
    from editkit.testbed import FactWorld, load_fact_world

    model, tok = load_fact_world()
    reqs = as_requests(FactWorld().records())
    train, val, _ = split_by_subject(reqs, (0.8, 0.1, 0.1), seed=0)
    hp = MENDHyperParams(rank=32)
    untrained = MEND(model, tok, hp, hypernet=MENDNet(MEND(model, tok, hp).specs, hp))
    before = edit_quality(untrained, train[:20], n_neighbors=5)
    cfg = MENDTrainConfig(max_steps=40, batch_size=8, lr=5e-4, val_every=20, val_size=12,
                          progress=False)
    editor = MEND.train(model, tok, train, val[:12], cfg, hparams=hp)
    after = edit_quality(editor, train[:20], n_neighbors=5)
    assert before["ES"] < 0.5
    assert after["ES"] >= 0.8 and after["PS"] >= 0.7 and after["NS"] >= 0.7, after
