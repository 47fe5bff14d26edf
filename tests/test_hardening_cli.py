"""Hardening of the command line and the cache: a table of user mistakes, each refused with
the right exit status, a message on stderr naming the bad value and the fix, and never a
traceback; ``editkit cache``; stale temporaries; the statistics progress total."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from badinput import assert_cli_refused, run_cli
from conftest import tiny_model

import editkit.cli as cli
from editkit import EditkitError
from editkit.cache import cache_entries, clear_cache, remove_stale_temporaries
from editkit.stats import second_moment


# ----------------------------------------------------------------------------- files
@dataclass(frozen=True)
class Files:
    """The files the cases refer to (made once per module)."""

    root: Path
    model: Path  # a tiny GPT-2 with its tokenizer
    no_tokenizer: Path  # model weights and config, no tokenizer files
    empty_dir: Path  # no config.json at all
    a_file: Path  # a regular file, used where a directory belongs

    def __call__(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def files(tmp_path_factory, bytelevel_tokenizer) -> Files:
    root = tmp_path_factory.mktemp("hardening_cli")
    model = tiny_model("gpt2", len(bytelevel_tokenizer))
    model.save_pretrained(root / "m")
    bytelevel_tokenizer.save_pretrained(root / "m")
    model.save_pretrained(root / "notok")
    (root / "empty").mkdir()
    (root / "afile").write_text("not a directory")
    (root / "bad.jsonl").write_text('{"prompt": "{} is", "subject": "x"\n')
    (root / "list.jsonl").write_text("[1, 2]\n")
    (root / "blank.jsonl").write_text("\n\n")
    (root / "noplace.jsonl").write_text(json.dumps(
        {"prompt": "no placeholder", "subject": "x", "target_new": "y"}) + "\n")
    (root / "bad_hp.json").write_text('{"lr": 1e-3,')
    (root / "list_hp.json").write_text("[1, 2]")
    (root / "bad_data.json").write_text("[{")
    (root / "obj_data.json").write_text('{"not": "a list"}')
    (root / "empty.txt").write_text("")
    (root / "weird.json").write_text('[{"a": 1}]')
    return Files(root, root / "m", root / "notok", root / "empty", root / "afile")


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class CliCase:
    """One command line a user could type by mistake, and how it must be refused."""

    id: str
    argv: Callable[[Files], Sequence[str]]
    status: int = 2
    mentions: tuple[str, ...] = ()

    def param(self):
        return pytest.param(self, id=self.id)


def _edit(f: Files, *extra: str) -> list[str]:
    return ["edit", "--model", str(f.model), "--method", "ft", "--prompt", "{} plays",
            "--subject", "LeBron James", "--target", "golf", *extra]


CUDA_DEVICE = "cuda:99" if torch.cuda.is_available() else "cuda"

CASES = [
    # ---- edit: requests, hyperparameters, options, outputs, model, device
    CliCase("edit-requests-missing",
            lambda f: ["edit", "--model", str(f.model), "--requests", f("missing.jsonl")],
            mentions=("missing.jsonl", "JSONL file")),
    CliCase("edit-requests-malformed-json",
            lambda f: ["edit", "--model", str(f.model), "--requests", f("bad.jsonl")],
            mentions=("bad.jsonl", "line 1", "one JSON object per line")),
    CliCase("edit-requests-not-objects",
            lambda f: ["edit", "--model", str(f.model), "--requests", f("list.jsonl")],
            mentions=("list.jsonl", "not an object", "target_new")),
    CliCase("edit-requests-blank-file",
            lambda f: ["edit", "--model", str(f.model), "--requests", f("blank.jsonl")],
            mentions=("blank.jsonl", "no request", "one JSON object per line")),
    CliCase("edit-requests-bad-request",
            lambda f: ["edit", "--model", str(f.model), "--requests", f("noplace.jsonl")],
            mentions=("noplace.jsonl", "line 1", "'{}'")),
    CliCase("edit-requests-and-prompt",
            lambda f: [*_edit(f), "--requests", f("noplace.jsonl")],
            mentions=("--prompt", "either a requests file")),
    CliCase("edit-missing-target",
            lambda f: ["edit", "--model", str(f.model), "--prompt", "{} plays", "--subject", "x"],
            mentions=("--target", "--requests")),
    CliCase("edit-prompt-without-placeholder",
            lambda f: ["edit", "--model", str(f.model), "--prompt", "no placeholder",
                       "--subject", "x", "--target", "y"],
            mentions=("no placeholder", "'{}'")),
    CliCase("edit-hparams-missing-file", lambda f: _edit(f, "--hparams", f("nope.json")),
            mentions=("nope.json", "JSON file")),
    CliCase("edit-hparams-malformed", lambda f: _edit(f, "--hparams", f("bad_hp.json")),
            mentions=("bad_hp.json", "valid JSON", "double-quoted")),
    CliCase("edit-hparams-not-an-object", lambda f: _edit(f, "--hparams", f("list_hp.json")),
            mentions=("list_hp.json", "JSON object")),
    CliCase("edit-set-malformed", lambda f: _edit(f, "--set", "{bad"),
            mentions=("{bad", "not valid JSON", "double-quoted")),
    CliCase("edit-set-unknown-field", lambda f: _edit(f, "--set", '{"lrr": 0.1}'),
            mentions=("lrr", "choose among", "lr")),
    CliCase("edit-set-not-an-object", lambda f: _edit(f, "--set", "[0.1]"),
            mentions=("[0.1]", "must be a JSON object", '{"field": value}')),
    CliCase("edit-layer-ignored-by-ke",
            lambda f: ["edit", "--model", str(f.model), "--method", "ke", "--layer", "1",
                       "--prompt", "{} plays", "--subject", "x", "--target", "y"],
            mentions=("--layer 1", "ke", '"layers": [1]')),
    CliCase("edit-layer-ignored-by-memit",
            lambda f: ["edit", "--model", str(f.model), "--method", "memit", "--layer", "2",
                       "--prompt", "{} plays", "--subject", "x", "--target", "y"],
            mentions=("--layer 2", "memit", '"layers": [2]')),
    CliCase("edit-layer-twice", lambda f: _edit(f, "--layer", "1", "--set", '{"layer": 2}'),
            mentions=("--layer", "keep one")),
    CliCase("edit-layer-out-of-range", lambda f: _edit(f, "--layer", "7"),
            mentions=("--layer 7", "[0, 2]")),
    CliCase("edit-set-wrong-type", lambda f: _edit(f, "--set", '{"lr": "fast"}'),
            mentions=("lr", "fast", "finite number")),
    CliCase("edit-prompt-longer-than-the-context",
            lambda f: ["edit", "--model", str(f.model), "--method", "ft",
                       "--prompt", "{} plays" + " and plays" * 200, "--subject", "LeBron James",
                       "--target", "golf"],
            mentions=("context", "128")),
    CliCase("edit-layer-not-an-integer", lambda f: _edit(f, "--layer", "one"),
            mentions=("one", "int")),
    CliCase("edit-unknown-method",
            lambda f: ["edit", "--model", str(f.model), "--method", "rom", "--prompt", "{} is",
                       "--subject", "x", "--target", "y"],
            mentions=("rom", "rome")),
    CliCase("edit-save-under-a-file", lambda f: _edit(f, "--save", f("afile/p.safetensors")),
            mentions=("afile", "writable directory")),
    CliCase("edit-save-is-a-directory", lambda f: _edit(f, "--save", str(f.root)),
            mentions=("is a directory", "patch.safetensors")),
    CliCase("edit-out-model-is-a-file", lambda f: _edit(f, "--out-model", str(f.a_file)),
            mentions=("afile", "not a directory")),
    CliCase("edit-device-without-cuda", lambda f: _edit(f, "--device", CUDA_DEVICE),
            mentions=(CUDA_DEVICE, "--device cpu")),
    CliCase("edit-device-unknown", lambda f: _edit(f, "--device", "gpu0"),
            mentions=("gpu0", "cpu")),
    CliCase("edit-model-missing",
            lambda f: ["edit", "--model", f("no_such_model"), "--prompt", "{} is",
                       "--subject", "x", "--target", "y"],
            mentions=("no_such_model", "save_pretrained")),
    CliCase("edit-model-without-tokenizer",
            lambda f: ["edit", "--model", str(f.no_tokenizer), "--prompt", "{} is",
                       "--subject", "x", "--target", "y"],
            mentions=("notok", "tokenizer.save_pretrained")),
    CliCase("edit-model-without-config",
            lambda f: ["edit", "--model", str(f.empty_dir), "--prompt", "{} is",
                       "--subject", "x", "--target", "y"],
            mentions=("config.json", "model.save_pretrained")),
    CliCase("edit-mend-without-hypernetwork",
            lambda f: ["edit", "--model", str(f.model), "--method", "mend", "--prompt",
                       "{} plays", "--subject", "x", "--target", "y"],
            mentions=("hypernetwork", "train-mend", '--hparams \'{"hypernet_path"')),
    # ---- eval
    CliCase("eval-n-negative",
            lambda f: ["eval", "--model", "factworld", "--method", "ft", "--data", "factworld",
                       "--n", "-1", "--out", f("out")],
            mentions=("--n -1", ">= 1")),
    CliCase("eval-data-missing",
            lambda f: ["eval", "--model", str(f.model), "--method", "ft", "--data",
                       f("missing.json"), "--out", f("out")],
            mentions=("missing.json",)),
    CliCase("eval-hparams-malformed",
            lambda f: ["eval", "--model", "factworld", "--method", "ft", "--data", "factworld",
                       "--hparams", "{oops", "--out", f("out")],
            mentions=("{oops", "JSON")),
    CliCase("eval-checkpoints-not-integers",
            lambda f: ["eval", "--model", "factworld", "--method", "ft", "--data", "factworld",
                       "--protocol", "sequential", "--checkpoints", "a,b", "--out", f("out")],
            mentions=("a,b", "integers")),
    CliCase("eval-batch-size-without-batch-protocol",
            lambda f: ["eval", "--model", "factworld", "--method", "ft", "--data", "factworld",
                       "--batch-size", "4", "--out", f("out")],
            mentions=("--batch-size 4", "--protocol batch")),
    CliCase("eval-data-format-unknown",
            lambda f: ["eval", "--model", "factworld", "--method", "ft", "--data",
                       f("weird.json"), "--out", f("out")],
            mentions=("keys ['a']", "--format counterfact")),
    CliCase("eval-out-is-a-file",
            lambda f: ["eval", "--model", "factworld", "--method", "ft", "--data", "factworld",
                       "--out", str(f.a_file)],
            mentions=("afile", "directory")),
    CliCase("eval-unknown-protocol",
            lambda f: ["eval", "--model", "factworld", "--method", "ft", "--data", "factworld",
                       "--protocol", "parallel"],
            mentions=("parallel", "choose from")),
    # ---- demo
    CliCase("demo-record-out-of-range", lambda f: ["demo", "--record", "99999"],
            mentions=("99999", "0 to 599")),
    CliCase("demo-record-negative", lambda f: ["demo", "--record", "-1"],
            mentions=("-1", "0 to 599")),
    CliCase("demo-record-with-smollm2", lambda f: ["demo", "--model", "smollm2", "--record", "3"],
            mentions=("--record 3", "leave --record out")),
    CliCase("demo-generate-negative", lambda f: ["demo", "--generate", "-5"],
            mentions=("--generate -5", ">= 0")),
    CliCase("demo-unknown-method", lambda f: ["demo", "--method", "romee"],
            mentions=("romee", "rome")),
    # ---- stats
    CliCase("stats-layers-not-integers", lambda f: ["stats", str(f.model), "--layers", "five"],
            mentions=("five", "'all'")),
    CliCase("stats-layer-out-of-range",
            lambda f: ["stats", str(f.model), "--layers", "9", "--texts", "pydoc",
                       "--cache-dir", f("stats_cache"), "--no-progress"],
            mentions=("--layers 9", "[0, 2]")),
    CliCase("stats-texts-missing",
            lambda f: ["stats", str(f.model), "--layers", "0", "--texts", f("missing.txt")],
            mentions=("missing.txt", "pydoc")),
    CliCase("stats-n-samples-zero",
            lambda f: ["stats", str(f.model), "--layers", "0", "--n-samples", "0"],
            mentions=("--n-samples 0", ">= 1")),
    CliCase("stats-unknown-model-name", lambda f: ["stats", "factwrold", "--layers", "0"],
            mentions=("factwrold", "factworld")),
    CliCase("stats-device-without-cuda",
            lambda f: ["stats", str(f.model), "--layers", "0", "--device", CUDA_DEVICE],
            mentions=(CUDA_DEVICE, "--device cpu")),
    CliCase("stats-empty-text-file-fails",  # a failure (the statistics cannot be computed): 1
            lambda f: ["stats", str(f.model), "--layers", "0", "--texts", f("empty.txt"),
                       "--cache-dir", f("stats_cache"), "--no-progress"],
            status=1, mentions=("no tokens", "empty.txt")),
    # ---- trace and suggest-layer
    CliCase("trace-data-missing",
            lambda f: ["trace", "--model", str(f.model), "--data", f("missing.json"),
                       "--out", f("trace")],
            mentions=("missing.json", "CounterFact records")),
    CliCase("trace-data-not-json",
            lambda f: ["trace", "--model", str(f.model), "--data", f("bad_data.json"),
                       "--out", f("trace")],
            mentions=("bad_data.json", "valid JSON")),
    CliCase("trace-data-not-a-list",
            lambda f: ["trace", "--model", str(f.model), "--data", f("obj_data.json"),
                       "--out", f("trace")],
            mentions=("obj_data.json", "JSON list")),
    CliCase("trace-prompt-without-subject",
            lambda f: ["trace", "--model", str(f.model), "--prompt", "{} was born in",
                       "--out", f("trace")],
            mentions=("--subject", "together")),
    CliCase("trace-directory-model-without-data",
            lambda f: ["trace", "--model", str(f.model), "--out", f("trace")],
            mentions=("--data FILE",)),
    CliCase("trace-samples-zero",
            lambda f: ["trace", "--model", "factworld", "--samples", "0", "--out", f("trace")],
            mentions=("--samples 0", ">= 1")),
    CliCase("trace-out-is-a-file",
            lambda f: ["trace", "--model", "factworld", "--out", str(f.a_file)],
            mentions=("afile", "directory")),
    CliCase("suggest-layer-layers-not-integers",
            lambda f: ["suggest-layer", "--model", "factworld", "--sweep", "rome",
                       "--layers", "a,b"],
            mentions=("a,b", "3,4,5")),
    CliCase("suggest-layer-layers-without-sweep",
            lambda f: ["suggest-layer", "--model", "factworld", "--layers", "1,2"],
            mentions=("--layers", "--sweep METHOD")),
    CliCase("suggest-layer-sweep-layer-out-of-range",
            lambda f: ["suggest-layer", "--model", "factworld", "--n", "2", "--samples", "1",
                       "--sweep", "ft", "--layers", "99", "--no-progress"],
            mentions=("--layers 99", "[0, 3]")),
    CliCase("suggest-layer-unknown-sweep-method",
            lambda f: ["suggest-layer", "--model", "factworld", "--sweep", "rme"],
            mentions=("rme",)),
    # ---- compare, train-*
    CliCase("compare-missing-results", lambda f: ["compare", f("no_results")],
            mentions=("no_results", "results.json")),
    CliCase("train-mend-config-missing",
            lambda f: ["train-mend", "--model", "factworld", "--data", "factworld",
                       "--out", f("mend"), "--config", f("missing_config.json")],
            mentions=("missing_config.json", "JSON file")),
    CliCase("train-ke-split-not-three",
            lambda f: ["train-ke", "--model", "factworld", "--data", "factworld",
                       "--out", f("ke"), "--split", "0.8,0.2"],
            mentions=("0.8,0.2", "three fractions")),
    CliCase("train-ke-locality-missing",
            lambda f: ["train-ke", "--model", "factworld", "--data", "factworld",
                       "--out", f("ke"), "--locality", f("missing.txt")],
            mentions=("missing.txt", "one per line")),
    CliCase("train-mend-steps-zero",
            lambda f: ["train-mend", "--model", "factworld", "--data", "factworld",
                       "--out", f("mend"), "--steps", "0"],
            mentions=("--steps 0", ">= 1")),
    CliCase("train-ke-split-not-numbers",
            lambda f: ["train-ke", "--model", "factworld", "--data", "factworld",
                       "--out", f("ke"), "--split", "a,b,c"],
            mentions=("a,b,c", "0.8,0.1,0.1")),
    CliCase("train-mend-config-not-an-object",
            lambda f: ["train-mend", "--model", "factworld", "--data", "factworld",
                       "--out", f("mend"), "--config", "[1]"],
            mentions=("[1]", "JSON object")),
    CliCase("trace-unknown-kind",
            lambda f: ["trace", "--model", "factworld", "--kinds", "foo", "--out", f("trace")],
            mentions=("foo", "hidden")),
    CliCase("eval-unknown-metric",
            lambda f: ["eval", "--model", "factworld", "--method", "ft", "--data", "factworld",
                       "--n", "1", "--metrics", "XYZ", "--out", f("out"), "--no-progress"],
            mentions=("XYZ", "known")),
    CliCase("train-ke-data-missing",
            lambda f: ["train-ke", "--model", "factworld", "--data", f("missing.json"),
                       "--out", f("ke")],
            mentions=("missing.json", "factworld")),
    # ---- cache and the top level
    CliCase("cache-clear-unknown-kind", lambda f: ["cache", "clear", "nosuch", "--yes"],
            mentions=("nosuch", "choose one of")),
    CliCase("cache-list-with-kind", lambda f: ["cache", "list", "stats"],
            mentions=("stats", "editkit cache list")),
    CliCase("cache-clear-not-confirmed", lambda f: ["cache", "clear"],
            mentions=("nothing deleted", "--yes")),
    CliCase("unknown-subcommand", lambda f: ["edti"], mentions=("edti", "choose from")),
    CliCase("verbose-after-subcommand-still-typed",
            lambda f: ["edit", "-v", "--model", f("no_such_model"), "--prompt", "{} is",
                       "--subject", "x", "--target", "y"],
            mentions=("no_such_model", "save_pretrained")),
]

# ---- incorporate (passage incorporation): missing or empty passage, bad triples, bad options
CASES += [
    CliCase("incorporate-passage-missing",
            lambda f: ["incorporate", "--model", str(f.model), "--passage", f("nope.txt")],
            mentions=("--passage", "nope.txt", "does not exist")),
    CliCase("incorporate-passage-empty",
            lambda f: ["incorporate", "--model", str(f.model), "--passage", f("empty.txt")],
            mentions=("--passage", "empty")),
    CliCase("incorporate-triples-malformed",
            lambda f: ["incorporate", "--model", str(f.model), "--passage", f("afile"),
                       "--triples", f("bad.jsonl")],
            mentions=("bad.jsonl:1", "invalid JSON")),
    CliCase("incorporate-triples-not-triples",
            lambda f: ["incorporate", "--model", str(f.model), "--passage", f("afile"),
                       "--triples", f("weird.json")],
            mentions=("weird.json:1", "subject")),
    CliCase("incorporate-given-without-triples",
            lambda f: ["incorporate", "--model", str(f.model), "--passage", f("afile"),
                       "--extractor", "given"],
            mentions=("--triples",)),
    CliCase("incorporate-unknown-extractor",
            lambda f: ["incorporate", "--model", str(f.model), "--passage", f("afile"),
                       "--extractor", "regex"],
            mentions=("regex", "pattern")),
]


if "apply" in cli.build_parser()._subparsers._group_actions[0].choices:
    # ``editkit apply --model DIR PATCH`` (issue 15, another branch): a patch that is not
    # there is a bad input file, a usage error like every other.
    CASES.append(CliCase(
        "apply-patch-missing",
        lambda f: ["apply", "--model", str(f.model), f("missing.safetensors")],
        mentions=("missing.safetensors",)))


# ``editkit study localization`` (issue 18): an unknown objective, a method that cannot
# optimise one, and a model that is not there are usage errors.
CASES += [
    CliCase("study-unknown-objective",
            lambda f: ["study", "localization", "--model", str(f.model), "--objectives",
                       "inject,delete", "--out", f("study_out")], mentions=("delete",)),
    CliCase("study-method-without-objectives",
            lambda f: ["study", "localization", "--model", str(f.model), "--methods", "mend",
                       "--objectives", "force", "--out", f("study_out")],
            mentions=("mend", "force")),
    CliCase("study-missing-model",
            lambda f: ["study", "localization", "--model", f("no_such_model"), "--out",
                       f("study_out")], mentions=("no_such_model",)),
]


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    """An empty editkit cache of its own (the cases must not touch the user's cache)."""
    root = tmp_path / "editkit_cache"
    (root / "stats").mkdir(parents=True)
    (root / "stats" / "entry.safetensors").write_bytes(b"x" * 10)
    monkeypatch.setenv("EDITKIT_CACHE", str(root))
    return root


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({tuple(c.argv(Files(Path("/r"), Path("/m"), Path("/n"), Path("/e"),
                                   Path("/f")))) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_cli_refuses(case: CliCase, files: Files, cache_root: Path):
    err = assert_cli_refused(case.argv(files), status=case.status, mentions=case.mentions)
    first = err.strip().splitlines()[-1]
    assert first.startswith("editkit"), err  # "editkit <subcommand>: error: ..."
    assert ": error:" in err


def test_no_subcommand_prints_a_traceback_or_python_spellings(files: Files, cache_root: Path):
    """Every case of the table, in one run, with -v too: no traceback, no keyword argument
    spellings (``texts=[``, ``hparams=``) where an option is meant, the model files intact."""
    before = {p: p.read_bytes() for p in files.model.iterdir() if p.is_file()}
    seen = set()
    for case in CASES:
        for argv in (list(case.argv(files)), ["-v", *case.argv(files)]):
            code, out, err = run_cli(argv)
            assert "Traceback" not in out + err, (case.id, err)
            assert code == case.status, (case.id, code, err)
            for python in ("hparams=", "texts=[", "texts='", "Pass hparams"):
                assert python not in err, (case.id, err)
            seen.add(argv[0] if argv[0] != "-v" else argv[1])
    assert {p: p.read_bytes() for p in files.model.iterdir() if p.is_file()} == before
    names = {name for name in cli.build_parser()._subparsers._group_actions[0].choices}
    # every subcommand that takes input is exercised by the table ('methods' takes none)
    assert names - seen == {"methods"}


def test_an_unexpected_exception_is_a_bug_report_with_the_traceback_under_verbose(monkeypatch):
    from editkit.cli import methods

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(methods, "run", broken)
    code, out, err = run_cli(["methods"])
    assert code == 1 and "Traceback" not in err
    assert "editkit methods: error: unexpected ZeroDivisionError" in err
    assert "please report" in err and "-v" in err
    code, out, err = run_cli(["methods", "-v"])
    assert code == 1 and "Traceback" in err and "please report" in err


def test_verbose_works_before_and_after_the_subcommand():
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "methods"]).verbose is True
    assert parser.parse_args(["methods", "-v"]).verbose is True
    assert parser.parse_args(["methods"]).verbose is False


def test_library_warnings_speak_cli(files: Files, tmp_path):
    code, out, err = run_cli(_edit(files, "--layer", "1", "--save",
                                   str(tmp_path / "p.safetensors")))
    assert code == 0, err
    assert "editkit edit: warning:" in err and "--hparams FILE.json" in err
    assert "hparams=" not in err and "UserWarning" not in err
    assert "saved the patch to" in out


def test_save_with_several_requests_says_what_it_wrote(files: Files, tmp_path):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("\n".join(json.dumps(d) for d in [
        {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "golf"},
    ]))
    code, out, err = run_cli(["edit", "--model", str(files.model), "--method", "ft_l",
                              "--requests", str(reqs), "--save", str(tmp_path / "p.safetensors")])
    assert code == 0, err
    written = sorted(tmp_path.glob("p.*.safetensors"))
    assert len(written) == 2
    assert "as 2 separate edits; saved one patch per edit" in out
    assert all(str(p) in out for p in written)


#: reStructuredText that a terminal would show raw.
MARKUP = ("``", ":func:", ":mod:", ":class:", ":meth:", ":data:", ":attr:", "`")


def test_every_subcommand_help_has_a_description_without_markup():
    parser = cli.build_parser()
    subparsers = parser._subparsers._group_actions[0]
    assert len(subparsers.choices) == len(cli.SUBCOMMANDS)
    for name, sub in subparsers.choices.items():
        assert sub.description and sub.description.strip(), name
        text = sub.format_help()
        for mark in MARKUP:
            assert mark not in text, (name, mark)
    assert not any(m in parser.format_help() for m in MARKUP)


def test_stats_accepts_every_model_name(monkeypatch):
    """``editkit stats`` takes the same --model spellings as the other subcommands."""
    from editkit.cli import common

    seen = []

    def fake_load(spec, device="cpu", **_):
        seen.append(spec)
        raise common.OptionError("stop here")

    monkeypatch.setattr("editkit.cli.stats.load_model", fake_load)
    for spec in ("factworld", "fact_world", "fact-world", "FactWorld", "smollm2"):
        code, _, err = run_cli(["stats", spec, "--layers", "0"])
        assert code == 2 and "stop here" in err, err
    assert seen == ["factworld", "fact_world", "fact-world", "FactWorld", "smollm2"]


def test_options_are_checked_before_the_model_is_loaded(files: Files, monkeypatch):
    loads = []
    monkeypatch.setattr("editkit.cli.edit.load_model",
                        lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError))
    for argv in (_edit(files, "--set", "{bad"), _edit(files, "--save", str(files.root)),
                 _edit(files, "--device", CUDA_DEVICE), _edit(files, "--hparams", "missing")):
        assert run_cli(argv)[0] == 2
    assert loads == []


# ----------------------------------------------------------------------------- cache
def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (then, then))


def test_cache_list_shows_kinds_sizes_and_temporaries(cache_root: Path):
    (cache_root / "context_templates").mkdir()
    (cache_root / "context_templates" / "t.json").write_text("[]")
    (cache_root / "stats" / "mom2_l0.safetensorsabc.tmp").write_bytes(b"y" * 5)
    code, out, err = run_cli(["cache", "list"])
    assert code == 0, err
    assert str(cache_root) in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "10 B" in lines["stats"] and "second-moment statistics" in lines["stats"]
    assert "context templates" in lines["context_templates"]
    assert "5 B" in lines["tmp"] and "total" in lines
    entries = {e.kind: e for e in cache_entries(cache_root)}
    assert entries["stats"].bytes == 10 and entries["stats"].files == 1


def test_cache_clear_one_kind_then_everything(cache_root: Path):
    (cache_root / "smollm2").mkdir()
    (cache_root / "smollm2" / "model.safetensors").write_bytes(b"z")
    code, out, err = run_cli(["cache", "clear", "stats", "--yes"])
    assert code == 0, err
    assert not (cache_root / "stats").exists() and (cache_root / "smollm2").exists()
    assert "deleted 1 item(s) of the 'stats' cache" in out
    code, out, err = run_cli(["cache", "clear", "--yes"])
    assert code == 0 and not any(cache_root.iterdir())
    assert "(empty)" in run_cli(["cache", "list"])[1]


def test_clear_cache_refuses_paths_outside_the_cache(tmp_path):
    (tmp_path / "c" / "stats").mkdir(parents=True)
    for kind in ("..", "../c", "/etc", "stats/../.."):
        with pytest.raises(EditkitError):
            clear_cache(kind, tmp_path / "c")
    assert (tmp_path / "c" / "stats").exists()


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path):
    root = tmp_path / "cache"
    (root / "stats" / "gpt2").mkdir(parents=True)
    stale_file = root / "stats" / "gpt2" / "mom2_l1_x.safetensorsk2j3.tmp"
    stale_file.write_bytes(b"partial")
    fresh_file = root / "context_templates" / "tmpab12.tmp"
    fresh_file.parent.mkdir()
    fresh_file.write_text("[")
    stale_dir = root / "fact_world" / ".abc.tmp-xyz"
    stale_dir.mkdir(parents=True)
    (stale_dir / "model.safetensors").write_bytes(b"w")
    stale_smollm2 = root / "smollm2" / ".smollm2-q1w2"
    stale_smollm2.mkdir(parents=True)
    finished = root / "stats" / "gpt2" / "mom2_l1_x.safetensors"
    finished.write_bytes(b"done")
    for p in (stale_file, stale_dir, stale_smollm2, finished):
        _age(p, 3 * 3600)
    removed = remove_stale_temporaries(root)
    assert set(removed) == {stale_file, stale_dir, stale_smollm2}
    assert not stale_file.exists() and not stale_dir.exists() and not stale_smollm2.exists()
    assert fresh_file.exists() and finished.exists()  # young temporaries may still be written
    # A folder a live writer still touches is young even if the folder itself is old.
    busy = root / "fact_world" / ".def.tmp-live"
    busy.mkdir()
    _age(busy, 3 * 3600)
    (busy / "checkpoint.safetensors").write_bytes(b"now")
    assert remove_stale_temporaries(root) == [] and busy.exists()


def test_the_next_command_cleans_stale_temporaries_of_the_cache(cache_root: Path, monkeypatch):
    import editkit.cache

    monkeypatch.setattr(editkit.cache, "_SWEPT", set())
    dead = cache_root / "smollm2" / ".smollm2-killed"
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half")
    _age(dead, 2 * 3600)
    code, out, err = run_cli(["methods"])
    assert code == 0 and not dead.exists()


@pytest.fixture
def gpt2_tok(bytelevel_tokenizer):
    return tiny_model("gpt2", len(bytelevel_tokenizer)), bytelevel_tokenizer


def test_the_next_statistics_run_cleans_a_killed_write(gpt2_tok, tmp_path):
    """A kill between mkstemp and the rename leaves ``*.tmp``; the next run deletes it."""
    model, tok = gpt2_tok
    cache = tmp_path / "stats_cache"
    left = cache / "gpt2" / "mom2_l1_dead.safetensorsqq.tmp"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a file")
    _age(left, 2 * 3600)
    second_moment(model, [1], ["a few words here", "and some more"], tokenizer=tok,
                  n_samples=2, max_length=16, cache_dir=cache, progress=False)
    assert not left.exists()
    assert list(cache.rglob("mom2_l1_*.safetensors"))


class _RecordingBar:
    """A stand-in for tqdm that remembers its total and progress."""

    bars: list[_RecordingBar] = []

    def __init__(self, total=None, initial=0, **kwargs):
        self.total, self.n = total, initial
        _RecordingBar.bars.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *args, **kwargs):
        pass

    def refresh(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("source", ["list", "file"])
def test_progress_shows_the_real_total_when_the_source_runs_out(gpt2_tok, tmp_path, monkeypatch,
                                                                 caplog, source):
    model, tok = gpt2_tok
    texts = ["the first text", "the second one", "and a third"]
    if source == "file":  # a stream: its size is known only when it ends
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(texts))
        given: object = str(path)
    else:
        given = texts
    _RecordingBar.bars = []
    monkeypatch.setattr("editkit.stats.tqdm", _RecordingBar)
    with caplog.at_level(logging.WARNING, logger="editkit.stats"):
        second_moment(model, [0], given, tokenizer=tok, n_samples=8, max_length=16,
                      batch_size=2, use_cache=False, progress=True)
    (bar,) = _RecordingBar.bars
    assert bar.total == 3 and bar.n == 3  # 100 %, not 3 of 8
    assert "ran out after 3 of the 8 requested texts" in caplog.text


def test_exit_status_classifies_every_error_class():
    """Usage errors are 2, failures 1, for every EditkitError subclass there is."""
    import editkit.errors as errors

    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.EditkitError)]
    assert len(classes) >= 15
    failures = {errors.EditFailedError, errors.StatsError, errors.ReplayMismatchError}
    for cls in classes:
        expected = 1 if any(issubclass(cls, f) for f in failures) else 2
        assert cli.exit_status(cls("x")) == expected, cls
    assert cli.exit_status(ZeroDivisionError()) == 1
    assert cli.exit_status(KeyboardInterrupt()) == 130


def test_library_messages_are_rewritten_with_options():
    assert cli.cli_message("pass local text instead: texts=['...', ...], texts='corpus.txt' "
                           "(documents) or the offline source texts='pydoc'") == (
        "pass local text instead: --texts corpus.txt (documents) or the offline source "
        "--texts pydoc")
    assert "--n-samples 0" in cli.cli_message("n_samples=0 must be a positive integer")
    assert cli.cli_message("Pass hparams= to choose your own.").startswith("Pass --hparams")


def test_the_offline_wikitext_default_names_the_texts_option(files: Files, tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("with 'datasets' installed the default source may try the network")
    err = assert_cli_refused(["stats", str(files.model), "--layers", "0", "--cache-dir",
                              str(tmp_path / "c"), "--no-progress"], status=1,
                             mentions=("wikitext", "--texts corpus.txt", "--texts pydoc"))
    assert "texts=" not in err


def test_device_checks_with_and_without_cuda(monkeypatch):
    from editkit.cli.common import OptionError, check_device

    check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="CUDA is not available.*--device cpu"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(OptionError, match=r"'cuda:2'.*2 CUDA device\(s\); use cuda:0 \.\. cuda:1"):
        check_device("cuda:2")
    with pytest.raises(OptionError, match="'tpu' is not a torch device"):
        check_device("tpu")
