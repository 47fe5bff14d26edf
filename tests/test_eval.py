"""Evaluation harness: loaders, metrics, batched scoring, generation, protocols, reports, CLI."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot, state_equal, tiny_model

from editkit.editor import EditHistory
from editkit.errors import DatasetFormatError, EditFailedError, EditkitError
from editkit.eval import (
    METRICS,
    DatasetUnavailableError,
    GenerationConfig,
    MetricContext,
    RecordScores,
    ReferenceTable,
    Report,
    UnknownMetricError,
    aggregate,
    compare,
    counterfact_metrics,
    edit_quality,
    edit_success,
    evaluate,
    generate,
    get_metric,
    harmonic_mean,
    list_metrics,
    load_counterfact,
    load_dataset,
    load_requests,
    load_zsre,
    mean_ci,
    ngram_entropy,
    plot_retention,
    read_json_records,
    request_logprobs,
    score_records,
    select_neighborhood,
    text_entropy,
    tfidf_cosine,
)
from editkit.eval.generation import generate_ids
from editkit.methods.ft import FT, FTHyperParams, FTLHyperParams
from editkit.tokens import build_scoring_batch, encode, score_targets

DATA = Path(__file__).parent / "data"
CF = DATA / "counterfact_sample.json"
ZSRE = DATA / "zsre_sample.json"
GEN = GenerationConfig(max_new_tokens=6)
HP = FTHyperParams(layer=1, lr=0.05, num_steps=10)


def _raw(path: Path) -> list[dict]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------- loaders
def test_counterfact_loader_keeps_raw_prompts():
    recs = load_counterfact(CF)
    assert [r.case_id for r in recs] == [0, 1, 2]
    r = recs[0]
    raw = _raw(CF)[0]
    assert r.kind == "counterfact"
    assert r.request.text == raw["requested_rewrite"]["prompt"].format(
        raw["requested_rewrite"]["subject"])
    assert r.request.target_new == "Welsh" and r.request.target_true == "Portuguese"
    assert r.paraphrase_prompts == raw["paraphrase_prompts"]
    assert r.neighborhood_prompts == raw["neighborhood_prompts"]
    assert r.attribute_prompts == raw["attribute_prompts"]
    assert r.generation_prompts == raw["generation_prompts"]
    assert len(load_counterfact(CF, n=2)) == 2


def test_zsre_loader_targets_and_locality():
    recs = load_zsre(ZSRE)
    raw = _raw(ZSRE)[1]
    r = recs[1]
    assert r.kind == "zsre" and r.case_id == 1
    assert r.request.text == raw["src"]
    assert r.request.target_new == raw["alt"] and r.request.target_true == raw["answers"][0]
    assert r.paraphrase_prompts == [raw["rephrase"]]
    assert r.loc_prompt == raw["loc"] + "?" and r.loc_ans == raw["loc_ans"]
    rome_style = load_zsre(ZSRE, target="answer")[1]
    assert rome_style.request.target_new == raw["answers"][0]
    assert rome_style.request.target_true is None


def test_auto_detection_and_jsonl(tmp_path):
    path = tmp_path / "zsre.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _raw(ZSRE)) + "\n")
    recs = load_dataset(path)
    assert [r.kind for r in recs] == ["zsre"] * 3
    assert [r.request.subject for r in recs] == [r["subject"] for r in _raw(ZSRE)]
    assert load_dataset(CF)[0].kind == "counterfact"


def _del(path):
    def mutate(rec):
        node = rec
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    return mutate


@pytest.mark.parametrize("mutate, field", [
    (_del("requested_rewrite.target_new.str"), "requested_rewrite.target_new.str"),
    (_del("requested_rewrite.subject"), "requested_rewrite.subject"),
    (lambda r: r.__setitem__("paraphrase_prompts", "one prompt"), "paraphrase_prompts"),
    (lambda r: r["neighborhood_prompts"].append(3), "neighborhood_prompts[3]"),
    (lambda r: r["requested_rewrite"].__setitem__("prompt", "no placeholder"),
     "requested_rewrite.prompt"),
    (lambda r: r["requested_rewrite"]["target_true"].__setitem__("str", "cricket"),
     "target_true"),
])
def test_malformed_counterfact_names_record_and_field(mutate, field):
    records = _raw(CF)
    mutate(records[1])
    with pytest.raises(DatasetFormatError) as err:
        load_counterfact(records)
    msg = str(err.value)
    assert "#1" in msg and "case_id 1" in msg and field in msg


@pytest.mark.parametrize("mutate, field", [
    (_del("loc_ans"), "loc_ans"),
    (lambda r: r.__setitem__("subject", "Nobody Here"), "subject"),
    (lambda r: r.__setitem__("answers", []), "answers"),
    (lambda r: r.__setitem__("alt", ""), "alt"),
])
def test_malformed_zsre_names_record_and_field(mutate, field):
    records = _raw(ZSRE)
    mutate(records[2])
    with pytest.raises(DatasetFormatError) as err:
        load_zsre(records)
    assert "zsRE record #2" in str(err.value) and field in str(err.value)


def test_duplicate_case_ids_and_unknown_format_rejected():
    records = _raw(CF)
    records[2]["case_id"] = 0
    with pytest.raises(DatasetFormatError, match="case_id '0'"):
        load_counterfact(records)
    with pytest.raises(DatasetFormatError, match="kind="):
        load_dataset([{"question": "?"}])


def test_missing_file_and_offline_hub_say_how_to_pass_a_local_file(monkeypatch, tmp_path):
    with pytest.raises(DatasetUnavailableError, match="local file"):
        load_dataset(tmp_path / "absent.json")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DatasetUnavailableError, match="--data path/to/counterfact.json"):
        load_dataset("hub:azhx/counterfact")

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DatasetUnavailableError) as err:
        load_dataset("azhx/counterfact")
    assert "offline" in str(err.value) and "no route to host" in str(err.value)
    assert isinstance(err.value, EditkitError)


def test_hub_records_are_validated(monkeypatch):
    rows = _raw(CF)
    fake = types.SimpleNamespace(load_dataset=lambda name, split: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert [r.case_id for r in load_dataset("hub:someone/counterfact")] == [0, 1, 2]


def test_fact_world_records_parse():
    from editkit.testbed import FactWorld

    recs = load_dataset("factworld", n=5)
    assert len(recs) == 5 and all(r.kind == "counterfact" for r in recs)
    assert [r.raw for r in recs] == FactWorld().records(5)


# ------------------------------------------------------------------------- metrics
def test_ngram_entropy_definition():
    assert ngram_entropy("a a a a a", 2) == 0.0
    # k distinct bigrams, each once: log2(k).
    assert ngram_entropy("w1 w2 w3 w4 w5", 2) == pytest.approx(math.log2(4))
    text = "the cat sat on the mat . the cat"
    h2, h3 = ngram_entropy(text, 2), ngram_entropy(text, 3)
    assert text_entropy(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    bigrams = ["the cat", "cat sat", "sat on", "on the", "the mat", "mat .", ". the", "the cat"]
    p = np.array([bigrams.count(b) for b in dict.fromkeys(bigrams)]) / len(bigrams)
    assert h2 == pytest.approx(float(-(p * np.log2(p)).sum()))


def test_tfidf_cosine_by_hand():
    idf = {"paris": 2.0, "city": 1.0, "french": 3.0}
    assert tfidf_cosine("Paris city", "paris CITY", idf) == pytest.approx(1.0)
    assert tfidf_cosine("paris", "french", idf) == 0.0
    assert tfidf_cosine("unknown words", "paris", idf) == 0.0
    # a = (paris 2·1, city 1·2) = (2, 2); b = (paris 2, french 3)
    expected = (2 * 2) / (math.sqrt(8) * math.sqrt(4 + 9))
    assert tfidf_cosine("paris city city", "paris french", idf) == pytest.approx(expected)


def test_counterfact_metric_definitions():
    lp = math.log
    scores = RecordScores(logprobs={
        "rewrite": [[lp(0.6), lp(0.3)]],
        "paraphrase": [[lp(0.5), lp(0.1)], [lp(0.2), lp(0.4)]],
        "neighborhood": [[lp(0.1), lp(0.7)], [lp(0.3), lp(0.2)], [lp(0.05), lp(0.5)]],
    })
    ctx = MetricContext(record=None)
    value = {m: get_metric(m).compute(scores, ctx) for m in ("ES", "EM", "PS", "PM", "NS", "NM")}
    assert value["ES"] == 1.0 and value["EM"] == pytest.approx(0.3)
    assert value["PS"] == 0.5 and value["PM"] == pytest.approx(((0.5 - 0.1) + (0.2 - 0.4)) / 2)
    assert value["NS"] == pytest.approx(2 / 3)
    assert value["NM"] == pytest.approx(((0.7 - 0.1) + (0.2 - 0.3) + (0.5 - 0.05)) / 3)
    assert get_metric("PS").compute(RecordScores(logprobs={"paraphrase": []}), ctx) is None


def test_counterfact_metrics_is_the_one_pure_definition():
    lp = math.log
    table = {"rewrite": [[lp(0.6), lp(0.3)]],
             "paraphrase": [[lp(0.5), lp(0.1)], [lp(0.2), lp(0.4)]],
             "neighborhood": [[lp(0.1), lp(0.7)], [lp(0.3), lp(0.2)], [lp(0.05), lp(0.5)]]}
    out = counterfact_metrics(table)
    assert out == pytest.approx({"ES": 1.0, "EM": 0.3, "PS": 0.5, "PM": 0.1,
                                 "NS": 2 / 3, "NM": (0.6 - 0.1 + 0.45) / 3})
    # the registered metrics are this function, value for value
    scores = RecordScores(logprobs=table)
    for name, value in out.items():
        assert get_metric(name).compute(scores, MetricContext(None)) == value
    # a tie is no success; an empty group is None, not 0
    tie = counterfact_metrics({"rewrite": [[-1.0, -1.0]], "neighborhood": [[-1.0, -1.0]]})
    assert tie["ES"] == 0.0 and tie["NS"] == 0.0 and tie["EM"] == 0.0
    assert tie["PS"] is None and tie["PM"] is None


def test_neighbourhood_rule_all_unless_the_caller_asks_for_fewer():
    prompts = [f"p{i}" for i in range(12)]
    assert select_neighborhood(prompts) == prompts
    assert select_neighborhood(prompts, 5) == prompts[:5]
    assert select_neighborhood(prompts, 50) == prompts
    with pytest.raises(ValueError, match="n_neighbors"):
        select_neighborhood(prompts, -1)
    rows = [[-1.0, -2.0]] * 2 + [[-2.0, -1.0]] * 2   # first two flip, last two keep P(true)
    assert counterfact_metrics({"neighborhood": rows})["NS"] == 0.5
    assert counterfact_metrics({"neighborhood": rows}, n_neighbors=2)["NS"] == 0.0


def test_harmonic_mean_rule_for_missing_and_non_positive_values():
    assert harmonic_mean([0.5, 1.0, 1.0]) == pytest.approx(3 / (2 + 1 + 1))
    assert harmonic_mean([0.5, None, float("nan")]) == 0.5     # missing groups left out
    assert harmonic_mean([0.9, 0.0, 1.0]) == 0.0                # a zero rate zeroes S
    assert harmonic_mean([0.9, -0.2]) == 0.0
    assert math.isnan(harmonic_mean([None, float("nan")]))
    assert math.isnan(harmonic_mean([]))


def test_edit_success_scores_every_prompt_of_a_request(gpt2_and_tok):
    model, tok = gpt2_and_tok
    rec = load_counterfact(CF)[0].request
    table = request_logprobs(model, tok, rec)
    assert [len(table[g]) for g in ("rewrite", "paraphrase", "neighborhood")] == \
        [1, len(rec.paraphrases), len(rec.neighborhood)]
    want = score_targets(model, tok, [rec.neighborhood[-1]] * 2,
                         [rec.target_new, rec.target_true])
    assert table["neighborhood"][-1] == pytest.approx(want.tolist(), abs=1e-5)
    assert edit_success(model, tok, rec) == counterfact_metrics(table)
    assert len(request_logprobs(model, tok, rec, n_neighbors=1)["neighborhood"]) == 1
    unedited = edit_quality((model, tok), [rec])
    assert unedited["n"] == 1 and unedited["seconds_per_edit"] is None
    assert unedited["ES"] == counterfact_metrics(table)["ES"]


def test_jsonl_reader_errors_are_typed_and_line_numbered(tmp_path):
    good = json.dumps({"text": "a"})
    path = tmp_path / "r.jsonl"
    path.write_text(f"{good}\n\n{good}\n{{broken\n{good}\n")
    with pytest.raises(DatasetFormatError, match=r"r\.jsonl:4: invalid JSON"):
        read_json_records(path)
    path.write_text(f"{good}\n\n{good}\n")
    assert read_json_records(path) == [{"text": "a"}] * 2
    doc = tmp_path / "r.json"
    doc.write_text('[\n {"a": 1},\n {"a": 2,}\n]')
    with pytest.raises(DatasetFormatError, match=r"r\.json:3: invalid JSON .*\.jsonl"):
        read_json_records(doc)
    doc.write_text('"just a string"')
    with pytest.raises(DatasetFormatError, match="expected a JSON list"):
        read_json_records(doc)
    with pytest.raises(DatasetUnavailableError, match="no file"):
        read_json_records(tmp_path / "absent.jsonl")
    idf = tmp_path / "idf.json"                       # the same reader serves every JSON file
    idf.write_text('{"paris": 1.0,\n "city" 2.0}')
    with pytest.raises(DatasetFormatError, match=r"idf\.json:2: invalid JSON"):
        ReferenceTable.from_files(idf, doc)
    deep = "[" * 100_000 + "]" * 100_000              # beyond Python's recursion limit
    path.write_text(f"{good}\n{deep}\n")
    with pytest.raises(DatasetFormatError, match=r"r\.jsonl:2: the JSON is nested too deeply"):
        read_json_records(path)
    doc.write_text(deep)
    with pytest.raises(DatasetFormatError, match=r"r\.json:1: the JSON is nested too deeply"):
        read_json_records(doc)


def test_load_requests_reads_records_and_request_dicts(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _raw(CF)))
    assert [r.case_id for r in load_requests(path)] == [0, 1, 2]
    req_file = tmp_path / "requests.json"
    req_file.write_text(json.dumps([r.to_dict() for r in load_requests(path)]))
    assert load_requests(req_file) == load_requests(path)
    assert len(load_requests(path, n=2)) == 2


def test_zsre_metric_definitions():
    pre = RecordScores(correct={"neighborhood": [[True, False, False]]},
                       predicted={"neighborhood": [[5, 6, 7]]})
    post = RecordScores(correct={"rewrite": [[True, True, False]], "paraphrase": [[False]],
                                 "neighborhood": [[True, False, False]]},
                        predicted={"neighborhood": [[5, 9, 7]]})
    ctx = MetricContext(record=None, pre=pre)
    assert get_metric("efficacy").compute(post, ctx) == pytest.approx(2 / 3)
    assert get_metric("paraphrase").compute(post, ctx) == 0.0
    assert get_metric("specificity").compute(post, ctx) == pytest.approx(1 / 3)
    assert get_metric("unchanged").compute(post, ctx) == pytest.approx(2 / 3)
    assert get_metric("unchanged").compute(pre, MetricContext(None, pre=pre)) == 1.0


def test_aggregation_and_confidence_intervals():
    xs = [0.0, 1.0, 1.0, 0.5, None]
    stats = mean_ci(xs)
    arr = np.array([0.0, 1.0, 1.0, 0.5])
    assert stats["n"] == 4 and stats["mean"] == pytest.approx(arr.mean())
    assert stats["ci95"] == pytest.approx(1.959964 * arr.std(ddof=1) / 2, rel=1e-5)
    per_record = [{"ES": 1.0, "PS": 0.5, "NS": 1.0}, {"ES": 1.0, "PS": 1.0, "NS": 0.0},
                  {"ES": 0.0, "PS": 1.0, "NS": 1.0}, {"ES": 1.0, "PS": 0.5, "NS": 1.0}]
    metrics = [get_metric(m) for m in ("S", "ES", "PS", "NS")]
    agg = aggregate(metrics, per_record)
    means = [agg[m]["mean"] for m in ("ES", "PS", "NS")]
    assert agg["S"]["mean"] == pytest.approx(3 / sum(1 / m for m in means))
    assert agg["S"]["lo"] <= agg["S"]["mean"] <= agg["S"]["hi"]


def test_registry_declares_direction_and_aggregation():
    names = list_metrics()
    assert {"S", "ES", "EM", "PS", "PM", "NS", "NM", "GE", "RS"} <= set(names)
    assert set(list_metrics("zsre")) >= {"efficacy", "paraphrase", "specificity", "unchanged"}
    for name in names:
        m = METRICS.get(name)
        assert isinstance(m.higher_is_better, bool)
        assert m.aggregation in ("mean", "harmonic")
        assert (m.compute is None) == (m.aggregation == "harmonic")
    with pytest.raises(UnknownMetricError, match="Did you mean"):
        get_metric("ESS")


# ------------------------------------------------------------------ batched scoring
def test_batched_scores_equal_one_at_a_time(family_model):
    family, model, tok = family_model
    recs = load_counterfact(CF)
    groups = ("rewrite", "paraphrase", "neighborhood", "attribute")
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        scores = score_records(model, tok, recs, groups, max_rows=1000)
    finally:
        handle.remove()
    assert len(calls) == 1  # all prompts × {new, true} of all records in one pass
    for rec, s in zip(recs, scores, strict=True):
        for group in groups:
            for prompt, (lp_new, lp_true) in zip(rec.prompts(group), s.logprobs.get(group, []),
                                                 strict=True):
                ref = [score_targets(model, tok, [prompt], [t])[0].item()
                       for t in (rec.request.target_new, rec.request.target_true)]
                assert lp_new == pytest.approx(ref[0], abs=1e-5)
                assert lp_true == pytest.approx(ref[1], abs=1e-5)


def test_records_are_never_split_across_passes(gpt2_and_tok):
    model, tok = gpt2_and_tok
    recs = load_counterfact(CF)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        small = score_records(model, tok, recs, ("rewrite", "paraphrase", "neighborhood"),
                              max_rows=4)
    finally:
        handle.remove()
    assert len(calls) == len(recs)  # one pass per record, even above max_rows
    big = score_records(model, tok, recs, ("rewrite", "paraphrase", "neighborhood"))
    for a, b in zip(small, big, strict=True):
        for g in a.logprobs:
            assert np.allclose(a.logprobs[g], b.logprobs[g], atol=1e-5)


def test_zsre_token_accuracy_matches_teacher_forcing(gpt2_and_tok):
    model, tok = gpt2_and_tok
    recs = load_zsre(ZSRE)
    scores = score_records(model, tok, recs, ("rewrite", "paraphrase", "neighborhood"))
    for rec, s in zip(recs, scores, strict=True):
        for group, prompt, target in (("rewrite", rec.request.text, rec.request.target_new),
                                      ("neighborhood", rec.loc_prompt, rec.loc_ans)):
            sb = build_scoring_batch(tok, [prompt], [target])
            ids, plen = sb.target_ids[0], sb.prompt_lengths[0]
            with torch.no_grad():
                logits = model(**sb.batch.model_inputs()).logits[0]
            pred = [int(logits[plen - 1 + j].argmax()) for j in range(len(ids))]
            assert s.predicted[group][0] == pred
            assert s.correct[group][0] == [p == t for p, t in zip(pred, ids, strict=True)]


# ----------------------------------------------------------------------- generation
@torch.no_grad()
def _naive_greedy(model, tok, prompt, n):
    ids = encode(tok, prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids


def test_cached_generation_equals_naive_greedy(family_model):
    family, model, tok = family_model
    prompts = ["The Eiffel Tower is", "LeBron James plays the sport of", "Paris"]
    out = generate_ids(model, tok, prompts, GenerationConfig(max_new_tokens=5, batch_size=2))
    for prompt, (p_ids, new_ids) in zip(prompts, out, strict=True):
        assert p_ids + new_ids == _naive_greedy(model, tok, prompt, 5)
    texts = generate(model, tok, prompts, GenerationConfig(max_new_tokens=5))
    assert all(t.startswith(p) for t, p in zip(texts, prompts, strict=True))


def test_generation_stops_at_the_context_length(gpt2_and_tok):
    model, tok = gpt2_and_tok
    limit = model.config.n_positions
    (p_ids, new_ids), = generate_ids(model, tok, ["Paris"], GenerationConfig(limit + 50))
    assert len(p_ids) + len(new_ids) == limit


def test_sampling_is_seeded(gpt2_and_tok):
    model, tok = gpt2_and_tok
    cfg = GenerationConfig(max_new_tokens=8, top_k=5, seed=3)
    prompts = ["The Eiffel Tower is", "Paris"]
    assert generate(model, tok, prompts, cfg) == generate(model, tok, prompts, cfg)


# ------------------------------------------------------------------------ protocols
@pytest.fixture
def cf_records():
    return load_counterfact(CF)


def test_independent_protocol_restores_model_and_matches_manual(gpt2_and_tok, cf_records):
    model, tok = gpt2_and_tok
    before = snapshot(model)
    report = evaluate("ft", model, tok, cf_records, hparams=HP, generation=GEN, progress=False)
    assert state_equal(model, before) and not EditHistory.of(model).edits
    assert report.protocol == "independent" and len(report.records) == 3
    groups = ("rewrite", "paraphrase", "neighborhood")
    pre = score_records(model, tok, cf_records, groups)
    editor = FT(model, tok, hparams=HP)
    for rec, pre_s, entry in zip(cf_records, pre, report.records, strict=True):
        for g, rows in pre_s.logprobs.items():
            assert np.allclose(entry["raw"]["pre"]["logprobs"][g], rows, atol=1e-6)
        editor.apply(rec.request)
        post_s = score_records(model, tok, [rec], groups)[0]
        editor.revert()
        assert np.allclose(entry["raw"]["post"]["logprobs"]["rewrite"],
                           post_s.logprobs["rewrite"], atol=1e-6)
        assert entry["post"]["ES"] == get_metric("ES").compute(post_s, MetricContext(rec))
    assert report.mean("ES", "post") > report.mean("ES", "pre")
    assert report.mean("GE", "post") is not None and report.mean("RS", "post") is None
    assert "RS" not in report.metrics


def test_sequential_protocol_curve_and_revert(gpt2_and_tok, cf_records):
    model, tok = gpt2_and_tok
    before = snapshot(model)
    report = evaluate(FT, model, tok, cf_records, protocol="sequential", hparams=HP,
                      checkpoints=[1, 2], metrics=["ES", "PS", "NS"], progress=False)
    assert state_equal(model, before) and not EditHistory.of(model).edits
    assert [p["n_edits"] for p in report.curve] == [1, 2, 3]
    assert report.curve[-1]["post"]["ES"]["mean"] == report.mean("ES", "post")
    assert report.curve[0]["post"]["ES"]["n"] == 1
    # One sequential edit is the same experiment as one independent edit.
    one = evaluate("ft", model, tok, cf_records[:1], protocol="sequential", hparams=HP,
                   metrics=["ES", "PS", "NS"], progress=False)
    ind = evaluate("ft", model, tok, cf_records[:1], hparams=HP, metrics=["ES", "PS", "NS"],
                   progress=False)
    assert one.records[0]["post"] == ind.records[0]["post"]


class _BatchFT(FT):
    """FT that receives whole batches (as MEMIT would) and records their sizes."""

    name = "batch_ft"
    sequential = False
    seen: list[int] = []

    def compute_update(self, requests):
        type(self).seen.append(len(requests))
        return super().compute_update(requests)


class _CountingFT(FT):
    name = "counting_ft"
    seen: list[int] = []

    def compute_update(self, requests):
        type(self).seen.append(len(requests))
        return super().compute_update(requests)


def test_batch_protocol_hands_k_records_to_apply(gpt2_and_tok, cf_records):
    model, tok = gpt2_and_tok
    before = snapshot(model)
    _BatchFT.seen, _CountingFT.seen = [], []
    rep = evaluate(_BatchFT, model, tok, cf_records, protocol="batch", batch_size=2,
                   hparams=HP, metrics=["ES"], progress=False)
    assert _BatchFT.seen == [2, 1] and rep.config["batch_size"] == 2
    evaluate(_CountingFT, model, tok, cf_records, protocol="batch", batch_size=2, hparams=HP,
             metrics=["ES"], progress=False)
    assert _CountingFT.seen == [1, 1, 1]  # a sequential method edits them one by one
    assert state_equal(model, before)
    assert all(r["post"] is not None for r in rep.records)


class _ImpureFT(FT):
    """Violates the contract: compute_update leaves a change in a weight it does not patch."""

    name = "impure_ft"

    def compute_update(self, requests):
        patch = super().compute_update(requests)
        with torch.no_grad():
            self.adapter.module(self.model, "mlp_in", 0).weight.add_(1e-3)
        return patch


def test_inexact_revert_is_detected(gpt2_and_tok, cf_records):
    model, tok = gpt2_and_tok
    with pytest.raises(EditFailedError, match="bit-for-bit"):
        evaluate(_ImpureFT, model, tok, cf_records[:1], hparams=HP, metrics=["ES"],
                 progress=False)


class _FailingFT(FT):
    name = "failing_ft"

    def compute_update(self, requests):
        if requests[0].case_id == 1:
            raise EditFailedError("cannot edit case 1")
        return super().compute_update(requests)


def test_skip_errors_records_failures(gpt2_and_tok, cf_records):
    model, tok = gpt2_and_tok
    with pytest.raises(EditFailedError):
        evaluate(_FailingFT, model, tok, cf_records, hparams=HP, metrics=["ES"], progress=False)
    rep = evaluate(_FailingFT, model, tok, cf_records, hparams=HP, metrics=["ES"],
                   progress=False, skip_errors=True)
    assert [f["case_id"] for f in rep.failures] == [1]
    assert rep.records[1]["post"] is None and rep.aggregate["post"]["ES"]["n"] == 2
    assert rep.aggregate["pre"]["ES"]["n"] == 2  # before and after on the same records


def test_editor_instance_and_argument_errors(gpt2_and_tok, cf_records):
    model, tok = gpt2_and_tok
    editor = FT(model, tok, hparams=HP)
    rep = evaluate(editor, records=cf_records[:1], metrics=["ES"], progress=False)
    assert rep.method == "ft" and rep.hparams == HP.to_dict()
    with pytest.raises(EditkitError, match="protocol"):
        evaluate(editor, records=cf_records, protocol="parallel")
    with pytest.raises(EditkitError, match="hparams"):
        evaluate(editor, records=cf_records, hparams=HP)
    with pytest.raises(UnknownMetricError, match="zsre"):
        evaluate(editor, records=cf_records, metrics=["efficacy"])
    with pytest.raises(UnknownMetricError, match="--idf"):
        evaluate(editor, records=cf_records, metrics=["RS"])


def test_reference_score_only_with_references(gpt2_and_tok, cf_records):
    model, tok = gpt2_and_tok
    refs = ReferenceTable(
        idf={"welsh": 2.0, "wales": 1.5, "cricket": 2.0, "the": 0.1, "is": 0.1},
        references={"0": ["Welsh is spoken in Wales."], "Q5375": ["He plays cricket."]},
    )
    rep = evaluate("ft", model, tok, cf_records, hparams=HP, metrics=["GE", "RS"],
                   references=refs, generation=GEN, progress=False)
    by_case = {r["case_id"]: r for r in rep.records}
    for cid in (0, 1):
        texts = by_case[cid]["raw"]["post"]["generations"]
        key = "0" if cid == 0 else "Q5375"
        assert by_case[cid]["post"]["RS"] == pytest.approx(
            tfidf_cosine(" ".join(texts), " ".join(refs.references[key]), refs.idf))
    assert by_case[2]["post"]["RS"] is None  # no reference texts: omitted, not faked
    assert rep.aggregate["post"]["RS"]["n"] == 2


def test_zsre_evaluation(gpt2_and_tok):
    model, tok = gpt2_and_tok
    rep = evaluate("ft", model, tok, load_zsre(ZSRE), hparams=HP, progress=False)
    assert rep.metrics == ["efficacy", "paraphrase", "specificity", "unchanged"]
    assert rep.mean("unchanged", "pre") == 1.0
    assert rep.mean("efficacy", "post") > rep.mean("efficacy", "pre")


# -------------------------------------------------------------------------- reports
def test_report_json_markdown_compare_and_plot(gpt2_and_tok, cf_records, tmp_path):
    model, tok = gpt2_and_tok
    seq = evaluate("ft", model, tok, cf_records, protocol="sequential", hparams=HP,
                   generation=GEN, progress=False)
    ind = evaluate("ft_l", model, tok, cf_records, metrics=["ES", "PS", "NS", "S"],
                   hparams=FTLHyperParams(layer=1, lr=0.05, num_steps=10), progress=False)
    path = tmp_path / "seq" / "results.json"
    seq.to_json(path)
    data = json.loads(path.read_text())
    assert data["editkit_version"] and data["hparams"]["lr"] == HP.lr
    assert {"prepare_s", "edit_s_total", "total_s"} <= set(data["timings"])
    back = Report.from_json(path.parent)
    assert back.aggregate == json.loads(seq.to_json())["aggregate"]
    md = seq.to_markdown(plot="retention.png")
    assert "(unedited)" in md and "Before → after" in md and "Retention" in md
    assert "retention.png" in md and f"{seq.mean('ES', 'post') * 100:.1f}" in md
    table = compare([path.parent, ind])
    assert table.count("(unedited)") == 1 and "| ft |" in table and "| ft_l |" in table
    assert "GE" in table and "sequential" in table
    png = plot_retention(seq, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(EditkitError, match="sequential"):
        plot_retention(ind, tmp_path / "x.png")


# ------------------------------------------------------------------------------ CLI
def _parser():
    from editkit import cli

    parser = argparse.ArgumentParser(prog="editkit")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser, cli


def test_cli_eval_and_compare(bytelevel_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("gpt2", len(bytelevel_tokenizer)).save_pretrained(model_dir)
    bytelevel_tokenizer.save_pretrained(model_dir)
    parser, cli = _parser()
    hp = json.dumps(HP.to_dict())
    for proto, extra in (("sequential", []), ("independent", ["--no-raw", "--label", "FT-x"])):
        args = parser.parse_args([
            "eval", "--model", str(model_dir), "--method", "ft", "--data", str(CF),
            "--n", "2", "--protocol", proto, "--hparams", hp, "--max-new-tokens", "4",
            "--no-progress", "--out", str(tmp_path / proto), *extra])
        assert cli.run(args) == 0
    assert {p.name for p in (tmp_path / "sequential").iterdir()} == {
        "results.json", "report.md", "retention.png"}
    assert not (tmp_path / "independent" / "retention.png").exists()
    report = Report.from_json(tmp_path / "sequential")
    assert len(report.records) == 2 and report.hparams["lr"] == HP.lr
    args = parser.parse_args(["compare", str(tmp_path / "sequential"),
                              str(tmp_path / "independent"), "--out", str(tmp_path / "c.md")])
    assert cli.run(args) == 0
    assert "| FT-x | independent |" in (tmp_path / "c.md").read_text()
    plain = Report.from_json(tmp_path / "independent")
    assert all("raw" not in r and r["post"] is not None for r in plain.records)
    assert all("raw" in r for r in report.records)
    capsys.readouterr()
    args = parser.parse_args(["eval", "--model", str(model_dir), "--method", "ft", "--data",
                              str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])
    assert cli.run(args) == 2
    assert "missing.json" in capsys.readouterr().err


# ------------------------------------------------------------------------ fact world
@pytest.mark.slow
def test_fact_world_ft_edits_and_keeps_neighbours():
    from editkit.testbed import load_fact_world

    model, tok = load_fact_world()
    before = snapshot(model)
    records = load_dataset("factworld", n=4, seed=1)
    rep = evaluate("ft", model, tok, copy.deepcopy(records), metrics=["ES", "PS", "NS", "S"],
                   progress=False)
    assert state_equal(model, before)
    # The trained model knows its facts: before editing the true object wins.
    assert rep.mean("ES", "pre") <= 0.25 and rep.mean("NS", "pre") >= 0.75
    assert rep.mean("ES", "post") >= 0.75


def test_layer_sweeps_use_the_metric_names_and_read_earlier_files():
    from editkit.tracing import SweepResult

    path = Path(__file__).resolve().parent.parent / "docs" / "tracing" / "layer_sweep_rome.json"
    saved = json.loads(path.read_text())
    sweep = SweepResult.from_dict(saved)   # written with efficacy / specificity / score
    assert sweep.ES == saved["efficacy"] and sweep.NS == saved["specificity"]
    assert sweep.best_layer == saved["best_layer"] and sweep.efficacy is sweep.ES
    for i in range(len(sweep.layers)):
        assert sweep.S[i] == pytest.approx(harmonic_mean([sweep.ES[i], sweep.PS[i], sweep.NS[i]]))
    again = sweep.to_dict()
    assert {"ES", "EM", "PS", "NS", "S"} <= set(again) and "efficacy" not in again
    assert SweepResult.from_dict(again) == sweep
