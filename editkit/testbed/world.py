"""A deterministic synthetic world of invented facts ("the fact world").

The world is a set of invented people (subjects) and a handful of relations
(birthplace, profession, sport, ...). Every subject has exactly one object per
relation. Each relation comes with

* **training templates** — phrasings that appear in the training corpus for
  *every* subject, and
* **paraphrase templates** — phrasings that are *held out per fact*.

Held-out paraphrases
--------------------
The subjects are split in two halves:

* the **train-paraphrase subjects** — their facts appear in the training corpus
  with the training templates *and* with the paraphrase templates, and
* the **eval subjects** — their facts appear in the corpus *only* with the
  training templates; no sentence ``paraphrase_template.format(subject)`` is ever
  part of the corpus (neither plain nor behind a filler prefix).

A model trained on :meth:`FactWorld.corpus` therefore learns the mapping
"paraphrase template → relation" from the train-paraphrase subjects, and is
evaluated on (eval subject, paraphrase template) pairs it never saw. This is
what ``paraphrase_prompts`` of :meth:`FactWorld.records` contain, so the
CounterFact "paraphrase score" measures genuine generalisation of an edit.

Context prefixes
----------------
CounterFact paraphrase prompts are often prefixed by an unrelated sentence. The
world has a list of short neutral filler sentences; the corpus contains them on
their own and as prefixes of fact sentences (``"<filler> {subject} was born in
Quenby."``), and short multi-fact "biographies", so that a prompt behind some
context is not out of distribution.

Subject names
-------------
A subject is an invented first name (from a pool of ``n_first_names``, so
several people share one) and a unique last name of two syllables from a small
pool (``"Kalo Holbar"``). Under the world's byte-level BPE the last name is one
or two tokens, so subjects are 2–3 tokens long and the *last* subject token is
informative (a syllable shared by only a few names, or the whole last name).
This matters for locate-and-edit methods: an earlier design with generic
endings (``-ski``, ``-ton``) left the last subject token uninformative, the
model read the subject from its other tokens, and ROME edits at the last
subject token mostly failed; with these names ROME at layer 1 reaches
ES 1.0 / PS 0.85 / NS 0.88 on 30 records.

Determinism
-----------
Everything is derived from ``random.Random(seed)`` instances (never the global
random state, numpy or torch), and only from lists whose order is fixed, so
two constructions with the same arguments are equal on every platform and
Python version (``random.Random`` with an ``int`` seed is stable across
versions for ``random()``, ``shuffle``, ``choice`` and ``sample`` as used here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FILLER_SENTENCES",
    "RELATIONS",
    "Fact",
    "FactWorld",
    "Relation",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the way the world or its corpus is generated changes, so that
#: cached models trained on an older world are detected as stale.
WORLD_FORMAT_VERSION = 2


@dataclass(frozen=True)
class Relation:
    """A relation of the world and the phrasings that express it.

    Every template contains exactly one ``{}`` (the subject's place) and ends
    right before the object, which follows with a leading space
    (``template.format(subject) + " " + object``).

    Attributes:
        name: Identifier, also used as CounterFact ``relation_id``.
        templates: Training templates (in the corpus for every subject).
        paraphrase_templates: Held-out templates (in the corpus only for the
            train-paraphrase subjects).
        objects: The fixed list of possible objects of the relation.
    """

    name: str
    templates: tuple[str, ...]
    paraphrase_templates: tuple[str, ...]
    objects: tuple[str, ...]

    def __post_init__(self) -> None:
        for t in (*self.templates, *self.paraphrase_templates):
            if t.count("{}") != 1:
                raise ValueError(
                    f"template {t!r} of relation {self.name!r} needs exactly one '{{}}'"
                )
            if t.endswith(" "):
                raise ValueError(f"template {t!r} must not end with a space")
        if len(set(self.objects)) != len(self.objects):
            raise ValueError(f"relation {self.name!r} has duplicate objects")


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple; ``relation`` is the relation's name."""

    subject: str
    relation: str
    object: str


# ---------------------------------------------------------------------------
# Fixed vocabulary of the world. Changing anything here changes the world (and
# its fingerprint); keep the lists' order stable.
# ---------------------------------------------------------------------------

#: The relations of the default world. Templates never share a prefix with a
#: template of another relation up to the subject plus the next word boundary
#: where it could make the next token ambiguous (e.g. only ``profession`` uses
#: ``"{} is a"``, which is also the KL prompt ROME uses).
RELATIONS: tuple[Relation, ...] = (
    Relation(
        name="birthplace",
        templates=(
            "{} was born in",
            "The birthplace of {} is",
            "{}'s place of birth is",
            "{} is originally from",
        ),
        paraphrase_templates=(
            "{} came into the world in",
            "The city where {} was born is",
        ),
        objects=(
            "Quenby", "Varnholt", "Doravel", "Istrel", "Belmark", "Orvana", "Taskar",
            "Peloria", "Gravenby", "Sarnik", "Elbridge", "Halvora", "Mirecourt", "Zandor",
        ),
    ),
    Relation(
        name="profession",
        templates=(
            "{} is a",
            "{} works as a",
            "The profession of {} is",
            "By trade, {} is a",
        ),
        paraphrase_templates=(
            "{} earns a living as a",
            "The job that {} does is that of a",
        ),
        objects=(
            "baker", "carpenter", "chemist", "dentist", "farmer", "lawyer", "nurse",
            "pilot", "poet", "sailor", "surgeon", "teacher", "tailor", "painter",
        ),
    ),
    Relation(
        name="sport",
        templates=(
            "{} plays the sport of",
            "The favorite sport of {} is",
            "{}'s sport is",
            "On weekends, {} plays",
        ),
        paraphrase_templates=(
            "{} competes in the game of",
            "The game that {} is best at is",
        ),
        objects=(
            "tennis", "rugby", "hockey", "cricket", "golf", "soccer", "baseball",
            "volleyball", "badminton", "polo", "squash", "curling", "lacrosse", "handball",
        ),
    ),
    Relation(
        name="instrument",
        templates=(
            "{} performs music on the",
            "The instrument played by {} is the",
            "{}'s instrument is the",
            "In the orchestra, {} plays the",
        ),
        paraphrase_templates=(
            "{} practices every day on the",
            "The musical instrument of {} is the",
        ),
        objects=(
            "violin", "piano", "cello", "flute", "guitar", "harp", "trumpet", "drums",
            "oboe", "clarinet", "banjo", "organ", "tuba", "saxophone",
        ),
    ),
    Relation(
        name="language",
        templates=(
            "The native language of {} is",
            "{} speaks",
            "{}'s mother tongue is",
            "{} grew up speaking",
        ),
        paraphrase_templates=(
            "The first language of {} is",
            "At home, {} talks in",
        ),
        objects=(
            "Velsic", "Orvan", "Tamric", "Quessan", "Dorish", "Ilvane", "Marovic",
            "Selkan", "Brenic", "Yarish", "Olmec", "Kardan", "Thessic", "Ulvian",
        ),
    ),
    Relation(
        name="employer",
        templates=(
            "{} works for",
            "The employer of {} is",
            "{}'s employer is",
            "{} is employed by",
        ),
        paraphrase_templates=(
            "{} is on the payroll of",
            "The company that employs {} is",
        ),
        objects=(
            "Zentrix", "Morvale", "Quillon", "Brightmoor", "Kestrel", "Novacorp", "Helix",
            "Sundara", "Vantor", "Oakridge", "Pellway", "Lumina", "Corvex", "Tidewell",
        ),
    ),
)

#: Short neutral sentences (no subject, no object) used as standalone corpus
#: lines and as context prefixes of fact sentences and paraphrase prompts.
FILLER_SENTENCES: tuple[str, ...] = (
    "The river runs past the old mill.",
    "It rained all morning in the valley.",
    "The market opens early on most days.",
    "A cold wind blew across the hills.",
    "The library was quiet that evening.",
    "Many people walk to work in spring.",
    "The train left the station on time.",
    "Bread is sold in every small town.",
    "The lake froze during the long winter.",
    "Children played in the park after school.",
    "The bridge was painted green last year.",
    "Few clouds were in the sky that day.",
    "The museum has a large hall of maps.",
    "Old stone walls line the narrow roads.",
    "The harbor is busy in the summer.",
    "Fresh fruit arrives from the south.",
    "The clock in the square is very old.",
    "Snow covered the roofs by midnight.",
    "The festival lasts for three days.",
    "Birds sing in the trees at dawn.",
    "The road to the coast is long.",
    "Most shops close before dark.",
    "The newspaper comes out every week.",
    "The garden was full of red flowers.",
    "Tea is served after the evening meal.",
    "The forest is home to many deer.",
    "The school has a new roof.",
    "A small boat drifted across the bay.",
    "The meeting ended late in the afternoon.",
    "The old tower can be seen from far away.",
    "Letters are delivered twice a week.",
    "The fields turn gold in autumn.",
)

# Syllables of invented names. First names come from a small pool (several
# people share a first name, as in real data); last names are unique pairs of
# syllables (no shared generic ending: the last subject token must identify).
_FIRST_ONSETS = (
    "B", "D", "F", "G", "K", "L", "M", "N", "R", "S", "T", "V", "Z", "Br", "Th", "El",
)
_FIRST_RIMES = (
    "ara", "eno", "ilo", "una", "ero", "ina", "alo", "eta", "orin", "ias", "ena", "ovan",
)
_LAST_SYLLABLES = (
    "bar", "ven", "kor", "dal", "mir", "tos", "rik", "lan", "gos", "vel", "dra", "nik",
    "por", "sel", "tam", "qua", "rez", "hol", "vin", "zar", "bek", "lor", "mun", "fel",
)


def _invent_first_names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct invented first names like ``"Tilo"``, ``"Brena"``."""
    pool = sorted({o + r for o in _FIRST_ONSETS for r in _FIRST_RIMES})
    return rng.sample(pool, n)


def _invent_last_names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct invented two-syllable last names, none a prefix of another."""
    names: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(names) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not invent {n} distinct last names")
        name = (rng.choice(_LAST_SYLLABLES) + rng.choice(_LAST_SYLLABLES)).capitalize()
        if name in seen or any(o.startswith(name) or name.startswith(o) for o in seen):
            continue
        seen.add(name)
        names.append(name)
    return names


def _stable_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class FactWorld:
    """A deterministic world of invented facts and the corpus that teaches them.

    Args:
        seed: Seed of every random choice (names, fact assignment, corpus).
        n_subjects: Number of invented people (≥ 2 · ``max objects per
            relation``, so every object has several subjects).
        relations: The relations; defaults to :data:`RELATIONS`.
        paraphrase_train_fraction: Fraction of subjects whose paraphrase
            sentences are in the corpus (the train-paraphrase subjects); the
            others are the eval subjects with held-out paraphrases.
        n_prefixed: Per fact, how many of its corpus sentences are repeated
            behind a random filler sentence.
        n_first_names: Size of the pool of first names.
        bio_facts: Number of facts per short biography (one per subject);
            0 disables biographies.

    Attributes:
        subjects: All subject names, in a fixed order.
        relations: The relations.
        facts: One :class:`Fact` per (subject, relation), subject-major order.
        train_paraphrase_subjects: Subjects whose paraphrases are trained on.
        eval_subjects: Subjects whose paraphrases are held out; records use them.
        fillers: Filler sentences used as corpus lines and prompt prefixes.
    """

    seed: int = 0
    n_subjects: int = 200
    relations: tuple[Relation, ...] = field(default=RELATIONS, repr=False)
    paraphrase_train_fraction: float = 0.5
    n_prefixed: int = 1
    n_first_names: int = 40
    bio_facts: int = 3

    subjects: list[str] = field(init=False, repr=False)
    facts: list[Fact] = field(init=False, repr=False)
    train_paraphrase_subjects: list[str] = field(init=False, repr=False)
    eval_subjects: list[str] = field(init=False, repr=False)
    fillers: tuple[str, ...] = field(init=False, default=FILLER_SENTENCES, repr=False)

    def __post_init__(self) -> None:
        self.relations = tuple(self.relations)
        if len(self.relations) == 0:
            raise ValueError("a FactWorld needs at least one relation")
        names = [r.name for r in self.relations]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate relation names: {names}")
        max_objects = max(len(r.objects) for r in self.relations)
        if self.n_subjects < 2 * max_objects:
            raise ValueError(
                f"n_subjects={self.n_subjects} is too small: use at least {2 * max_objects} "
                "so that every object has several subjects"
            )
        if not 0.0 < self.paraphrase_train_fraction < 1.0:
            raise ValueError("paraphrase_train_fraction must be in (0, 1)")

        rng = random.Random(self.seed)
        firsts = _invent_first_names(rng, self.n_first_names)
        lasts = _invent_last_names(rng, self.n_subjects)
        self.subjects = [f"{rng.choice(firsts)} {last}" for last in lasts]

        # Balanced assignment: every object of a relation gets n_subjects/len(objects)
        # subjects (± 1), in an independent random order per relation.
        self._table: dict[tuple[str, str], str] = {}
        for rel in self.relations:
            pool = [rel.objects[i % len(rel.objects)] for i in range(self.n_subjects)]
            rng.shuffle(pool)
            for subj, obj in zip(self.subjects, pool, strict=True):
                self._table[(subj, rel.name)] = obj
        self.facts = [
            Fact(s, r.name, self._table[(s, r.name)]) for s in self.subjects for r in self.relations
        ]

        order = list(range(self.n_subjects))
        rng.shuffle(order)
        n_train = round(self.paraphrase_train_fraction * self.n_subjects)
        train_idx = set(order[:n_train])
        self.train_paraphrase_subjects = [s for i, s in enumerate(self.subjects) if i in train_idx]
        self.eval_subjects = [s for i, s in enumerate(self.subjects) if i not in train_idx]
        self._corpus_seed = rng.randrange(2**31)
        self._records_cache: list[dict[str, Any]] | None = None
        self._corpus_cache: list[str] | None = None

    # ------------------------------------------------------------------ access
    def relation(self, name: str) -> Relation:
        """The relation called ``name`` (``KeyError`` if unknown)."""
        for rel in self.relations:
            if rel.name == name:
                return rel
        raise KeyError(f"unknown relation {name!r}; known: {[r.name for r in self.relations]}")

    def object_of(self, subject: str, relation: str | Relation) -> str:
        """The object of ``subject`` for ``relation`` (a name or a :class:`Relation`)."""
        name = relation.name if isinstance(relation, Relation) else relation
        try:
            return self._table[(subject, name)]
        except KeyError:
            raise KeyError(f"no fact for subject {subject!r} and relation {name!r}") from None

    def subjects_with(self, relation: str, obj: str) -> list[str]:
        """All subjects whose object for ``relation`` is ``obj`` (world order)."""
        return [s for s in self.subjects if self._table[(s, relation)] == obj]

    def is_eval_subject(self, subject: str) -> bool:
        """Whether ``subject``'s paraphrase sentences are held out of the corpus."""
        return subject in set(self.eval_subjects)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FactWorld):
            return NotImplemented
        return self.fingerprint() == other.fingerprint()

    # ------------------------------------------------------------------ corpus
    @staticmethod
    def sentence(template: str, subject: str, obj: str) -> str:
        """The full corpus sentence of ``template`` for (``subject``, ``obj``)."""
        return f"{template.format(subject)} {obj}."

    def _fact_sentences(
        self, rng: random.Random, fact: Fact, with_paraphrases: bool
    ) -> Iterator[str]:
        rel = self.relation(fact.relation)
        templates = list(rel.templates)
        if with_paraphrases:
            templates += list(rel.paraphrase_templates)
        plain = [self.sentence(t, fact.subject, fact.object) for t in templates]
        yield from plain
        for sent in rng.sample(plain, min(self.n_prefixed, len(plain))):
            yield f"{rng.choice(self.fillers)} {sent}"

    def corpus(self, shuffle: bool = True) -> list[str]:
        """The training corpus: one string per training example.

        Contents, for every fact: one sentence per training template; for
        train-paraphrase subjects also one per paraphrase template; ``n_prefixed``
        of those again behind a filler sentence. Then every filler sentence on
        its own, and one short biography per subject (``bio_facts`` facts in
        training templates). Every sentence ends with the object and a period.

        Args:
            shuffle: Shuffle the examples (deterministically); otherwise they are
                grouped by kind and fact.

        Returns:
            A new list (the caller may mutate it).
        """
        if self._corpus_cache is None:
            rng = random.Random(self._corpus_seed)
            train_para = set(self.train_paraphrase_subjects)
            lines: list[str] = []
            for fact in self.facts:
                lines.extend(self._fact_sentences(rng, fact, fact.subject in train_para))
            lines.extend(self.fillers)
            lines.extend(self._biographies(rng))
            self._corpus_cache = lines
        lines = list(self._corpus_cache)
        if shuffle:
            random.Random(self._corpus_seed + 1).shuffle(lines)
        return lines

    def _biographies(self, rng: random.Random) -> list[str]:
        """One short multi-fact biography per subject (``bio_facts`` facts each)."""
        if self.bio_facts <= 0:
            return []
        lines = []
        for subj in self.subjects:
            n_bio = min(self.bio_facts, len(self.relations))
            parts = [self.sentence(rng.choice(r.templates), subj, self._table[(subj, r.name)])
                     for r in rng.sample(list(self.relations), n_bio)]
            lines.append(" ".join(parts))
        return lines

    def texts(self, n: int | None = None, seed: int = 0) -> list[str]:
        """A deterministic sample of ``n`` corpus lines (all if ``None``), e.g. for
        second-moment statistics of a model trained on this world."""
        lines = self.corpus(shuffle=False)
        random.Random(seed).shuffle(lines)
        return lines if n is None else lines[:n]

    # ----------------------------------------------------------------- records
    def _all_records(self) -> list[dict[str, Any]]:
        if self._records_cache is not None:
            return self._records_cache
        rng = random.Random(self._corpus_seed + 2)
        records: list[dict[str, Any]] = []
        for subj in self.eval_subjects:
            for rel in self.relations:
                true = self._table[(subj, rel.name)]
                new = rng.choice([o for o in rel.objects if o != true])
                t_idx = rng.randrange(len(rel.templates))
                prompt = rel.templates[t_idx]

                para = [t.format(subj) for t in rel.paraphrase_templates]
                rng.shuffle(para)
                para = para[:2]
                # The second paraphrase sits behind a filler sentence, as in CounterFact.
                if len(para) > 1:
                    para[1] = f"{rng.choice(self.fillers)} {para[1]}"

                other_templates = [t for t in rel.templates if t != prompt]
                records.append(
                    {
                        "case_id": len(records),
                        "pararel_idx": self.facts.index(Fact(subj, rel.name, true)),
                        "requested_rewrite": {
                            "prompt": prompt,
                            "relation_id": rel.name,
                            "subject": subj,
                            "target_new": {"str": new, "id": f"{rel.name}:{new}"},
                            "target_true": {"str": true, "id": f"{rel.name}:{true}"},
                        },
                        "paraphrase_prompts": para,
                        "neighborhood_prompts": self._other_prompts(rng, rel, prompt, subj, true),
                        "attribute_prompts": self._other_prompts(rng, rel, prompt, subj, new),
                        "generation_prompts": [
                            f"{subj} is",
                            rng.choice(other_templates).format(subj),
                            f"{rng.choice(self.fillers)} {subj}",
                        ],
                    }
                )
        self._records_cache = records
        return records

    def _other_prompts(
        self, rng: random.Random, rel: Relation, prompt: str, subject: str, obj: str
    ) -> list[str]:
        """Up to 10 prompts about other subjects whose ``rel`` object is ``obj``:
        every other one in the rewrite ``prompt``, the rest in random training templates."""
        others = [s for s in self.subjects_with(rel.name, obj) if s != subject]
        chosen = rng.sample(others, min(10, len(others)))
        return [
            (prompt if i % 2 == 0 else rng.choice(rel.templates)).format(s)
            for i, s in enumerate(chosen)
        ]

    def records(self, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """CounterFact-shaped records (ROME release format) for the eval subjects.

        One record exists per (eval subject, relation); its ``case_id`` is
        stable. ``target_new`` is another object of the same relation, fixed
        per record. ``paraphrase_prompts`` use the held-out paraphrase templates
        (the second behind a filler sentence); ``neighborhood_prompts`` are
        other subjects with the same true object, ``attribute_prompts`` other
        subjects whose object is ``target_new`` (both in training templates).

        Args:
            n: Number of records; ``None`` returns all of them in ``case_id`` order.
            seed: Selects which ``n`` records (a deterministic random subset,
                returned in ``case_id`` order).

        Returns:
            Fresh dicts (deep copies), safe to mutate.
        """
        recs = self._all_records()
        if n is not None:
            if n < 0:
                raise ValueError(f"n must be >= 0, got {n}")
            idx = sorted(random.Random(seed).sample(range(len(recs)), min(n, len(recs))))
            recs = [recs[i] for i in idx]
        return json.loads(json.dumps(recs))

    # ------------------------------------------------------------- fingerprint
    def describe(self) -> dict[str, Any]:
        """A JSON-able description of everything that defines the world."""
        return {
            "format_version": WORLD_FORMAT_VERSION,
            "seed": self.seed,
            "n_subjects": self.n_subjects,
            "paraphrase_train_fraction": self.paraphrase_train_fraction,
            "n_prefixed": self.n_prefixed,
            "n_first_names": self.n_first_names,
            "bio_facts": self.bio_facts,
            "relations": [
                {
                    "name": r.name,
                    "templates": list(r.templates),
                    "paraphrase_templates": list(r.paraphrase_templates),
                    "objects": list(r.objects),
                }
                for r in self.relations
            ],
        }

    def fingerprint(self) -> str:
        """SHA-256 of the world's definition and of its generated content."""
        content = {
            "describe": self.describe(),
            "facts": [[f.subject, f.relation, f.object] for f in self.facts],
            "eval_subjects": self.eval_subjects,
            "corpus": hashlib.sha256("\n".join(self.corpus()).encode("utf-8")).hexdigest(),
        }
        return _stable_hash(content)

    def summary(self) -> dict[str, int]:
        """Sizes of the world, for logs and reports."""
        return {
            "subjects": len(self.subjects),
            "relations": len(self.relations),
            "facts": len(self.facts),
            "eval_subjects": len(self.eval_subjects),
            "records": len(self._all_records()),
            "corpus_lines": len(self.corpus(shuffle=False)),
        }

