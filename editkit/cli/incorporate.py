"""``editkit incorporate``: write the facts a passage states into a model by fact edits.

    editkit incorporate --model factworld --passage bio.txt --extractor pattern --method rome
    editkit incorporate --model smollm2 --passage news.txt --triples facts.jsonl --save p.safetensors
    editkit incorporate --model smollm2 --passage news.txt --extractor model --eval questions.jsonl

Prints the triples read from the passage (and every line the extractor could not use), the
edit requests built from them, and a before/after table of each request's prompt. With
--eval FILE (one question per line: subject, relation, prompts, new, old) it also prints the
three-way evaluation: the unedited model, the unedited model with the passage in its prompt,
and the edited model (see docs/results/passages.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from editkit.cli.common import (
    MODEL_CHOICES,
    OptionError,
    add_dtype_option,
    check_device,
    check_method,
    check_model,
    check_overrides,
    check_writable,
    describe,
    is_fact_world,
    load_model,
    probe,
    read_json_option,
)
from editkit.errors import DatasetFormatError
from editkit.jsonio import read_json_records
from editkit.passages.evaluate import (
    PassageRecord,
    cloze_and_generation,
    in_context_share,
    neighbourhood,
    parse_question,
)
from editkit.passages.extractors import EXTRACTORS, GivenExtractor, get_extractor
from editkit.passages.incorporate import incorporate
from editkit.passages.relations import UnknownRelationError, get_relation, list_relations
from editkit.passages.triples import read_triples


def add_parser(subparsers: Any) -> None:
    """Register ``editkit incorporate``."""
    p = subparsers.add_parser(
        "incorporate", help="edit the facts a passage states into a model",
        description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=MODEL_CHOICES)
    p.add_argument("--passage", required=True, help="a UTF-8 text file holding the passage")
    p.add_argument("--triples", help="JSONL, one {subject, relation, object} per line (implies "
                                     "--extractor given)")
    p.add_argument("--extractor", help="given (needs --triples), pattern or model, or a plugin "
                                       "(default: given with --triples, else pattern)")
    p.add_argument("--extractor-model", help="with --extractor model: the model that lists the "
                                             "facts ('smollm2', a directory or hub id; default "
                                             "the edited model)")
    p.add_argument("--method", default="memit", help="registered method (default memit)")
    p.add_argument("--hparams", help="the method's hyperparameters: JSON file or inline object")
    p.add_argument("--set", help='JSON of hyperparameter overrides, e.g. \'{"layer": 2}\'')
    p.add_argument("--save", help="write the patch (safetensors) here; a method that edits one "
                                  "fact at a time writes one file per edit")
    p.add_argument("--eval", help="JSONL of questions about the passage (subject, relation, "
                                  "prompts, new, old[, new_aliases, neighborhood])")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_dtype_option(p)
    p.set_defaults(func=run)


def _read_passage(value: str) -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise OptionError(f"--passage {value!r} does not exist; pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"--passage {value!r} cannot be read ({exc}); pass a UTF-8 text "
                          "file") from None
    if not text.strip():
        raise OptionError(f"--passage {value!r} is empty; write the passage in it")
    return text.strip()


def _read_questions(value: str):
    records = read_json_records(value, hint="one question object per line")
    if not records:
        raise DatasetFormatError(f"--eval {value!r} holds no question")
    return tuple(parse_question(q, f"{value}:{i}") for i, q in enumerate(records, 1))


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """Every option before the model is loaded."""
    check_method(args.method)
    passage = _read_passage(args.passage)
    name = args.extractor or ("given" if args.triples else "pattern")
    if args.triples and name != "given":
        raise OptionError(f"--triples gives the facts, so --extractor {name} would be ignored; "
                          "drop --extractor or --triples")
    if name == "given" and not args.triples:
        raise OptionError("--extractor given needs --triples FILE.jsonl (one {subject, "
                          "relation, object} per line)")
    if args.extractor_model and name != "model":
        raise OptionError("--extractor-model only applies to --extractor model")
    EXTRACTORS.get(name)  # an unknown name is a typed error naming the choices
    triples = read_triples(args.triples) if args.triples else None
    for i, t in enumerate(triples or (), 1):
        try:
            get_relation(t.relation)
        except UnknownRelationError as exc:
            raise UnknownRelationError(f"--triples {args.triples!r} line {i}: {exc}") from None
    if args.hparams is not None:
        check_overrides(args.method, read_json_option("--hparams", args.hparams) or {},
                        "--hparams")
    overrides = read_json_option("--set", args.set, inline_only=True) or {}
    check_overrides(args.method, overrides)
    questions = _read_questions(args.eval) if args.eval else None
    check_device(args.device)
    check_model(args.model)
    if args.save:
        check_writable("--save", args.save)
    return {"passage": passage, "extractor": name, "triples": triples, "overrides": overrides,
            "questions": questions}


def _extractor(name: str, args: argparse.Namespace, triples):
    if name == "given":
        return GivenExtractor(triples, strict=True)
    if name == "pattern":
        return get_extractor("pattern", relations=None if is_fact_world(args.model)
                             else list_relations())
    if name == "model":
        return get_extractor("model", model_name=args.extractor_model)
    return get_extractor(name)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def run(args: argparse.Namespace) -> int:
    """Run ``editkit incorporate``; returns the exit status."""
    opts = _check(args)
    model, tok = load_model(args.model, args.device, dtype=args.model_dtype)
    hparams: Any = opts["overrides"] or None
    if args.hparams:
        from editkit.registry import get_method

        cls = get_method(args.method)
        hp = cls.hparams_class.from_json(args.hparams) if not args.hparams.lstrip().startswith(
            "{") else cls.hparams_class.from_dict(read_json_option("--hparams", args.hparams))
        hparams = cls.hparams_class.from_dict({**hp.to_dict(), **opts["overrides"]})
    passage = opts["passage"]
    record = None
    before_eval = None
    if opts["questions"]:
        record = PassageRecord("cli", passage, (), opts["questions"])
        before_eval = (cloze_and_generation(model, tok, record),
                       cloze_and_generation(model, tok, record, context=passage),
                       neighbourhood(model, tok, record))
    extractor = _extractor(opts["extractor"], args, opts["triples"])
    extraction = extractor(passage, model=model, tokenizer=tok)
    print(f"extractor {opts['extractor']}: {len(extraction.triples)} triple(s)")
    for t in extraction.triples:
        print(f"  ({t.subject!r}, {t.relation}, {t.object!r})")
    if extraction.rejected:
        print(f"rejected {len(extraction.rejected)} line(s):")
        for r in extraction.rejected:
            print(f"  {r.line!r}: {r.reason}")
    # The extraction's triples are now fixed: incorporate them as given (checked again).
    triples = extraction.triples
    if not triples:
        raise DatasetFormatError("no usable triple was found in the passage (every line is "
                                 "listed above with the reason); give the facts with --triples "
                                 "FILE.jsonl or try another --extractor")
    from editkit.passages.incorporate import requests_from_triples

    requests = requests_from_triples(triples)
    before = [probe(model, tok, "before", r.text, r.target_new, r.target_true) for r in requests]
    result = incorporate(model, tok, passage, triples, method=args.method, hparams=hparams)
    print(f"{args.method}: {len(result.requests)} request(s) applied as {len(result.edits)} "
          "edit(s)")
    for line, r in zip(before, result.requests, strict=True):
        print(f"  request: {r.prompt!r} subject={r.subject!r} → {r.target_new!r}")
        print(line)
        print(probe(model, tok, "after", r.text, r.target_new, r.target_true))
    if record is not None and before_eval is not None:
        a, b, ns_a = before_eval
        c = cloze_and_generation(model, tok, record)
        ns_c = neighbourhood(model, tok, record)
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        rows = {k: {"a": mean(a[k]), "b": mean(b[k]), "c": mean(c[k])} for k in ("cloze", "gen")}
        print(f"evaluation on {len(record.questions)} question(s):")
        print("  score       (a) unedited  (b) passage in context  (c) edited  share of gain")
        for k, v in rows.items():
            share = in_context_share([{f"a_{k}": v["a"], f"b_{k}": v["b"], f"c_{k}": v["c"]}],
                                     k, n_boot=0)
            print(f"  {k:<10}  {_pct(v['a']):>12}  {_pct(v['b']):>22}  {_pct(v['c']):>10}  "
                  f"{_pct(share['share']) if share['share'] is not None else 'undefined (b≤a)'}")
        print(f"  neighbourhood success: {_pct(mean(ns_a))} → {_pct(mean(ns_c))}")
    if args.save:
        if len(result.edits) > 1:
            print(f"saved one patch per edit ({len(result.edits)}):")
            for e in result.edits:
                print(f"  {e.patch.save(Path(args.save).with_suffix(f'.{e.id}.safetensors'))}")
        else:
            print(f"saved the patch to {result.edits[0].patch.save(args.save)}")
    return 0
