"""Composite (multi-hop) facts: MQuAKE records, KnowEdit portability records, their metrics.

**MQuAKE** (Zhong et al. 2023) asks whether an edited fact propagates to the questions that
depend on it: a case has one or more ``requested_rewrite`` edits (CounterFact-style), multi-hop
``questions`` whose ``answer`` changes to ``new_answer`` once the edits hold, and the chain's
``single_hops`` / ``new_single_hops`` (each a ``question``, a ``cloze`` form, an ``answer`` and
its ``answer_alias`` list). :func:`load_mquake` reads that published JSON format.

**KnowEdit / EasyEdit portability** (Yao et al. 2023, "Editing Large Language Models:
Problems, Methods, and Opportunities"): a record is an edit (``subject``, ``prompt``,
``target_new``, optionally ``ground_truth``) plus ``portability`` probes (``Subject_Aliasing``,
``reasoning``, ``Logical_Generalization``: lists of ``{prompt, ground_truth}``) and
``locality`` probes. :func:`load_portability` reads it.

Metrics (registered in :data:`editkit.eval.METRICS`; ``lp(o | p)`` is the mean per-token
log-probability of ``" " + o`` after ``p``, as in CounterFact):

* ``edit_success``: the edited facts hold: ``lp(new | rewrite prompt) > lp(true | ...)``
  (CounterFact's ES, per requested rewrite).
* ``multihop_cloze`` / ``multihop_cloze_any``: after the edit, ``lp(new_answer | q) >
  lp(answer | q)`` averaged over the case's questions / for any of them (MQuAKE counts a case
  when any of its questions is answered); ``multihop_cloze_pre``: before the edit,
  ``lp(answer | q) > lp(new_answer | q)`` (the model knew the old composite answer).
* ``multihop_gen`` / ``multihop_gen_pre``: the greedy continuation of a question starts with
  the new answer or one of its aliases after the edit / with the old answer or an alias before
  (case and surrounding space ignored; the match must end at a word boundary); averaged over
  the questions.
* ``hop_acc_pre``: before the edit, the fraction of ``single_hops`` the model knows;
  ``hop_acc_post``: after it, the fraction of ``new_single_hops``. A hop is known when greedy
  decoding after its ``cloze`` reproduces the answer or an alias (read off one teacher-forced
  pass: every target token is the argmax).
* ``reliability`` / ``portability`` / ``portability_<key>``: EasyEdit's ``rewrite_acc`` and
  portability: the teacher-forced token accuracy of the target after the prompt (the fraction
  of target tokens that are the argmax given the true prefix); with several ground-truth
  alternatives the best one counts. ``locality``: EasyEdit's locality: the fraction of the
  locality answer's token positions whose argmax is unchanged by the edit.

:func:`evaluate_multihop` / :func:`evaluate_portability` edit each record alone (the
independent protocol: score, edit, score, revert exactly) and return a :class:`MultiHopReport`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from editkit.errors import DatasetFormatError, EditkitError, InvalidRequestError
from editkit.eval.datasets import hub_records, read_json_records
from editkit.eval.generation import GenerationConfig, generate
from editkit.eval.metrics import (
    METRICS,
    Metric,
    MetricContext,
    RecordScores,
    get_metric,
    list_metrics,
    mean_ci,
)
from editkit.eval.scoring import score_rows
from editkit.protocols import TokenizerLike
from editkit.requests import EditRequest

__all__ = [
    "MQUAKE",
    "PORTABILITY",
    "Hop",
    "MultiHopRecord",
    "MultiHopReport",
    "PortabilityRecord",
    "Probe",
    "answer_matches",
    "evaluate_multihop",
    "evaluate_portability",
    "load_mquake",
    "load_portability",
    "parse_mquake",
    "parse_portability",
    "score_mquake",
    "score_portability",
]

logger = logging.getLogger(__name__)

#: Dataset kinds of the metrics registered here.
MQUAKE = "mquake"
PORTABILITY = "portability"

_HINT = ("pass a local file: a JSON list (or .jsonl) of records in the published format, "
         "'chainworld' (the offline chain world) or 'twohop' (the shipped SmolLM2 two-hop "
         "records)")


# ------------------------------------------------------------------ records
@dataclass(frozen=True)
class Hop:
    """One single-hop fact of a chain: a question, its cloze form, answer and aliases."""

    question: str
    cloze: str
    answer: str
    answer_alias: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer and its aliases."""
        return (self.answer, *self.answer_alias)


@dataclass(frozen=True)
class MultiHopRecord:
    """One MQuAKE case (see the module docstring); ``raw`` is the record as read."""

    index: int
    case_id: int | str
    requests: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    answer: str
    answer_alias: tuple[str, ...]
    new_answer: str
    new_answer_alias: tuple[str, ...]
    single_hops: tuple[Hop, ...]
    new_single_hops: tuple[Hop, ...]
    raw: Mapping[str, Any] = field(repr=False)
    kind: str = MQUAKE

    @property
    def request(self) -> EditRequest:
        """The first requested rewrite."""
        return self.requests[0]

    @property
    def orig(self) -> Mapping[str, Any]:
        """MQuAKE's ``orig`` block (empty if absent)."""
        value = self.raw.get("orig")
        return value if isinstance(value, Mapping) else {}

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.answer_alias)

    @property
    def new_answers(self) -> tuple[str, ...]:
        return (self.new_answer, *self.new_answer_alias)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.raw))


@dataclass(frozen=True)
class Probe:
    """A prompt and its acceptable answers (the first is the reference)."""

    prompt: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class PortabilityRecord:
    """One KnowEdit-style record: the edit and its portability / locality probes."""

    index: int
    case_id: int | str
    request: EditRequest
    portability: Mapping[str, tuple[Probe, ...]]
    locality: Mapping[str, tuple[Probe, ...]]
    raw: Mapping[str, Any] = field(repr=False)
    kind: str = PORTABILITY

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        return (self.request,)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.raw))


# --------------------------------------------------------------- validation
def _where(label: str, index: int, record: Any) -> str:
    cid = record.get("case_id") if isinstance(record, Mapping) else None
    return f"{label} record #{index}" + (f" (case_id {cid!r})" if cid is not None else "")


def _field(node: Any, key: str, where: str, path: str) -> Any:
    if not isinstance(node, Mapping):
        raise DatasetFormatError(f"{where}: {path or 'the record'} must be a JSON object, got "
                                 f"{type(node).__name__}")
    if key not in node:
        raise DatasetFormatError(f"{where}: missing field {(path + '.' if path else '') + key!r};"
                                 " add it to the record")
    return node[key]


def _text(node: Any, key: str, where: str, path: str = "") -> str:
    value = _field(node, key, where, path)
    if not isinstance(value, str) or not value.strip():
        raise DatasetFormatError(f"{where}: field {(path + '.' if path else '') + key!r} must be "
                                 f"a non-empty string, got {value!r}")
    return value


def _target(node: Any, key: str, where: str, path: str) -> str:
    """A CounterFact target: ``{"str": ...}`` or a plain string."""
    value = _field(node, key, where, path)
    if isinstance(value, Mapping):
        return _text(value, "str", where, f"{path}.{key}")
    if isinstance(value, str) and value.strip():
        return value
    raise DatasetFormatError(f"{where}: field '{path}.{key}' must be {{\"str\": ...}} or a "
                             f"non-empty string, got {value!r}")


def _text_list(node: Any, key: str, where: str, path: str = "",
               required: bool = True) -> tuple[str, ...]:
    if not isinstance(node, Mapping) or key not in node:
        if required:
            _field(node, key, where, path)
        return ()
    values = node[key]
    name = (path + "." if path else "") + key
    if values is None and not required:
        return ()
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise DatasetFormatError(f"{where}: field {name!r} must be a list of strings, got "
                                 f"{type(values).__name__} {values!r}")
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise DatasetFormatError(f"{where}: field '{name}[{i}]' must be a non-empty string, "
                                     f"got {v!r}")
    return tuple(values)


def _hops(record: Mapping[str, Any], key: str, where: str) -> tuple[Hop, ...]:
    values = _field(record, key, where, "")
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise DatasetFormatError(f"{where}: field {key!r} must be a non-empty list of hops "
                                 "({question, cloze, answer, answer_alias}), got "
                                 f"{values!r}")
    hops = []
    for i, h in enumerate(values):
        path = f"{key}[{i}]"
        question = _text(h, "question", where, path)
        cloze = h.get("cloze", question) if isinstance(h, Mapping) else question
        if not isinstance(cloze, str) or not cloze.strip():
            raise DatasetFormatError(f"{where}: field '{path}.cloze' must be a non-empty "
                                     f"string, got {cloze!r}")
        hops.append(Hop(question, cloze, _text(h, "answer", where, path),
                        _text_list(h, "answer_alias", where, path, required=False)))
    return tuple(hops)


def _request(node: Any, where: str, path: str, case_id: Any) -> EditRequest:
    prompt = _text(node, "prompt", where, path)
    subject = _text(node, "subject", where, path)
    new = _target(node, "target_new", where, path)
    true = _target(node, "target_true", where, path) if "target_true" in node else None
    if "{}" not in prompt and subject in prompt:
        prompt = prompt.replace(subject, "{}", 1)  # a filled-in prompt (KnowEdit's form)
    try:
        return EditRequest(prompt=prompt, subject=subject, target_new=new, target_true=true,
                           case_id=case_id)
    except InvalidRequestError as exc:
        raise DatasetFormatError(f"{where}: '{path}' is not a valid edit: {exc}") from exc


def parse_mquake(record: Any, index: int = 0) -> MultiHopRecord:
    """Validate one MQuAKE record (published format) into a :class:`MultiHopRecord`.

    Raises:
        DatasetFormatError: naming the record and the missing or malformed field.
    """
    where = _where("MQuAKE", index, record)
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"{where}: a record must be a JSON object, got "
                                 f"{type(record).__name__}")
    case_id = record.get("case_id", index)
    rewrites = _field(record, "requested_rewrite", where, "")
    if isinstance(rewrites, Mapping):
        rewrites = [rewrites]
    if isinstance(rewrites, str) or not isinstance(rewrites, Sequence) or not rewrites:
        raise DatasetFormatError(f"{where}: field 'requested_rewrite' must be a non-empty list "
                                 f"of edits, got {rewrites!r}")
    requests = tuple(_request(r, where, f"requested_rewrite[{i}]", case_id)
                     for i, r in enumerate(rewrites))
    questions = _text_list(record, "questions", where)
    if not questions:
        raise DatasetFormatError(f"{where}: field 'questions' must list at least one question")
    return MultiHopRecord(
        index=index, case_id=case_id, requests=requests, questions=questions,
        answer=_text(record, "answer", where),
        answer_alias=_text_list(record, "answer_alias", where, required=False),
        new_answer=_text(record, "new_answer", where),
        new_answer_alias=_text_list(record, "new_answer_alias", where, required=False),
        single_hops=_hops(record, "single_hops", where),
        new_single_hops=_hops(record, "new_single_hops", where),
        raw=record,
    )


def _answers(value: Any, where: str, path: str) -> tuple[str, ...]:
    """KnowEdit ground truths: a string, a list of strings, or a list of such lists."""
    if isinstance(value, str) and value.strip():
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        out: list[str] = []
        for i, v in enumerate(value):
            out.extend(_answers(v, where, f"{path}[{i}]"))
        return tuple(out)
    raise DatasetFormatError(f"{where}: field {path!r} must be a non-empty string or list of "
                             f"strings, got {value!r}")


def _probes(record: Mapping[str, Any], key: str, where: str) -> dict[str, tuple[Probe, ...]]:
    block = record.get(key) or {}
    if not isinstance(block, Mapping):
        raise DatasetFormatError(f"{where}: field {key!r} must be an object mapping kinds to "
                                 f"lists of {{prompt, ground_truth}}, got {block!r}")
    out: dict[str, tuple[Probe, ...]] = {}
    for kind, items in block.items():
        if isinstance(items, Mapping):
            items = [items]
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise DatasetFormatError(f"{where}: field '{key}.{kind}' must be a list of "
                                     f"{{prompt, ground_truth}}, got {items!r}")
        probes = []
        for i, item in enumerate(items):
            path = f"{key}.{kind}[{i}]"
            prompt = _field(item, "prompt", where, path)
            truth = _field(item, "ground_truth", where, path)
            # Some KnowEdit files give parallel lists of prompts and answers in one item.
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, Sequence) or not prompts or not all(
                    isinstance(p, str) and p.strip() for p in prompts):
                raise DatasetFormatError(f"{where}: field '{path}.prompt' must be a non-empty "
                                         f"string, got {prompt!r}")
            if len(prompts) == 1:
                probes.append(Probe(prompts[0], _answers(truth, where, f"{path}.ground_truth")))
            else:
                if not isinstance(truth, Sequence) or len(truth) != len(prompts):
                    raise DatasetFormatError(f"{where}: '{path}' has {len(prompts)} prompts; "
                                             "give as many ground truths")
                probes.extend(Probe(p, _answers(t, where, f"{path}.ground_truth[{j}]"))
                              for j, (p, t) in enumerate(zip(prompts, truth, strict=True)))
        out[str(kind)] = tuple(probes)
    return out


def parse_portability(record: Any, index: int = 0) -> PortabilityRecord:
    """Validate one KnowEdit-style record into a :class:`PortabilityRecord`.

    Accepts ``prompt`` (or zsRE's ``src``) with the subject in it (or a ``{}`` template),
    ``subject``, ``target_new`` (or ``alt``), optional ``ground_truth``, ``portability`` and
    ``locality`` blocks.
    """
    where = _where("portability", index, record)
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"{where}: a record must be a JSON object, got "
                                 f"{type(record).__name__}")
    case_id = record.get("case_id", index)
    edit = dict(record)
    if "prompt" not in edit and "src" in edit:
        edit["prompt"] = edit["src"]
    if "target_new" not in edit and "alt" in edit:
        edit["target_new"] = edit["alt"]
    truth = edit.get("ground_truth")
    if "target_true" not in edit and truth is not None:
        answers = _answers(truth, where, "ground_truth")
        edit["target_true"] = answers[0]
    prompt = _text(edit, "prompt", where)
    subject = _text(edit, "subject", where)
    if "{}" not in prompt and subject not in prompt:
        raise DatasetFormatError(f"{where}: the subject {subject!r} does not occur in the prompt "
                                 f"{prompt!r}; give the prompt with the subject in it")
    request = _request(edit, where, "", case_id)
    portability = _probes(record, "portability", where)
    if not any(portability.values()):
        raise DatasetFormatError(f"{where}: field 'portability' has no probes; give at least "
                                 "one {prompt, ground_truth} under Subject_Aliasing, reasoning "
                                 "or Logical_Generalization")
    return PortabilityRecord(index, case_id, request, portability,
                             _probes(record, "locality", where), record)


# ------------------------------------------------------------------ loaders
def _raw(source: str | Path | Sequence[Any] | Mapping[str, Any], split: str | None,
         builtin: Callable[[str], list[Any] | None]) -> list[Any]:
    if isinstance(source, Mapping):
        return [source]
    if isinstance(source, (str, Path)):
        text = str(source)
        found = builtin(text)
        if found is not None:
            return found
        if text.startswith("hub:"):
            name, _, hub_split = text[4:].partition(":")
            return hub_records(name, hub_split or split)
        path = Path(text).expanduser()
        if not path.exists() and path.suffix not in (".json", ".jsonl") and text.count("/") == 1:
            return hub_records(text, split)  # "owner/name": a hub dataset id
        return read_json_records(path)
    return list(source)


def _builtin_mquake(text: str) -> list[Any] | None:
    if text in ("chainworld", "chain_world"):
        from editkit.testbed.chains import ChainWorld

        return ChainWorld().multihop_records()
    if text in ("twohop", "two_hop"):
        from editkit.testbed.two_hop import two_hop_records

        return two_hop_records()
    return None


def _select(recs: list[Any], n: int | None, seed: int | None) -> list[Any]:
    if n is None:
        return recs
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed is None:
        return recs[:n]
    import random

    idx = sorted(random.Random(seed).sample(range(len(recs)), min(n, len(recs))))
    return [recs[i] for i in idx]


def load_mquake(source: str | Path | Sequence[Any], n: int | None = None, *,
                split: str | None = None, seed: int | None = None) -> list[MultiHopRecord]:
    """MQuAKE records from a ``.json``/``.jsonl`` file, ``"chainworld"``, ``"twohop"``,
    ``"hub:<name>[:<split>]"`` / ``"owner/name"`` (through ``datasets``; offline this raises
    :class:`~editkit.errors.DatasetUnavailableError`), or a list of dicts.

    Args:
        n: Keep ``n`` records: the first ``n``, or with ``seed`` a fixed random subset (in
            order).
    """
    raw = _select(_raw(source, split, _builtin_mquake), n, seed)
    return _unique([r if isinstance(r, MultiHopRecord) else parse_mquake(r, i)
                    for i, r in enumerate(raw)])


def _builtin_portability(text: str) -> list[Any] | None:
    if text in ("chainworld", "chain_world"):
        from editkit.testbed.chains import ChainWorld

        return ChainWorld().portability_records()
    if text in ("twohop", "two_hop"):
        from editkit.testbed.two_hop import two_hop_records

        return [mquake_to_portability(r) for r in two_hop_records()]
    return None


def load_portability(source: str | Path | Sequence[Any], n: int | None = None, *,
                     split: str | None = None, seed: int | None = None
                     ) -> list[PortabilityRecord]:
    """KnowEdit-style portability records from the same kinds of sources as
    :func:`load_mquake` (``"chainworld"``: the chain world's records with the multi-hop
    questions as ``reasoning`` probes and an unrelated fact as locality probe)."""
    raw = _select(_raw(source, split, _builtin_portability), n, seed)
    return _unique([r if isinstance(r, PortabilityRecord) else parse_portability(r, i)
                    for i, r in enumerate(raw)])


def _unique(records: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    for r in records:
        if r.case_id in seen:
            raise DatasetFormatError(f"case_id {r.case_id!r} occurs more than once; case ids "
                                     "must be unique")
        seen.add(r.case_id)
    return records


def mquake_to_portability(record: Mapping[str, Any],
                          locality: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
                          ) -> dict[str, Any]:
    """A KnowEdit-style record from an MQuAKE one: its first edit, its multi-hop questions as
    ``reasoning`` probes with the new answer (and aliases) as ground truth."""
    rr = record["requested_rewrite"]
    rr = rr[0] if isinstance(rr, Sequence) and not isinstance(rr, Mapping) else rr
    new = rr["target_new"]["str"] if isinstance(rr["target_new"], Mapping) else rr["target_new"]
    true = rr.get("target_true")
    true = true["str"] if isinstance(true, Mapping) else true
    answers = [record["new_answer"], *record.get("new_answer_alias", [])]
    out: dict[str, Any] = {
        "case_id": record.get("case_id"),
        "subject": rr["subject"],
        "prompt": rr["prompt"].format(rr["subject"]),
        "target_new": new,
        "portability": {"reasoning": [{"prompt": q, "ground_truth": answers}
                                      for q in record["questions"]]},
        "locality": {k: list(v) for k, v in (locality or {}).items()},
    }
    if true is not None:
        out["ground_truth"] = true
    return out


# ------------------------------------------------------------------ scoring
_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip().strip("\"'").lower()


def answer_matches(continuation: str, answers: Iterable[str]) -> bool:
    """Whether ``continuation`` starts with one of ``answers`` (case and surrounding space
    ignored) and the match ends at a word boundary (``"Paris"`` does not match
    ``"Parisian"``)."""
    text = _norm(continuation)
    for a in answers:
        a = _norm(a)
        if a and text.startswith(a) and (len(text) == len(a) or not text[len(a)].isalnum()):
            return True
    return False


def _run_rows(model: nn.Module, tokenizer: TokenizerLike, rows: list[tuple[str, str]],
              max_rows: int) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        out.extend(score_rows(model, tokenizer, [p for p, _ in chunk], [t for _, t in chunk]))
    return out


class _Rows:
    """Collects (prompt, target) rows, scores them in batches, hands results back by key."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.keys: list[tuple[int, str, int, int]] = []  # record, group, item, alternative

    def add(self, record: int, group: str, item: int, alternative: int, prompt: str,
            target: str) -> None:
        self.rows.append((prompt, target))
        self.keys.append((record, group, item, alternative))

    def score(self, model: nn.Module, tokenizer: TokenizerLike, max_rows: int
              ) -> dict[tuple[int, str, int, int], Any]:
        results = _run_rows(model, tokenizer, self.rows, max_rows)
        return dict(zip(self.keys, results, strict=True))


def score_mquake(model: nn.Module, tokenizer: TokenizerLike, records: Sequence[MultiHopRecord],
                 *, generation: bool = True, max_rows: int = 128,
                 max_new_tokens: int | None = None) -> list[RecordScores]:
    """Measure one model state on MQuAKE records (see the module docstring).

    ``logprobs["rewrite"]`` (per requested rewrite) and ``logprobs["multihop"]`` (per
    question) hold ``[lp(new), lp(old)]``; ``correct["single_hops"]`` /
    ``correct["new_single_hops"]`` hold ``[known]`` per hop; ``generations`` the greedy
    continuations of the questions (``generation=True``).
    """
    rows = _Rows()
    for r, rec in enumerate(records):
        for i, req in enumerate(rec.requests):
            prompt = req.prompt.format(req.subject)
            rows.add(r, "rewrite", i, 0, prompt, req.target_new)
            rows.add(r, "rewrite", i, 1, prompt, req.target_true or req.target_new)
        for i, q in enumerate(rec.questions):
            rows.add(r, "multihop", i, 0, q, rec.new_answer)
            rows.add(r, "multihop", i, 1, q, rec.answer)
        for group, hops in (("single_hops", rec.single_hops),
                            ("new_single_hops", rec.new_single_hops)):
            for i, hop in enumerate(hops):
                for j, a in enumerate(hop.answers):
                    rows.add(r, group, i, j, hop.cloze, a)
    got = rows.score(model, tokenizer, max_rows)
    texts: list[str] = []
    if generation:
        questions = [q for rec in records for q in rec.questions]
        if max_new_tokens is None:
            longest = max((len(tokenizer(" " + a, add_special_tokens=False)["input_ids"])
                           for rec in records for a in (*rec.answers, *rec.new_answers)),
                          default=1)
            max_new_tokens = longest + 2
        texts = generate(model, tokenizer, questions,
                         GenerationConfig(max_new_tokens=max_new_tokens), full_text=False)
    out: list[RecordScores] = []
    pos = 0
    for r, rec in enumerate(records):
        s = RecordScores()
        s.logprobs["rewrite"] = [[got[(r, "rewrite", i, 0)].logprob,
                                  got[(r, "rewrite", i, 1)].logprob]
                                 for i in range(len(rec.requests))]
        s.logprobs["multihop"] = [[got[(r, "multihop", i, 0)].logprob,
                                   got[(r, "multihop", i, 1)].logprob]
                                  for i in range(len(rec.questions))]
        for group, hops in (("single_hops", rec.single_hops),
                            ("new_single_hops", rec.new_single_hops)):
            s.correct[group] = [[any(all(got[(r, group, i, j)].correct)
                                     for j in range(len(hop.answers)))]
                                for i, hop in enumerate(hops)]
        if generation:
            s.generations = texts[pos:pos + len(rec.questions)]
            pos += len(rec.questions)
        out.append(s)
    return out


def score_portability(model: nn.Module, tokenizer: TokenizerLike,
                      records: Sequence[PortabilityRecord], *, max_rows: int = 128
                      ) -> list[RecordScores]:
    """Measure one model state on portability records: ``correct["rewrite"]`` (the target's
    token hits after the edit prompt), ``correct["portability:<kind>"]`` (per probe, the token
    hits of its best-scoring alternative answer) and ``predicted["locality:<kind>"]`` (argmax
    ids at the locality answer's positions)."""
    rows = _Rows()
    for r, rec in enumerate(records):
        rows.add(r, "rewrite", 0, 0, rec.request.prompt.format(rec.request.subject),
                 rec.request.target_new)
        for kind, probes in rec.portability.items():
            for i, p in enumerate(probes):
                for j, a in enumerate(p.answers):
                    rows.add(r, f"portability:{kind}", i, j, p.prompt, a)
        for kind, probes in rec.locality.items():
            for i, p in enumerate(probes):
                rows.add(r, f"locality:{kind}", i, 0, p.prompt, p.answers[0])
    got = rows.score(model, tokenizer, max_rows)
    out = []
    for r, rec in enumerate(records):
        s = RecordScores()
        s.correct["rewrite"] = [list(got[(r, "rewrite", 0, 0)].correct)]
        for kind, probes in rec.portability.items():
            group = f"portability:{kind}"
            best = []
            for i, p in enumerate(probes):
                alts = [got[(r, group, i, j)].correct for j in range(len(p.answers))]
                best.append(max(alts, key=lambda c: sum(c) / len(c)))
            s.correct[group] = [list(b) for b in best]
        for kind, probes in rec.locality.items():
            group = f"locality:{kind}"
            s.predicted[group] = [list(got[(r, group, i, 0)].predicted)
                                  for i in range(len(probes))]
        out.append(s)
    return out


# ------------------------------------------------------------------ metrics
def _avg(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _edit_success(s: RecordScores, ctx: MetricContext) -> float | None:
    return _avg([float(new > old) for new, old in s.logprobs.get("rewrite", [])])


def _cloze(after: bool, reduce: str) -> Callable[[RecordScores, MetricContext], float | None]:
    def fn(s: RecordScores, ctx: MetricContext) -> float | None:
        src = s if after else ctx.pre
        if src is None:
            return None
        hits = [float(new > old) if after else float(old > new)
                for new, old in src.logprobs.get("multihop", [])]
        if not hits:
            return None
        return max(hits) if reduce == "any" else _avg(hits)
    return fn


def _gen(after: bool) -> Callable[[RecordScores, MetricContext], float | None]:
    def fn(s: RecordScores, ctx: MetricContext) -> float | None:
        src = s if after else ctx.pre
        if src is None or not src.generations:
            return None
        answers = ctx.record.new_answers if after else ctx.record.answers
        return _avg([float(answer_matches(t, answers)) for t in src.generations])
    return fn


def _hops_known(group: str, after: bool) -> Callable[[RecordScores, MetricContext],
                                                       float | None]:
    def fn(s: RecordScores, ctx: MetricContext) -> float | None:
        src = s if after else ctx.pre
        if src is None:
            return None
        return _avg([float(row[0]) for row in src.correct.get(group, [])])
    return fn


def _token_acc(prefix: str) -> Callable[[RecordScores, MetricContext], float | None]:
    """EasyEdit's portability: per probe, the mean of the target tokens' hits; then the mean
    over the record's probes (of the groups whose name starts with ``prefix``)."""
    def fn(s: RecordScores, ctx: MetricContext) -> float | None:
        per_probe = [sum(row) / len(row) for g, rows in s.correct.items()
                     if g == prefix or g.startswith(prefix + ":") for row in rows if row]
        return _avg(per_probe)
    return fn


def _locality(s: RecordScores, ctx: MetricContext) -> float | None:
    if ctx.pre is None:
        return None
    same = []
    for group, rows in s.predicted.items():
        if not group.startswith("locality:"):
            continue
        for after, before in zip(rows, ctx.pre.predicted.get(group, []), strict=True):
            same.append(_avg([float(a == b) for a, b in zip(after, before, strict=True)]) or 0.0)
    return _avg(same)


_PRE = frozenset({"pre"})
_GEN = frozenset({"generation"})
MQUAKE_METRICS: tuple[Metric, ...] = (
    Metric("edit_success", MQUAKE, "the requested rewrites hold: P(new) > P(true) on their "
           "prompts", True, _edit_success, groups=("rewrite",)),
    Metric("multihop_cloze", MQUAKE, "after the edit, P(new answer) > P(old answer) on the "
           "multi-hop questions (mean over questions)", True, _cloze(True, "mean"),
           groups=("multihop",)),
    Metric("multihop_cloze_any", MQUAKE, "after the edit, P(new answer) > P(old answer) on any "
           "of the case's questions (MQuAKE's case accuracy)", True, _cloze(True, "any"),
           groups=("multihop",)),
    Metric("multihop_cloze_pre", MQUAKE, "before the edit, P(old answer) > P(new answer) on "
           "the multi-hop questions", True, _cloze(False, "mean"), groups=("multihop",),
           needs=_PRE),
    Metric("multihop_gen", MQUAKE, "after the edit, the greedy continuation of a question "
           "starts with the new answer or an alias", True, _gen(True), needs=_GEN),
    Metric("multihop_gen_pre", MQUAKE, "before the edit, the greedy continuation starts with "
           "the old answer or an alias", True, _gen(False), needs=_GEN | _PRE),
    Metric("hop_acc_pre", MQUAKE, "before the edit, fraction of the single hops known "
           "(greedy decoding gives the answer or an alias)", True,
           _hops_known("single_hops", False), groups=("single_hops",), needs=_PRE),
    Metric("hop_acc_post", MQUAKE, "after the edit, fraction of the new single hops known",
           True, _hops_known("new_single_hops", True), groups=("new_single_hops",)),
)
PORTABILITY_METRICS: tuple[Metric, ...] = (
    Metric("reliability", PORTABILITY, "teacher-forced token accuracy of the new target after "
           "the edit prompt (EasyEdit rewrite_acc)", True, _token_acc("rewrite")),
    Metric("portability", PORTABILITY, "teacher-forced token accuracy of the portability "
           "ground truths (EasyEdit), mean over all probes", True, _token_acc("portability")),
    Metric("portability_reasoning", PORTABILITY, "portability on the reasoning probes", True,
           _token_acc("portability:reasoning")),
    Metric("portability_subject_aliasing", PORTABILITY, "portability on the Subject_Aliasing "
           "probes", True, _token_acc("portability:Subject_Aliasing")),
    Metric("portability_logical_generalization", PORTABILITY, "portability on the "
           "Logical_Generalization probes", True, _token_acc("portability:Logical_Generalization")),
    Metric("locality", PORTABILITY, "fraction of locality answer tokens whose argmax the edit "
           "leaves unchanged (EasyEdit)", True, _locality, needs=_PRE),
)
for _m in (*MQUAKE_METRICS, *PORTABILITY_METRICS):
    if _m.name not in METRICS:
        METRICS.register(_m.name, _m)


# --------------------------------------------------------------- evaluation
@dataclass
class MultiHopReport:
    """Per-record metric values (with each record's ``orig`` labels) and their summaries."""

    method: str
    kind: str
    metrics: list[str]
    rows: list[dict[str, Any]]
    raw: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, by: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """``{group: {metric: mean_ci}}``; ``by`` names a row label (e.g. ``"edit_hop"``,
        ``"composition_seen"``, ``"chain"``) to group on (``"all"`` when ``None``)."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            if row.get("error"):
                continue
            key = "all" if by is None else str(row.get("labels", {}).get(by))
            groups.setdefault(key, []).append(row)
        return {g: {m: mean_ci([r["values"].get(m) for r in rs]) for m in self.metrics}
                for g, rs in sorted(groups.items())}

    def to_markdown(self, by: str | None = None) -> str:
        """A table of every metric's mean ± 95% CI (×100) per group."""
        summ = self.summary(by)
        head = "| group | n | " + " | ".join(self.metrics) + " |"
        lines = [f"### {self.method} on {self.kind}", "", head,
                 "|" + "---|" * (len(self.metrics) + 2)]
        for g, ms in summ.items():
            n = max((v["n"] for v in ms.values()), default=0)
            cells = []
            for m in self.metrics:
                v = ms[m]
                if v["mean"] is None:
                    cells.append("–")
                elif v["ci95"] is None:
                    cells.append(f"{100 * v['mean']:.1f}")
                else:
                    cells.append(f"{100 * v['mean']:.1f} ± {100 * v['ci95']:.1f}")
            lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "kind": self.kind, "metrics": self.metrics,
                "summary": self.summary(), "rows": self.rows, "raw": self.raw}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")


def _labels(record: Any) -> dict[str, Any]:
    orig = getattr(record, "orig", None) or record.raw.get("orig") or {}
    keep = ("chain", "hops", "edit_hop", "composition_seen", "relation")
    return {k: orig[k] for k in keep if k in orig}


def _evaluate(editor_or_method: Any, model: nn.Module | None, tokenizer: TokenizerLike | None,
              records: Sequence[Any], kind: str, scorer: Callable[..., list[RecordScores]],
              metrics: Sequence[str] | None, hparams: Any, progress: bool, skip_errors: bool,
              label: str | None, keep_raw: bool, on_record: Callable[[dict], None] | None
              ) -> MultiHopReport:
    from editkit.eval.runner import _make_editor, _RevertGuard

    names = list(metrics) if metrics is not None else list_metrics(kind)
    chosen = [get_metric(n) for n in names]
    for m in chosen:
        if m.dataset != kind:
            raise EditkitError(f"metric {m.name!r} is a {m.dataset} metric, not a {kind} one; "
                               f"{kind} metrics: {list_metrics(kind)}")
    editor = _make_editor(editor_or_method, model, tokenizer, hparams)
    model, tokenizer = editor.model, editor.tokenizer
    guard = _RevertGuard(editor, enabled=True)
    pre = scorer(model, tokenizer, records)
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    name = label or (editor_or_method if isinstance(editor_or_method, str)
                     else type(editor).__name__)
    for rec, p in tqdm(list(zip(records, pre, strict=True)), desc=f"{name} {kind}",
                       disable=not progress):
        row: dict[str, Any] = {"case_id": rec.case_id, "labels": _labels(rec)}
        try:
            editor.apply(list(rec.requests))
        except EditkitError as exc:
            if not skip_errors:
                raise
            row.update(error=f"{type(exc).__name__}: {exc}", values={})
            rows.append(row)
            if on_record is not None:
                on_record(row)
            continue
        try:
            post = scorer(model, tokenizer, [rec])[0]
        finally:
            guard.revert_added()
        ctx = MetricContext(rec, p)
        row["values"] = {m.name: m.compute(post, ctx) for m in chosen if m.compute is not None}
        rows.append(row)
        if keep_raw:
            raw.append({"case_id": rec.case_id, "pre": p.to_dict(), "post": post.to_dict()})
        if on_record is not None:
            on_record(row)
    return MultiHopReport(name, kind, [m.name for m in chosen], rows, raw)


def evaluate_multihop(editor_or_method: Any, model: nn.Module | None = None,
                      tokenizer: TokenizerLike | None = None,
                      records: Sequence[MultiHopRecord | Mapping[str, Any]] = (), *,
                      metrics: Sequence[str] | None = None, hparams: Any = None,
                      generation: bool = True, max_rows: int = 128, progress: bool = True,
                      skip_errors: bool = False, label: str | None = None,
                      keep_raw: bool = False,
                      on_record: Callable[[dict], None] | None = None) -> MultiHopReport:
    """Edit each MQuAKE record alone (all its requested rewrites in one ``apply``), score the
    MQuAKE metrics before and after, revert exactly.

    Args:
        editor_or_method: an ``Editor``, an ``Editor`` class or a registered method name.
        records: :class:`MultiHopRecord`\\ s or raw MQuAKE dicts.
        metrics: metric names (default: every ``mquake`` metric; without ``generation`` the
            generation metrics are left out).
        on_record: called with each record's row as soon as it is scored (e.g. to append it
            to a JSONL file, so that a long run is usable when interrupted).
    """
    recs = [r if isinstance(r, MultiHopRecord) else parse_mquake(r, i)
            for i, r in enumerate(records)]
    if metrics is None:
        metrics = [m for m in list_metrics(MQUAKE)
                   if generation or "generation" not in get_metric(m).needs]

    def scorer(model: nn.Module, tokenizer: TokenizerLike, rs: Sequence[MultiHopRecord]
               ) -> list[RecordScores]:
        return score_mquake(model, tokenizer, rs, generation=generation, max_rows=max_rows)

    return _evaluate(editor_or_method, model, tokenizer, recs, MQUAKE, scorer, metrics,
                     hparams, progress, skip_errors, label, keep_raw, on_record)


def evaluate_portability(editor_or_method: Any, model: nn.Module | None = None,
                         tokenizer: TokenizerLike | None = None,
                         records: Sequence[PortabilityRecord | Mapping[str, Any]] = (), *,
                         metrics: Sequence[str] | None = None, hparams: Any = None,
                         max_rows: int = 128, progress: bool = True, skip_errors: bool = False,
                         label: str | None = None, keep_raw: bool = False,
                         on_record: Callable[[dict], None] | None = None) -> MultiHopReport:
    """Edit each portability record alone and score EasyEdit's reliability, portability and
    locality (see the module docstring); arguments as :func:`evaluate_multihop`."""
    recs = [r if isinstance(r, PortabilityRecord) else parse_portability(r, i)
            for i, r in enumerate(records)]

    def scorer(model: nn.Module, tokenizer: TokenizerLike, rs: Sequence[PortabilityRecord]
               ) -> list[RecordScores]:
        return score_portability(model, tokenizer, rs, max_rows=max_rows)

    return _evaluate(editor_or_method, model, tokenizer, recs, PORTABILITY, scorer, metrics,
                     hparams, progress, skip_errors, label, keep_raw, on_record)
