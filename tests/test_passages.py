"""Passage incorporation: relation registry, extractors, triples, incorporate, CLI, data."""

from __future__ import annotations

import json
import types

import pytest
import torch
from badinput import Bad, assert_cli_refused, assert_refused
from conftest import snapshot, state_equal

from editkit.errors import DatasetFormatError, EditFailedError
from editkit.passages import (
    GivenExtractor,
    InvalidTripleError,
    PatternExtractor,
    RelationSpec,
    Triple,
    UnknownExtractorError,
    UnknownRelationError,
    get_extractor,
    get_relation,
    incorporate,
    load_passages,
    parse_triple_lines,
)
from editkit.passages import relations as relations_mod
from editkit.passages.evaluate import extraction_scores, in_context_share, summarise
from editkit.passages.triples import check_triple

# ------------------------------------------------------------------ registry


@pytest.mark.parametrize("name, rid", [
    ("P19", "P19"), ("p19", "P19"), ("born in", "P19"), ("Place of Birth", "P19"),
    ("place-of-birth:", "P19"), ("P106", "P106"), ("occupation", "P106"), ("works for", "P108"),
    ("capital", "P36"), ("The capital", "P36"), ("headquartered in", "P159"),
    ("P1303", "P1303"), ("birthplace", "birthplace"), ("instrument", "instrument"),
    ("profession", "profession"), ("employer", "employer"), ("language", "language"),
])
def test_relation_ids_and_phrases(name, rid):
    assert get_relation(name).id == rid


def test_relation_prompts_are_cloze_templates():
    for rid in relations_mod.list_relations():
        spec = get_relation(rid)
        assert all(p.count("{}") == 1 and not p.endswith(" ") for p in spec.prompts), rid
        assert spec.prompt == spec.prompts[0]
    # The fact world's relations carry the world's own sentence forms, rewrite prompt first.
    from editkit.testbed.world import RELATIONS

    for rel in RELATIONS:
        assert get_relation(rel.name).prompts[0] == rel.templates[0]
        assert set(rel.paraphrase_templates) <= set(get_relation(rel.name).prompts)


def test_unknown_relation_is_typed_and_suggests():
    with pytest.raises(UnknownRelationError, match="Did you mean") as info:
        get_relation("place of brith")
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownRelationError, match="editkit.relations"):
        get_relation("favourite colour of the moon")
    with pytest.raises(UnknownRelationError):
        get_relation("")


def test_relation_spec_validates_templates():
    with pytest.raises(ValueError, match="exactly one"):
        RelationSpec("X1", "x", ("no placeholder",))
    with pytest.raises(ValueError, match="space"):
        RelationSpec("X1", "x", ("{} likes ",))
    with pytest.raises(ValueError, match="at least one"):
        RelationSpec("X1", "x", ())


def _fake_entry_points(monkeypatch, module, group, eps):
    def fake(group=None, **kw):
        return [e for e in eps if e.group == group] if group else eps
    monkeypatch.setattr(module, "entry_points", fake)


def _ep(name, group, obj, dist="toy-plugin"):
    return types.SimpleNamespace(name=name, group=group, load=lambda: obj,
                                 dist=types.SimpleNamespace(name=dist))


def test_relation_plugin_through_entry_point(monkeypatch):
    spec = RelationSpec("X42", "favourite colour", ("The favourite colour of {} is",),
                        ("What colour does {} like?",), ("likes the colour",))
    clash = RelationSpec("P19", "stolen", ("{} stole",))

    def broken():
        raise RuntimeError("boom")

    eps = [_ep("colours", "editkit.relations", lambda: [spec]),
           _ep("clash", "editkit.relations", clash),
           _ep("broken", "editkit.relations", broken)]
    _fake_entry_points(monkeypatch, relations_mod, "editkit.relations", eps)
    registry = relations_mod._RelationRegistry()
    with pytest.warns(UserWarning) as record:
        assert registry.get("likes the colour").id == "X42"
    messages = " ".join(str(w.message) for w in record)
    assert "already registered" in messages and "failed to load" in messages
    assert registry.get("P19").label == "place of birth"  # a plugin cannot replace a built-in
    assert registry.get("favourite colour") is spec
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec)


def test_register_relation_at_run_time(monkeypatch):
    monkeypatch.setattr(relations_mod, "RELATIONS", relations_mod._RelationRegistry())
    spec = RelationSpec("X7", "pet", ("The pet of {} is a",), aliases=("has pet",))
    relations_mod.register_relation(spec)
    assert relations_mod.get_relation("has pet") is spec
    ambiguous = RelationSpec("X8", "pet2", ("{} owns a",), aliases=("has pet",))
    relations_mod.register_relation(ambiguous)
    with pytest.raises(UnknownRelationError, match="several relations"):
        relations_mod.get_relation("has pet")


# ------------------------------------------------------------------ triples and extractors
PASSAGE = ("Breaking: Anna Berg, long a chemist, has left Oslo. Anna Berg was born in Bergen. "
           "The capital of Norway is Trondheim.")


def test_parse_messy_model_output():
    out = """Sure! Here are the triples:
1. Anna Berg | born in | Bergen
- (Norway, capital, Trondheim).
* "Anna Berg" -> "occupation" -> "chemist"
subject: Anna Berg, relation: works for, object: Statoil
{"subject": "Anna Berg", "relation": "P19", "object": "Bergen"}
Anna Berg | born in
Bob Smith | born in | Paris
Anna Berg | favourite food | fish
Anna Berg | born in |
Anna Berg; citizen of; Norway
"""
    ex = parse_triple_lines(out, PASSAGE)
    got = {(t.subject, t.relation, t.object) for t in ex.triples}
    assert got == {("Anna Berg", "P19", "Bergen"), ("Norway", "P36", "Trondheim"),
                   ("Anna Berg", "P106", "chemist"), ("Anna Berg", "P108", "Statoil"),
                   ("Anna Berg", "P27", "Norway")}
    reasons = {r.line: r.reason for r in ex.rejected}
    assert "expected 3 fields" in reasons["Anna Berg | born in"]
    assert "not in the passage" in reasons["Bob Smith | born in | Paris"]
    assert "favourite food" in reasons["Anna Berg | favourite food | fish"]
    assert "Sure! Here are the triples:" in reasons  # prose is reported, not dropped
    assert any("Anna Berg | born in |" == line for line in reasons)
    assert ex.raw == out
    # Every non-empty line is accounted for: used (the duplicate JSON line too) or rejected.
    n_lines = sum(1 for line in out.splitlines() if line.strip())
    assert len(ex.triples) + len(ex.rejected) + 1 == n_lines


def test_parse_without_passage_keeps_unchecked_subjects():
    ex = parse_triple_lines("Bob Smith | P19 | Paris\nnonsense", None)
    assert [(t.subject, t.relation) for t in ex.triples] == [("Bob Smith", "P19")]
    assert [r.line for r in ex.rejected] == ["nonsense"]


def test_pattern_extractor_reads_fact_world_sentence_forms():
    text = ("The river runs past the old mill. Kalo Holbar was born in Quenby. "
            "The job that Kalo Holbar does is that of a baker. Kalo Holbar's instrument is "
            "the harp. Lately Kalo Holbar has switched to the oboe.")
    ex = PatternExtractor()(text)
    assert {(t.subject, t.relation, t.object) for t in ex.triples} == {
        ("Kalo Holbar", "birthplace", "Quenby"), ("Kalo Holbar", "profession", "baker"),
        ("Kalo Holbar", "instrument", "harp")}
    assert {r.line for r in ex.rejected} == {"The river runs past the old mill.",
                                             "Lately Kalo Holbar has switched to the oboe."}


def test_pattern_extractor_on_shipped_passages_is_precise():
    recs = load_passages("factworld")
    scores = [extraction_scores(PatternExtractor()(r.passage).triples, r.triples) for r in recs]
    assert all(s["precision"] == 1.0 for s in scores if s["precision"] is not None)
    # Template sentences are all found; the free forms (one fact in five) are not.
    for r, s in zip(recs, scores, strict=True):  # every template sentence is found
        forms = json.loads(json.dumps([t for t in _raw(r.id)["triples"]]))
        assert s["n_correct"] >= sum(1 for t in forms if t["form"] != "free")
    recall = sum(s["recall"] for s in scores) / len(scores)
    assert 0.6 < recall < 1.0


def _raw(pid):
    from editkit.passages.evaluate import passages_path

    for line in passages_path("factworld").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["id"] == pid:
            return rec
    raise KeyError(pid)


def test_check_triple_errors_are_typed():
    t = check_triple(Triple("anna  berg", "born in", "Bergen"), PASSAGE)
    assert (t.subject, t.relation) == ("Anna Berg", "P19")  # spelled as in the passage
    with pytest.raises(InvalidTripleError, match="not in the passage"):
        check_triple(Triple("Olaf", "P19", "Bergen"), PASSAGE)
    with pytest.raises(UnknownRelationError):
        check_triple(Triple("Anna Berg", "sings with", "Bergen"), PASSAGE)
    with pytest.raises(InvalidTripleError, match="empty"):
        Triple("Anna Berg", "P19", "  ")
    with pytest.raises(InvalidTripleError, match="string"):
        Triple("Anna Berg", "P19", 3)


def test_given_extractor_reads_jsonl_with_line_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"subject": "Anna Berg", "relation": "P19", "object": "Bergen"}\n'
                    '{"subject": "Anna Berg", "relation": "P19"}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"t.jsonl:2.*lacks \['object'\]"):
        GivenExtractor(path)
    path.write_text('{"subject": "Anna Berg", "relation": "P19", "object": "Bergen"}\n{oops\n',
                    encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"t.jsonl:2: invalid JSON"):
        GivenExtractor(path)
    path.write_text('["Anna Berg", "born in", "Bergen"]\n'
                    '{"subject": "Nobody", "relation": "P19", "object": "X"}\n', encoding="utf-8")
    ex = GivenExtractor(path)(PASSAGE)
    assert [t.relation for t in ex.triples] == ["P19"]
    assert "not in the passage" in ex.rejected[0].reason
    with pytest.raises(InvalidTripleError):
        GivenExtractor(path, strict=True)(PASSAGE)


def test_extractor_registry_and_plugin(monkeypatch):
    from editkit import registry as registry_mod
    from editkit.passages import extractors as ex_mod

    with pytest.raises(UnknownExtractorError, match="pattern"):
        get_extractor("patern")

    def upper_factory(**kw):
        return lambda passage, model=None, tokenizer=None: ex_mod.Extraction(
            [Triple("Anna Berg", "P19", "Bergen")])

    eps = [_ep("upper", "editkit.extractors", upper_factory)]
    _fake_entry_points(monkeypatch, registry_mod, "editkit.extractors", eps)
    reg = registry_mod.Registry("extractor", "editkit.extractors", callable,
                                UnknownExtractorError, "")
    assert reg.get("upper")()(PASSAGE).triples[0].object == "Bergen"


def test_model_extractor_parses_generation(gpt2_and_tok):
    """The model extractor runs a model and parses whatever it says; a random tiny model says
    nothing usable, and every line of it is reported."""
    model, tok = gpt2_and_tok
    ex = get_extractor("model", max_new_tokens=12)(PASSAGE, model=model, tokenizer=tok)
    assert ex.raw is not None and ex.triples == [] or all(t.relation for t in ex.triples)
    n_lines = sum(1 for line in (ex.raw or "").splitlines() if line.strip())
    assert len(ex.rejected) + len(ex.triples) >= min(n_lines, 1) - 0
    with pytest.raises(InvalidTripleError, match="needs a model"):
        get_extractor("model")(PASSAGE)


# ------------------------------------------------------------------ incorporate
TINY_PASSAGE = "The Eiffel Tower is located in the city of Rome. LeBron James plays football."


def _ft(**kw):
    return {"num_steps": 3, **kw}


def test_incorporate_builds_requests_and_reverts_exactly(gpt2_and_tok):
    model, tok = gpt2_and_tok
    base = snapshot(model)
    triples = [Triple("Eiffel Tower", "located in", "Rome", old="Paris"),
               Triple("LeBron James", "P641", "football")]
    result = incorporate(model, tok, TINY_PASSAGE, triples, method="ft", hparams=_ft())
    assert [r.prompt for r in result.requests] == ["{} is located in the city of",
                                                  "{} plays the sport of"]
    assert result.requests[0].target_true == "Paris"
    assert result.requests[1].paraphrases == ("LeBron James professionally plays the sport of",)
    assert len(result.edits) == 2  # FT edits one request at a time
    assert not state_equal(model, base)
    result.revert()
    assert state_equal(model, base)


def test_incorporate_batch_method_is_one_edit(gpt2_and_tok, monkeypatch):
    from editkit.methods.ft import FT

    model, tok = gpt2_and_tok
    monkeypatch.setattr(FT, "sequential", False)
    result = incorporate(model, tok, TINY_PASSAGE, [Triple("Eiffel Tower", "P131", "Rome"),
                                                    Triple("LeBron James", "P641", "football")],
                         method="ft", hparams=_ft())
    assert len(result.edits) == 1 and len(result.edits[0].requests) == 2
    result.revert()


def test_incorporate_failure_leaves_model_unchanged(gpt2_and_tok, monkeypatch):
    from editkit.methods.ft import FT

    model, tok = gpt2_and_tok
    base = snapshot(model)
    calls = {"n": 0}
    original = FT.compute_update

    def second_fails(self, requests):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("diverged")
        return original(self, requests)

    monkeypatch.setattr(FT, "compute_update", second_fails)
    with pytest.raises(EditFailedError, match="unchanged"):
        incorporate(model, tok, TINY_PASSAGE, [Triple("Eiffel Tower", "P131", "Rome"),
                                               Triple("LeBron James", "P641", "football")],
                    method="ft", hparams=_ft())
    assert calls["n"] == 2 and state_equal(model, base)


BAD = [
    Bad("subject-not-in-passage",
        lambda m, t: incorporate(m, t, TINY_PASSAGE, [Triple("Big Ben", "P131", "Rome")],
                                 method="ft"),
        InvalidTripleError, ("Big Ben", "passage")),
    Bad("unknown-relation",
        lambda m, t: incorporate(m, t, TINY_PASSAGE, [Triple("Eiffel Tower", "smells of", "x")],
                                 method="ft"),
        UnknownRelationError, ("smells of", "register")),
    Bad("not-a-triple",
        lambda m, t: incorporate(m, t, TINY_PASSAGE, [("Eiffel Tower", "P131", "Rome")],
                                 method="ft"),
        InvalidTripleError, ("Triple(",)),
    Bad("empty-passage", lambda m, t: incorporate(m, t, "  ", method="ft"),
        InvalidTripleError, ("passage",)),
    Bad("nothing-extracted",
        lambda m, t: incorporate(m, t, "Nothing here.", extractor="pattern", method="ft"),
        InvalidTripleError, ("no usable triple", "Nothing here.")),
    Bad("unknown-extractor",
        lambda m, t: incorporate(m, t, TINY_PASSAGE, extractor="regexp", method="ft"),
        UnknownExtractorError, ("regexp", "pattern")),
]


@pytest.mark.parametrize("case", [b.param() for b in BAD])
def test_incorporate_refuses_bad_input(case, gpt2_and_tok):
    model, tok = gpt2_and_tok
    assert_refused(case, model, tok, models=[model])


# ------------------------------------------------------------------ data and evaluation
def test_shipped_passages_parse_and_state_new_facts():
    fw = load_passages("factworld")
    assert len(fw) >= 50
    for r in fw:
        assert 2 <= len(r.triples) <= 4 and len(r.questions) == len(r.triples)
        for t, q in zip(r.triples, r.questions, strict=True):
            assert t.subject in r.passage and t.old != t.object and q.new == t.object
    rw = load_passages("smollm2")
    assert len(rw) >= 15
    for r in rw:
        assert 2 <= len(r.triples) <= 5
        for t in r.triples:
            check_triple(t, r.passage)


def test_passage_records_errors_are_line_numbered(tmp_path):
    good = json.loads(load_passages.__globals__["passages_path"]("factworld").read_text(
        encoding="utf-8").splitlines()[0])
    bad = dict(good, questions=[dict(good["questions"][0], relation="sings")])
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"p.jsonl:2 question 1.*sings"):
        load_passages(path)
    path.write_text(json.dumps({"id": 1, "passage": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"p.jsonl:1.*lacks"):
        load_passages(path)
    with pytest.raises(DatasetFormatError, match="shipped passage set"):
        load_passages.__globals__["passages_path"]("nope")


def test_in_context_share_is_defined_carefully():
    rows = [{"a_cloze": 0.0, "b_cloze": 1.0, "c_cloze": 0.5}] * 4 + \
           [{"a_cloze": 0.0, "b_cloze": 0.5, "c_cloze": 0.5}] * 4
    s = in_context_share(rows, "cloze")
    assert s["share"] == pytest.approx(0.5 / 0.75) and s["lo"] <= s["share"] <= s["hi"]
    flat = in_context_share([{"a_cloze": 0.5, "b_cloze": 0.5, "c_cloze": 1.0}] * 3, "cloze")
    assert flat["share"] is None and "does not help" in flat["why"]
    worse = in_context_share([{"a_cloze": 0.5, "b_cloze": 0.2, "c_cloze": 1.0}] * 3, "cloze")
    assert worse["share"] is None and worse["gain"] == pytest.approx(-0.3)
    summary = summarise([{**r, "a_gen": 0.0, "b_gen": 0.0, "c_gen": 1.0} for r in rows])
    assert summary["c_cloze"]["mean"] == pytest.approx(0.5) and summary["share_gen"]["share"] \
        is None


def test_extraction_scores():
    truth = [Triple("A B", "P19", "Oslo"), Triple("A B", "P106", "chemist")]
    found = [Triple("a  b", "born in", "oslo."), Triple("A B", "P108", "Nokia")]
    s = extraction_scores(found, truth)
    assert (s["precision"], s["recall"]) == (0.5, 0.5)
    assert extraction_scores([], truth)["precision"] is None


# ------------------------------------------------------------------ command line
def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_cli_refuses_bad_options(tmp_path):
    passage = _write(tmp_path, "p.txt", "Kalo Holbar was born in Quenby.")
    triples = _write(tmp_path, "t.jsonl", '{"subject": "Kalo Holbar", "relation": "sings", '
                                          '"object": "x"}\n')
    broken = _write(tmp_path, "b.jsonl", "{oops\n")
    base = ["incorporate", "--model", "factworld"]
    assert_cli_refused([*base, "--passage", str(tmp_path / "missing.txt")], status=2,
                       mentions=["--passage", "does not exist"])
    assert_cli_refused([*base, "--passage", _write(tmp_path, "e.txt", "  \n")], status=2,
                       mentions=["empty"])
    assert_cli_refused([*base, "--passage", passage, "--extractor", "given"], status=2,
                       mentions=["--triples"])
    assert_cli_refused([*base, "--passage", passage, "--triples", broken], status=2,
                       mentions=["b.jsonl:1", "invalid JSON"])
    assert_cli_refused([*base, "--passage", passage, "--extractor", "nope"], status=2,
                       mentions=["nope", "pattern"])
    assert_cli_refused([*base, "--passage", passage, "--triples", triples, "--extractor",
                        "pattern"], status=2, mentions=["--triples"])
    assert_cli_refused([*base, "--passage", passage, "--method", "memitt"], status=2,
                       mentions=["memit"])
    assert_cli_refused([*base, "--passage", passage, "--set", '{"nope": 1}'], status=2,
                       mentions=["nope"])
    assert_cli_refused([*base, "--passage", passage, "--eval", broken], status=2,
                       mentions=["b.jsonl:1"])


def test_cli_refuses_unknown_relation_before_editing(tmp_path):
    passage = _write(tmp_path, "p.txt", "Kalo Holbar was born in Quenby.")
    triples = _write(tmp_path, "t.jsonl", '{"subject": "Kalo Holbar", "relation": "sings", '
                                          '"object": "x"}\n')
    assert_cli_refused(["incorporate", "--model", "factworld", "--passage", passage,
                        "--triples", triples, "--method", "ft"], status=2,
                       mentions=["sings"])


def test_cli_incorporates_a_fact_world_passage(tmp_path):
    from badinput import run_cli

    from editkit.testbed import FactWorld

    world = FactWorld()
    subject = world.eval_subjects[0]
    old = world.object_of(subject, "employer")
    new = "Helix" if old != "Helix" else "Zentrix"
    passage = _write(tmp_path, "p.txt", f"The river runs past the old mill. {subject} works "
                                        f"for {new}. Lately {subject} has switched to the oboe.")
    questions = _write(tmp_path, "q.jsonl", json.dumps({
        "subject": subject, "relation": "employer", "new": new, "old": old,
        "prompts": [f"{subject} works for", f"The company that employs {subject} is"]}) + "\n")
    save = tmp_path / "patch.safetensors"
    code, out, err = run_cli(["incorporate", "--model", "factworld", "--passage", passage,
                              "--method", "ft", "--save", str(save), "--eval", questions])
    assert code == 0, err
    assert f"({subject!r}, employer, {new!r})" in out
    assert "rejected 2 line(s)" in out and "switched to the oboe" in out
    assert "request: '{} works for'" in out and "after" in out
    assert "(a) unedited" in out and "passage in context" in out
    cloze = next(line for line in out.splitlines() if line.strip().startswith("cloze"))
    assert cloze.split()[1] == "0%"  # the unedited model holds the old employer
    assert save.is_file()


# ------------------------------------------------------------------ quality (fact world)
#: The setting that incorporates fact-world passages (docs/results/passages.md): ROME keyed on
#: the prompt's last token at layer 2. Keyed on the subject (the preset), every fact of one
#: subject shares one key and later edits overwrite earlier ones.
ROME_LAST = {"layer": 2, "value": {"fact_token": "last", "num_grad_steps": 20,
                                   "context_template_start": "words"}}


@pytest.mark.slow
def test_fact_world_passages_become_answerable():
    from editkit.passages.evaluate import evaluate_passages
    from editkit.testbed import load_fact_world

    torch.set_num_threads(1)
    model, tok = load_fact_world()
    base = snapshot(model)
    records = load_passages("factworld", n=12)
    rows = evaluate_passages(model, tok, records, method="rome", hparams=ROME_LAST)
    s = summarise(rows)
    assert s["a_cloze"]["mean"] <= 0.1  # the passages' facts are new to the model
    assert s["c_cloze"]["mean"] >= 0.8 and s["c_gen"]["mean"] >= 0.6
    assert s["ns_after"]["mean"] >= 0.8
    assert state_equal(model, base)  # every passage was reverted exactly
