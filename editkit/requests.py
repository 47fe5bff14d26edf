"""``EditRequest``: one fact to rewrite, validated at construction."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from editkit.errors import DatasetFormatError, InvalidRequestError

PLACEHOLDER = "{}"

#: The editing objectives of Hase et al. (2023, "Does localization inform editing?", §3):
#: ``inject`` (error injection, the CounterFact task: o_true → target_new), ``erase`` (fact
#: erasure: lower p(target_true)), ``amplify`` (fact amplification: raise p(target_true)),
#: ``reverse_tracing`` (tracing reversal: make the clean run predict o_noise, what the
#: subject-noised run predicts) and ``force`` (fact forcing: raise p(target_true) on inputs
#: whose subject embeddings are noised as causal tracing noises them).
OBJECTIVES = ("inject", "erase", "amplify", "reverse_tracing", "force")
#: Objectives whose optimised object is the request's ``target_true``.
TRUE_TARGET_OBJECTIVES = ("erase", "amplify", "force")
#: Objectives that need the causal-tracing noise (ν, samples, seed).
NOISED_OBJECTIVES = ("reverse_tracing", "force")


@dataclass(frozen=True)
class Objective:
    """What an edit optimises (Hase et al. 2023, §3); ``Objective()`` is plain error injection.

    ``name``: one of :data:`OBJECTIVES`. The noise fields matter for ``force`` and
    ``reverse_tracing`` and follow causal tracing (Meng et al. 2022, §2.1): ``noise_std`` is the
    absolute ν; ``None`` gives ν = ``noise_multiple`` · σ with σ the standard deviation of the
    subject's token embeddings (the tracer's rule without ``texts``); ``samples`` noise draws
    per prompt (paper 10), drawn with ``seed`` exactly as ``editkit.tracing`` draws them.
    ``floor`` is the erasure threshold: ``erase`` lowers the mean p(target_true) until it is
    at most ``floor`` (0: as low as it goes, the released code's objective; the study passes
    p(target_true) of the subject-noised run, what the paper compares against).
    """

    name: str = "inject"
    noise_std: float | None = None
    noise_multiple: float = 3.0
    samples: int = 10
    seed: int = 0
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise InvalidRequestError(
                f"objective {self.name!r} is not known; use one of {list(OBJECTIVES)}")
        for field_name in ("noise_multiple", "floor"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidRequestError(f"Objective.{field_name}={value!r} must be a number ≥ 0")
        if self.noise_std is not None and (isinstance(self.noise_std, bool) or not isinstance(
                self.noise_std, int | float) or self.noise_std < 0):
            raise InvalidRequestError(
                f"Objective.noise_std={self.noise_std!r} must be a number ≥ 0 or None (3σ)")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise InvalidRequestError(f"Objective.samples={self.samples!r} must be an integer ≥ 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InvalidRequestError(f"Objective.seed={self.seed!r} must be an integer")
        if self.floor >= 1:
            raise InvalidRequestError(f"Objective.floor={self.floor!r} must be below 1")

    @property
    def noised(self) -> bool:
        """Whether this objective draws the causal-tracing noise."""
        return self.name in NOISED_OBJECTIVES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, value: Any) -> Objective:
        """An ``Objective`` from itself, its name, or its :meth:`to_dict` form."""
        if isinstance(value, Objective):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            known = {"name", "noise_std", "noise_multiple", "samples", "seed", "floor"}
            unknown = set(value) - known
            if unknown:
                raise InvalidRequestError(
                    f"unknown Objective field(s) {sorted(unknown)}; known: {sorted(known)}")
            return cls(**value)
        raise InvalidRequestError(
            f"objective must be a name ({list(OBJECTIVES)}) or an Objective, got "
            f"{type(value).__name__} {value!r}")


#: Unicode categories a reader cannot see: control (Cc: NUL, escape), format (Cf: zero-width
#: space and joiners, bidi overrides, BOM), unassigned (Cn) and surrogates (Cs).
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Cs"})
_KINDS = {"Cc": "control character", "Cf": "format character", "Cn": "unassigned code point",
          "Cs": "surrogate"}
#: Controls that are ordinary whitespace in text.
_WHITESPACE_CONTROLS = frozenset("\t\n\r")


#: Zero-width (non-)joiners are part of the spelling of Persian, Indic and emoji text; they
#: are accepted between two visible characters, never on their own or at an edge.
_JOINERS = frozenset("\u200c\u200d")


def _hidden_characters(value: str) -> list[str]:
    """Names of the invisible characters of ``value`` (see ``INVISIBLE_CATEGORIES``)."""
    out = []
    for i, ch in enumerate(value):
        if ch in _WHITESPACE_CONTROLS or unicodedata.category(ch) not in INVISIBLE_CATEGORIES:
            continue
        if ch in _JOINERS and 0 < i < len(value) - 1 and all(
                not n.isspace() and unicodedata.category(n) not in INVISIBLE_CATEGORIES
                for n in (value[i - 1], value[i + 1])):
            continue
        kind = _KINDS[unicodedata.category(ch)]
        out.append(f"U+{ord(ch):04X} {unicodedata.name(ch, kind)}")
    return sorted(set(out))


def _check_str(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"EditRequest.{name} must be a string, got {type(value).__name__} {value!r}"
        )
    if not allow_empty and not value.strip():
        raise InvalidRequestError(f"EditRequest.{name} is empty ({value!r}); give a non-empty string")
    hidden = _hidden_characters(value)
    if hidden:
        # An edit keyed on text nobody can read (a zero-width space inside a name, a NUL) is
        # either a copy-paste accident or an attempt to hide what was edited.
        raise InvalidRequestError(
            f"EditRequest.{name}={value!r} contains invisible or control characters "
            f"({', '.join(hidden)}); remove them and give plain visible text")
    return value


def _check_strings(name: str, values: Any) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InvalidRequestError(
            f"EditRequest.{name} must be a sequence of strings, got {type(values).__name__} "
            f"{values!r}; wrap a single prompt in a list"
        )
    return tuple(_check_str(f"{name}[{i}]", v) for i, v in enumerate(values))


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``prompt`` with its ``{}`` replaced by ``subject`` → ``target_new``.

    ``prompt`` has exactly one ``{}``, the subject's place (``"{} plays the sport of"``).
    Targets are plain strings ("football"); they are scored with a leading space as the papers
    do. ``paraphrases`` and ``neighborhood`` are optional evaluation prompts with the subject
    already filled in (neighbourhood prompts should keep predicting ``target_true``).

    ``objective`` (a name of :data:`OBJECTIVES` or an :class:`Objective`; default
    ``"inject"``, the behaviour above) says what the edit optimises (Hase et al. 2023):
    ``erase``, ``amplify`` and ``force`` optimise ``target_true`` (required then; ``target_new``
    is only the contrast object of the CounterFact scores), ``reverse_tracing`` edits towards
    the object the subject-noised model predicts (the method computes it; ``target_new`` is
    replaced by it). ROME, MEMIT, FT and FT+L honour objectives; other methods refuse them
    with :class:`~editkit.errors.UnsupportedObjectiveError`.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = field(default=())
    neighborhood: tuple[str, ...] = field(default=())
    case_id: int | str | None = None
    objective: Objective = field(default=Objective())

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", Objective.parse(self.objective))
        if self.objective.name in TRUE_TARGET_OBJECTIVES and self.target_true is None:
            raise InvalidRequestError(
                f"objective {self.objective.name!r} optimises target_true, but the request has "
                "none; give target_true (the object the model predicts now)")
        _check_str("prompt", self.prompt)
        count = self.prompt.count(PLACEHOLDER)
        if count != 1:
            raise InvalidRequestError(
                f"EditRequest.prompt must contain exactly one '{{}}' (the subject's place), "
                f"found {count} in {self.prompt!r}; e.g. '{{}} plays the sport of'"
            )
        _check_str("subject", self.subject)
        _check_str("target_new", self.target_new)
        if self.target_true is not None:
            _check_str("target_true", self.target_true)
            if self.target_true.strip() == self.target_new.strip():
                raise InvalidRequestError(
                    f"target_new equals target_true ({self.target_new!r}); nothing to edit"
                )
        object.__setattr__(self, "paraphrases", _check_strings("paraphrases", self.paraphrases))
        object.__setattr__(self, "neighborhood", _check_strings("neighborhood", self.neighborhood))
        if self.case_id is not None and not isinstance(self.case_id, (int, str)):
            raise InvalidRequestError(f"EditRequest.case_id must be int or str, got {self.case_id!r}")

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace(PLACEHOLDER, self.subject)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; :meth:`from_dict` reads it back."""
        d = asdict(self)
        d["paraphrases"] = list(self.paraphrases)
        d["neighborhood"] = list(self.neighborhood)
        if self.objective == Objective():
            del d["objective"]  # the default: the form every earlier version wrote
        else:
            d["objective"] = self.objective.to_dict()
        return d

    @property
    def optimised_target(self) -> str:
        """The object the edit raises (or, for ``erase``, lowers) the probability of."""
        if self.objective.name in TRUE_TARGET_OBJECTIVES:
            assert self.target_true is not None  # checked at construction
            return self.target_true
        return self.target_new

    def with_objective(self, objective: Objective | str) -> EditRequest:
        """This request with another objective."""
        import dataclasses

        return dataclasses.replace(self, objective=Objective.parse(objective))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRequest:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        known = {"prompt", "subject", "target_new", "target_true", "paraphrases",
                 "neighborhood", "case_id", "objective"}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(
                f"unknown EditRequest field(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**{k: (tuple(v) if k in ("paraphrases", "neighborhood") else v)
                      for k, v in data.items()})

    # ------------------------------------------------------- dataset formats
    @classmethod
    def from_counterfact(cls, record: Mapping[str, Any]) -> EditRequest:
        """Parse a record of the ROME release's CounterFact JSON."""
        rid = record.get("case_id", "?") if isinstance(record, Mapping) else "?"
        try:
            rw = record["requested_rewrite"]
            return cls(
                prompt=rw["prompt"],
                subject=rw["subject"],
                target_new=rw["target_new"]["str"],
                target_true=rw["target_true"]["str"],
                paraphrases=tuple(record.get("paraphrase_prompts", ())),
                neighborhood=tuple(record.get("neighborhood_prompts", ())),
                case_id=record.get("case_id"),
            )
        except (KeyError, TypeError) as exc:
            raise DatasetFormatError(
                f"CounterFact record {rid}: missing or malformed field {exc}; expected "
                "requested_rewrite.{prompt, subject, target_new.str, target_true.str}"
            ) from exc

    @classmethod
    def from_zsre(cls, record: Mapping[str, Any], target: str = "alt") -> EditRequest:
        """Parse a zsRE record of the MEND/ROME format (``src``, ``subject``, ``alt``, ...).

        The question ``src`` must contain ``subject``; its first occurrence becomes ``{}``.
        ``target="alt"`` (MEND) edits towards ``alt`` with ``answers[0]`` as the true answer
        (none when they are equal: nothing to contrast); ``target="answer"`` (the ROME
        release's zsRE run) edits towards ``answers[0]`` with no true answer. ``rephrase``
        is the paraphrase and the unrelated question ``loc`` the neighbourhood prompt.
        """
        rid = record.get("case_id", "?") if isinstance(record, Mapping) else "?"
        if target not in ("alt", "answer"):
            raise DatasetFormatError(f"zsRE target={target!r}; use 'alt' or 'answer'")
        try:
            src, subject = record["src"], record["subject"]
            answers = record.get("answers") or [None]
            if not isinstance(src, str) or not isinstance(subject, str) or subject not in src:
                raise DatasetFormatError(
                    f"zsRE record {rid}: subject {subject!r} does not occur in src {src!r}"
                )
            new, true = (record["alt"], answers[0]) if target == "alt" else (answers[0], None)
            if isinstance(true, str) and isinstance(new, str) and true.strip() == new.strip():
                true = None
            rephrase = record.get("rephrase")
            return cls(
                prompt=src.replace(subject, PLACEHOLDER, 1),
                subject=subject,
                target_new=new,
                target_true=true,
                paraphrases=(rephrase,) if rephrase else (),
                neighborhood=(record["loc"],) if record.get("loc") else (),
                case_id=record.get("case_id"),
            )
        except (KeyError, TypeError) as exc:
            raise DatasetFormatError(
                f"zsRE record {rid}: missing or malformed field {exc}; expected src, subject, "
                "alt, answers, rephrase, loc, loc_ans"
            ) from exc


def as_request_list(requests: EditRequest | Sequence[EditRequest]) -> list[EditRequest]:
    """Normalise one request or a sequence of them to a non-empty list."""
    if isinstance(requests, EditRequest):
        return [requests]
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
        raise InvalidRequestError(
            f"expected an EditRequest or a sequence of them, got {type(requests).__name__}; "
            "build one with EditRequest(prompt=..., subject=..., target_new=...)"
        )
    items = list(requests)
    if not items:
        raise InvalidRequestError("no requests given; pass at least one EditRequest")
    for i, r in enumerate(items):
        if not isinstance(r, EditRequest):
            raise InvalidRequestError(
                f"requests[{i}] is a {type(r).__name__}, not an EditRequest; convert dicts "
                "with EditRequest.from_dict / from_counterfact"
            )
    return items
