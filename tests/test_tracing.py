"""Causal tracing: the fast tracer equals the straightforward oracle; AIE, layers, plots, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import transformers as T
from conftest import snapshot, state_equal, tiny_config

from editkit import cli as tracing_cli
from editkit import get_adapter
from editkit.errors import InvalidHyperParamsError, InvalidRequestError
from editkit.tracing import (
    ALL_KINDS,
    GROUPS,
    KINDS,
    AIEResult,
    CausalTracer,
    SweepResult,
    TraceResult,
    average_indirect_effect,
    causal_trace,
    default_window,
    embedding_std,
    layer_from_aie,
    layer_sweep,
    make_noise,
    mlp_aie,
    plots,
    scaled_window,
    subject_token_range,
    suggest_layer,
    token_groups,
    trace_naive,
    trace_records,
    window_layers,
)

PROMPT, SUBJECT = "The city of {} is in", "Paris"
TOL = 1e-4


def sharp_model(family: str, tokenizer, n_layers: int = 4, seed: int = 0):
    """A tiny random model with large weights: P(answer) moves a lot when states change,
    so agreement to 1e-4 means something (default init gives P ≈ 1/vocab everywhere)."""
    cfg = tiny_config(family, len(tokenizer), n_layers)
    cfg.initializer_range = 0.3
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def gpt2_sharp(bytelevel_tokenizer):
    return sharp_model("gpt2", bytelevel_tokenizer, 4), bytelevel_tokenizer


def fact_world_or_skip():
    from editkit.testbed import load_fact_world

    try:
        return load_fact_world(train_if_missing=False)
    except FileNotFoundError:
        pytest.skip("the fact-world model is not built on this machine")


def max_diff(a: dict[str, TraceResult], b: dict[str, TraceResult]) -> float:
    return max(float(np.abs(a[k].scores - b[k].scores).max()) for k in a)


KW = dict(kinds=ALL_KINDS, window=3, samples=3, noise_std=1.0, seed=1)


# --------------------------------------------------------------------------- fast == naive
def test_fast_equals_naive_on_every_family(family_model):
    family, _, tok = family_model
    model = sharp_model(family, tok)
    before = snapshot(model)
    tracer = CausalTracer(model, tok, noise_std=1.0, samples=3, seed=1)
    fast = tracer.trace(PROMPT, SUBJECT, kinds=ALL_KINDS, window=3)
    assert tracer.shortcuts == {"reuse_prefix": True, "first_blocks": True}  # all exercised
    naive = trace_naive(model, tok, PROMPT, SUBJECT, **KW)
    assert set(fast) == set(ALL_KINDS)
    assert max_diff(fast, naive) < TOL
    for k in ALL_KINDS:
        assert fast[k].p_clean == pytest.approx(naive[k].p_clean, abs=TOL)
        assert fast[k].p_corrupt == pytest.approx(naive[k].p_corrupt, abs=TOL)
        assert fast[k].answer_id == naive[k].answer_id
    # the comparison is not vacuous: restorations move P(answer) by far more than 1e-4
    assert min(float(np.ptp(fast[k].scores)) for k in KINDS) > 1e-2
    # tracing leaves the model as it was: weights, hooks, mode
    assert state_equal(model, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model.training


def test_fast_without_shortcuts_and_with_tiny_batches_is_the_same(gpt2_sharp):
    model, tok = gpt2_sharp
    ref = causal_trace(model, tok, PROMPT, SUBJECT, **KW)
    plain = CausalTracer(model, tok, noise_std=1.0, samples=3, seed=1, reuse_prefix=False,
                         first_blocks=False, batch_size=3)
    assert max_diff(plain.trace(PROMPT, SUBJECT, kinds=ALL_KINDS, window=3), ref) < TOL


def test_oracle_detects_a_wrong_window(gpt2_sharp):
    """The equality test has teeth: a different window gives clearly different MLP scores."""
    model, tok = gpt2_sharp
    a = causal_trace(model, tok, PROMPT, SUBJECT, kinds="mlp", window=3, samples=3, noise_std=1.0)
    b = trace_naive(model, tok, PROMPT, SUBJECT, kinds="mlp", window=2, samples=3,
                    noise_std=1.0)
    assert max_diff(a, b) > 1e-3


def test_fast_equals_naive_on_the_fact_world():
    model, tok = fact_world_or_skip()
    from editkit.testbed import FactWorld

    rec = FactWorld().records(2)[1]["requested_rewrite"]
    args = (model, tok, rec["prompt"], rec["subject"], rec["target_true"]["str"])
    kw = dict(kinds=KINDS, samples=3, seed=0, texts=[rec["subject"]])
    fast, naive = causal_trace(*args, **kw), trace_naive(*args, **kw)
    assert max_diff(fast, naive) < TOL
    assert fast["hidden"].p_clean > fast["hidden"].p_corrupt  # the model knows the fact


# --------------------------------------------------------------------------- identities
def test_trace_identities(gpt2_sharp, bytelevel_tokenizer):
    model, tok = gpt2_sharp
    res = causal_trace(model, tok, "We know that {} is in", SUBJECT, samples=3, noise_std=1.0,
                kinds=ALL_KINDS, window=3)
    h = res["hidden"]
    b, e = h.subject_range
    assert b > 0
    # tokens before the subject are not corrupted: restoring them changes nothing
    for r in res.values():
        assert np.allclose(r.scores[:b], r.p_corrupt, atol=TOL)
    # restoring the last token's final hidden state restores the clean prediction
    assert h.scores[-1, -1] == pytest.approx(h.p_clean, abs=TOL)
    # at the top layer nothing is above to freeze: severed == plain hidden
    for k in ("hidden_sever_mlp", "hidden_sever_attn"):
        assert np.allclose(res[k].scores[:, -1], h.scores[:, -1], atol=TOL)
    assert h.indirect_effects.shape == (len(h.tokens), 4)
    assert np.allclose(h.indirect_effects, h.scores - h.p_corrupt)
    # the subject tokens spell the subject
    assert "".join(h.tokens[b:e]).strip() == SUBJECT


def test_noise_is_seeded(gpt2_sharp):
    model, tok = gpt2_sharp
    a = causal_trace(model, tok, PROMPT, SUBJECT, kinds="hidden", samples=3, noise_std=1.0, seed=5)
    b = causal_trace(model, tok, PROMPT, SUBJECT, kinds="hidden", samples=3, noise_std=1.0, seed=5)
    c = causal_trace(model, tok, PROMPT, SUBJECT, kinds="hidden", samples=3, noise_std=1.0, seed=6)
    assert np.array_equal(a["hidden"].scores, b["hidden"].scores)
    assert a["hidden"].p_corrupt != c["hidden"].p_corrupt
    n1, n2 = make_noise(4, 2, 8, 3.0, seed=7), make_noise(4, 2, 8, 3.0, seed=7)
    assert torch.equal(n1, n2) and n1.shape == (4, 2, 8)
    assert float(make_noise(50, 4, 64, 3.0, seed=0).std()) == pytest.approx(3.0, rel=0.05)


def test_embedding_std_matches_direct_computation(gpt2_sharp):
    model, tok = gpt2_sharp
    texts = ["Paris is a city.", "LeBron James plays basketball."]
    ids = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    emb = get_adapter(model).module(model, "embedding")
    direct = torch.cat([emb(i) for i in ids]).detach().double().std()
    assert embedding_std(model, tok, texts) == pytest.approx(float(direct), rel=1e-6)
    with pytest.raises(InvalidRequestError):
        embedding_std(model, tok, ["  "])


def test_windows_follow_the_paper():
    assert list(window_layers(0, 10, 48)) == list(range(0, 5))
    assert list(window_layers(20, 10, 48)) == list(range(15, 25))
    assert list(window_layers(47, 10, 48)) == list(range(42, 48))
    assert list(window_layers(5, 3, 8)) == [4, 5, 6]
    assert list(window_layers(2, 1, 8)) == [2]
    # the paper's (and the reference code's) 10, clipped to the depth; the depth-scaled
    # window of earlier editkit versions stays available as scaled_window
    assert default_window(48) == 10 and default_window(6) == 6 and default_window(200) == 10
    assert default_window(4) == 4 and default_window(1) == 1
    assert scaled_window(48) == 10 and scaled_window(6) == 1 and scaled_window(30) == 6


def test_subject_token_range(bytelevel_tokenizer, sentencepiece_tokenizer):
    for tok in (bytelevel_tokenizer, sentencepiece_tokenizer):
        prompt, subject = "The mother tongue of {} is", "Danielle Darrieux"
        b, e = subject_token_range(tok, prompt, subject)
        ids = tok(prompt.replace("{}", subject))["input_ids"]
        assert 0 < b < e < len(ids)
        assert tok.decode(ids[b:e]).strip() == subject


def test_bad_arguments_raise_typed_errors(gpt2_sharp):
    model, tok = gpt2_sharp
    with pytest.raises(InvalidHyperParamsError, match="kind"):
        causal_trace(model, tok, PROMPT, SUBJECT, kinds="neurons", noise_std=1.0)
    with pytest.raises(InvalidHyperParamsError, match="window"):
        causal_trace(model, tok, PROMPT, SUBJECT, window=0, noise_std=1.0)
    with pytest.raises(InvalidRequestError, match="placeholder|'\\{\\}'"):
        causal_trace(model, tok, "Rome is in", SUBJECT, noise_std=1.0)  # no subject, no {}
    with pytest.raises(InvalidHyperParamsError, match="samples"):
        causal_trace(model, tok, PROMPT, SUBJECT, samples=0, noise_std=1.0)


def test_trace_result_json_round_trip(gpt2_sharp, tmp_path):
    model, tok = gpt2_sharp
    res = causal_trace(model, tok, PROMPT, SUBJECT, kinds="mlp", samples=2, noise_std=1.0)["mlp"]
    path = res.save(tmp_path / "r.json")
    back = TraceResult.from_dict(json.loads(path.read_text()))
    assert np.array_equal(back.scores, res.scores)
    assert (back.kind, back.window, back.subject_range, back.tokens) == \
        (res.kind, res.window, res.subject_range, res.tokens)


# --------------------------------------------------------------------------- AIE
def fake_result(kind: str, ie_by_token: list[float], subject_range, n_layers: int = 3,
                p_corrupt: float = 0.1) -> TraceResult:
    scores = np.array([[p_corrupt + v * (layer + 1) for layer in range(n_layers)]
                       for v in ie_by_token])
    return TraceResult(kind=kind, scores=scores, p_clean=0.9, p_corrupt=p_corrupt,
                       tokens=[f"t{i}" for i in range(len(ie_by_token))],
                       subject_range=subject_range, window=1)


def test_token_groups_follow_the_paper():
    g = token_groups(8, (1, 5))
    assert g == {"first subject token": [1], "middle subject tokens": [2, 3],
                 "last subject token": [4], "first subsequent token": [5],
                 "further tokens": [6], "last token": [7]}
    g = token_groups(3, (0, 1))  # one-token subject, directly followed by the last token
    assert g["first subject token"] == g["last subject token"] == [0]
    assert g["middle subject tokens"] == [] and g["further tokens"] == []


def test_aie_groups_means_and_standard_errors():
    a = fake_result("hidden", [0.0, 0.1, 0.2, 0.4, 0.3, 0.0, 0.05], (1, 4))
    b = fake_result("hidden", [0.2, 0.3, 0.5, 0.0, 0.1], (0, 2))
    aie = average_indirect_effect([a, b])
    assert isinstance(aie, AIEResult) and aie.groups == list(GROUPS) and aie.n_facts == 2
    gi = GROUPS.index
    # first subject token: a -> 0.1, b -> 0.2 (times layer+1)
    assert np.allclose(aie.mean[gi("first subject token")], 0.15 * np.arange(1, 4))
    # middle tokens: a has one (0.2); b has none -> one fact
    assert aie.counts[gi("middle subject tokens")] == 1
    assert np.allclose(aie.mean[gi("middle subject tokens")], 0.2 * np.arange(1, 4))
    # last subject token: a -> 0.4, b -> 0.3; stderr = std(ddof=1)/sqrt(2)
    se = np.std([0.4, 0.3], ddof=1) / math.sqrt(2)
    assert np.allclose(aie.mean[gi("last subject token")], 0.35 * np.arange(1, 4))
    assert np.allclose(aie.stderr[gi("last subject token")], se * np.arange(1, 4))
    # further tokens averaged within a fact first: a -> mean(0.0) at token 5; b -> token 3
    assert np.allclose(aie.mean[gi("further tokens")], np.mean([0.0, 0.0]) * np.arange(1, 4))
    assert aie.total_effect == pytest.approx(0.8)
    assert AIEResult.from_dict(json.loads(json.dumps(aie.to_dict()))).mean.tolist() == \
        aie.mean.tolist()
    with pytest.raises(InvalidRequestError):
        average_indirect_effect([a, fake_result("mlp", [0.1, 0.2, 0.3], (0, 1))])
    assert layer_from_aie(aie).layer == 2


# --------------------------------------------------------------------------- layers
def counterfact(subject: str, prompt: str, new: str, true: str, case_id: int) -> dict:
    return {"case_id": case_id,
            "requested_rewrite": {"prompt": prompt, "subject": subject,
                                  "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"In short, {prompt.replace('{}', subject)}"],
            "neighborhood_prompts": ["The Eiffel Tower is located in the city of"]}


RECORDS = [counterfact("Paris", "The city of {} is in", "Spain", "France", 0),
           counterfact("LeBron James", "{} plays the sport of", "football", "basketball", 1)]


def test_suggest_layer_is_the_argmax_of_the_mlp_curve(gpt2_sharp):
    model, tok = gpt2_sharp
    # a random model predicts neither fact: trace target_true (the default would skip both)
    kw = {"samples": 2, "window": 1, "progress": False, "answer": "target_true"}
    layer, curve = suggest_layer(model, tok, RECORDS, **kw)
    assert curve.shape == (4,) and layer == int(np.argmax(curve))
    aie = mlp_aie(model, tok, RECORDS, **kw)
    assert np.allclose(aie.curve("last subject token"), curve)
    traces = trace_records(model, tok, RECORDS, kinds="mlp", **kw)
    assert np.allclose(average_indirect_effect([t["mlp"] for t in traces]).curve(), curve)


def test_layer_sweep_with_ft(gpt2_sharp):
    from editkit.methods.ft import FT, FTHyperParams

    model, tok = gpt2_sharp
    before = snapshot(model)
    hp = FTHyperParams(layer=0, lr=0.05, num_steps=4)
    sweep = layer_sweep("ft", model, tok, RECORDS, [0, 2], hparams=hp, samples=2, window=1,
                        progress=False, answer="target_true")
    assert sweep.layers == [0, 2] and sweep.method == FT.name and sweep.n_records == 2
    for values in (sweep.efficacy, sweep.paraphrase, sweep.specificity, sweep.score):
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    assert sweep.best_layer in (0, 2) and sweep.traced_layer in range(4)
    assert len(sweep.trace_curve) == 2
    assert sweep.correlation is None or -1.0 <= sweep.correlation <= 1.0
    assert state_equal(model, before)  # every edit was reverted
    d = json.loads(json.dumps(sweep.to_dict()))
    assert d["best_layer"] == sweep.best_layer
    assert SweepResult.from_dict(d).best_layer == sweep.best_layer
    # a method whose hparams have no single layer cannot be swept
    @dataclasses.dataclass
    class Multi:
        layers: tuple = (0, 1)
    with pytest.raises(InvalidHyperParamsError):
        layer_sweep(FT, model, tok, RECORDS, [0], hparams=Multi(), trace=False,
                    progress=False)


# --------------------------------------------------------------------------- plots
def test_plots_write_png_and_svg(gpt2_sharp, tmp_path):
    model, tok = gpt2_sharp
    res = causal_trace(model, tok, PROMPT, SUBJECT, kinds=ALL_KINDS, samples=2, noise_std=1.0,
                window=1)
    files = plots.save_figure(plots.plot_traces(res), tmp_path / "all.png")
    files += plots.save_figure(plots.plot_trace(res["mlp"]), tmp_path / "mlp")
    aies = {k: average_indirect_effect([res[k]]) for k in res}
    plots.plot_aie({k: aies[k] for k in KINDS}, tmp_path / "aie")
    plots.plot_aie_heatmaps({k: aies[k] for k in KINDS}, tmp_path / "aie_heat")
    plots.plot_severed(aies, path=tmp_path / "severed")
    for stem in ("all", "mlp", "aie", "aie_heat", "severed"):
        png, svg = tmp_path / f"{stem}.png", tmp_path / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in svg.read_bytes()[:2000]
    assert len(files) == 4


# --------------------------------------------------------------------------- CLI
def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tracing_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_trace_prompt_data_and_suggest_layer(gpt2_sharp, tmp_path, capsys):
    model, tok = gpt2_sharp
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "one"
    args = parse(["trace", "--model", str(model_dir), "--prompt", PROMPT, "--subject", SUBJECT,
                  "--target", "France", "--samples", "2", "--out", str(out), "--no-progress"])
    assert tracing_cli.run(args) == 0
    data = json.loads((out / "trace.json").read_text())
    assert set(data) == set(KINDS) and data["mlp"]["answer"] == "France"
    assert (out / "trace.png").exists() and (out / "trace_attn.svg").exists()

    data_file = tmp_path / "cf.json"
    data_file.write_text(json.dumps(RECORDS))
    out = tmp_path / "many"
    # the random model predicts neither record: by default (the paper's) nothing is traced
    args = parse(["trace", "--model", str(model_dir), "--data", str(data_file), "--aie",
                  "--samples", "2", "--out", str(out), "--no-progress"])
    assert tracing_cli.run(args) == 2  # a usage error: nothing the request asked for exists
    assert "skipped 2 of 2 records" in capsys.readouterr().out
    args = parse(["trace", "--model", str(model_dir), "--data", str(data_file), "--aie",
                  "--sever", "--samples", "2", "--out", str(out), "--no-progress",
                  "--answer", "target_true"])
    assert tracing_cli.run(args) == 0
    assert "answer: target_true" in capsys.readouterr().out
    aie = json.loads((out / "aie.json").read_text())
    assert set(aie) == set(ALL_KINDS) and aie["hidden"]["n_facts"] == 2
    for stem in ("aie", "aie_heatmap", "aie_severed", "record_0"):
        assert (out / f"{stem}.png").exists() and (out / f"{stem}.svg").exists()

    args = parse(["suggest-layer", "--model", str(model_dir), "--data", str(data_file),
                  "--samples", "2", "--out", str(tmp_path / "s"), "--no-progress",
                  "--answer", "target_true"])
    assert tracing_cli.run(args) == 0
    got = json.loads((tmp_path / "s" / "suggest_layer.json").read_text())
    assert got["layer"] == int(np.argmax(got["curve"]))
    assert f"suggested layer: {got['layer']}" in capsys.readouterr().out


def test_a_forward_that_is_not_just_the_blocks_is_refused(bytelevel_tokenizer):
    """The fast path replays blocks itself; a model whose forward does more is detected."""
    from editkit.errors import ReplayMismatchError, UnsupportedModelError

    model = sharp_model("gpt2", bytelevel_tokenizer, 3)
    plain_forward = model.forward

    def forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 2.0  # e.g. a logit scale the block-by-block path misses
        return out

    model.forward = forward
    with pytest.raises(ReplayMismatchError, match="trace_naive") as info:
        causal_trace(model, bytelevel_tokenizer, PROMPT, SUBJECT, samples=2, noise_std=1.0)
    assert isinstance(info.value, UnsupportedModelError)  # existing except clauses still work


def test_the_oracle_uses_only_public_names_of_the_tracing_modules():
    """naive.py shares the experiment's definition, not the fast tracer's internals."""
    import ast
    import inspect

    from editkit.tracing import naive

    tree = ast.parse(inspect.getsource(naive))
    imported = [(node.module, alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("editkit")
                for alias in node.names]
    assert imported, "naive.py imports its set-up from editkit"
    assert not [name for _, name in imported if name.startswith("_")]
    assert "editkit.tracing.trace" not in {module for module, _ in imported}


def test_split_modules_keep_the_old_import_paths():
    from editkit.tracing import corruption, kinds, results, trace

    assert trace.TraceResult is results.TraceResult and trace.GROUPS is results.GROUPS
    assert trace.check_kinds is kinds.check_kinds and trace.SEVERED_KINDS is kinds.SEVERED_KINDS
    assert trace.DEFAULT_NOISE == corruption.DEFAULT_NOISE == 3.0
    for name in [*trace.__all__, *trace._MOVED]:
        assert getattr(trace, name) is not None
    with pytest.raises(AttributeError):
        trace.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- from the reference
# What users of the reference's calculate_hidden_flow trip over (issue 16): the meaning of the
# noise level, defaults, its other corruptions and token ranges, filled prompts.
def test_noise_multiple_noise_std_and_the_deprecated_noise(gpt2_sharp):
    model, tok = gpt2_sharp
    kw = dict(kinds="hidden", samples=3, seed=2)
    sigma = embedding_std(model, tok, [SUBJECT])
    default = causal_trace(model, tok, PROMPT, SUBJECT, **kw)["hidden"]
    # the default is the paper's ν = 3σ, σ over the traced subject's token embeddings
    assert default.noise_std == pytest.approx(3 * sigma, rel=1e-9)
    assert default.noise_multiple == 3.0 and "subject" in default.sigma_source
    # an absolute noise_std of the same value gives the same trace; it records no multiple
    absolute = causal_trace(model, tok, PROMPT, SUBJECT, noise_std=3 * sigma, **kw)["hidden"]
    assert np.allclose(absolute.scores, default.scores, atol=1e-6)
    assert absolute.noise_multiple is None and "absolute" in absolute.sigma_source
    # noise_multiple scales σ
    half = causal_trace(model, tok, PROMPT, SUBJECT, noise_multiple=1.5, **kw)["hidden"]
    assert half.noise_std == pytest.approx(1.5 * sigma, rel=1e-9)
    # the old noise= still means the multiple, with a warning that says so
    with pytest.warns(DeprecationWarning, match="multiple of σ.*noise_std="):
        old = causal_trace(model, tok, PROMPT, SUBJECT, noise=1.5, **kw)["hidden"]
    assert np.array_equal(old.scores, half.scores)
    with pytest.raises(InvalidHyperParamsError, match="noise_multiple"):
        causal_trace(model, tok, PROMPT, SUBJECT, noise_multiple=-1.0, **kw)
    with pytest.raises(InvalidHyperParamsError, match="disagree"), \
            pytest.warns(DeprecationWarning):
        causal_trace(model, tok, PROMPT, SUBJECT, noise=2.0, noise_multiple=3.0, **kw)


def test_sigma_comes_from_the_given_texts_else_the_subject(gpt2_sharp):
    model, tok = gpt2_sharp
    texts = ["Paris", "LeBron James"]
    tracer = CausalTracer(model, tok, texts=texts, samples=2)
    res = tracer.trace(PROMPT, SUBJECT, kinds="hidden")["hidden"]
    assert res.noise_std == pytest.approx(3 * embedding_std(model, tok, texts), rel=1e-9)
    assert res.sigma_source == "token embeddings of 2 given text(s)"
    # without texts: σ of each traced prompt's own subject, not of the embedding matrix
    tracer = CausalTracer(model, tok, samples=2)
    a = tracer.trace(PROMPT, SUBJECT, kinds="hidden")["hidden"]
    b = tracer.trace("{} plays the sport of", "LeBron James", kinds="hidden")["hidden"]
    assert a.noise_std == pytest.approx(3 * embedding_std(model, tok, [SUBJECT]), rel=1e-9)
    assert b.noise_std == pytest.approx(3 * embedding_std(model, tok, ["LeBron James"]),
                                        rel=1e-9)
    # the straightforward oracle makes the same choice
    naive = trace_naive(model, tok, PROMPT, SUBJECT, kinds="hidden", samples=2)["hidden"]
    assert naive.noise_std == pytest.approx(a.noise_std) and max_diff(
        {"h": naive}, {"h": a}) < TOL


def test_a_corruption_that_barely_moves_the_prediction_is_flagged(caplog):
    model, tok = fact_world_or_skip()
    from editkit.testbed import FactWorld

    rec = FactWorld().records(1)[0]["requested_rewrite"]
    args = (model, tok, rec["prompt"], rec["subject"], rec["target_true"]["str"])
    with caplog.at_level("WARNING", logger="editkit.tracing.trace"):
        # the reference's absolute noise=0.1 misread as a multiple of σ: no effect
        weak = causal_trace(*args, kinds="hidden", noise_multiple=0.01, samples=3)["hidden"]
    assert weak.weak_corruption and abs(weak.p_clean - weak.p_corrupt) < 0.1 * weak.p_clean
    assert "barely moves" in caplog.text and "noise_std=" in caplog.text
    strong = causal_trace(*args, kinds="hidden", samples=3)["hidden"]
    assert not strong.weak_corruption and strong.p_clean - strong.p_corrupt > 0.1 * strong.p_clean
    assert TraceResult.from_dict(weak.to_dict()).weak_corruption


def test_kinds_none_is_the_default_kinds(gpt2_sharp):
    model, tok = gpt2_sharp
    res = causal_trace(model, tok, PROMPT, SUBJECT, kinds=None, samples=2, noise_std=1.0)
    assert tuple(res) == KINDS
    with pytest.raises(InvalidHyperParamsError, match="kind"):
        causal_trace(model, tok, PROMPT, SUBJECT, kinds=3, samples=2, noise_std=1.0)


def test_default_window_is_the_papers_clipped_and_labelled_by_its_centre(gpt2_sharp):
    model, tok = gpt2_sharp
    res = causal_trace(model, tok, PROMPT, SUBJECT, kinds="mlp", samples=2, noise_std=1.0)
    mlp = res["mlp"]
    assert mlp.window == 4 == default_window(4) and mlp.window_label == "centre"
    assert mlp.restored_layers(0) == [0, 1] and mlp.restored_layers(3) == [1, 2, 3]
    explicit = causal_trace(model, tok, PROMPT, SUBJECT, kinds="mlp", samples=2,
                            noise_std=1.0, window=4)
    assert np.array_equal(explicit["mlp"].scores, mlp.scores)
    # the reference's literal window=10 on a 4-layer model restores every layer in every
    # column (why the default is clipped to the depth): all columns equal
    literal = causal_trace(model, tok, PROMPT, SUBJECT, kinds="mlp", samples=2,
                           noise_std=1.0, window=10)["mlp"].scores
    assert np.allclose(literal, literal[:, :1]) and not np.allclose(mlp.scores,
                                                                    mlp.scores[:, :1])


@pytest.mark.parametrize("option", [
    {"uniform_noise": True},
    {"replace": True},
    {"replace": "LeBron James"},
    {"token_range": "subject_last"},
    {"token_range": [0, -1]},
    {"uniform_noise": True, "replace": True, "token_range": "subject"},
])
def test_reference_options_fast_equals_naive(gpt2_sharp, option):
    model, tok = gpt2_sharp
    kw = dict(kinds=ALL_KINDS, window=3, samples=3, seed=1, noise_std=1.0, **option)
    fast = causal_trace(model, tok, PROMPT, SUBJECT, **kw)
    naive = trace_naive(model, tok, PROMPT, SUBJECT, **kw)
    for k in ALL_KINDS:
        assert np.array_equal(np.isnan(fast[k].scores), np.isnan(naive[k].scores))
        assert np.nanmax(np.abs(fast[k].scores - naive[k].scores)) < TOL
        assert fast[k].p_corrupt == pytest.approx(naive[k].p_corrupt, abs=TOL)
    # the option changed the corruption or the rows traced (the test is not vacuous)
    plain = causal_trace(model, tok, PROMPT, SUBJECT, **KW)
    assert fast["hidden"].p_corrupt != pytest.approx(plain["hidden"].p_corrupt, abs=1e-6) \
        or np.isnan(fast["hidden"].scores).any()


def test_uniform_and_replace_corruptions_are_what_they_say():
    u = make_noise(20, 3, 16, 0.5, seed=0, uniform=True)
    assert float(u.abs().max()) <= 0.5 and float(u.abs().max()) > 0.45
    assert float(u.mean()) == pytest.approx(0.0, abs=0.05)
    from editkit.tracing.corruption import corrupt, fit_tokens

    h, noise = torch.ones(2, 5, 4), torch.full((2, 2, 4), 7.0)
    added, replaced = corrupt(h, noise, (1, 3)), corrupt(h, noise, (1, 3), replace=True)
    assert torch.equal(added[:, 1:3], torch.full((2, 2, 4), 8.0))
    assert torch.equal(replaced[:, 1:3], noise) and torch.equal(replaced[:, 3:], h[:, 3:])
    other = torch.arange(8.0).view(2, 4)
    assert torch.equal(fit_tokens(other, 1), other[:1])
    assert torch.equal(fit_tokens(other, 3), torch.cat([other, other[1:]]))


def test_replace_with_another_subject_writes_its_embeddings(gpt2_sharp):
    """``replace=" Rome"`` on "Paris": p_corrupt is the model run on the prompt's embeddings
    with Rome's token embeddings (fitted to Paris's token count) written at the subject."""
    model, tok = gpt2_sharp
    from editkit.tokens import encode

    res = causal_trace(model, tok, PROMPT, SUBJECT, "France", kinds="hidden", samples=2,
                       replace=" Rome")["hidden"]
    b, e = res.subject_range
    ids = torch.tensor([encode(tok, PROMPT.format(SUBJECT))])
    answer = res.answer_id
    with torch.no_grad():
        emb = model.transformer.wte(ids).clone()
        rome = model.transformer.wte(torch.tensor(encode(tok, " Rome")))
        emb[0, b:e] = rome[: e - b]
        want = torch.softmax(model(inputs_embeds=emb).logits[0, -1], -1)[answer]
    assert res.p_corrupt == pytest.approx(float(want), abs=1e-5)
    assert res.p_corrupt != pytest.approx(res.p_clean, abs=1e-4)
    assert res.corruption == "replace with ' Rome'" and res.noise_multiple is None


def test_token_range_traces_only_those_rows_and_the_aie_uses_them():
    from editkit.tracing import resolve_token_range

    assert resolve_token_range("subject_last", 8, (2, 5)) == {4}
    assert resolve_token_range("subject", 8, (2, 5)) == {2, 3, 4}
    assert resolve_token_range("last", 8, (2, 5)) == {7}
    assert resolve_token_range([1, -1], 8, (2, 5)) == {1, 7}
    assert resolve_token_range(None, 8, (2, 5)) is None
    for bad in ("subject_first", [9], []):
        with pytest.raises(InvalidHyperParamsError, match="token_range"):
            resolve_token_range(bad, 8, (2, 5))
    scores = np.full((6, 3), np.nan)
    scores[3] = [0.2, 0.5, 0.3]
    r = TraceResult(kind="mlp", scores=scores, p_clean=0.9, p_corrupt=0.1,
                    tokens=list("abcdef"), subject_range=(1, 4), window=1, token_range=[3])
    aie = average_indirect_effect([r])
    assert aie.counts == [0, 0, 1, 0, 0, 0]
    assert np.allclose(aie.curve("last subject token"), [0.1, 0.4, 0.2])


def test_a_filled_prompt_with_its_subject_is_the_template(gpt2_sharp):
    model, tok = gpt2_sharp
    kw = dict(kinds="hidden", samples=2, noise_std=1.0)
    filled = causal_trace(model, tok, "The city of Paris is in", "Paris", **kw)["hidden"]
    template = causal_trace(model, tok, PROMPT, SUBJECT, **kw)["hidden"]
    assert np.array_equal(filled.scores, template.scores)
    assert filled.prompt == PROMPT and filled.subject_range == template.subject_range
    naive = trace_naive(model, tok, "The city of Paris is in", "Paris", **kw)["hidden"]
    assert max_diff({"h": naive}, {"h": filled}) < TOL


def test_trace_records_skips_facts_the_model_gets_wrong_as_the_reference():
    model, tok = fact_world_or_skip()
    from editkit.testbed import FactWorld

    recs = FactWorld().records(3)
    wrong = json.loads(json.dumps(recs[1]))
    wrong["requested_rewrite"]["target_true"]["str"] = \
        recs[0]["requested_rewrite"]["target_true"]["str"]
    if wrong["requested_rewrite"]["target_true"] == recs[1]["requested_rewrite"]["target_true"]:
        pytest.skip("records share their answer")
    records = [recs[0], wrong, recs[2]]
    kw = dict(kinds="hidden", samples=2, progress=False)
    traced = trace_records(model, tok, records, **kw)
    assert traced.indices == [0, 2] and [i for i, *_ in traced.skipped] == [1]
    # what is traced is the model's own prediction, which is target_true's first token
    assert all(t["hidden"].correct_prediction for t in traced)
    everything = trace_records(model, tok, records, answer="target_true", **kw)
    assert len(everything) == 3 and not everything[1]["hidden"].correct_prediction
    assert np.array_equal(everything[0]["hidden"].scores, traced[0]["hidden"].scores)
    with pytest.raises(InvalidHyperParamsError, match="answer"):
        trace_records(model, tok, records, answer="top1", **kw)


def test_cli_noise_options(gpt2_sharp, tmp_path, capsys):
    model, tok = gpt2_sharp
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    base = ["trace", "--model", str(model_dir), "--prompt", "The city of Paris is in",
            "--subject", SUBJECT, "--samples", "2", "--no-progress", "--kinds", "hidden"]
    assert tracing_cli.run(parse([*base, "--noise", "2", "--out", str(tmp_path / "a")])) == 0
    out = capsys.readouterr()
    assert "--noise is deprecated" in out.err and "ν = 2σ" in out.out
    assert "window 4 of 4 layers, labelled by its centre" in out.out
    assert tracing_cli.run(parse([*base, "--noise-std", "0.5", "--uniform-noise",
                                  "--token-range", "subject_last",
                                  "--out", str(tmp_path / "b")])) == 0
    data = json.loads((tmp_path / "b" / "trace.json").read_text())["hidden"]
    assert data["noise_std"] == 0.5 and data["corruption"] == "uniform"
    assert data["token_range"] == [data["subject_range"][1] - 1]
    capsys.readouterr()
    assert tracing_cli.run(parse([*base, "--noise-std", "0.5", "--noise-multiple", "3",
                                  "--out", str(tmp_path / "c")])) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_numpy_noise_is_the_reference_draw(gpt2_sharp):
    """``noise_rng="numpy"``, seed 1: the reference's RandomState(1) draws, so editkit can be
    compared with calculate_hidden_flow on identical noise (benchmarks/
    bench_vs_reference_tracing.py); fast still equals the oracle with it."""
    rs = np.random.RandomState(1)
    want = torch.from_numpy(rs.randn(3, 2, 8) * 0.5).float()
    assert torch.equal(make_noise(3, 2, 8, 0.5, seed=1, rng="numpy"), want)
    rs = np.random.RandomState(1)
    want = torch.from_numpy(rs.uniform(-1, 1, (3, 2, 8)) * 0.5).float()
    assert torch.equal(make_noise(3, 2, 8, 0.5, seed=1, rng="numpy", uniform=True), want)
    with pytest.raises(InvalidHyperParamsError, match="noise_rng"):
        make_noise(3, 2, 8, 0.5, seed=1, rng="jax")
    model, tok = gpt2_sharp
    kw = dict(KW, seed=1, noise_rng="numpy")
    fast = causal_trace(model, tok, PROMPT, SUBJECT, **kw)
    assert max_diff(fast, trace_naive(model, tok, PROMPT, SUBJECT, **kw)) < TOL
    assert max_diff(fast, causal_trace(model, tok, PROMPT, SUBJECT, **KW)) > 1e-3


def test_plots_label_windows_by_their_centre():
    assert plots._xlabel("mlp", 10) == ("centre of a window of 10 restored layers "
                                        "(clipped at the ends)")
    assert plots._xlabel("hidden", 1) == "restored layer"
