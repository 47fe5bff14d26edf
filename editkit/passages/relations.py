"""The relation registry: what a (subject, relation, object) triple's relation *says*.

A :class:`RelationSpec` maps one relation to the cloze prompts that ask for its object
(``"{} was born in"``, the first is the prompt an edit rewrites, the rest are paraphrase
questions) and to natural-language questions (``"Where was {} born?"``). Relations are
named by a Wikidata-style property id (``P19``) or by their own name (the fact world's
``birthplace``), and looked up by any of their plain-phrase aliases too (``"born in"``,
``"place of birth"``): :func:`get_relation` normalises case, spacing, punctuation and a
leading article before matching.

Built-in relations (a set of Wikidata properties common in CounterFact/zsRE and the fact
world's six relations) are registered in code; third parties add theirs through the entry-point
group ``editkit.relations`` (the value: a :class:`RelationSpec`, a sequence of them, or a
callable returning either) or :func:`register_relation` at run time. An id is never shadowed by
another relation's alias, and an alias claimed by two relations is refused when it is looked
up (the error lists both), so a phrase never silently picks one.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from editkit.errors import EditkitError

__all__ = [
    "RELATIONS_GROUP",
    "RelationSpec",
    "UnknownRelationError",
    "get_relation",
    "list_relations",
    "normalise_phrase",
    "register_relation",
]

#: The entry-point group third-party relations are registered in.
RELATIONS_GROUP = "editkit.relations"


class UnknownRelationError(EditkitError, KeyError):
    """No relation is registered under an id or phrase (or a phrase names two relations)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def normalise_phrase(text: str) -> str:
    """Lower case, ``_``/``-`` as spaces, punctuation and a leading article dropped,
    whitespace collapsed: ``"The Place-of-Birth:"`` → ``"place of birth"``."""
    text = re.sub(r"[_\-]+", " ", str(text).lower())
    text = re.sub(r"[^\w\s']", " ", text)
    text = re.sub(r"^(the|a|an|is|has|its|their)\s+", "", " ".join(text.split()))
    return " ".join(text.split())


def _check_templates(rid: str, kind: str, templates: Sequence[str]) -> tuple[str, ...]:
    out = tuple(templates)
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"relation {rid!r}: {kind} template {t!r} needs exactly one '{{}}' "
                             "(the subject's place)")
        if kind == "prompt" and t.endswith(" "):
            raise ValueError(f"relation {rid!r}: cloze prompt {t!r} must not end with a space "
                             "(the object follows with its own leading space)")
    return out


@dataclass(frozen=True)
class RelationSpec:
    """One relation: its id, a label, cloze prompts, questions and alias phrases.

    Attributes:
        id: The registry key (``"P19"``, ``"birthplace"``).
        label: A short human name (``"place of birth"``); also an alias.
        prompts: Cloze templates with one ``{}`` ending right before the object. The first
            is the prompt an edit rewrites; the others are paraphrases to evaluate with.
        questions: Natural questions with one ``{}`` (``"Where was {} born?"``).
        aliases: Further phrases naming the relation (``"born in"``, ``"birthplace"``).
    """

    id: str
    label: str
    prompts: tuple[str, ...]
    questions: tuple[str, ...] = ()
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ValueError(f"a relation needs a non-empty string id, got {self.id!r}")
        if not self.prompts:
            raise ValueError(f"relation {self.id!r} needs at least one cloze prompt")
        object.__setattr__(self, "prompts", _check_templates(self.id, "prompt", self.prompts))
        object.__setattr__(self, "questions",
                           _check_templates(self.id, "question", self.questions))
        object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def prompt(self) -> str:
        """The cloze prompt an edit of this relation rewrites."""
        return self.prompts[0]

    def phrases(self) -> set[str]:
        """Every normalised phrase that names this relation (label and aliases)."""
        return {normalise_phrase(p) for p in (self.label, *self.aliases)} - {""}


# --------------------------------------------------------------------- built-ins
def _wikidata() -> list[RelationSpec]:
    """Wikidata properties frequent in CounterFact and zsRE, with cloze prompts in the
    style of CounterFact's (ROME's released) templates."""
    R = RelationSpec
    return [
        R("P19", "place of birth", ("{} was born in the city of", "{} was born in",
                                    "{} is originally from", "The birthplace of {} is"),
          ("Where was {} born?",), ("born in", "birth place", "was born in", "hometown")),
        R("P20", "place of death", ("{} died in", "{} passed away in"),
          ("Where did {} die?",), ("died in", "death place")),
        R("P27", "country of citizenship", ("{} is from the country of", "{} is a citizen of",
                                            "{} holds a citizenship of"),
          ("Which country is {} a citizen of?",), ("citizenship", "citizen of", "nationality")),
        R("P106", "occupation", ("{} worked as a", "{} works as a", "The occupation of {} is"),
          ("What is {}'s occupation?",), ("profession", "job", "works as", "works as a")),
        R("P36", "capital", ("The capital of {} is", "{}'s capital city is",
                             "The capital city of {} is"),
          ("What is the capital of {}?",), ("capital city", "capital is", "has capital")),
        R("P159", "headquarters location", ("The headquarters of {} are in",
                                            "{} is headquartered in", "{}'s headquarters are in"),
          ("Where is {} headquartered?",),
          ("headquarters", "headquartered in", "based in", "head office")),
        R("P17", "country", ("{} is located in the country of", "{}, which is located in"),
          ("Which country is {} in?",), ("located in country", "in country")),
        R("P37", "official language", ("The official language of {} is",
                                       "In {}, the official language is"),
          ("What is the official language of {}?",), ("language of", "official language is")),
        R("P103", "native language", ("The mother tongue of {} is", "{} natively speaks"),
          ("What is {}'s native language?",), ("mother tongue", "first language", "speaks")),
        R("P641", "sport", ("{} plays the sport of", "{} professionally plays the sport of"),
          ("Which sport does {} play?",), ("plays sport", "plays the sport", "plays")),
        R("P1303", "instrument", ("{} plays the instrument", "{} is known for playing the"),
          ("Which instrument does {} play?",), ("plays instrument", "musical instrument")),
        R("P108", "employer", ("{} works for", "{} is employed by", "The employer of {} is"),
          ("Who employs {}?",), ("works for", "employed by", "company")),
        R("P131", "located in the administrative territorial entity",
          ("{} is located in the city of", "{} is located in", "{} can be found in"),
          ("Where is {} located?",), ("located in", "location", "is in", "city")),
        R("P140", "religion", ("{} is affiliated with the religion of", "The religion of {} is"),
          ("What is {}'s religion?",), ("religion is", "faith", "religious affiliation")),
        R("P30", "continent", ("{} is located on the continent of", "{} belongs to the continent of"),
          ("Which continent is {} on?",), ("on continent",)),
        R("P178", "developer", ("{} is made by", "{} is developed by", "The maker of {} is"),
          ("Which company makes {}?",), ("developer", "developed by", "made by", "maker")),
        R("P38", "currency", ("The official currency of {} is the", "The currency of {} is the"),
          ("What is the currency of {}?",), ("official currency", "money")),
        R("P176", "manufacturer", ("{} is produced by", "{} is made by", "The manufacturer of {} is"),
          ("Who manufactures {}?",), ("produced by", "manufactured by")),
        R("P127", "owned by", ("{} is owned by", "The owner of {} is"),
          ("Who owns {}?",), ("owner", "owns")),
        R("P449", "original broadcaster", ("{} premiered on", "{} was originally aired on"),
          ("Which network first aired {}?",), ("broadcaster", "network", "aired on")),
        R("P495", "country of origin", ("{} originated in the country of", "{} originated in",
                                      "{} was first made in"),
          ("Where does {} come from?",), ("origin", "originated in", "from country")),
        R("P413", "position played", ("{} plays in the position of", "{}'s position is"),
          ("Which position does {} play?",), ("position", "plays as")),
        R("P54", "member of sports team", ("{} plays for", "{} is a player of"),
          ("Which team does {} play for?",), ("team", "plays for", "club")),
        R("P169", "chief executive officer", ("The CEO of {} is", "{} is led by its CEO"),
          ("Who is the CEO of {}?",), ("ceo", "chief executive", "led by")),
        R("P6", "head of government", ("The mayor of {} is", "The head of government of {} is"),
          ("Who is the mayor of {}?",), ("mayor", "head of government is")),
        R("P35", "head of state", ("The head of state of {} is", "{}'s head of state is"),
          ("Who is the head of state of {}?",), ("president", "monarch")),
        R("P50", "author", ("{} was written by", "The author of {} is"),
          ("Who wrote {}?",), ("written by", "writer")),
        R("P57", "director", ("{} was directed by", "The director of {} is"),
          ("Who directed {}?",), ("directed by",)),
        R("P112", "founded by", ("{} was founded by", "The founder of {} is"),
          ("Who founded {}?",), ("founder", "founded")),
        R("P264", "record label", ("{} is signed to the record label", "{}'s record label is"),
          ("Which label is {} signed to?",), ("label", "signed to")),
        R("P740", "location of formation", ("{} was formed in", "{} was founded in the city of"),
          ("Where was {} formed?",), ("formed in", "founded in")),
    ]


#: The fact world's relations and their ids: its own names, with the world's training
#: templates then its held-out paraphrase templates as cloze prompts.
_FACT_WORLD_QUESTIONS = {
    "birthplace": ("Where was {} born?",), "profession": ("What does {} do for a living?",),
    "sport": ("Which sport does {} play?",), "instrument": ("Which instrument does {} play?",),
    "language": ("What is the native language of {}?",),
    "employer": ("Which company does {} work for?",),
}
_FACT_WORLD_ALIASES = {
    "sport": ("favorite sport",), "instrument": ("instrument played",),
    "language": ("mother tongue of",), "employer": ("employer of",),
}


def fact_world_relations() -> list[RelationSpec]:
    """The default fact world's relations (``editkit.testbed.RELATIONS``) as specs."""
    from editkit.testbed.world import RELATIONS

    return [RelationSpec(r.name, r.name, (*r.templates, *r.paraphrase_templates),
                         _FACT_WORLD_QUESTIONS.get(r.name, ()),
                         _FACT_WORLD_ALIASES.get(r.name, ()))
            for r in RELATIONS]


# ---------------------------------------------------------------------- registry
class _RelationRegistry:
    """Ids → specs, and normalised phrases → ids; built-ins first, then entry points."""

    def __init__(self, group: str = RELATIONS_GROUP) -> None:
        self.group = group
        self._specs: dict[str, RelationSpec] = {}
        self._builtin: set[str] = set()
        self._discovered = False

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for spec in (*_wikidata(), *fact_world_relations()):
            self._specs[spec.id] = spec
            self._builtin.add(spec.id)
        for ep in entry_points(group=self.group):
            origin = ep.dist.name if getattr(ep, "dist", None) else "?"
            try:
                specs = _as_specs(ep.load())
            except Exception as exc:  # a broken plugin is skipped, loudly
                warnings.warn(f"relation plugin {ep.name!r} from {origin!r} is skipped: it "
                              f"failed to load ({type(exc).__name__}: {exc})", stacklevel=3)
                continue
            for spec in specs:
                if spec.id in self._specs:
                    warnings.warn(f"relation {spec.id!r} from plugin {origin!r} is ignored: the "
                                  "id is already registered; choose another id", stacklevel=3)
                    continue
                self._specs[spec.id] = spec

    def register(self, spec: RelationSpec, *, override: bool = False) -> None:
        self._discover()
        if not isinstance(spec, RelationSpec):
            raise TypeError(f"register a RelationSpec, got {type(spec).__name__}")
        if spec.id in self._specs and not override:
            raise ValueError(f"relation {spec.id!r} is already registered; pass override=True "
                             "to replace it")
        if spec.id in self._builtin and override:
            warnings.warn(f"overriding built-in relation {spec.id!r}", stacklevel=3)
        self._specs[spec.id] = spec

    def ids(self) -> list[str]:
        self._discover()
        return sorted(self._specs)

    def get(self, name: str) -> RelationSpec:
        self._discover()
        if not isinstance(name, str) or not name.strip():
            raise UnknownRelationError(f"relation {name!r} is not a relation id or phrase; name "
                                       "one, e.g. 'P19' or 'born in'")
        if name in self._specs:
            return self._specs[name]
        by_upper = {i.upper(): i for i in self._specs}
        if name.strip().upper() in by_upper:
            return self._specs[by_upper[name.strip().upper()]]
        phrase = normalise_phrase(name)
        ids = {i for i in self._specs if normalise_phrase(i) == phrase}
        if not ids:
            ids = {i for i, s in self._specs.items() if phrase in s.phrases()}
        if len(ids) == 1:
            return self._specs[ids.pop()]
        if len(ids) > 1:
            raise UnknownRelationError(
                f"relation phrase {name!r} names several relations ({sorted(ids)}); use one "
                "of their ids")
        import difflib

        phrases = sorted({p for s in self._specs.values() for p in s.phrases()} | set(self._specs))
        close = difflib.get_close_matches(phrase, phrases, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise UnknownRelationError(
            f"unknown relation {name!r}.{hint} Known ids: {', '.join(self.ids())}. Register a "
            f"new one with editkit.passages.register_relation(RelationSpec(...)) or an entry "
            f"point in group {self.group!r}")


def _as_specs(obj: Any) -> list[RelationSpec]:
    if callable(obj) and not isinstance(obj, RelationSpec):
        obj = obj()
    items = [obj] if isinstance(obj, RelationSpec) else list(obj)
    bad = [x for x in items if not isinstance(x, RelationSpec)]
    if bad:
        raise TypeError(f"expected RelationSpec objects, got {type(bad[0]).__name__}")
    return items


RELATIONS = _RelationRegistry()


def get_relation(name: str) -> RelationSpec:
    """The relation named by an id (``"P19"``, case-insensitive) or a phrase (``"born in"``).

    Raises :class:`UnknownRelationError` naming close matches and how to register one.
    """
    return RELATIONS.get(name)


def list_relations() -> list[str]:
    """The registered relation ids."""
    return RELATIONS.ids()


def register_relation(spec: RelationSpec, *, override: bool = False) -> None:
    """Register ``spec`` at run time (``override=True`` replaces one of the same id)."""
    RELATIONS.register(spec, override=override)
