"""Composite facts: the chain world, MQuAKE / portability records, their metrics and tasks."""

from __future__ import annotations

import json
import sys
import types
from importlib.metadata import EntryPoint

import pytest
import torch

from editkit.errors import DatasetFormatError, DatasetUnavailableError, EditkitError
from editkit.eval import METRICS, MetricContext, RecordScores
from editkit.eval.multihop import (
    answer_matches,
    evaluate_multihop,
    evaluate_portability,
    load_mquake,
    load_portability,
    mquake_to_portability,
    parse_mquake,
)
from editkit.eval.tasks import TASKS, Task, UnknownTaskError, get_task, list_tasks
from editkit.testbed import ChainWorld, FactWorld, TrainSettings, world_fingerprint

#: FactWorld().fingerprint() before the chain world existed: every committed fact-world
#: result depends on this world, which the chain world must leave untouched.
DEFAULT_WORLD_FINGERPRINT = "059aa5b7d75923b15b9a6e290d00fac128c00481c1d255b0c42a7e490c0ebedd"


def mquake_record(case_id=0, **changes):
    """A record in MQuAKE's published format (an invented case)."""
    rec = {
        "case_id": case_id,
        "requested_rewrite": [{
            "prompt": "{} is a citizen of", "relation_id": "P27",
            "target_new": {"str": "Croatia", "id": "Q224"},
            "target_true": {"str": "United States of America", "id": "Q30"},
            "subject": "Ellie Kemper",
            "question": "What is the country of citizenship of Ellie Kemper?",
        }],
        "questions": [
            "What is the name of the current head of state in Ellie Kemper's country?",
            "Who leads the country Ellie Kemper is a citizen of?",
            "Who is the head of state of the country of citizenship of Ellie Kemper?",
        ],
        "answer": "Joe Biden", "answer_alias": ["Joseph Biden", "Biden"],
        "new_answer": "Kolinda Grabar-Kitarović", "new_answer_alias": ["Kolinda"],
        "single_hops": [
            {"question": "What is the country of citizenship of Ellie Kemper?",
             "cloze": "Ellie Kemper is a citizen of", "answer": "United States of America",
             "answer_alias": ["USA", "United States"]},
            {"question": "Who is the head of state of United States of America?",
             "cloze": "The head of state of United States of America is",
             "answer": "Joe Biden", "answer_alias": ["Biden"]},
        ],
        "new_single_hops": [
            {"question": "What is the country of citizenship of Ellie Kemper?",
             "cloze": "Ellie Kemper is a citizen of", "answer": "Croatia", "answer_alias": []},
            {"question": "Who is the head of state of Croatia?",
             "cloze": "The head of state of Croatia is",
             "answer": "Kolinda Grabar-Kitarović", "answer_alias": ["Kolinda"]},
        ],
        "orig": {"triples": [["Q1", "P27", "Q30"], ["Q30", "P35", "Q6279"]],
                 "new_triples": [["Q1", "P27", "Q224"], ["Q224", "P35", "Q7"]],
                 "edit_triples": [["Q1", "P27", "Q224"]]},
    }
    rec.update(changes)
    return rec


# ---------------------------------------------------------------- chain world
@pytest.fixture(scope="module")
def world():
    return ChainWorld()


def test_default_fact_world_is_unchanged():
    assert FactWorld().fingerprint() == DEFAULT_WORLD_FINGERPRINT
    from editkit.testbed import package_data_dir

    meta = json.loads((package_data_dir() / "fact_world.json").read_text())
    assert world_fingerprint(FactWorld(), TrainSettings()) == meta["world_fingerprint"]


def test_chain_world_is_deterministic_and_distinct(world):
    again = ChainWorld()
    assert again.fingerprint() == world.fingerprint() != FactWorld().fingerprint()
    assert again.multihop_records(n=20, seed=3) == world.multihop_records(n=20, seed=3)
    # the people are those a FactWorld with the same arguments invents
    assert world.subjects == FactWorld(n_subjects=168, relations=world.relations).subjects


def test_multihop_records_are_exact_by_construction(world):
    recs = world.multihop_records(subjects="all")
    assert len(recs) == len(world.subjects) * (2 + 2 + 3)  # hops of the three chains
    for rec in recs:
        o = rec["orig"]
        walk = world.walk(o["person"], o["chain"])
        assert [list(f.__dict__.values()) for f in walk] == o["triples"]
        assert rec["answer"] == walk[-1].object == world.chain_answer(o["person"], o["chain"])
        # replay the edit by hand: the new chain follows the world's facts after the edited hop
        (s, r, new), = o["edit_triples"]
        k = o["edit_hop"] - 1
        assert (s, r) == (walk[k].subject, walk[k].relation) and new != walk[k].object
        node = new
        for later in walk[k + 1:]:
            node = world.object_of(node, later.relation)
        assert rec["new_answer"] == node != rec["answer"]
        assert [h["answer"] for h in rec["single_hops"]] == [f.object for f in walk]
        assert rec["new_single_hops"][k]["answer"] == new
        rr = rec["requested_rewrite"][0]
        assert rr["subject"] == s and rr["target_true"]["str"] == walk[k].object
        assert all(o["person"] in q for q in rec["questions"])
        # no single-hop cloze is the start of a multi-hop question (greedy decoding after it
        # must be able to give the hop's answer)
        for h in (*rec["single_hops"], *rec["new_single_hops"]):
            assert not any(q.startswith(h["cloze"]) for q in rec["questions"])


def test_compositions_are_in_the_corpus_only_for_the_composition_train_people(world):
    corpus = "\n".join(world.corpus(shuffle=False))
    seen = set(world.composition_train_subjects)
    assert 0 < len(seen) < len(world.subjects)
    for person in world.subjects[:40]:
        for ch in world.chains:
            sentence = world.sentence(ch.templates[0], person, world.chain_answer(person, ch))
            assert (sentence in corpus) == (person in seen)
    # every single hop of every entity is taught
    for fact in world.entity_facts:
        assert world.sentence(world.relation(fact.relation).templates[0], fact.subject,
                              fact.object) in corpus
    held = world.multihop_records(subjects="composition_held_out")
    assert held and not any(r["orig"]["composition_seen"] for r in held)


def test_chain_world_portability_records(world):
    recs = load_portability(world.portability_records(n=12, seed=1))
    assert len(recs) == 12
    for rec in recs:
        probes = rec.portability["reasoning"]
        assert len(probes) == 3 and rec.locality["Relation_Specificity"]
        loc = rec.locality["Relation_Specificity"][0]
        assert loc.answers[0] != rec.request.target_new or rec.request.subject not in loc.prompt


# ---------------------------------------------------------------- loaders
def test_load_mquake_json_and_jsonl(tmp_path):
    recs = [mquake_record(0), mquake_record(7)]
    (tmp_path / "m.json").write_text(json.dumps(recs))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    for name in ("m.json", "m.jsonl"):
        out = load_mquake(tmp_path / name)
        assert [r.case_id for r in out] == [0, 7]
        r = out[0]
        assert r.request.prompt == "{} is a citizen of" and r.request.target_new == "Croatia"
        assert r.request.target_true == "United States of America"
        assert r.new_answers == ("Kolinda Grabar-Kitarović", "Kolinda")
        assert [h.cloze for h in r.single_hops][0] == "Ellie Kemper is a citizen of"
        assert r.single_hops[0].answers == ("United States of America", "USA", "United States")
    assert len(load_mquake(tmp_path / "m.json", n=1)) == 1
    assert len(load_mquake("chainworld", n=5, seed=0)) == 5


@pytest.mark.parametrize("change, words", [
    ({"requested_rewrite": None}, ["missing field", "requested_rewrite"]),
    ({"requested_rewrite": []}, ["requested_rewrite", "non-empty"]),
    ({"questions": "What?"}, ["questions", "list of strings"]),
    ({"questions": []}, ["questions", "at least one"]),
    ({"new_answer": ""}, ["new_answer", "non-empty string"]),
    ({"answer_alias": [3]}, ["answer_alias[0]"]),
    ({"single_hops": [{"question": "q?"}]}, ["single_hops[0].answer", "missing"]),
    ({"new_single_hops": {"question": "q"}}, ["new_single_hops", "list of hops"]),
])
def test_malformed_mquake_records_are_typed_errors_naming_record_and_field(change, words):
    rec = mquake_record(5)
    for key, value in change.items():
        if value is None:
            del rec[key]
        else:
            rec[key] = value
    with pytest.raises(DatasetFormatError) as err:
        load_mquake([mquake_record(4), rec])
    msg = str(err.value)
    assert "MQuAKE record #1 (case_id 5)" in msg
    assert all(w in msg for w in words), msg


def test_malformed_rewrites_and_duplicates():
    rec = mquake_record(1)
    rec["requested_rewrite"][0]["target_new"] = {"id": "Q1"}
    with pytest.raises(DatasetFormatError, match=r"requested_rewrite\[0\]\.target_new\.str"):
        parse_mquake(rec, 0)
    rec = mquake_record(1)
    rec["requested_rewrite"][0]["prompt"] = "is a citizen of"  # no {} and no subject
    with pytest.raises(DatasetFormatError, match="not a valid edit"):
        parse_mquake(rec, 0)
    with pytest.raises(DatasetFormatError, match="more than once"):
        load_mquake([mquake_record(1), mquake_record(1)])
    with pytest.raises(DatasetFormatError, match="JSON object"):
        parse_mquake(["not", "a", "dict"], 3)


def test_offline_hub_ids_are_typed_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    for source in ("hub:someone/MQuAKE", "someone/MQuAKE"):
        with pytest.raises(DatasetUnavailableError) as err:
            load_mquake(source)
        assert "no route to host" in str(err.value) and "offline" in str(err.value)
        with pytest.raises(DatasetUnavailableError):
            load_portability(source)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DatasetUnavailableError, match="not installed"):
        load_mquake("hub:someone/MQuAKE")
    rows = [mquake_record(3)]
    fake = types.SimpleNamespace(load_dataset=lambda name, split: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert [r.case_id for r in load_mquake("hub:someone/MQuAKE")] == [3]


def test_knowedit_portability_records():
    raw = {
        "subject": "Ellie Kemper", "prompt": "Ellie Kemper is a citizen of",
        "target_new": "Croatia", "ground_truth": ["United States of America"],
        "portability": {
            "Subject_Aliasing": [{"prompt": "Elizabeth Kemper is a citizen of",
                                  "ground_truth": [["Croatia", "Republic of Croatia"]]}],
            "reasoning": [{"prompt": "The head of state of Ellie Kemper's country is",
                           "ground_truth": "Kolinda"}],
        },
        "locality": {"Relation_Specificity": [{"prompt": "Ellie Kemper was born in",
                                               "ground_truth": "Kansas City"}]},
    }
    rec = load_portability([raw])[0]
    assert rec.request.prompt == "{} is a citizen of"
    assert rec.request.target_true == "United States of America"
    assert rec.portability["Subject_Aliasing"][0].answers == ("Croatia", "Republic of Croatia")
    assert rec.locality["Relation_Specificity"][0].answers == ("Kansas City",)
    bad = dict(raw, prompt="Somebody is a citizen of")
    with pytest.raises(DatasetFormatError, match="does not occur in the prompt"):
        load_portability([bad])
    with pytest.raises(DatasetFormatError, match="no probes"):
        load_portability([dict(raw, portability={})])
    bad = dict(raw, portability={"reasoning": [{"prompt": "p"}]})
    with pytest.raises(DatasetFormatError, match=r"portability\.reasoning\[0\]\.ground_truth"):
        load_portability([bad])
    converted = load_portability([mquake_to_portability(mquake_record(2))])[0]
    assert len(converted.portability["reasoning"]) == 3
    assert converted.portability["reasoning"][0].answers[0] == "Kolinda Grabar-Kitarović"


# ---------------------------------------------------------------- metrics
def _metric(name, post, pre=None, record=None):
    return METRICS.get(name).compute(post, MetricContext(record, pre))


def test_multihop_metric_arithmetic():
    rec = parse_mquake(mquake_record(0))
    post = RecordScores(logprobs={"rewrite": [[-0.5, -2.0]],
                                  "multihop": [[-1.0, -2.0], [-3.0, -1.0], [-0.5, -0.7]]},
                        correct={"single_hops": [[True], [False]],
                                 "new_single_hops": [[True], [True]]},
                        generations=[" Kolinda Grabar-Kitarović.", " Joe Biden", " kolinda!"])
    pre = RecordScores(logprobs={"rewrite": [[-9.0, -0.1]],
                                 "multihop": [[-5.0, -1.0], [-0.2, -0.3], [-4.0, -1.0]]},
                       correct={"single_hops": [[True], [True]],
                                "new_single_hops": [[False], [False]]},
                       generations=[" Joseph Biden is", " Bidenomics", " The president"])
    assert _metric("edit_success", post) == 1.0
    assert _metric("multihop_cloze", post) == pytest.approx(2 / 3)
    assert _metric("multihop_cloze_any", post) == 1.0
    assert _metric("multihop_cloze_pre", post, pre) == pytest.approx(2 / 3)
    assert _metric("multihop_cloze_pre", post, None) is None
    assert _metric("multihop_gen", post, pre, rec) == pytest.approx(2 / 3)
    assert _metric("multihop_gen_pre", post, pre, rec) == pytest.approx(1 / 3)
    assert _metric("hop_acc_pre", post, pre) == 1.0
    assert _metric("hop_acc_post", post, pre) == 1.0
    assert _metric("hop_acc_pre", pre, post) == 0.5


def test_answer_matching_respects_word_boundaries_and_aliases():
    assert answer_matches(" Paris, France", ["Paris"])
    assert answer_matches("  the city", ["The City"])
    assert not answer_matches(" Parisian food", ["Paris"])
    assert not answer_matches(" London", ["Paris", "City of Light"])
    assert answer_matches(" City of Light!", ["Paris", "City of Light"])


def test_portability_and_locality_arithmetic():
    post = RecordScores(
        correct={"rewrite": [[True, True]],
                 "portability:reasoning": [[True, False], [True, True, True, False]],
                 "portability:Subject_Aliasing": [[False]]},
        predicted={"locality:Relation_Specificity": [[5, 6, 7], [1]]})
    pre = RecordScores(predicted={"locality:Relation_Specificity": [[5, 0, 7], [2]]})
    assert _metric("reliability", post) == 1.0
    # EasyEdit: per probe the mean of its token hits, then the mean over probes
    assert _metric("portability_reasoning", post) == pytest.approx((0.5 + 0.75) / 2)
    assert _metric("portability_subject_aliasing", post) == 0.0
    assert _metric("portability", post) == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    assert _metric("portability_logical_generalization", post) is None
    assert _metric("locality", post, pre) == pytest.approx((2 / 3 + 0.0) / 2)


# ---------------------------------------------------------------- tasks
TOY_TASK = Task("toy_multihop", "a third-party task", lambda source, n=None: [source],
                lambda *a, **k: None, "mquake")


def test_task_registry_builtins_and_entry_point(monkeypatch):
    assert {"counterfact", "zsre", "mquake", "portability"} <= set(list_tasks())
    assert get_task("mquake").metrics()[0] == "edit_success"
    assert "portability" in get_task("portability").metrics()
    assert len(get_task("mquake").load("chainworld", n=3)) == 3
    with pytest.raises(UnknownTaskError, match="mquak"):
        get_task("mquak")
    ep = EntryPoint(name="toy_multihop", value=f"{__name__}:TOY_TASK", group="editkit.eval_tasks")
    monkeypatch.setattr("editkit.registry.entry_points",
                        lambda group: [ep] if group == "editkit.eval_tasks" else [])
    monkeypatch.setattr(TASKS, "_refs", dict(TASKS._refs))
    monkeypatch.setattr(TASKS, "_loaded", dict(TASKS._loaded))
    monkeypatch.setattr(TASKS, "_discovered", False)
    assert "toy_multihop" in list_tasks()
    assert get_task("toy_multihop").load("x") == ["x"]


# ---------------------------------------------------------------- evaluation
def _toy_record(case_id, subject, new, true, question_answer):
    return {
        "case_id": case_id,
        "requested_rewrite": [{"prompt": "{} is located in the city of", "subject": subject,
                               "target_new": {"str": new}, "target_true": {"str": true}}],
        "questions": [f"The country of the city where {subject} stands is"],
        "answer": question_answer[0], "new_answer": question_answer[1],
        "single_hops": [{"question": f"{subject} is located in the city of",
                         "cloze": f"{subject} is located in the city of", "answer": true}],
        "new_single_hops": [{"question": f"{subject} is located in the city of",
                             "cloze": f"{subject} is located in the city of", "answer": new}],
        "orig": {"edit_hop": 1},
    }


def test_evaluate_multihop_scores_and_restores_the_model(gpt2_and_tok):
    model, tok = gpt2_and_tok
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recs = [_toy_record(0, "The Eiffel Tower", "Rome", "Paris", ("France", "Italy")),
            _toy_record(1, "The Colosseum", "Paris", "Rome", ("Italy", "France"))]
    rows = []
    report = evaluate_multihop("ft", model, tok, recs, progress=False,
                               hparams={"layer": 1, "num_steps": 5, "lr": 1e-2},
                               on_record=rows.append)
    assert [r["case_id"] for r in report.rows] == [0, 1] == [r["case_id"] for r in rows]
    for row in report.rows:
        assert set(row["values"]) == set(report.metrics)
        assert row["labels"] == {"edit_hop": 1}
        for v in row["values"].values():
            assert v is None or 0.0 <= v <= 1.0
    assert report.summary()["all"]["edit_success"]["n"] == 2
    assert "edit_success" in report.to_markdown(by="edit_hop")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    port = evaluate_portability("ft", model, tok,
                                [mquake_to_portability(r) for r in recs], progress=False,
                                hparams={"layer": 1, "num_steps": 5, "lr": 1e-2})
    assert port.summary()["all"]["portability"]["n"] == 2
    with pytest.raises(EditkitError, match="not a mquake one"):
        evaluate_multihop("ft", model, tok, recs, metrics=["ES"], progress=False)


# ---------------------------------------------------------------- command line
def test_cli_eval_task_mquake_and_refusals(tmp_path, bytelevel_tokenizer):
    from badinput import assert_cli_refused, run_cli
    from conftest import tiny_model

    model_dir = tmp_path / "m"
    tiny_model("gpt2", len(bytelevel_tokenizer)).save_pretrained(model_dir)
    bytelevel_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "mq.json"
    data.write_text(json.dumps([
        _toy_record(0, "The Eiffel Tower", "Rome", "Paris", ("France", "Italy")),
        _toy_record(1, "The Colosseum", "Paris", "Rome", ("Italy", "France"))]))
    out = tmp_path / "res"
    code, stdout, stderr = run_cli(
        ["eval", "--task", "mquake", "--model", str(model_dir), "--method", "ft",
         "--data", str(data), "--hparams", '{"layer": 1, "num_steps": 3}', "--no-progress",
         "--out", str(out)])
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "mquake" and len(results["rows"]) == 2
    assert "multihop_cloze" in (out / "report.md").read_text() and "edit_success" in stdout
    base = ["eval", "--model", str(model_dir), "--method", "ft", "--data", str(data),
            "--out", str(tmp_path / "x")]
    assert_cli_refused([*base, "--task", "mquak"], status=2, mentions=["mquak", "mquake"])
    assert_cli_refused([*base, "--task", "mquake", "--protocol", "batch"], status=2,
                       mentions=["--protocol"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"case_id": 3, "questions": ["q"]}]))
    assert_cli_refused(["eval", "--task", "mquake", "--model", str(model_dir), "--method",
                        "ft", "--data", str(bad), "--out", str(tmp_path / "y")], status=2,
                       mentions=["case_id 3", "requested_rewrite"])


# ---------------------------------------------------------------- quality (chain world)
@pytest.fixture(scope="module")
def chain_model():
    from editkit.testbed import load_chain_world

    torch.set_num_threads(1)
    return load_chain_world(train_if_missing=False)


@pytest.mark.slow
def test_shipped_chain_world_model_knows_every_hop(chain_model, world):
    from editkit.testbed import chain_recall, chain_world_dir

    assert chain_world_dir().name == "chain_world"  # the shipped package data is current
    recall = chain_recall(*chain_model, world)
    for rel in ("birthplace", "employer", "sport", "country", "headquarters"):
        assert recall[f"hop_{rel}"] >= 0.95, recall
    for ch in world.chains:
        assert recall[f"chain_{ch.name}_seen"] >= 0.95, recall
        # the compositions held out of the corpus are known far less often (measured, not
        # assumed: docs/results/multihop.md)
        assert recall[f"chain_{ch.name}_held_out"] < recall[f"chain_{ch.name}_seen"] - 0.3


@pytest.mark.slow
def test_rome_bridge_edits_hold_but_do_not_reach_memorised_compositions(chain_model, world):
    """MQuAKE's finding on the chain world: ROME's edit of the bridge entity's fact (a city's
    country, a company's headquarters) holds, yet the multi-hop questions of people whose
    chain sentences were memorised keep the old answer (docs/results/multihop.md: 0/47)."""
    from editkit.methods.rome import ROME
    from editkit.testbed.presets import ROME_FACT_WORLD

    model, tok = chain_model
    records = world.multihop_records(8, seed=1, chains=["birth_country", "employer_city"],
                                     edit_hops=[2], subjects="composition_seen")
    editor = ROME(model, tok, hparams={**ROME_FACT_WORLD, "mom2_dataset": "chain_world"})
    report = evaluate_multihop(editor, records=records, progress=False, generation=False)
    summary = report.summary()["all"]
    assert summary["multihop_cloze_pre"]["mean"] == 1.0  # the chains were known before
    assert summary["edit_success"]["mean"] >= 0.75
    assert summary["multihop_cloze"]["mean"] <= 0.25


def test_shipped_smollm2_two_hop_records():
    from editkit.testbed.two_hop import two_hop_meta, two_hop_records

    meta = two_hop_meta()
    raw = two_hop_records()
    records = load_mquake("twohop")
    assert len(records) == len(raw) == meta["records"] == 2 * meta["chains_kept"]
    assert meta["chains_kept"] >= 40
    for hop in (1, 2):
        recs = load_mquake(two_hop_records(edit_hop=hop))
        assert len(recs) == meta["chains_kept"]
        for r in recs:
            assert r.new_answer != r.answer and len(r.questions) == 3
            assert len(r.single_hops) == len(r.new_single_hops) == 2
            # the edit rewrites hop ``hop``: its subject is the first hop's subject or the bridge
            edited = r.requests[0]
            assert edited.target_true == r.single_hops[hop - 1].answer
            assert edited.target_new == r.new_single_hops[hop - 1].answer
    assert len(load_portability("twohop", n=4)) == 4


def test_shipped_chain_world_is_current_small_and_safe():
    from editkit.testbed import chain_world_dir
    from editkit.testbed.chains import chain_world_package_dir

    shipped = chain_world_package_dir()
    files = [p for p in shipped.rglob("*") if p.is_file()]
    assert {"model.safetensors", "tokenizer.json", "fact_world.json"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) < 10 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".pth", ".pickle")]
    assert chain_world_dir() == shipped, "stale: rerun scripts/build_fact_world.py --world chain"
    meta = json.loads((shipped / "fact_world.json").read_text())
    assert min(v for k, v in meta["chain_metrics"].items() if k.startswith("hop_")) >= 0.95


def test_builtin_tasks_register_without_warnings():
    """Importing the task registry (again) warns about nothing: the built-ins are not also
    declared as editkit's own entry points, which made every import warn of an override."""
    import importlib
    import warnings

    import editkit.eval.tasks as tasks

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(tasks)
        assert {"counterfact", "zsre", "mquake", "portability"} <= set(tasks.list_tasks())
