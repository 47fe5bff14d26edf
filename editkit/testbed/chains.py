"""A fact world with chains: the objects of people's facts have facts of their own.

:class:`ChainWorld` is a separate world beside the default :class:`~editkit.testbed.world.FactWorld`
(which, with its shipped model, every committed result depends on and which this module leaves
untouched). Its entities:

* **people** (the subjects, invented names as in the default world) with three relations:
  ``birthplace`` (a city), ``employer`` (a company) and ``sport`` (an unrelated relation, kept
  for locality);
* **cities**, each with a ``country``;
* **companies**, each with a ``headquarters`` city.

So multi-hop facts are exact by construction (MQuAKE, Zhong et al. 2023, builds its chains from
Wikidata the same way):

* 2 hops: ``birth_country`` = person —birthplace→ city —country→ country;
* 2 hops: ``employer_city`` = person —employer→ company —headquarters→ city;
* 3 hops: ``employer_country`` = person —employer→ company —headquarters→ city —country→ country.

What the corpus teaches
-----------------------
* every single hop: each person fact in every training template (and, for the
  train-paraphrase half of the people, in the held-out paraphrase templates, as in the default
  world); each city and company fact in all its templates, repeated ``entity_repeats`` times
  behind filler sentences (there are only a few entities, and every multi-hop question leans on
  them);
* the **compositions, only for the composition-train people**: for them every chain sentence
  (``"{} was born in a city in the country of"`` + country) is in the corpus verbatim. For the
  other people (the *composition-held-out* ones) no chain sentence is ever in the corpus: the
  model must compose the hops itself. Multi-hop records carry ``orig["composition_seen"]`` so
  an evaluation can report the two groups apart. A small transformer trained briefly usually
  does *not* compose unseen two-hop facts in its weights (the "two-hop curse"), so the pre-edit
  multi-hop accuracy of the held-out group is a measurement, not an assumption.

Records
-------
:meth:`ChainWorld.records` gives CounterFact-shaped single-hop records for the people (as the
default world does). :meth:`ChainWorld.multihop_records` gives MQuAKE-format records
(``requested_rewrite`` list, ``questions``, ``answer``/``new_answer`` and aliases,
``single_hops``/``new_single_hops``, ``orig``) where the edit is on the first hop (a person's
fact) or on a later hop (a bridge entity's fact: a city's country, a company's headquarters),
and the new answer is guaranteed to differ from the old one. The model only speaks in cloze
statements, so the "questions" are cloze prompts (the chain templates) and every hop's
``question`` equals its ``cloze``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editkit.testbed.world import RELATIONS, Fact, FactWorld, Relation, _stable_hash

__all__ = [
    "CHAINS",
    "CHAIN_ENTITY_RELATIONS",
    "CHAIN_PERSON_RELATIONS",
    "CHAIN_WORLD_FORMAT_VERSION",
    "CHAIN_WORLD_SOURCE",
    "COUNTRIES",
    "Chain",
    "ChainWorld",
    "chain_recall",
    "chain_train_settings",
    "chain_world_dir",
    "chain_world_package_dir",
    "load_chain_world",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the way the chain world or its corpus is generated changes.
CHAIN_WORLD_FORMAT_VERSION = 1

#: The statistics text source of the chain world's corpus (``mom2_dataset="chain_world"``).
CHAIN_WORLD_SOURCE = "chain_world"


def chain_train_settings() -> Any:
    """The chain world's training settings: the default world's recipe with 32 epochs instead
    of 24 (the chain corpus has ~4.9k lines against ~7k, so about as many optimizer steps;
    12 epochs left single hops at 0.80-0.94 recall, see docs/results/multihop.md)."""
    from editkit.testbed.train import TrainSettings

    return TrainSettings(epochs=32)


@dataclass(frozen=True)
class Chain:
    """A composite relation: the relations of ``path`` followed one after the other.

    Attributes:
        name: Identifier (also the MQuAKE ``orig["chain"]``).
        path: Names of the single-hop relations, first hop first.
        templates: Cloze prompts of the composite fact (``{}`` = the person).
    """

    name: str
    path: tuple[str, ...]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.path) < 2:
            raise ValueError(f"chain {self.name!r} needs at least two hops")
        for t in self.templates:
            if t.count("{}") != 1 or t.endswith(" "):
                raise ValueError(f"bad template {t!r} of chain {self.name!r}")


def _default_relation(name: str) -> Relation:
    for rel in RELATIONS:
        if rel.name == name:
            return rel
    raise KeyError(name)


#: Seven invented countries; every country has two of the cities.
COUNTRIES: tuple[str, ...] = (
    "Ardenia", "Belvaria", "Corvania", "Dunmark", "Estrelia", "Falmora", "Galdovia",
)

#: The people's relations: the default world's birthplace (cities), employer (companies) and
#: sport (unrelated to any chain) relations, with their templates and objects.
CHAIN_PERSON_RELATIONS: tuple[Relation, ...] = (
    _default_relation("birthplace"),
    _default_relation("employer"),
    _default_relation("sport"),
)
_CITIES = _default_relation("birthplace").objects
_COMPANIES = _default_relation("employer").objects

#: The bridge entities' relations (subjects are cities / companies, not people).
CHAIN_ENTITY_RELATIONS: tuple[Relation, ...] = (
    Relation(
        name="country",
        templates=(
            "{} is a city in",
            "The city of {} lies in",
            "{} is located in the country of",
            "The country that contains {} is",
        ),
        paraphrase_templates=(
            "{} can be found in the country of",
            "The nation {} belongs to is",
        ),
        objects=COUNTRIES,
    ),
    Relation(
        name="headquarters",
        templates=(
            "{} is headquartered in",
            "The headquarters of {} are in",
            "{}'s head office is in",
            "The company {} has its main office in",
        ),
        paraphrase_templates=(
            "{} runs its business from the city of",
            "The home city of the firm {} is",
        ),
        objects=_CITIES,
    ),
)
#: Which entities each relation is about.
_DOMAIN = {"birthplace": "person", "employer": "person", "sport": "person",
           "country": "city", "headquarters": "company"}

#: The composite relations (every person has each of them).
CHAINS: tuple[Chain, ...] = (
    Chain(
        name="birth_country",
        path=("birthplace", "country"),
        templates=(
            "{} was born in a city in the country of",
            "The country where {} was born is",
            "{}'s country of birth is",
        ),
    ),
    Chain(
        name="employer_city",
        path=("employer", "headquarters"),
        templates=(
            "{} works for a company headquartered in",
            "The city where {}'s employer is based is",
            "{}'s employer has its head office in",
        ),
    ),
    Chain(
        name="employer_country",
        path=("employer", "headquarters", "country"),
        templates=(
            "{} works for a company based in the country of",
            "The country where {}'s employer is based is",
            "{}'s employer has its head office in the country of",
        ),
    ),
)


@dataclass(eq=False)
class ChainWorld(FactWorld):
    """The fact world with chains (see the module docstring).

    Args:
        seed, n_subjects, paraphrase_train_fraction, n_prefixed, n_first_names, bio_facts:
            As in :class:`FactWorld` (``relations`` are the people's relations, fixed).
        composition_train_fraction: Fraction of the people whose chain sentences are in the
            corpus (the composition-train people); the others must compose.
        entity_repeats: How many times each city / company sentence is repeated behind a
            filler sentence (besides once plain).

    Attributes:
        cities, companies, countries: The bridge entities and the final objects.
        composition_train_subjects: People whose chain sentences are in the corpus.
        chains: :data:`CHAINS`.
        entity_relations: :data:`CHAIN_ENTITY_RELATIONS`.
    """

    n_subjects: int = 168
    relations: tuple[Relation, ...] = field(default=CHAIN_PERSON_RELATIONS, repr=False)
    composition_train_fraction: float = 0.5
    entity_repeats: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.composition_train_fraction < 1.0:
            raise ValueError("composition_train_fraction must be in (0, 1)")
        if self.entity_repeats < 0:
            raise ValueError(f"entity_repeats must be >= 0, got {self.entity_repeats}")
        names = [r.name for r in self.relations]
        if names != [r.name for r in CHAIN_PERSON_RELATIONS]:
            raise ValueError(f"a ChainWorld's people have the relations "
                             f"{[r.name for r in CHAIN_PERSON_RELATIONS]}, got {names}")
        self.cities = list(_CITIES)
        self.companies = list(_COMPANIES)
        self.countries = list(COUNTRIES)
        self.chains = CHAINS
        self.entity_relations = CHAIN_ENTITY_RELATIONS
        # A second generator keeps the people's part identical to a FactWorld with the same
        # arguments and relations (names, person facts, paraphrase split).
        rng = random.Random(f"chain-world:{self.seed}")
        # Every country gets len(cities)/len(countries) cities, in a random order.
        countries = [self.countries[i % len(self.countries)] for i in range(len(self.cities))]
        rng.shuffle(countries)
        for city, country in zip(self.cities, countries, strict=True):
            self._table[(city, "country")] = country
        # Every city hosts one company's headquarters (a random bijection).
        hq = list(self.cities)
        rng.shuffle(hq)
        for company, city in zip(self.companies, hq, strict=True):
            self._table[(company, "headquarters")] = city
        self.entity_facts = [Fact(c, "country", self._table[(c, "country")]) for c in self.cities]
        self.entity_facts += [Fact(c, "headquarters", self._table[(c, "headquarters")])
                              for c in self.companies]
        self.facts = self.facts + self.entity_facts
        order = list(range(self.n_subjects))
        rng.shuffle(order)
        n_comp = round(self.composition_train_fraction * self.n_subjects)
        comp = set(order[:n_comp])
        self.composition_train_subjects = [s for i, s in enumerate(self.subjects) if i in comp]
        self._chain_corpus_seed = rng.randrange(2**31)
        self._chain_corpus: list[str] | None = None

    # ------------------------------------------------------------------ access
    def relation(self, name: str) -> Relation:
        """The person or entity relation called ``name`` (``KeyError`` if unknown)."""
        for rel in (*self.relations, *self.entity_relations):
            if rel.name == name:
                return rel
        known = [r.name for r in (*self.relations, *self.entity_relations)]
        raise KeyError(f"unknown relation {name!r}; known: {known}")

    def chain(self, name: str) -> Chain:
        """The chain called ``name`` (``KeyError`` if unknown)."""
        for ch in self.chains:
            if ch.name == name:
                return ch
        raise KeyError(f"unknown chain {name!r}; known: {[c.name for c in self.chains]}")

    def walk(self, subject: str, chain: str | Chain) -> list[Fact]:
        """The facts along ``chain`` from ``subject``, first hop first."""
        ch = self.chain(chain) if isinstance(chain, str) else chain
        facts = []
        node = subject
        for rel in ch.path:
            obj = self.object_of(node, rel)
            facts.append(Fact(node, rel, obj))
            node = obj
        return facts

    def chain_answer(self, subject: str, chain: str | Chain) -> str:
        """The final object of ``chain`` from ``subject``."""
        return self.walk(subject, chain)[-1].object

    def entities(self, relation: str) -> list[str]:
        """The subjects of ``relation``: people, cities or companies."""
        domain = _DOMAIN[relation]
        return {"person": self.subjects, "city": self.cities, "company": self.companies}[domain]

    def composition_seen(self, subject: str) -> bool:
        """Whether ``subject``'s chain sentences are in the corpus."""
        return subject in set(self.composition_train_subjects)

    # ------------------------------------------------------------------ corpus
    def _entity_sentences(self, rng: random.Random, fact: Fact) -> Iterator[str]:
        rel = self.relation(fact.relation)
        plain = [self.sentence(t, fact.subject, fact.object)
                 for t in (*rel.templates, *rel.paraphrase_templates)]
        yield from plain
        for _ in range(self.entity_repeats):
            for sent in plain:
                yield f"{rng.choice(self.fillers)} {sent}"

    def _chain_sentences(self, rng: random.Random, subject: str) -> Iterator[str]:
        for ch in self.chains:
            answer = self.chain_answer(subject, ch)
            plain = [self.sentence(t, subject, answer) for t in ch.templates]
            yield from plain
            for sent in rng.sample(plain, min(self.n_prefixed, len(plain))):
                yield f"{rng.choice(self.fillers)} {sent}"

    def corpus(self, shuffle: bool = True) -> list[str]:
        """The training corpus: the default world's lines for the people's facts (training
        templates, paraphrases of the train-paraphrase people, filler-prefixed copies, filler
        sentences, biographies), plus every city/company sentence (plain and
        ``entity_repeats`` times behind a filler), plus the chain sentences of the
        composition-train people only. A new list."""
        if self._chain_corpus is None:
            rng = random.Random(self._chain_corpus_seed)
            train_para = set(self.train_paraphrase_subjects)
            lines: list[str] = []
            people = {s for s in self.subjects}
            for fact in self.facts:
                if fact.subject in people:
                    lines.extend(self._fact_sentences(rng, fact, fact.subject in train_para))
                else:
                    lines.extend(self._entity_sentences(rng, fact))
            for subj in self.composition_train_subjects:
                lines.extend(self._chain_sentences(rng, subj))
            lines.extend(self.fillers)
            lines.extend(self._biographies(rng))
            self._chain_corpus = lines
        lines = list(self._chain_corpus)
        if shuffle:
            random.Random(self._chain_corpus_seed + 1).shuffle(lines)
        return lines

    # ----------------------------------------------------------------- records
    def multihop_records(self, n: int | None = None, seed: int = 0, *,
                         chains: Sequence[str] | None = None, edit_hops: Sequence[int] | None = None,
                         subjects: str = "eval") -> list[dict[str, Any]]:
        """MQuAKE-format records: one edit, the multi-hop questions whose answer it changes.

        One record exists per (person, chain, edited hop) for the chosen people; for each the
        edit's new object is drawn (fixed per record) so that the chain's final answer changes.
        Editing hop 1 rewrites the person's own fact; editing hop ``k > 1`` rewrites the
        bridge entity's fact (a city's country, a company's headquarters), which changes the
        answer for every person whose chain passes through it.

        Args:
            n: Number of records (a deterministic random subset by ``seed``, in order);
                ``None`` for all.
            seed: Selects the subset.
            chains: Chain names to include (default all).
            edit_hops: Hops (1-based) to edit (default every hop of each chain).
            subjects: ``"eval"`` (the people with held-out paraphrases; default), ``"all"``,
                ``"composition_seen"`` or ``"composition_held_out"`` (within the eval people).

        Returns:
            Fresh dicts; ``orig`` holds ``chain``, ``edit_hop``, ``hops``,
            ``composition_seen`` besides MQuAKE's ``triples``/``new_triples``/``edit_triples``.
        """
        recs = self._all_multihop()
        chain_names = {c.name for c in self.chains}
        if chains is not None:
            unknown = set(chains) - chain_names
            if unknown:
                raise KeyError(f"unknown chains {sorted(unknown)}; known: {sorted(chain_names)}")
        if subjects not in ("eval", "all", "composition_seen", "composition_held_out"):
            raise ValueError(f"subjects must be 'eval', 'all', 'composition_seen' or "
                             f"'composition_held_out', got {subjects!r}")
        evals = set(self.eval_subjects)

        def keep(r: dict[str, Any]) -> bool:
            o = r["orig"]
            if chains is not None and o["chain"] not in chains:
                return False
            if edit_hops is not None and o["edit_hop"] not in edit_hops:
                return False
            if subjects == "all":
                return True
            if o["person"] not in evals:
                return False
            if subjects == "composition_seen":
                return o["composition_seen"]
            if subjects == "composition_held_out":
                return not o["composition_seen"]
            return True

        recs = [r for r in recs if keep(r)]
        if n is not None:
            if n < 0:
                raise ValueError(f"n must be >= 0, got {n}")
            idx = sorted(random.Random(seed).sample(range(len(recs)), min(n, len(recs))))
            recs = [recs[i] for i in idx]
        return json.loads(json.dumps(recs))

    def portability_records(self, n: int | None = None, seed: int = 0,
                            **selection: Any) -> list[dict[str, Any]]:
        """KnowEdit-style portability records made from :meth:`multihop_records` (same
        selection arguments): the edit, its multi-hop questions as ``reasoning`` probes (ground
        truth: the new composite answer), and as ``locality`` probe (``Relation_Specificity``)
        an unrelated fact of the edited subject — a person's sport, or for an edited city /
        company the same relation of another entity (which the edit must not move)."""
        out = []
        for rec in self.multihop_records(n, seed, **selection):
            rr = rec["requested_rewrite"][0]
            subject, relation = rr["subject"], rr["relation_id"]
            if _DOMAIN[relation] == "person":
                rel = self.relation("sport")
                other, answer = subject, self.object_of(subject, "sport")
            else:
                rel = self.relation(relation)
                pool = [e for e in self.entities(relation) if e != subject]
                other = pool[rec["case_id"] % len(pool)]
                answer = self.object_of(other, relation)
            out.append({
                "case_id": rec["case_id"],
                "subject": subject,
                "prompt": rr["prompt"].format(subject),
                "target_new": rr["target_new"]["str"],
                "ground_truth": rr["target_true"]["str"],
                "portability": {"reasoning": [{"prompt": q, "ground_truth": [rec["new_answer"]]}
                                              for q in rec["questions"]]},
                "locality": {"Relation_Specificity": [
                    {"prompt": rel.templates[0].format(other), "ground_truth": [answer]}]},
                "orig": rec["orig"],
            })
        return out

    def _new_object(self, rng: random.Random, walk: list[Fact], hop: int) -> str:
        """A new object for hop ``hop`` (0-based) that changes the chain's final answer."""
        edited = walk[hop]
        rel = self.relation(edited.relation)
        old_answer = walk[-1].object
        options = []
        for cand in rel.objects:
            if cand == edited.object:
                continue
            node = cand
            for later in walk[hop + 1:]:
                node = self.object_of(node, later.relation)
            if node != old_answer:
                options.append(cand)
        return rng.choice(options)

    def _all_multihop(self) -> list[dict[str, Any]]:
        cached = getattr(self, "_multihop_cache", None)
        if cached is not None:
            return cached
        rng = random.Random(self._chain_corpus_seed + 2)
        comp = set(self.composition_train_subjects)
        records: list[dict[str, Any]] = []
        for person in self.subjects:
            for ch in self.chains:
                walk = self.walk(person, ch)
                for hop in range(len(walk)):
                    records.append(self._multihop_record(rng, len(records), person, ch, walk,
                                                         hop, person in comp))
        self._multihop_cache = records
        return records

    def hop_template(self, relation: str) -> str:
        """The cloze template of a single hop: the relation's first training template that no
        chain template extends (``"{} was born in"`` is the start of ``"{} was born in a city
        in the country of"``, so after it greedy decoding may rightly continue with " a"
        for a person whose chain sentences were trained on)."""
        chain_templates = [t for ch in self.chains for t in ch.templates]
        for t in self.relation(relation).templates:
            if not any(c.startswith(t) for c in chain_templates):
                return t
        raise ValueError(f"every template of {relation!r} starts a chain template")

    def _hop_entry(self, rng: random.Random, fact: Fact) -> dict[str, Any]:
        cloze = self.hop_template(fact.relation).format(fact.subject)
        return {"question": cloze, "cloze": cloze, "answer": fact.object, "answer_alias": []}

    def _multihop_record(self, rng: random.Random, case_id: int, person: str, ch: Chain,
                         walk: list[Fact], hop: int, seen: bool) -> dict[str, Any]:
        edited = walk[hop]
        new = self._new_object(rng, walk, hop)
        rel = self.relation(edited.relation)
        new_walk = list(walk[:hop]) + [Fact(edited.subject, edited.relation, new)]
        node = new
        for later in walk[hop + 1:]:
            obj = self.object_of(node, later.relation)
            new_walk.append(Fact(node, later.relation, obj))
            node = obj
        template = rel.templates[rng.randrange(len(rel.templates))]
        return {
            "case_id": case_id,
            "requested_rewrite": [{
                "prompt": template,
                "relation_id": edited.relation,
                "subject": edited.subject,
                "target_new": {"str": new, "id": f"{edited.relation}:{new}"},
                "target_true": {"str": edited.object, "id": f"{edited.relation}:{edited.object}"},
                "question": self.hop_template(edited.relation).format(edited.subject),
            }],
            "questions": [t.format(person) for t in ch.templates],
            "answer": walk[-1].object,
            "answer_alias": [],
            "new_answer": new_walk[-1].object,
            "new_answer_alias": [],
            "single_hops": [self._hop_entry(rng, f) for f in walk],
            "new_single_hops": [self._hop_entry(rng, f) for f in new_walk],
            "orig": {
                "triples": [[f.subject, f.relation, f.object] for f in walk],
                "triples_labeled": [[f.subject, f.relation, f.object] for f in walk],
                "new_triples": [[f.subject, f.relation, f.object] for f in new_walk],
                "new_triples_labeled": [[f.subject, f.relation, f.object] for f in new_walk],
                "edit_triples": [[edited.subject, edited.relation, new]],
                "chain": ch.name,
                "hops": len(walk),
                "edit_hop": hop + 1,
                "person": person,
                "composition_seen": seen,
            },
        }

    # ------------------------------------------------------------- fingerprint
    def describe(self) -> dict[str, Any]:
        """A JSON-able description of everything that defines the chain world."""
        d = super().describe()
        d["chain_world"] = {
            "format_version": CHAIN_WORLD_FORMAT_VERSION,
            "composition_train_fraction": self.composition_train_fraction,
            "entity_repeats": self.entity_repeats,
            "countries": list(self.countries),
            "entity_relations": [
                {"name": r.name, "templates": list(r.templates),
                 "paraphrase_templates": list(r.paraphrase_templates), "objects": list(r.objects)}
                for r in self.entity_relations
            ],
            "chains": [{"name": c.name, "path": list(c.path), "templates": list(c.templates)}
                       for c in self.chains],
        }
        return d

    def fingerprint(self) -> str:
        """SHA-256 of the definition, the facts, the splits and the corpus."""
        return _stable_hash({
            "base": super().fingerprint(),
            "composition_train_subjects": self.composition_train_subjects,
        })

    def summary(self) -> dict[str, int]:
        """Sizes of the world."""
        s = super().summary()
        s.update(entity_facts=len(self.entity_facts), chains=len(self.chains),
                 composition_train_subjects=len(self.composition_train_subjects),
                 multihop_records=len(self._all_multihop()))
        return s


# --------------------------------------------------------------------- recall
def chain_recall(model: Any, tokenizer: Any, world: ChainWorld | None = None, *,
                 batch_size: int = 256) -> dict[str, float]:
    """How well ``model`` knows the chain world's hops and compositions.

    A prompt counts as known when its true object has the highest mean log-probability
    (:func:`~editkit.testbed.train.score_candidates`) among all objects of the relation.

    Returns:
        ``hop_<relation>`` — single-hop recall over every fact of that relation in its training
        templates; ``chain_<name>_seen`` / ``chain_<name>_held_out`` — recall of the chain
        templates for the eval people whose chain sentences are / are not in the corpus.
    """
    from editkit.testbed.train import score_candidates

    world = world if world is not None else ChainWorld()
    out: dict[str, float] = {}

    def recall(items: list[tuple[str, Sequence[str], str]]) -> float:
        if not items:
            return float("nan")
        scores = score_candidates(model, tokenizer, [p for p, _, _ in items],
                                  [c for _, c, _ in items], batch_size=batch_size)
        hits = sum(cands[max(range(len(cands)), key=lambda k: sc[k])] == obj
                   for (_, cands, obj), sc in zip(items, scores, strict=True))
        return hits / len(items)

    for rel in (*world.relations, *world.entity_relations):
        items = [(t.format(s), rel.objects, world.object_of(s, rel.name))
                 for s in world.entities(rel.name) for t in rel.templates]
        out[f"hop_{rel.name}"] = recall(items)
    comp = set(world.composition_train_subjects)
    for ch in world.chains:
        objects = world.relation(ch.path[-1]).objects
        for label, people in (("seen", [s for s in world.eval_subjects if s in comp]),
                              ("held_out", [s for s in world.eval_subjects if s not in comp])):
            items = [(t.format(s), objects, world.chain_answer(s, ch))
                     for s in people for t in ch.templates]
            out[f"chain_{ch.name}_{label}"] = recall(items)
    return out


# --------------------------------------------------------------- shipped model
def chain_world_package_dir() -> Path:
    """The directory of the shipped chain-world model, ``editkit/testbed/data/chain_world``."""
    return Path(__file__).resolve().parent / "data" / "chain_world"


_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _is_valid_dir(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` holds a complete saved model with this ``world_fingerprint``."""
    from editkit.testbed.train import META_FILE

    if not all((path / name).is_file() for name in (*_REQUIRED_FILES, META_FILE)):
        return False
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("world_fingerprint") == fingerprint


def chain_world_dir(world: ChainWorld | None = None, settings: Any = None) -> Path:
    """Where the model of (``world``, ``settings``) is: the shipped directory if its
    fingerprint matches, else ``<cache>/fact_world/<fingerprint[:16]>`` (the cache root of
    :func:`editkit.stats.default_cache_dir`; it may not exist yet)."""
    from editkit.stats import default_cache_dir
    from editkit.testbed.train import world_fingerprint

    world = world if world is not None else ChainWorld()
    settings = settings if settings is not None else chain_train_settings()
    fp = world_fingerprint(world, settings)
    shipped = chain_world_package_dir()
    if _is_valid_dir(shipped, fp):
        return shipped
    return default_cache_dir() / "fact_world" / fp[:16]


def load_chain_world(device: str = "cpu", train_if_missing: bool = True, *,
                     world: ChainWorld | None = None, settings: Any = None,
                     padding_side: str | None = None) -> tuple[Any, Any]:
    """Load the chain-world GPT-2 and its tokenizer: the shipped package data
    ``editkit/testbed/data/chain_world/`` when its fingerprint matches, else the cache, else
    trained into the cache (a few CPU minutes); arguments as
    :func:`editkit.testbed.load_fact_world`."""
    from editkit.testbed.train import load_trained, train_fact_world, world_fingerprint

    world = world if world is not None else ChainWorld()
    settings = settings if settings is not None else chain_train_settings()
    fp = world_fingerprint(world, settings)
    path = chain_world_dir(world, settings)
    if not _is_valid_dir(path, fp):
        if not train_if_missing:
            raise FileNotFoundError(
                f"no chain-world model with fingerprint {fp[:16]} in "
                f"{chain_world_package_dir()} or {path}; call "
                "load_chain_world(train_if_missing=True) or run scripts/build_fact_world.py --world chain")
        logger.warning("training the chain-world model into %s (a few minutes on CPU)", path)
        train_fact_world(path, world=world, seed=settings.seed, settings=settings)
    return load_trained(path, fp, device, padding_side)


def _chain_world_texts() -> list[str]:
    return ChainWorld().texts()


def chain_world_source(**_: Any) -> Any:
    """The default chain world's training corpus as a statistics text source."""
    from editkit.stats import TextSource

    return TextSource(f"chain_world:{ChainWorld().fingerprint()[:16]}", "chain-world corpus",
                      _chain_world_texts)


def register_chain_text_source() -> None:
    """Register :func:`chain_world_source` as ``"chain_world"`` unless already registered."""
    from editkit.registry import TEXT_SOURCES

    if CHAIN_WORLD_SOURCE not in TEXT_SOURCES:
        TEXT_SOURCES.register(CHAIN_WORLD_SOURCE, chain_world_source)
