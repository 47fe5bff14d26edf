"""Build the fact-world passages shipped in ``editkit/passages/data/factworld_passages.jsonl``.

Deterministic: from the DEFAULT ``FactWorld()`` and ``random.Random(SEED)`` only. Each
passage is a short biography of one eval subject stating NEW (counterfactual) objects for
2–4 of its relations, one sentence per fact, in varied forms: one of the relation's training
templates other than the rewrite prompt, or one of its held-out paraphrase templates, or (one
fact in five) a free form that no relation template matches (so the pattern extractor's recall
is measured, not assumed); half of the passages open with one of the world's filler sentences.
Questions per fact: the rewrite prompt (the relation's first template) and a held-out
paraphrase template the passage did not use; neighbourhood prompts are other subjects whose
object is the old one. Every passage plus its longest question fits the model's 64 positions.

    PYTHONPATH=. python scripts/build_passages.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import AutoTokenizer

from editkit.passages.relations import _FACT_WORLD_QUESTIONS
from editkit.testbed import FactWorld, package_data_dir

SEED = 14
N_PASSAGES = 60
OUT = Path(__file__).resolve().parent.parent / "editkit/passages/data/factworld_passages.jsonl"

#: Sentence forms no relation template matches ({s} subject, {o} object).
FREE_FORMS = {
    "birthplace": "{o} is the town where {s} was born.",
    "profession": "After years of study, {s} became a {o}.",
    "sport": "These days the game for {s} is {o}.",
    "instrument": "Lately {s} has switched to the {o}.",
    "language": "At the market {s} now mostly speaks {o}.",
    "employer": "Last spring {s} joined {o}.",
}


def build(world: FactWorld, tok, rng: random.Random) -> list[dict]:
    subjects = rng.sample(world.eval_subjects, N_PASSAGES)
    limit = 64
    out = []
    for i, subject in enumerate(subjects):
        for _attempt in range(20):
            k = rng.choice([2, 3, 4])
            rels = rng.sample(list(world.relations), k)
            sentences, triples, questions = [], [], []
            for rel in rels:
                old = world.object_of(subject, rel)
                new = rng.choice([o for o in rel.objects if o != old])
                forms = [("template", t) for t in rel.templates[1:]] + \
                        [("paraphrase", t) for t in rel.paraphrase_templates]
                if rng.random() < 0.2:
                    kind, form = "free", FREE_FORMS[rel.name]
                    sentences.append(form.format(s=subject, o=new))
                else:
                    kind, form = rng.choice(forms)
                    sentences.append(world.sentence(form, subject, new))
                para = [t for t in rel.paraphrase_templates if t != form][0]
                neighbours = [s for s in world.subjects_with(rel.name, old) if s != subject]
                triples.append({"subject": subject, "relation": rel.name, "object": new,
                                "old": old, "form": kind})
                questions.append({
                    "subject": subject, "relation": rel.name,
                    "prompts": [rel.templates[0].format(subject), para.format(subject)],
                    "question": _FACT_WORLD_QUESTIONS[rel.name][0].format(subject),
                    "new": new, "old": old,
                    "neighborhood": [rel.templates[0].format(s) for s in
                                     rng.sample(neighbours, min(5, len(neighbours)))]})
            if rng.random() < 0.5:
                sentences.insert(0, rng.choice(world.fillers))
            passage = " ".join(sentences)
            longest = max(len(tok(passage + " " + p)["input_ids"]) for q in questions
                          for p in q["prompts"])
            if longest + 3 <= limit:
                break
        else:
            raise RuntimeError(f"no passage for {subject} fits {limit} positions")
        out.append({"id": f"fw-{i:03d}", "passage": passage, "triples": triples,
                    "questions": questions,
                    "generation_prompts": [f"{subject} is", f"{subject} was"]})
    return out


def main() -> None:
    world = FactWorld()
    tok = AutoTokenizer.from_pretrained(package_data_dir())
    records = build(world, tok, random.Random(SEED))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    n_facts = sum(len(r["triples"]) for r in records)
    print(f"wrote {len(records)} passages ({n_facts} facts) to {OUT}")


if __name__ == "__main__":
    main()
