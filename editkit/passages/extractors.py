"""Extractors: from a passage to the triples it states.

An extractor is a callable ``extract(passage, *, model=None, tokenizer=None) -> Extraction``.
Three are built in, and others plug in through the entry-point group ``editkit.extractors``
(the value: a factory taking keyword options and returning an extractor):

* ``given``   — triples the user supplies (a JSONL file or a list), checked against the passage;
* ``pattern`` — regular expressions built from the relation registry's cloze prompts: a
  sentence ``"<Subject> <prompt words> <object>."`` states that relation (by default the fact
  world's templates, which are exactly the sentence forms of its corpus);
* ``model``   — a language model (the edited model itself, or another one the user names) is
  asked to list the passage's facts as ``subject | relation | object`` lines; its output is
  parsed leniently (bullets, numbering, brackets, quotes, ``->``, ``;``, tabs, key: value) and
  every triple is checked (:func:`~editkit.passages.triples.check_triple`).

Every line an extractor cannot use is kept in :attr:`Extraction.rejected` with its reason;
nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editkit.errors import EditkitError
from editkit.passages.relations import (
    RelationSpec,
    fact_world_relations,
    get_relation,
)
from editkit.passages.triples import (
    InvalidTripleError,
    Rejected,
    Triple,
    check_triple,
    dedupe,
    read_triples,
)
from editkit.registry import Registry

__all__ = ["EXTRACTORS", "EXTRACTORS_GROUP", "Extraction", "GivenExtractor", "ModelExtractor",
           "PatternExtractor", "UnknownExtractorError", "get_extractor", "list_extractors",
           "parse_triple_lines"]

EXTRACTORS_GROUP = "editkit.extractors"


class UnknownExtractorError(EditkitError, KeyError):
    """No extractor is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class Extraction:
    """What an extractor found: usable triples, rejected lines, and the raw model output."""

    triples: list[Triple]
    rejected: list[Rejected] = field(default_factory=list)
    raw: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"triples": [t.to_dict() for t in self.triples],
                "rejected": [r.to_dict() for r in self.rejected], "raw": self.raw}


def _validate(candidates: Sequence[tuple[str, Triple]], passage: str) -> Extraction:
    """Check each (source line, triple) against the passage; failures become ``Rejected``."""
    ok, rejected = [], []
    for line, t in candidates:
        try:
            ok.append(check_triple(t, passage))
        except EditkitError as exc:
            rejected.append(Rejected(line, str(exc)))
    return Extraction(dedupe(ok), rejected)


# ------------------------------------------------------------------------ given
class GivenExtractor:
    """The user's triples (a list, or a JSONL/JSON file of them), checked against the passage.

    ``strict=True`` raises the first invalid triple's typed error instead of rejecting it.
    """

    def __init__(self, triples: Sequence[Triple] | str | Path, *, strict: bool = False) -> None:
        self.triples = read_triples(triples) if isinstance(triples, (str, Path)) else list(triples)
        self.strict = strict

    def __call__(self, passage: str, *, model=None, tokenizer=None) -> Extraction:
        if self.strict:
            return Extraction(dedupe(check_triple(t, passage) for t in self.triples))
        return _validate([(json.dumps(t.to_dict()), t) for t in self.triples], passage)


# ---------------------------------------------------------------------- pattern
#: A subject: one or more capitalised words (names like "Kalo Holbar", "Eiffel Tower").
_SUBJECT = r"(?P<s>[A-Z][\w'’.-]*(?:\s+(?:of\s+|de\s+|the\s+)?[A-Z][\w'’.-]*)*)"
_OBJECT = r"(?P<o>[^.;!?\n]+?)"


def _template_regex(template: str) -> re.Pattern[str]:
    head, tail = template.split("{}")
    head_re = re.escape(head)
    if head[:1].isalpha():  # the template's first word may start a sentence or not
        head_re = f"[{head[0].upper()}{head[0].lower()}]" + re.escape(head[1:])
    body = head_re + _SUBJECT + re.escape(tail) + r"\s+" + _OBJECT + r"\s*(?:[.;!?](?=\s|$)|$)"
    return re.compile(r"(?:^|(?<=[.;!?]\s)|(?<=,\s))" + body, flags=re.MULTILINE)


class PatternExtractor:
    """Sentences in the form of a relation's cloze prompts (``"{} was born in"`` + object).

    ``relations``: the relations whose prompts are patterns (ids or specs); default the fact
    world's six, whose prompts are the sentence forms its corpus is written in. Longer
    templates are tried first, so ``"{} works for"`` never reads as a shorter ``"{} works"``.
    A sentence no template matches is reported in ``rejected``.
    """

    def __init__(self, relations: Sequence[str | RelationSpec] | None = None) -> None:
        specs = (fact_world_relations() if relations is None else
                 [r if isinstance(r, RelationSpec) else get_relation(r) for r in relations])
        pats = [(t, s.id) for s in specs for t in s.prompts]
        pats.sort(key=lambda p: -len(p[0]))
        self.patterns = [(_template_regex(t), rid, t) for t, rid in pats]

    def __call__(self, passage: str, *, model=None, tokenizer=None) -> Extraction:
        candidates: list[tuple[str, Triple]] = []
        rejected: list[Rejected] = []
        for sentence in _sentences(passage):
            found = False
            for regex, rid, _ in self.patterns:
                m = regex.search(sentence)
                if m is None:
                    continue
                try:
                    candidates.append((sentence, Triple(m.group("s"), rid, m.group("o"))))
                    found = True
                except InvalidTripleError as exc:
                    rejected.append(Rejected(sentence, str(exc)))
                break
            if not found and not any(r.line == sentence for r in rejected):
                rejected.append(Rejected(sentence, "no relation pattern matches this sentence"))
        out = _validate(candidates, passage)
        out.rejected = rejected + out.rejected
        return out


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


# ------------------------------------------------------------------------ model
#: How a model is asked for triples: an instruction and one worked example. A chat model gets
#: the example as an earlier turn of the conversation (SmolLM2-135M-Instruct answers in the
#: format far more often that way than with the example inside one message).
MODEL_INSTRUCTION = ("Extract the facts from the text as triples, one per line: "
                     "subject | relation | object. Use short relation names such as: "
                     "{relations}.")
EXAMPLE_PASSAGE = "Anna Berg, a chemist, was born in Oslo. She now works for Nokia."
EXAMPLE_TRIPLES = ("Anna Berg | occupation | chemist\nAnna Berg | born in | Oslo\n"
                   "Anna Berg | works for | Nokia")

_BULLET = re.compile(r"^\s*(?:[-*•·>]+|\(?\d+[.):]|\(?[a-z][.)])\s*")
_KEYED = re.compile(r"subject\s*[:=]\s*(?P<s>.+?)\s*[,;|]\s*(?:relation|predicate)\s*[:=]\s*"
                    r"(?P<r>.+?)\s*[,;|]\s*object\s*[:=]\s*(?P<o>.+)$", re.IGNORECASE)


def _clean(field_text: str) -> str:
    text = field_text.strip().strip("\"'`“”‘’*_").strip()
    return re.sub(r"[.,;:]+$", "", text).strip().strip("\"'`“”‘’").strip()


def _split_line(line: str) -> list[str] | None:
    """The fields of one output line, or ``None`` when it holds no triple."""
    body = _BULLET.sub("", line).strip()
    if not body:
        return None
    m = _KEYED.search(body)
    if m:
        return [m.group("s"), m.group("r"), m.group("o")]
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and {"subject", "relation", "object"} <= set(obj):
            return [str(obj["subject"]), str(obj["relation"]), str(obj["object"])]
    if body[:1] in "([<" and body.rstrip(".,;")[-1:] in ")]>":
        body = body.rstrip(".,;")[1:-1]
        if "|" not in body and ";" not in body:
            return re.split(r"\s*,\s*", body) if body.count(",") == 2 else [body]
    for sep in (r"\s*\|\s*", r"\s*->\s*|\s*→\s*", r"\s*;\s*", r"\t+"):
        parts = [p for p in re.split(sep, body) if p.strip()]
        if len(parts) >= 2:
            return parts
    return [body]


def parse_triple_lines(text: str, passage: str | None = None) -> Extraction:
    """Parse a model's free-form list of triples (see the module docstring for the accepted
    forms); with ``passage``, check every triple against it. Unusable lines are rejected with
    their reason: no triple, wrong number of fields, empty fields, unknown relation, subject
    not in the passage."""
    candidates: list[tuple[str, Triple]] = []
    rejected: list[Rejected] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        parts = _split_line(line)
        if parts is None:
            continue
        fields = [_clean(p) for p in parts]
        if len(fields) != 3:
            rejected.append(Rejected(line, f"expected 3 fields (subject | relation | object), "
                                           f"found {len(fields)}"))
            continue
        try:
            candidates.append((line, Triple(*fields)))
        except InvalidTripleError as exc:
            rejected.append(Rejected(line, str(exc)))
    if passage is None:
        ok, bad = [], []
        for line, t in candidates:
            try:
                ok.append(Triple(t.subject, get_relation(t.relation).id, t.object))
            except EditkitError as exc:
                bad.append(Rejected(line, str(exc)))
        return Extraction(dedupe(ok), rejected + bad, text)
    out = _validate(candidates, passage)
    out.rejected = rejected + out.rejected
    out.raw = text
    return out


def _default_relation_hint() -> str:
    return ", ".join(["born in", "occupation", "works for", "citizen of", "capital",
                      "headquarters", "located in", "official language", "native language",
                      "plays sport", "plays instrument", "owned by", "CEO", "founded by"])


class ModelExtractor:
    """Ask a causal LM to list the passage's facts and parse its answer.

    Args:
        model_name: Another model to ask (``"smollm2"``, a ``save_pretrained`` directory or a
            hub id); ``None`` asks the model being edited.
        max_new_tokens: Length of the model's answer (greedy).
        relations: Relation phrases named in the instruction (default: common ones).
        chat: Use the tokenizer's chat template when it has one (instruction-tuned models).
    """

    def __init__(self, model_name: str | None = None, *, max_new_tokens: int = 120,
                 relations: Sequence[str] | None = None, chat: bool = True) -> None:
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.relations = list(relations) if relations is not None else None
        self.chat = chat
        self._loaded: tuple[Any, Any] | None = None

    def _model(self, model, tokenizer) -> tuple[Any, Any]:
        if self.model_name is None:
            if model is None or tokenizer is None:
                raise InvalidTripleError("the model extractor needs a model: pass model= and "
                                         "tokenizer=, or ModelExtractor(model_name=...)")
            return model, tokenizer
        if self._loaded is None:
            if self.model_name.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
                from editkit.testbed.smollm2 import load_smollm2

                self._loaded = load_smollm2()
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                try:
                    tok = AutoTokenizer.from_pretrained(self.model_name)
                    lm = AutoModelForCausalLM.from_pretrained(self.model_name).eval()
                except Exception as exc:
                    raise InvalidTripleError(
                        f"extractor model {self.model_name!r} cannot be loaded "
                        f"({type(exc).__name__}: {exc}); name a local save_pretrained directory,"
                        " a cached hub id or 'smollm2'") from exc
                self._loaded = (lm, tok)
        return self._loaded

    def prompt(self, passage: str, tokenizer) -> str:
        """The text the model continues."""
        hint = ", ".join(self.relations) if self.relations else _default_relation_hint()
        instruction = MODEL_INSTRUCTION.format(relations=hint)
        text = " ".join(passage.split())
        if self.chat and getattr(tokenizer, "chat_template", None):
            turns = [{"role": "user", "content": f"{instruction}\n\nText: {EXAMPLE_PASSAGE}"},
                     {"role": "assistant", "content": EXAMPLE_TRIPLES},
                     {"role": "user", "content": f"Text: {text}"}]
            return tokenizer.apply_chat_template(turns, tokenize=False,
                                                 add_generation_prompt=True)
        return (f"{instruction}\n\nText: {EXAMPLE_PASSAGE}\nTriples:\n{EXAMPLE_TRIPLES}\n\n"
                f"Text: {text}\nTriples:\n")

    def __call__(self, passage: str, *, model=None, tokenizer=None) -> Extraction:
        from editkit.eval.generation import GenerationConfig, generate

        lm, tok = self._model(model, tokenizer)
        text = generate(lm, tok, [self.prompt(passage, tok)],
                        GenerationConfig(max_new_tokens=self.max_new_tokens, stop_at_eos=True),
                        full_text=False)[0]
        return parse_triple_lines(text, passage)


# --------------------------------------------------------------------- registry
EXTRACTORS: Registry[Callable[..., Any]] = Registry(
    "extractor", EXTRACTORS_GROUP, callable, UnknownExtractorError,
    f'Register an extractor factory with an entry point in group "{EXTRACTORS_GROUP}" '
    '(name = "package.module:factory") or editkit.passages.EXTRACTORS.register(name, factory).')
for _name, _factory in (("given", GivenExtractor), ("pattern", PatternExtractor),
                        ("model", ModelExtractor)):
    EXTRACTORS.register(_name, _factory)
    EXTRACTORS._builtin.add(_name)


def get_extractor(name: str, **options: Any) -> Callable[..., Extraction]:
    """A new extractor registered as ``name``, built with ``options``."""
    return EXTRACTORS.get(name)(**options)


def list_extractors() -> list[str]:
    return EXTRACTORS.names()

