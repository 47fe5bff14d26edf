"""The multiple-facts protocol: grouping, matrix arithmetic, revert exactness, CLI refusals."""

from __future__ import annotations

import json
import math

import pytest
from badinput import assert_cli_refused, run_cli
from conftest import snapshot, state_equal

from editkit.editor import EditHistory
from editkit.errors import DatasetFormatError, EditFailedError, EditkitError
from editkit.eval import evaluate
from editkit.eval.datasets import parse_records
from editkit.eval.multifact import (
    MULTI_FACT,
    MultiFactReport,
    compare_multifact,
    evaluate_multifact,
    group_by_subject,
    interference_matrix,
    paired_difference,
    relation_of,
    retention,
    spread_groups,
)
from editkit.methods.ft import FT, FTHyperParams

HP = FTHyperParams(layer=1, lr=0.05, num_steps=5)
RELATIONS = {"born": "{} was born in", "job": "{} works as a", "sport": "{} plays"}
OBJECTS = {"born": ("Paris", "Rome"), "job": ("baker", "pilot"), "sport": ("golf", "polo")}


def record(case_id: int, subject: str, relation: str, *, prompt: str | None = None) -> dict:
    true, new = OBJECTS[relation]
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": prompt or RELATIONS[relation], "relation_id": relation, "subject": subject,
            "target_new": {"str": new}, "target_true": {"str": true}},
        "paraphrase_prompts": [f"Everyone knows {subject} " + RELATIONS[relation][3:]],
        "neighborhood_prompts": [RELATIONS[relation].format("Someone Else")],
        "attribute_prompts": [], "generation_prompts": [],
    }


def world(subjects=("Ann Lee", "Bo Park", "Cy Moss"), relations=("born", "job", "sport"),
          start=0):
    recs, i = [], start
    for s in subjects:
        for r in relations:
            recs.append(record(i, s, r))
            i += 1
    return recs


# ------------------------------------------------------------------------ grouping
def test_group_by_subject_keeps_order_and_drops_lone_subjects():
    recs = world() + [record(99, "Di Solo", "born")]
    groups = group_by_subject(recs)
    assert [g.subject for g in groups] == ["Ann Lee", "Bo Park", "Cy Moss"]
    assert [g.relations for g in groups] == [["born", "job", "sport"]] * 3
    assert [r.case_id for r in groups[1].records] == [3, 4, 5]
    # three relations required: the two-relation subject is dropped
    recs2 = world(("Ann Lee",)) + world(("Bo Park",), ("born", "job"), start=3)
    assert [g.subject for g in group_by_subject(recs2, min_relations=3)] == ["Ann Lee"]


def test_relation_falls_back_to_the_prompt_template():
    rec = record(0, "Ann Lee", "born")
    del rec["requested_rewrite"]["relation_id"]
    (parsed,) = parse_records([rec], "auto")
    assert relation_of(parsed) == "{} was born in"


def test_records_without_a_shared_subject_are_refused():
    recs = [record(0, "Ann Lee", "born"), record(1, "Bo Park", "job")]
    with pytest.raises(DatasetFormatError, match="no subject has 2 or more records"):
        group_by_subject(recs)


def test_two_records_of_one_relation_and_subject_are_refused():
    recs = [record(0, "Ann Lee", "born"), record(1, "Ann Lee", "born", prompt="{} is from")]
    with pytest.raises(DatasetFormatError, match="both edit relation 'born'"):
        group_by_subject(recs)


def test_zsre_records_and_bad_min_relations_are_refused():
    zsre = [{"subject": "Ann Lee", "src": "Where was Ann Lee born?", "alt": "Rome",
             "answers": ["Paris"], "rephrase": "Ann Lee's birthplace?", "loc": "nq question",
             "loc_ans": "x"}]
    with pytest.raises(DatasetFormatError, match="CounterFact"):
        group_by_subject(zsre)
    with pytest.raises(EditkitError, match="min_relations=1"):
        group_by_subject(world(), min_relations=1)


def test_spread_groups_is_a_latin_square():
    groups = group_by_subject(world())
    spread = spread_groups(groups)
    ids = [[r.case_id for r in chunk] for chunk in spread]
    # chunk i takes slot j from subject group (i + j) mod 3
    assert ids == [[0, 4, 8], [3, 7, 2], [6, 1, 5]]
    assert sorted(i for chunk in ids for i in chunk) == list(range(9))
    for chunk in spread:
        assert len({r.request.subject for r in chunk}) == len(chunk)
        assert [relation_of(r) for r in chunk] == ["born", "job", "sport"]
    with pytest.raises(DatasetFormatError, match="at least 2 subject groups"):
        spread_groups(groups[:1])


def test_spread_groups_with_unequal_sizes_still_use_distinct_subjects():
    recs = world(("Ann Lee",)) + world(("Bo Park",), ("born", "job"), start=3)
    spread = spread_groups(group_by_subject(recs))
    assert [[r.case_id for r in c] for c in spread] == [[0, 4], [3, 1]]


# ---------------------------------------------------------------------- arithmetic
def test_retention_counts_prompts_where_the_true_object_still_wins():
    assert retention([[-5.0, -1.0], [-1.0, -2.0], [-3.0, -2.5], [-1.0, -1.0]]) == 0.5
    assert retention([]) is None


def test_interference_matrix_means_and_intervals():
    cells = [("a", "b", 1.0), ("a", "b", 0.0), ("a", "b", 0.5), ("b", "a", 1.0),
             ("b", "a", None)]
    m = interference_matrix(cells, ["a", "b"])
    assert m["a"]["b"]["mean"] == pytest.approx(0.5)
    assert m["a"]["b"]["n"] == 3
    # s = 0.5, half-width 1.96 * 0.5 / sqrt(3)
    assert m["a"]["b"]["ci95"] == pytest.approx(1.959963984540054 * 0.5 / math.sqrt(3))
    assert m["b"]["a"] == {**m["b"]["a"], "mean": 1.0, "n": 1, "ci95": None}
    assert m["a"]["a"]["mean"] is None and m["a"]["a"]["n"] == 0
    with pytest.raises(EditkitError, match="outside"):
        interference_matrix([("a", "z", 1.0)], ["a", "b"])


def test_paired_difference_uses_pairs_with_both_values():
    after = [{"ES": 1.0, "NS": 0.5}, {"ES": 0.0, "NS": None}, {"ES": 1.0, "NS": 1.0}]
    before = [{"ES": 1.0, "NS": 1.0}, {"ES": 1.0, "NS": 1.0}, {"ES": 0.0, "NS": 1.0}]
    d = paired_difference(after, before, ("ES", "NS"))
    assert d["ES"]["mean"] == pytest.approx(0.0) and d["ES"]["n"] == 3
    assert d["NS"]["mean"] == pytest.approx(-0.25) and d["NS"]["n"] == 2


# ------------------------------------------------------------------------ protocol
def test_protocol_reverts_exactly_and_reports_every_condition(gpt2_and_tok, tmp_path):
    model, tok = gpt2_and_tok
    before = snapshot(model)
    report = evaluate_multifact("ft", model, tok, world(), hparams=HP, progress=False)
    assert state_equal(model, before) and not EditHistory.of(model).edits
    assert report.relations == ["born", "job", "sport"] and len(report.subjects) == 3
    assert report.apply_mode == "sequentially"
    for c in ("pre", "alone", "same_subject", "spread"):
        assert report.conditions[c]["ES"]["n"] == 9
    for rec in report.records:
        assert rec["alone"] is not None and rec["same_subject"] is not None
        assert len(rec["spread"]) == 1
    # matrix (i) has 3 subjects per off-diagonal cell; matrix (ii) diagonal = ES alone
    assert report.retention["born"]["job"]["n"] == 3
    assert report.retention["born"]["born"]["n"] == 0
    born_alone = [r["alone"]["ES"] for r in report.records if r["relation"] == "born"]
    assert report.paired_es["born"]["born"]["mean"] == pytest.approx(sum(born_alone) / 3)
    assert report.paired_es["job"]["born"]["n"] == 3
    # JSON round trip, markdown and heatmap
    report.to_json(tmp_path)
    again = MultiFactReport.from_json(tmp_path)
    assert again.to_dict() == report.to_dict()
    md = report.to_markdown(plot="interference.png")
    assert "## (i) Unedited B after editing A" in md and "| born | · |" in md
    assert report.plot(tmp_path / "m.png").stat().st_size > 1000
    table = compare_multifact([report, tmp_path], title="t")
    assert table.count("(unedited)") == 1 and table.count("| ft (3 subjects) | same_subject | 9 |") == 2


def test_pairwise_subjects_limits_matrix_ii_and_zero_skips_it(gpt2_and_tok):
    model, tok = gpt2_and_tok
    one = evaluate_multifact("ft", model, tok, world(), hparams=HP, pairwise_subjects=1,
                             n_subjects=2, progress=False)
    assert one.subjects == ["Ann Lee", "Bo Park"]
    assert one.paired_es["job"]["born"]["n"] == 1
    none = evaluate_multifact("ft", model, tok, world(), hparams=HP, pairwise_subjects=0,
                              n_subjects=2, progress=False)
    assert none.paired_es["job"]["born"]["n"] == 0
    assert "Not measured." in none.to_markdown()
    with pytest.raises(EditkitError, match="n_subjects=1"):
        evaluate_multifact("ft", model, tok, world(), hparams=HP, n_subjects=1)


def test_evaluate_points_multi_fact_to_its_own_function(gpt2_and_tok):
    model, tok = gpt2_and_tok
    with pytest.raises(EditkitError, match="evaluate_multifact"):
        evaluate("ft", model, tok, world(), protocol=MULTI_FACT, hparams=HP)
    with pytest.raises(EditkitError, match="unknown protocol 'all_at_once'"):
        evaluate("ft", model, tok, world(), protocol="all_at_once", hparams=HP)


def test_a_failing_edit_mid_protocol_leaves_the_model_unchanged(gpt2_and_tok):
    model, tok = gpt2_and_tok
    before = snapshot(model)
    editor = FT(model, tok, hparams=HP)
    calls = {"n": 0}
    compute = editor.compute_update

    def flaky(requests):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the same-subject block of the first group
            raise EditFailedError("injected failure")
        return compute(requests)

    editor.compute_update = flaky
    with pytest.raises(EditFailedError, match="injected"):
        evaluate_multifact(editor, records=world(), progress=False)
    assert calls["n"] == 5
    assert state_equal(model, before) and not EditHistory.of(model).edits


# ----------------------------------------------------------------------------- CLI
def _data(tmp_path, recs) -> str:
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    return str(path)


BASE = ["eval", "--model", "factworld", "--method", "ft"]


@pytest.mark.parametrize("extra, mentions", [
    (["--protocol", "multi_fact", "--n", "1"], ["--n 1", "2 subjects"]),
    (["--protocol", "independent", "--pairwise-subjects", "2"], ["--pairwise-subjects"]),
    (["--protocol", "multi_fact", "--pairwise-subjects", "-1"], ["--pairwise-subjects"]),
    (["--protocol", "multi_fact", "--metrics", "ES"], ["--metrics", "multi_fact"]),
])
def test_cli_refuses_bad_multi_fact_options(tmp_path, extra, mentions):
    argv = [*BASE, "--data", "factworld", *extra, "--out", str(tmp_path / "o")]
    assert_cli_refused(argv, status=2, mentions=mentions)


def test_cli_refuses_records_without_shared_subjects(tmp_path):
    data = _data(tmp_path, [record(0, "Ann Lee", "born"), record(1, "Bo Park", "job")])
    argv = [*BASE, "--data", data, "--protocol", "multi_fact", "--out", str(tmp_path / "o")]
    assert_cli_refused(argv, status=2, mentions=["no subject has 2 or more records"])


def test_cli_runs_multi_fact_on_the_fact_world(tmp_path):
    out = tmp_path / "mf"
    code, stdout, err = run_cli([*BASE, "--data", "factworld", "--protocol", "multi_fact",
                                 "--n", "2", "--pairwise-subjects", "1", "--no-progress",
                                 "--hparams", '{"num_steps": 3}', "--out", str(out)])
    assert code == 0, err
    assert "same_subject" in stdout and "spread" in stdout
    report = MultiFactReport.from_json(out)
    assert report.config["n_subjects"] == 2 and report.config["group_sizes"] == [6, 6]
    assert len(report.relations) == 6 and report.config["pairwise_subjects_used"] == 1
    assert (out / "interference.png").is_file() and (out / "report.md").is_file()


# ------------------------------------------------------------------- shipped data
def test_shipped_real_subjects_have_several_known_relations():
    from editkit.testbed.real_facts import real_facts
    from editkit.testbed.real_multifact import real_multifact, real_multifact_meta

    records = real_multifact()
    groups = group_by_subject(records)
    meta = real_multifact_meta()
    assert len(groups) == meta["n_subjects"] >= 20 and len(records) == meta["n_records"]
    assert {g.subject: g.relations for g in groups} == meta["subjects"]
    assert all(len(g.records) >= 2 for g in groups)
    sizes = [len(g.records) for g in groups]
    assert sizes == sorted(sizes, reverse=True)
    # every record is one of the facts the unedited model passed the real-fact filter on
    upstream = {json.dumps(r, sort_keys=True) for r in real_facts()}
    assert all(json.dumps(r, sort_keys=True) in upstream for r in records)


# ------------------------------------------------------------------- slow quality
@pytest.mark.slow
def test_memit_edits_one_subjects_relations_worse_than_the_same_number_spread():
    """MEMIT's batched least squares has one key per subject (its last token) for all of its
    relations: four edits of one subject compete for it, four edits of four subjects do not
    (docs/results/multifact.md)."""
    import torch

    from editkit.testbed import FactWorld, load_fact_world

    torch.set_num_threads(1)
    model, tok = load_fact_world()
    before = snapshot(model)
    rels = ("birthplace", "profession", "sport", "instrument")
    recs = [r for r in FactWorld().records() if r["requested_rewrite"]["relation_id"] in rels]
    report = evaluate_multifact("memit", model, tok, recs, n_subjects=4, pairwise_subjects=0,
                                progress=False)
    assert state_equal(model, before)
    es = {c: report.conditions[c]["ES"]["mean"] for c in ("alone", "same_subject", "spread")}
    assert es["alone"] >= 0.75 and es["spread"] >= 0.75
    assert es["same_subject"] <= es["spread"] - 0.25
    assert es["same_subject"] <= es["alone"] - 0.25
    for c in ("alone", "same_subject", "spread"):
        assert report.conditions[c]["NS"]["mean"] >= 0.9
