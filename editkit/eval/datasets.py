"""Evaluation datasets: CounterFact and zsRE records in their original formats.

**CounterFact** (Meng et al. 2022, the ROME release's ``counterfact.json``): one JSON object
per fact with ``case_id``, ``requested_rewrite`` (``prompt`` with ``{}``, ``subject``,
``target_new.str``, ``target_true.str``), ``paraphrase_prompts``, ``neighborhood_prompts``,
``attribute_prompts`` and ``generation_prompts``.

**zsRE** (the MEND / ROME evaluation split, ``zsre_mend_eval.json``): ``subject``, ``src``
(a question containing the subject), ``alt`` (the new answer), ``answers`` (the original
answers), ``rephrase`` (a paraphrased question), ``loc`` (an unrelated Natural Questions
question) and ``loc_ans`` (its answer).

Every record is validated field by field; a bad one raises :class:`DatasetFormatError`
naming the record (index and ``case_id``) and the field. Records become
:class:`EvalRecord`\\ s: the ``EditRequest`` handed to the editor plus the raw record, from
which the metrics read the prompts the request does not carry (attribute and generation
prompts, ``loc``/``loc_ans``).

Sources (:func:`load_dataset`): a local ``.json`` (a list of records) or ``.jsonl`` file, a
list of dicts, ``"factworld"`` (the offline fact world's CounterFact-shaped records) or
``"hub:<name>[:<split>]"`` through the optional ``datasets`` package when online.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from editkit import jsonio
from editkit.errors import DatasetFormatError, DatasetUnavailableError, InvalidRequestError
from editkit.requests import PLACEHOLDER, EditRequest

logger = logging.getLogger(__name__)

Kind = Literal["counterfact", "zsre"]
KINDS: tuple[str, ...] = ("counterfact", "zsre")

_LOCAL_HINT = (
    "pass a local file instead: --data path/to/counterfact.json (a JSON list of records in "
    "the ROME release format) or path/to/zsre_mend_eval.json, or a .jsonl file with one "
    "record per line; Python: editkit.eval.load_dataset('path.json')"
)


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation case: the edit request and the raw record its metrics read.

    ``index`` is the position in the loaded dataset; ``case_id`` the record's own id (the
    index when the format has none, as in zsRE).
    """

    kind: str
    index: int
    case_id: int | str
    request: EditRequest
    raw: Mapping[str, Any] = field(repr=False)

    # CounterFact groups ------------------------------------------------------------
    @property
    def rewrite_prompts(self) -> list[str]:
        """The rewrite prompt (the request's text) as a one-element list."""
        return [self.request.text]

    @property
    def paraphrase_prompts(self) -> list[str]:
        """Paraphrases of the rewrite prompt (PS)."""
        return list(self.request.paraphrases)

    @property
    def neighborhood_prompts(self) -> list[str]:
        """Prompts whose answer must not change (NS; zsRE: the ``loc`` question)."""
        if self.kind == "zsre":
            return [self.loc_prompt] if self.loc_prompt else []
        return list(self.request.neighborhood)

    @property
    def attribute_prompts(self) -> list[str]:
        """CounterFact prompts about other subjects that have the new object."""
        return list(self.raw.get("attribute_prompts", ()) or ())

    @property
    def generation_prompts(self) -> list[str]:
        """CounterFact prompts for generated text (GE, RS)."""
        return list(self.raw.get("generation_prompts", ()) or ())

    # zsRE locality ----------------------------------------------------------------
    @property
    def loc_prompt(self) -> str | None:
        """The zsRE locality question, ending in ``?`` as the ROME evaluation feeds it."""
        loc = self.raw.get("loc") if self.kind == "zsre" else None
        if not loc:
            return None
        loc = loc.rstrip()
        return loc if loc.endswith("?") else loc + "?"

    @property
    def loc_ans(self) -> str | None:
        """The zsRE locality answer (``None`` for CounterFact)."""
        return self.raw.get("loc_ans") if self.kind == "zsre" else None

    def prompts(self, group: str) -> list[str]:
        """Prompts of a named group: rewrite, paraphrase, neighborhood, attribute, generation."""
        try:
            return getattr(self, f"{group}_prompts")
        except AttributeError:
            raise DatasetFormatError(
                f"unknown prompt group {group!r}; use rewrite, paraphrase, neighborhood, "
                "attribute or generation"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (kind, index, case_id and the request; not the raw record)."""
        return {"kind": self.kind, "index": self.index, "case_id": self.case_id,
                "request": self.request.to_dict()}


# ----------------------------------------------------------------- validation
def _where(kind: str, index: int, record: Any) -> str:
    cid = record.get("case_id") if isinstance(record, Mapping) else None
    label = "CounterFact" if kind == "counterfact" else "zsRE"
    return f"{label} record #{index}" + (f" (case_id {cid!r})" if cid is not None else "")


def _get(record: Mapping[str, Any], path: str, where: str) -> Any:
    node: Any = record
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise DatasetFormatError(f"{where}: missing field {path!r}; add it to the record")
        node = node[part]
    return node


def _string(record: Mapping[str, Any], path: str, where: str) -> str:
    value = _get(record, path, where)
    if not isinstance(value, str) or not value.strip():
        raise DatasetFormatError(
            f"{where}: field {path!r} must be a non-empty string, got {value!r}"
        )
    return value


def _strings(record: Mapping[str, Any], path: str, where: str, required: bool) -> list[str]:
    if path not in record:
        if required:
            raise DatasetFormatError(f"{where}: missing field {path!r} (a list of prompts)")
        return []
    values = record[path]
    if values is None and not required:
        return []
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise DatasetFormatError(
            f"{where}: field {path!r} must be a list of strings, got {type(values).__name__} "
            f"{values!r}"
        )
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise DatasetFormatError(
                f"{where}: field '{path}[{i}]' must be a non-empty string, got {v!r}"
            )
    return list(values)


def parse_counterfact(record: Any, index: int = 0) -> EvalRecord:
    """Validate one CounterFact record and turn it into an :class:`EvalRecord`."""
    where = _where("counterfact", index, record)
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt = _string(record, "requested_rewrite.prompt", where)
    if prompt.count(PLACEHOLDER) != 1:
        raise DatasetFormatError(
            f"{where}: field 'requested_rewrite.prompt' must contain exactly one '{{}}' for "
            f"the subject, got {prompt!r}"
        )
    for path in ("requested_rewrite.subject", "requested_rewrite.target_new.str",
                 "requested_rewrite.target_true.str"):
        _string(record, path, where)
    _strings(record, "paraphrase_prompts", where, required=True)
    _strings(record, "neighborhood_prompts", where, required=True)
    _strings(record, "attribute_prompts", where, required=False)
    _strings(record, "generation_prompts", where, required=False)
    case_id = record.get("case_id", index)
    if not isinstance(case_id, (int, str)) or isinstance(case_id, bool):
        raise DatasetFormatError(f"{where}: field 'case_id' must be an int or string, "
                                 f"got {case_id!r}")
    try:
        request = EditRequest.from_counterfact({**record, "case_id": case_id})
    except (InvalidRequestError, DatasetFormatError) as exc:
        raise DatasetFormatError(f"{where}: {exc}") from exc
    return EvalRecord("counterfact", index, case_id, request, record)


def parse_zsre(record: Any, index: int = 0, target: str = "alt") -> EvalRecord:
    """Validate one zsRE record (MEND/ROME format) and turn it into an :class:`EvalRecord`.

    ``target="alt"`` (default, as MEND) edits the question's answer to ``alt``, with
    ``answers[0]`` as the true answer; ``target="answer"`` edits towards ``answers[0]``
    (what the ROME release's zsRE evaluation does), with no true target.
    """
    where = _where("zsre", index, record)
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if target not in ("alt", "answer"):
        raise DatasetFormatError(f"zsRE target={target!r}; use 'alt' or 'answer'")
    src = _string(record, "src", where)
    subject = _string(record, "subject", where)
    if subject not in src:
        raise DatasetFormatError(
            f"{where}: field 'subject' ({subject!r}) does not occur in field 'src' ({src!r}); "
            "the question must spell the subject exactly"
        )
    if PLACEHOLDER in src:
        raise DatasetFormatError(f"{where}: field 'src' contains '{{}}' ({src!r}); remove it")
    _string(record, "alt", where)
    answers = _strings(record, "answers", where, required=True)
    if not answers:
        raise DatasetFormatError(f"{where}: field 'answers' is empty; give at least one answer")
    _string(record, "rephrase", where)
    _string(record, "loc", where)
    _string(record, "loc_ans", where)
    case_id = record.get("case_id", index)
    if not isinstance(case_id, (int, str)) or isinstance(case_id, bool):
        raise DatasetFormatError(f"{where}: field 'case_id' must be an int or string, "
                                 f"got {case_id!r}")
    try:
        request = EditRequest.from_zsre({**record, "case_id": case_id}, target=target)
    except (InvalidRequestError, DatasetFormatError) as exc:
        raise DatasetFormatError(f"{where}: {exc}") from exc
    # The evaluation scores ``loc`` by token accuracy against ``loc_ans`` (EvalRecord.loc_prompt),
    # not as a CounterFact neighbour of the edit, so the request does not carry it.
    request = dataclasses.replace(request, neighborhood=())
    return EvalRecord("zsre", index, case_id, request, record)


def detect_kind(record: Any) -> str:
    """``"counterfact"`` or ``"zsre"`` from a record's keys."""
    if isinstance(record, Mapping):
        if "requested_rewrite" in record:
            return "counterfact"
        if "src" in record and "alt" in record:
            return "zsre"
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise DatasetFormatError(
        f"cannot tell the dataset format of a record with keys {keys}; CounterFact records "
        "have 'requested_rewrite', zsRE records 'src' and 'alt'. Pass kind='counterfact' or "
        "kind='zsre'"
    )


def parse_records(records: Iterable[Any], kind: str = "auto", n: int | None = None,
                  zsre_target: str = "alt") -> list[EvalRecord]:
    """Validate raw records (dicts) and return :class:`EvalRecord`\\ s (the first ``n``)."""
    out: list[EvalRecord] = []
    for i, rec in enumerate(records):
        if n is not None and i >= n:
            break
        if isinstance(rec, EvalRecord):
            out.append(rec)
            continue
        k = detect_kind(rec) if kind == "auto" else kind
        if k == "counterfact":
            out.append(parse_counterfact(rec, i))
        elif k == "zsre":
            out.append(parse_zsre(rec, i, target=zsre_target))
        else:
            raise DatasetFormatError(f"unknown dataset kind {kind!r}; use one of {KINDS} or 'auto'")
    ids = [r.case_id for r in out]
    if len(set(map(str, ids))) != len(ids):
        seen: set[str] = set()
        dup = next(c for c in map(str, ids) if c in seen or seen.add(c))
        raise DatasetFormatError(f"case_id {dup!r} occurs more than once; case ids must be unique")
    return out


# ---------------------------------------------------------------------- sources
def read_json_records(path: str | Path) -> list[Any]:
    """Records of a ``.json`` file (a list) or a ``.jsonl`` file (one object per line).

    :func:`editkit.jsonio.read_json_records` with the evaluation's hint on a missing file.
    """
    return jsonio.read_json_records(path, hint=_LOCAL_HINT)


def hub_records(name: str, split: str | None = None) -> list[Any]:
    """Records of a hub dataset through the optional ``datasets`` package (needs network)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DatasetUnavailableError(
            f"cannot load hub dataset {name!r}: the 'datasets' package is not installed "
            f"(pip install datasets), or {_LOCAL_HINT}"
        ) from exc
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, unknown name, missing split: all need the same fix
        raise DatasetUnavailableError(
            f"cannot load hub dataset {name!r} (split {split or 'train'!r}): "
            f"{type(exc).__name__}: {exc}. If you are offline, {_LOCAL_HINT}"
        ) from exc
    return [dict(r) for r in ds]


def load_dataset(source: str | Path | Sequence[Any], kind: str = "auto", n: int | None = None,
                 *, split: str | None = None, seed: int = 0,
                 zsre_target: str = "alt") -> list[EvalRecord]:
    """Load evaluation records from a file, the fact world, the hub, or a list of dicts.

    Args:
        source: a ``.json``/``.jsonl`` path; ``"factworld"``; ``"realfacts"`` (the shipped
            real facts SmolLM2 knows, :mod:`editkit.testbed.real_facts`); ``"hub:<name>"`` (optionally
            ``"hub:<name>:<split>"``); or a sequence of raw records / ``EvalRecord``\\ s.
        kind: ``"counterfact"``, ``"zsre"`` or ``"auto"`` (from the first record's keys).
        n: keep the first ``n`` records (the fact world draws a fixed random ``n`` with
            ``seed``).
        zsre_target: see :func:`parse_zsre`.
    """
    if isinstance(source, (str, Path)):
        text = str(source)
        if text == "factworld":
            from editkit.testbed import FactWorld

            return parse_records(FactWorld().records(n, seed=seed), "counterfact")
        if text in ("realfacts", "real_facts"):
            from editkit.testbed.real_facts import real_facts

            return parse_records(real_facts(n), "counterfact")
        if text.startswith("hub:"):
            name, _, hub_split = text[4:].partition(":")
            return parse_records(hub_records(name, hub_split or split), kind, n, zsre_target)
        path = Path(text).expanduser()
        if not path.exists() and path.suffix not in (".json", ".jsonl") and text.count("/") == 1:
            # An "owner/name" that is no local file: a hub dataset id.
            return parse_records(hub_records(text, split), kind, n, zsre_target)
        return parse_records(read_json_records(path), kind, n, zsre_target)
    if isinstance(source, Mapping):
        source = [source]
    return parse_records(source, kind, n, zsre_target)


def load_counterfact(source: str | Path | Sequence[Any], n: int | None = None,
                     **kwargs: Any) -> list[EvalRecord]:
    """CounterFact records from a file, ``"factworld"``, ``"hub:<name>"`` or a list."""
    return load_dataset(source, "counterfact", n, **kwargs)


def load_zsre(source: str | Path | Sequence[Any], n: int | None = None,
              target: str = "alt", **kwargs: Any) -> list[EvalRecord]:
    """zsRE records (MEND/ROME format) from a file, ``"hub:<name>"`` or a list."""
    return load_dataset(source, "zsre", n, zsre_target=target, **kwargs)


def load_requests(source: str | Path | Sequence[Any], n: int | None = None,
                  **kwargs: Any) -> list[EditRequest]:
    """Edit requests from any :func:`load_dataset` source, or from a file of
    ``EditRequest.to_dict()`` objects (``prompt``, ``subject``, ``target_new``, ...).

    CounterFact and zsRE records are validated as :func:`load_dataset` does; ``"factworld"``
    without ``n`` gives every fact-world record in ``case_id`` order.
    """
    raw: Any = source
    if isinstance(source, (str, Path)) and Path(str(source)).expanduser().suffix in (".json",
                                                                                       ".jsonl"):
        raw = read_json_records(Path(str(source)).expanduser())
    if (isinstance(raw, Sequence) and not isinstance(raw, str) and raw
            and all(isinstance(r, Mapping) and "prompt" in r and "subject" in r for r in raw)):
        return [EditRequest.from_dict(r) for r in raw[:n]]
    return [r.request for r in load_dataset(raw, n=n, **kwargs)]

