#!/usr/bin/env python
"""Build the shipped real-fact CounterFact file for SmolLM2-135M-Instruct.

Reads the hand-written candidate facts of ``scripts/real_facts_candidates.json``
(relations with one rewrite template, paraphrase templates and ``[subject, object]``
pairs), turns every candidate into a CounterFact-format record (Meng et al. 2022,
ROME §3 / appendix on CounterFact) and keeps those the *unedited* model knows:

1. rewrite prompt: the true object's mean per-token log-prob (of ``" " + object``,
   :func:`editkit.tokens.score_targets`) ranks first among all objects of the
   relation's pool, and beats ``target_new`` by at least ``--margin`` nats;
2. at least one paraphrase prompt scores the true object above ``target_new``;
3. at least three neighbourhood prompts exist (other subjects, any relation, whose
   true object is the same string and whose own rewrite prompt the model ranks
   first), and on the majority of them the true object beats ``target_new`` — so
   neighbourhood specificity measures something on this model.

``target_new`` is a deterministic (seeded per relation and subject) other object of
the same relation's pool. Writes ``editkit/testbed/data/real_facts/counterfact.json``
and ``meta.json`` next to it.

Scoring is exact but cheap: one forward pass per unique prompt gives the first-token
log-prob of every object; a single-token object's score *is* that log-prob, and a
multi-token object's mean log-prob is at most ``first / n_tokens`` (later tokens have
log-prob <= 0), so only the objects whose bound reaches the compared score are scored
in full with :func:`~editkit.tokens.score_targets`.

Usage::

    python scripts/build_real_facts.py               # into the package data dir
    python scripts/build_real_facts.py --out DIR --threads 2 --margin 0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editkit.testbed.real_facts import interleave_relations

CANDIDATES = Path(__file__).resolve().with_name("real_facts_candidates.json")
PLACEHOLDER = "{}"
ARTICLE = "the "

logger = logging.getLogger("build_real_facts")


# ---------------------------------------------------------------- candidates
@dataclass
class Relation:
    """One relation of the candidate file: templates and its object pool."""

    relation_id: str
    name: str
    prompt: str
    paraphrases: list[str]
    generation: list[str]
    pool: list[str] = field(default_factory=list)


@dataclass
class Fact:
    """One candidate (subject, relation, object) and the prompts built for it.

    ``subject`` is the name without a leading article ("Eiffel Tower"); ``article``
    is ``"the"`` when the candidate was written "the Eiffel Tower", so templates
    read "The Eiffel Tower is located in ..." while the record's subject stays the
    name itself.
    """

    relation: Relation
    subject: str
    article: bool
    target_true: str
    target_new: str = ""
    prompt: str = ""  # rewrite template with "{}" (article included)
    paraphrases: list[str] = field(default_factory=list)
    generation: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt.replace(PLACEHOLDER, self.subject)


def with_article(template: str, article: bool) -> str:
    """``template`` with the subject's article put before ``{}`` (capitalised at the start)."""
    if not article:
        return template
    word = "The " if template.startswith(PLACEHOLDER) else "the "
    return template.replace(PLACEHOLDER, word + PLACEHOLDER, 1)


def fill(template: str, subject: str, article: bool) -> str:
    return with_article(template, article).replace(PLACEHOLDER, subject, 1)


def load_candidates(path: Path, seed: int) -> tuple[list[Relation], list[Fact]]:
    """Parse the candidate file and build every fact's prompts deterministically."""
    data = json.loads(path.read_text(encoding="utf-8"))
    fillers: list[str] = data["fillers"]
    relations: list[Relation] = []
    facts: list[Fact] = []
    for raw in data["relations"]:
        rel = Relation(raw["relation_id"], raw["name"], raw["prompt"], list(raw["paraphrases"]),
                       list(raw["generation"]))
        if rel.prompt.count(PLACEHOLDER) != 1:
            raise ValueError(f"relation {rel.relation_id}: bad prompt template {rel.prompt!r}")
        seen: set[str] = set()
        rel_facts = []
        for subject, obj in raw["facts"]:
            article = subject.startswith(ARTICLE)
            name = subject[len(ARTICLE):] if article else subject
            if name in seen:
                raise ValueError(f"relation {rel.relation_id}: subject {name!r} listed twice")
            seen.add(name)
            rel_facts.append(Fact(rel, name, article, obj))
        rel.pool = sorted({f.target_true for f in rel_facts})
        if len(rel.pool) < 2:
            raise ValueError(f"relation {rel.relation_id} needs at least two distinct objects")
        for f in rel_facts:
            rng = random.Random(f"{seed}/{rel.relation_id}/{f.subject}")
            f.target_new = rng.choice([o for o in rel.pool if o != f.target_true])
            f.prompt = with_article(rel.prompt, f.article)
            templates = rng.sample(rel.paraphrases, 2)
            paras = [fill(t, f.subject, f.article) for t in templates]
            # As in CounterFact, the second paraphrase follows an unrelated sentence.
            paras[1] = f"{rng.choice(fillers)} {paras[1]}"
            f.paraphrases = paras
            f.generation = [fill(t, f.subject, f.article) for t in rel.generation]
            f.generation.append(f"{rng.choice(fillers)} {fill('{}', f.subject, f.article)}")
        relations.append(rel)
        facts.extend(rel_facts)
    return relations, facts


# ------------------------------------------------------------------- scoring
class Scorer:
    """Exact ``score_targets`` values with first-token bounds to skip most full passes."""

    def __init__(self, model, tokenizer, objects: list[str], batch_size: int = 32) -> None:
        from editkit.tokens import prompt_target_ids

        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self._ids = prompt_target_ids
        self._target_ids: dict[tuple[str, str], list[int]] = {}
        self._first: dict[str, torch.Tensor] = {}
        self._exact: dict[tuple[str, str], float] = {}
        self._objects = objects
        first_ids = sorted({self.target_ids("X", o)[0] for o in objects})
        self._col = {t: i for i, t in enumerate(first_ids)}
        self._cols = torch.tensor(first_ids)

    def target_ids(self, prompt: str, target: str) -> list[int]:
        key = (prompt, target)
        if key not in self._target_ids:
            self._target_ids[key] = self._ids(self.tok, prompt, target)[1]
        return self._target_ids[key]

    @torch.no_grad()
    def first_token_pass(self, prompts: list[str]) -> None:
        """Next-token log-probs (restricted to the objects' first tokens) after each prompt."""
        from tqdm import tqdm

        from editkit.tokens import encode, pad_id, right_pad

        todo = sorted({p for p in prompts if p not in self._first},
                      key=lambda p: len(encode(self.tok, p)))
        decoder = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        for i in tqdm(range(0, len(todo), self.batch_size), desc="first-token pass",
                      unit="batch", file=sys.stderr):
            chunk = todo[i:i + self.batch_size]
            batch = right_pad([encode(self.tok, p) for p in chunk], pad_id(self.tok))
            hidden = decoder(**batch.model_inputs()).last_hidden_state
            last = hidden[torch.arange(len(chunk)), torch.tensor(batch.lengths) - 1]
            logp = torch.log_softmax(head(last).float(), dim=-1)[:, self._cols]
            for p, row in zip(chunk, logp, strict=True):
                self._first[p] = row.clone()

    def first(self, prompt: str, target: str) -> float:
        ids = self.target_ids(prompt, target)
        if ids[0] not in self._col:  # a boundary merge changed the first token: no bound
            return 0.0
        return float(self._first[prompt][self._col[ids[0]]])

    def upper_bound(self, prompt: str, target: str) -> float:
        """An upper bound of the mean log-prob (exact for single-token targets)."""
        key = (prompt, target)
        if key in self._exact:
            return self._exact[key]
        ids = self.target_ids(prompt, target)
        if len(ids) == 1 and ids[0] in self._col:
            return self.first(prompt, target)
        return self.first(prompt, target) / len(ids)

    def is_exact(self, prompt: str, target: str) -> bool:
        ids = self.target_ids(prompt, target)
        return (prompt, target) in self._exact or (len(ids) == 1 and ids[0] in self._col)

    def exact_many(self, pairs: list[tuple[str, str]]) -> None:
        """Score, in batches, every pair whose exact value is not known yet."""
        from tqdm import tqdm

        from editkit.tokens import score_targets

        todo = sorted({p for p in pairs if not self.is_exact(*p)},
                      key=lambda p: len(self.target_ids(*p)) + len(p[0]) / 1000)
        for i in tqdm(range(0, len(todo), self.batch_size), desc="full scoring",
                      unit="batch", file=sys.stderr, disable=not todo):
            chunk = todo[i:i + self.batch_size]
            scores = score_targets(self.model, self.tok, [p for p, _ in chunk],
                                   [t for _, t in chunk], batch_size=self.batch_size)
            for pair, s in zip(chunk, scores.tolist(), strict=True):
                self._exact[pair] = float(s)

    def exact(self, prompt: str, target: str) -> float:
        if not self.is_exact(prompt, target):
            self.exact_many([(prompt, target)])
        return self.upper_bound(prompt, target)

    def beats(self, prompt: str, winner: str, loser: str, margin: float = 0.0) -> bool:
        """``score(winner) - score(loser) >= margin`` (``winner`` must be scored exactly)."""
        return self.exact(prompt, winner) - self.upper_bound(prompt, loser) >= margin or \
            self.exact(prompt, winner) - self.exact(prompt, loser) >= margin

    def needs(self, prompt: str, winner: str, loser: str, margin: float = 0.0) -> bool:
        """Whether ``loser`` must be scored exactly to decide :meth:`beats`."""
        return (not self.is_exact(prompt, loser)
                and self.exact(prompt, winner) - self.upper_bound(prompt, loser) < margin)


# ------------------------------------------------------------------ filtering
def neighbour_order(fact: Fact, known: list[Fact], seed: int) -> list[Fact]:
    """Known facts of other subjects with the same true object: same relation first."""
    same = [g for g in known if g.target_true == fact.target_true and g.subject != fact.subject
            and fact.subject not in g.text]
    rng = random.Random(f"{seed}/neighbours/{fact.relation.relation_id}/{fact.subject}")
    rng.shuffle(same)
    same.sort(key=lambda g: g.relation.relation_id != fact.relation.relation_id)
    seen: set[str] = set()
    out = []
    for g in same:
        if g.text not in seen:
            seen.add(g.text)
            out.append(g)
    return out


def build(model, tokenizer, relations: list[Relation], facts: list[Fact], *, margin: float,
          max_neighbours: int, seed: int, batch_size: int) -> tuple[list[dict], dict]:
    """Score every candidate and return (kept CounterFact records, per-relation stats)."""
    objects = sorted({o for r in relations for o in r.pool})
    scorer = Scorer(model, tokenizer, objects, batch_size=batch_size)
    prompts = [f.text for f in facts] + [p for f in facts for p in f.paraphrases]
    scorer.first_token_pass(prompts)
    _check_against_score_targets(scorer, facts[:: max(1, len(facts) // 8)])

    # Exact scores of the true object everywhere it is compared.
    scorer.exact_many([(f.text, f.target_true) for f in facts]
                      + [(p, f.target_true) for f in facts for p in f.paraphrases])
    # Rank among the pool: a fact already beaten by an exactly known object fails; for
    # the others, only objects whose bound reaches the true score need scoring.
    beaten = {id(f) for f in facts
              if any(scorer.is_exact(f.text, o) and scorer.exact(f.text, o) >= scorer.exact(
                  f.text, f.target_true) for o in f.relation.pool if o != f.target_true)}
    scorer.exact_many([(f.text, o) for f in facts if id(f) not in beaten
                       for o in f.relation.pool
                       if o != f.target_true and scorer.needs(f.text, f.target_true, o)])
    rank_ok = {id(f): id(f) not in beaten and all(
        scorer.beats(f.text, f.target_true, o, 1e-6) for o in f.relation.pool
        if o != f.target_true) for f in facts}
    known = [f for f in facts if rank_ok[id(f)]]
    scorer.exact_many([(f.text, f.target_new) for f in known
                       if scorer.needs(f.text, f.target_true, f.target_new, margin)])

    neighbours = {id(f): neighbour_order(f, known, seed)[:max_neighbours] for f in known}
    scorer.exact_many([(p, f.target_new) for f in known for p in f.paraphrases
                       if scorer.needs(p, f.target_true, f.target_new)]
                      + [(g.text, f.target_new) for f in known for g in neighbours[id(f)]
                         if scorer.needs(g.text, f.target_true, f.target_new)])

    stats: dict[str, Counter] = defaultdict(Counter)
    records: list[dict] = []
    for f in facts:
        st = stats[f.relation.relation_id]
        st["candidates"] += 1
        if not rank_ok[id(f)]:
            st["fail_rank"] += 1
            continue
        if not scorer.beats(f.text, f.target_true, f.target_new, margin):
            st["fail_margin"] += 1
            continue
        if not any(scorer.beats(p, f.target_true, f.target_new) for p in f.paraphrases):
            st["fail_paraphrase"] += 1
            continue
        nb = neighbours[id(f)]
        if len(nb) < 3:
            st["fail_few_neighbours"] += 1
            continue
        wins = sum(scorer.beats(g.text, f.target_true, f.target_new) for g in nb)
        if 2 * wins <= len(nb):
            st["fail_neighbourhood"] += 1
            continue
        st["kept"] += 1
        attribute = [g.text for g in neighbour_order(
            Fact(f.relation, f.subject, f.article, f.target_new), known, seed)][:max_neighbours]
        records.append(_record(len(records), f, [g.text for g in nb], attribute))
    return records, {k: dict(v) for k, v in stats.items()}


def _record(case_id: int, f: Fact, neighbourhood: list[str], attribute: list[str]) -> dict:
    rid = f.relation.relation_id
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": f.prompt,
            "relation_id": rid,
            "subject": f.subject,
            "target_new": {"str": f.target_new, "id": f"{rid}:{f.target_new}"},
            "target_true": {"str": f.target_true, "id": f"{rid}:{f.target_true}"},
        },
        "paraphrase_prompts": f.paraphrases,
        "neighborhood_prompts": neighbourhood,
        "attribute_prompts": attribute,
        "generation_prompts": f.generation,
    }


def _check_against_score_targets(scorer: Scorer, facts: list[Fact]) -> None:
    """The first-token shortcut must equal ``score_targets`` on single-token targets."""
    from editkit.tokens import score_targets

    pairs = [(f.text, o) for f in facts for o in f.relation.pool[:3]
             if len(scorer.target_ids(f.text, o)) == 1]
    if not pairs:
        return
    ref = score_targets(scorer.model, scorer.tok, [p for p, _ in pairs], [t for _, t in pairs])
    fast = torch.tensor([scorer.upper_bound(p, t) for p, t in pairs])
    err = float((ref - fast).abs().max())
    if err > 1e-3:
        raise RuntimeError(f"first-token scores disagree with score_targets by {err:.2e}")
    logger.info("first-token shortcut matches score_targets on %d pairs (max err %.1e)",
                len(pairs), err)


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Filter the candidates with the model and write the records; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--candidates", type=Path, default=CANDIDATES)
    parser.add_argument("--out", type=Path, default=None,
                        help="output dir (default: editkit/testbed/data/real_facts)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--margin", type=float, default=0.5,
                        help="nats by which target_true must beat target_new on the prompt")
    parser.add_argument("--neighbours", type=int, default=6,
                        help="neighbourhood prompts per record (at most; default 6)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    from editkit.testbed.real_facts import real_facts_path
    from editkit.testbed.smollm2 import SMOLLM2_NAME, load_smollm2

    out = args.out if args.out is not None else real_facts_path().parent
    t0 = time.perf_counter()
    relations, facts = load_candidates(args.candidates, args.seed)
    model, tok = load_smollm2()
    records, stats = build(model, tok, relations, facts, margin=args.margin,
                           max_neighbours=args.neighbours, seed=args.seed,
                           batch_size=args.batch_size)
    wall = time.perf_counter() - t0

    meta = {
        "model": SMOLLM2_NAME,
        "format": "CounterFact (ROME release schema)",
        "source": "hand-written candidates, scripts/real_facts_candidates.json",
        "builder": "scripts/build_real_facts.py",
        "seed": args.seed,
        "filter": {
            "score": "mean per-token log-prob of ' ' + target after the prompt "
                     "(editkit.tokens.score_targets)",
            "rewrite_prompt": "target_true ranks first among the relation's pool and beats "
                              f"target_new by >= {args.margin} nats",
            "paraphrases": "target_true beats target_new on at least one",
            "neighbourhood": ">= 3 prompts (other subjects, same true object, rewrite prompts "
                             "the model ranks first); target_true beats target_new on a "
                             "strict majority",
            "margin": args.margin,
        },
        "n_candidates": len(facts),
        "n_records": len(records),
        "relations": {
            r.relation_id: {"name": r.name, "template": r.prompt, "pool": r.pool,
                            **{k: stats.get(r.relation_id, {}).get(k, 0)
                               for k in ("candidates", "kept")},
                            "rejected": {k: v for k, v in stats.get(r.relation_id, {}).items()
                                         if k.startswith("fail_")}}
            for r in relations
        },
    }
    records = interleave_relations(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "counterfact.json").write_text(
        json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n",
                                   encoding="utf-8")

    print(f"kept {len(records)} of {len(facts)} candidates in {wall:.0f} s -> {out}")
    for rid, info in meta["relations"].items():
        print(f"  {rid:5s} {info['name']:24s} {info['kept']:3d} / {info['candidates']:3d}  "
              f"{info['rejected']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
