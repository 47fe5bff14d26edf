"""The shipped real-fact CounterFact file for SmolLM2 (editkit.testbed.real_facts)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from editkit.errors import ModelUnavailableError
from editkit.eval.datasets import load_counterfact
from editkit.requests import EditRequest
from editkit.testbed.real_facts import real_facts, real_facts_meta, real_facts_path


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return real_facts()


@pytest.fixture(scope="module")
def meta() -> dict:
    return real_facts_meta()


def test_every_record_parses(records):
    requests = [EditRequest.from_counterfact(r) for r in records]
    assert len(requests) == len(records)
    assert all(r.target_true is not None for r in requests)
    # The evaluation loader accepts the file as it is shipped.
    assert len(load_counterfact(real_facts_path())) == len(records)


def test_size_and_relations(records, meta):
    relations = Counter(r["requested_rewrite"]["relation_id"] for r in records)
    assert len(records) >= 100
    assert len(relations) >= 6
    assert meta["n_records"] == len(records)
    for rid, count in relations.items():
        assert meta["relations"][rid]["kept"] == count
        assert count <= meta["relations"][rid]["candidates"]


def test_prompt_groups(records):
    for r in records:
        subject = r["requested_rewrite"]["subject"]
        assert len(r["paraphrase_prompts"]) >= 2, r["case_id"]
        assert len(r["neighborhood_prompts"]) >= 3, r["case_id"]
        assert len(r["generation_prompts"]) >= 2, r["case_id"]
        assert all(subject in p for p in r["paraphrase_prompts"]), r["case_id"]
        assert all(subject in p for p in r["generation_prompts"]), r["case_id"]
        # Neighbourhood prompts are about other subjects, and distinct.
        assert not any(subject in p for p in r["neighborhood_prompts"]), r["case_id"]
        assert len(set(r["neighborhood_prompts"])) == len(r["neighborhood_prompts"])
        assert "{}" not in " ".join(r["paraphrase_prompts"] + r["neighborhood_prompts"])


def test_targets(records, meta):
    for r in records:
        rw = r["requested_rewrite"]
        pool = meta["relations"][rw["relation_id"]]["pool"]
        assert rw["target_new"]["str"] != rw["target_true"]["str"], r["case_id"]
        assert rw["target_new"]["str"] in pool, r["case_id"]
        assert rw["target_true"]["str"] in pool, r["case_id"]


def test_unique_ids_and_subjects(records):
    ids = [r["case_id"] for r in records]
    assert len(set(ids)) == len(ids)
    by_relation: dict[str, list[str]] = defaultdict(list)
    for r in records:
        by_relation[r["requested_rewrite"]["relation_id"]].append(r["requested_rewrite"]["subject"])
    for rid, subjects in by_relation.items():
        assert len(set(subjects)) == len(subjects), rid


def test_n_and_fresh_copies():
    first = real_facts(5)
    assert len(first) == 5
    assert first == real_facts()[:5]
    first[0]["case_id"] = "changed"
    assert real_facts(1)[0]["case_id"] != "changed"
    with pytest.raises(ValueError):
        real_facts(-1)


@pytest.mark.slow
def test_model_knows_the_facts(records):
    """On a spread of records the unedited model prefers target_true to target_new."""
    from editkit.testbed import smollm2

    try:
        smollm2.gguf_path()
    except ModelUnavailableError as exc:
        pytest.skip(str(exc))
    from editkit.tokens import score_targets

    model, tok = smollm2.load_smollm2()
    sample = records[:: max(1, len(records) // 10)][:10]
    prompts = [EditRequest.from_counterfact(r).text for r in sample] * 2
    targets = ([r["requested_rewrite"]["target_true"]["str"] for r in sample]
               + [r["requested_rewrite"]["target_new"]["str"] for r in sample])
    scores = score_targets(model, tok, prompts, targets).view(2, len(sample))
    assert bool((scores[0] > scores[1]).all()), scores


def test_evaluation_harness_loads_them_by_name():
    from editkit.eval.datasets import load_counterfact
    from editkit.testbed.real_facts import real_facts

    records = load_counterfact("realfacts", n=20)
    assert len(records) == 20
    assert [r.request.subject for r in records] == [
        rec["requested_rewrite"]["subject"] for rec in real_facts(20)]


def test_shipped_records_are_interleaved_by_relation():
    from editkit.testbed.real_facts import interleave_relations, real_facts

    records = real_facts()
    assert interleave_relations(records) == records  # already in round-robin order
    relations = {r["requested_rewrite"]["relation_id"] for r in records}
    first = {r["requested_rewrite"]["relation_id"] for r in records[: len(relations)]}
    assert first == relations
    grouped = sorted(records, key=lambda r: r["requested_rewrite"]["relation_id"])
    assert [r["case_id"] for r in interleave_relations(grouped)] == list(range(len(records)))
