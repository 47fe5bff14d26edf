"""Shareable statistics: ``export_statistics`` / ``editkit stats --export`` write safetensors +
a card; ``load_statistics`` / ``second_moment(source=)`` / ``mom2_dataset=DIR`` read them back
exactly and refuse a card or tensor that does not match the model or the settings."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from editkit.cli import main
from editkit.errors import StatsError
from editkit.registry import get_adapter
from editkit.stats import (
    STATS_CARD,
    STATS_TENSORS,
    export_statistics,
    load_statistics,
    second_moment,
)

TEXTS = ["The Eiffel Tower is located in the city of Paris.",
         "LeBron James plays the sport of basketball.",
         "Rome is the capital of Italy.",
         "The quick brown fox jumps over the lazy dog, again and again."] * 4
SETTINGS = {"n_samples": 16, "max_length": 24}


@pytest.fixture
def model_tok(bytelevel_tokenizer):
    return tiny_model("gpt2", len(bytelevel_tokenizer), n_layers=3), bytelevel_tokenizer


@pytest.fixture
def exported(model_tok, tmp_path):
    """C of layers 0 and 2, computed and exported; returns (directory, C)."""
    model, tok = model_tok
    c = second_moment(model, [0, 2], TEXTS, tokenizer=tok, use_cache=False, progress=False,
                      **SETTINGS)
    directory = export_statistics(model, c, tmp_path / "shared", tokenizer=tok, texts=TEXTS,
                                  **SETTINGS)
    return directory, c


def test_round_trip_equals_the_computed_statistics(model_tok, exported):
    model, tok = model_tok
    directory, c = exported
    card = json.loads((directory / STATS_CARD).read_text())
    assert card["layers"] == [0, 2] and card["n_samples"] == 16 and card["max_length"] == 24
    assert card["dtype"] == "float32" and card["model"]["n_layers"] == 3
    assert {"editkit_version", "tokenizer", "text_source", "sha256"} <= set(card)
    assert sorted(load_file(str(directory / STATS_TENSORS))) == ["layer.0", "layer.2"]
    loaded = load_statistics(directory, model, tokenizer=tok, **SETTINGS)
    assert sorted(loaded) == [0, 2]
    for layer in (0, 2):
        assert torch.equal(loaded[layer], c[layer])
    # second_moment loads them (no texts read) for source= and for texts=DIR (mom2_dataset)
    for kw in ({"source": directory}, {"texts": str(directory)}):
        got = second_moment(model, [2], tokenizer=tok, use_cache=False, progress=False,
                            **SETTINGS, **kw)
        assert torch.equal(got[2], c[2])


def test_a_rome_editor_uses_exported_statistics_as_its_mom2_dataset(model_tok, exported):
    from editkit.methods.rome import ROME, ROMEHyperParams

    model, tok = model_tok
    directory, c = exported
    hp = ROMEHyperParams.for_model(model, get_adapter(model))
    hp = ROMEHyperParams.from_dict({**hp.to_dict(), "layer": 2, "mom2_dataset": str(directory),
                                    "mom2_n_samples": 16, "mom2_max_length": 24})
    editor = ROME(model, tok, hp)
    editor.prepare()  # statistics from the export: no texts to read
    assert torch.equal(editor.covariances[2].to(c[2].dtype), c[2])


def _tamper_card(directory: Path, change) -> None:
    card = json.loads((directory / STATS_CARD).read_text())
    change(card)
    (directory / STATS_CARD).write_text(json.dumps(card))


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: c["model"]["fingerprints"].update({"2": "0" * 32}), "other weights"),
    (lambda c: c["model"].update(d_key=7), "another model: d_key"),
    (lambda c: c["model"].update(n_layers=12), "another model: n_layers"),
    (lambda c: c.update(n_samples=1000), "n_samples=1000"),
    (lambda c: c.update(layers=[0]), r"hold layers \[0\], not \[2\]"),
    (lambda c: c.update(format=99), "export format 99"),
    (lambda c: c["sha256"].update({"layer.2": "f" * 64}), "SHA-256"),
])
def test_a_tampered_card_is_refused(model_tok, exported, change, match):
    model, tok = model_tok
    directory, _ = exported
    _tamper_card(directory, change)
    with pytest.raises(StatsError, match=match):
        load_statistics(directory, model, [2], tokenizer=tok, **SETTINGS)


def test_a_tampered_tensor_is_refused(model_tok, exported):
    model, tok = model_tok
    directory, c = exported
    tensors = load_file(str(directory / STATS_TENSORS))
    tensors["layer.2"] = tensors["layer.2"].clone()
    tensors["layer.2"][0, 0] += 1e-3
    save_file(tensors, str(directory / STATS_TENSORS))
    with pytest.raises(StatsError, match="layer 2 .* SHA-256"):
        load_statistics(directory, model, [2], tokenizer=tok)
    (directory / STATS_TENSORS).write_bytes(b"not safetensors")
    with pytest.raises(StatsError, match="cannot be read"):
        load_statistics(directory, model, [0], tokenizer=tok)


def test_another_model_or_edited_weights_are_refused(model_tok, exported, bytelevel_tokenizer):
    model, tok = model_tok
    directory, _ = exported
    other = tiny_model("gpt2", len(bytelevel_tokenizer), n_layers=3, seed=1)  # same shapes
    with pytest.raises(StatsError, match="other weights"):
        load_statistics(directory, other, [2], tokenizer=tok)
    deeper = tiny_model("gpt2", len(bytelevel_tokenizer), n_layers=4)
    with pytest.raises(StatsError, match="n_layers"):
        load_statistics(directory, deeper, [2], tokenizer=tok)
    with torch.no_grad():  # a change below layer 2 changes its keys
        model.transformer.h[1].mlp.c_fc.weight[0, 0] += 0.5
    with pytest.raises(StatsError, match="layer 2's keys"):
        load_statistics(directory, model, [2], tokenizer=tok)
    assert load_statistics(directory, model, [0], tokenizer=tok)  # layer 0 is unaffected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_copies_of_the_model_use_its_export(model_tok, exported, dtype):
    """A float32 export serves the model's bf16/fp16 copies (their weights are the float32
    ones rounded, which the card records), and still refuses a half copy of other weights."""
    import copy

    model, tok = model_tok
    directory, c = exported
    half = copy.deepcopy(model).to(dtype)
    loaded = load_statistics(directory, half, [0, 2], tokenizer=tok, **SETTINGS)
    assert torch.equal(loaded[2], c[2])
    with torch.no_grad():  # one rounded weight below layer 2 moved by more than its ulp
        half.transformer.h[0].mlp.c_fc.weight[0, 0] += 0.25
    with pytest.raises(StatsError, match="other weights"):
        load_statistics(directory, half, [2], tokenizer=tok, **SETTINGS)


def test_not_an_export_and_hub_offline_are_typed_errors(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    with pytest.raises(StatsError, match="holds no editkit_stats.json"):
        load_statistics(tmp_path, model, [0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(StatsError, match="cannot be reached .*HF_HUB_OFFLINE"):
        load_statistics("some-org/some-stats", model, [0])
    assert time.perf_counter() - start < 5


def test_stats_cli_export(model_tok, tmp_path, capsys):
    model, tok = model_tok
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS) + "\n")
    assert main(["stats", str(tmp_path / "m"), "--layers", "1", "--texts", str(corpus),
                 "--n-samples", "16", "--max-length", "24", "--cache-dir",
                 str(tmp_path / "cache"), "--export", str(tmp_path / "shared"),
                 "--no-progress"]) == 0
    assert "exported to" in capsys.readouterr().out
    card = json.loads((tmp_path / "shared" / STATS_CARD).read_text())
    assert card["layers"] == [1] and card["text_source"]["description"] == str(corpus)
    c = second_moment(model, [1], corpus, tokenizer=tok, n_samples=16, max_length=24,
                      use_cache=False, progress=False)
    loaded = load_statistics(tmp_path / "shared", model, [1], tokenizer=tok)
    torch.testing.assert_close(loaded[1], c[1], rtol=0, atol=0)
