"""Tests of the offline fact world (``editkit.testbed``)."""

from __future__ import annotations

import json

import pytest
import torch

from editkit.testbed import (
    FactWorld,
    TrainSettings,
    fact_recall,
    fact_world_dir,
    load_fact_world,
    package_data_dir,
    train_fact_world,
    world_fingerprint,
)
from editkit.testbed.train import META_FILE, score_candidates

COUNTERFACT_KEYS = {
    "case_id",
    "pararel_idx",
    "requested_rewrite",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "attribute_prompts",
    "generation_prompts",
}
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64, "max_steps": 3, "vocab_size": 400}


@pytest.fixture(scope="module")
def world() -> FactWorld:
    return FactWorld()


def _subject_in(world: FactWorld, prompt: str) -> str:
    found = [s for s in world.subjects if s in prompt]
    assert len(found) == 1, (prompt, found)
    return found[0]


# ----------------------------------------------------------------------- world
def test_world_is_deterministic(world: FactWorld) -> None:
    other = FactWorld()
    assert other == world
    assert other.subjects == world.subjects
    assert other.facts == world.facts
    assert other.eval_subjects == world.eval_subjects
    assert other.corpus() == world.corpus()
    assert other.records() == world.records()
    assert other.fingerprint() == world.fingerprint()


def test_other_seed_gives_other_world(world: FactWorld) -> None:
    other = FactWorld(seed=1)
    assert other != world
    assert other.subjects != world.subjects


def test_world_sizes(world: FactWorld) -> None:
    assert len(world.subjects) >= 150
    assert len(set(world.subjects)) == len(world.subjects)
    assert len(world.relations) >= 4
    for rel in world.relations:
        assert len(rel.templates) >= 4
        assert len(rel.paraphrase_templates) >= 2
        assert 10 <= len(rel.objects) <= 16
        assert not set(rel.templates) & set(rel.paraphrase_templates)
        for t in (*rel.templates, *rel.paraphrase_templates):
            assert t.count("{}") == 1 and not t.endswith(" ")
    assert len(world.facts) == len(world.subjects) * len(world.relations)
    assert set(world.eval_subjects).isdisjoint(world.train_paraphrase_subjects)
    assert len(world.eval_subjects) + len(world.train_paraphrase_subjects) == len(world.subjects)


def test_no_subject_is_a_prefix_of_another(world: FactWorld) -> None:
    for a in world.subjects:
        for b in world.subjects:
            assert a == b or not b.startswith(a)


def test_object_of_matches_facts(world: FactWorld) -> None:
    for fact in world.facts:
        assert world.object_of(fact.subject, fact.relation) == fact.object
        assert fact.object in world.relation(fact.relation).objects
    with pytest.raises(KeyError):
        world.object_of("Nobody Atall", world.relations[0].name)


def test_corpus_contains_every_training_sentence(world: FactWorld) -> None:
    corpus = world.corpus()
    assert all(line.endswith(".") for line in corpus)
    text = "\n".join(corpus)
    for fact in world.facts[:60]:
        for t in world.relation(fact.relation).templates:
            assert FactWorld.sentence(t, fact.subject, fact.object) in text
    assert any(line.startswith(f) and len(line) > len(f) for f in world.fillers for line in corpus)


def test_paraphrases_held_out_for_eval_subjects(world: FactWorld) -> None:
    text = "\n".join(world.corpus())
    for subj in world.eval_subjects:
        for rel in world.relations:
            for t in rel.paraphrase_templates:
                assert t.format(subj) not in text, t.format(subj)
    # ... but trained for the other half, so the template -> relation map is learnable.
    for subj in world.train_paraphrase_subjects[:20]:
        for rel in world.relations:
            for t in rel.paraphrase_templates:
                assert FactWorld.sentence(t, subj, world.object_of(subj, rel)) in text


# --------------------------------------------------------------------- records
def test_records_have_counterfact_shape(world: FactWorld) -> None:
    records = world.records()
    assert len(records) == len(world.eval_subjects) * len(world.relations)
    assert [r["case_id"] for r in records] == list(range(len(records)))
    eval_set = set(world.eval_subjects)
    for rec in records:
        assert set(rec) == COUNTERFACT_KEYS
        rw = rec["requested_rewrite"]
        assert set(rw) == {"prompt", "relation_id", "subject", "target_new", "target_true"}
        rel = world.relation(rw["relation_id"])
        subj = rw["subject"]
        assert subj in eval_set
        assert rw["prompt"] in rel.templates
        assert set(rw["target_new"]) == {"str", "id"} and set(rw["target_true"]) == {"str", "id"}
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        assert true == world.object_of(subj, rel) and new != true and new in rel.objects
        assert isinstance(rec["case_id"], int) and isinstance(rec["pararel_idx"], int)

        assert len(rec["paraphrase_prompts"]) == 2
        for p in rec["paraphrase_prompts"]:
            assert subj in p
            assert any(p.endswith(t.format(subj)) for t in rel.paraphrase_templates)
        assert len(rec["neighborhood_prompts"]) >= 5
        for p in rec["neighborhood_prompts"]:
            other = _subject_in(world, p)
            assert other != subj and world.object_of(other, rel) == true
            assert any(p == t.format(other) for t in rel.templates)
        assert len(rec["attribute_prompts"]) >= 5
        for p in rec["attribute_prompts"]:
            other = _subject_in(world, p)
            assert other != subj and world.object_of(other, rel) == new
        assert len(rec["generation_prompts"]) >= 2
        assert all(subj in p for p in rec["generation_prompts"])
    json.dumps(records)  # plain JSON types only


def test_records_subset_is_deterministic(world: FactWorld) -> None:
    a, b = world.records(n=7, seed=3), world.records(n=7, seed=3)
    assert a == b and len(a) == 7
    full = world.records()
    assert all(full[r["case_id"]] == r for r in a)
    assert world.records(n=7, seed=4) != a
    a[0]["requested_rewrite"]["subject"] = "mutated"
    assert world.records(n=7, seed=3) == b


# ----------------------------------------------------------------- training
def test_fingerprint_depends_on_world_and_settings(world: FactWorld) -> None:
    base = world_fingerprint(world, TrainSettings())
    assert base == world_fingerprint(FactWorld(), TrainSettings())
    assert base != world_fingerprint(world, TrainSettings(epochs=1))
    assert base != world_fingerprint(FactWorld(seed=5), TrainSettings())
    assert base == world_fingerprint(world, TrainSettings(padding_side="left"))


def test_train_tiny_writes_loadable_dir(tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    small = FactWorld(n_subjects=40, seed=3)
    out = train_fact_world(tmp_path / "fw", world=small, progress=False, **TINY)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert not list(tmp_path.glob(".fw*")), "temporary dir left behind"
    for name in ("config.json", "model.safetensors", "tokenizer.json", META_FILE):
        assert (out / name).is_file()
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    meta = json.loads((out / META_FILE).read_text())
    settings = TrainSettings(**TINY)
    assert meta["world_fingerprint"] == world_fingerprint(small, settings)
    assert meta["steps"] == 3
    assert 0.0 <= meta["metrics"]["train_template_recall"] <= 1.0

    tok = AutoTokenizer.from_pretrained(out)
    model = GPT2LMHeadModel.from_pretrained(out)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert model.config.n_layer == 1 and model.config.vocab_size == len(tok)
    assert tok.decode(tok(" Hello world")["input_ids"]) == " Hello world"

    # The cache path: missing -> error without training, trained on demand, then reused.
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError):
        load_fact_world(train_if_missing=False, world=small, settings=settings)
    model, tok = load_fact_world(world=small, settings=settings, padding_side="left")
    path = fact_world_dir(small, settings)
    assert path.parent == tmp_path / "cache" / "fact_world"
    assert (path / "model.safetensors").is_file()
    assert tok.padding_side == "left" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    before = (path / "model.safetensors").stat().st_mtime_ns
    load_fact_world(train_if_missing=False, world=small, settings=settings)
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_score_candidates_multi_token_matches_manual(tmp_path) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    out = train_fact_world(tmp_path / "fw", world=FactWorld(n_subjects=40), progress=False,
                           evaluate=False, **TINY)
    tok = AutoTokenizer.from_pretrained(out)
    model = GPT2LMHeadModel.from_pretrained(out).eval()
    prompt, cands = "Quenby is", ["baker", "Zz qq xyzzy"]
    scores = score_candidates(model, tok, [prompt, prompt], [cands, cands[:1]])
    for j, c in enumerate(cands):
        p_ids = tok(prompt)["input_ids"]
        t_ids = tok(" " + c)["input_ids"]
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0], -1)
        manual = torch.stack([logp[len(p_ids) - 1 + k, t] for k, t in enumerate(t_ids)]).mean()
        assert scores[0][j] == pytest.approx(float(manual), abs=1e-4)
    assert scores[1][0] == pytest.approx(scores[0][0], abs=1e-4)


# ------------------------------------------------------------- shipped model
def test_shipped_data_is_small_and_safe() -> None:
    shipped = package_data_dir()
    files = [p for p in shipped.rglob("*") if p.is_file()]
    assert files, f"no shipped model in {shipped}; run scripts/build_fact_world.py"
    assert sum(p.stat().st_size for p in files) < 10 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".pth", ".pickle")]
    assert fact_world_dir() == shipped, "shipped model is stale: rerun scripts/build_fact_world.py"


def test_shipped_model_knows_the_world(world: FactWorld) -> None:
    model, tok = load_fact_world(train_if_missing=False)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token == tok.eos_token
    recall = fact_recall(model, tok, world)
    assert recall["train_template_recall"] >= 0.95, recall
    assert recall["paraphrase_recall"] >= 0.8, recall
