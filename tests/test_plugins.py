"""A separately installed distribution adds a method, an adapter and a statistics text source
through entry points; run-time registration; registries check what they load by interface."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = Path(__file__).parent / "plugin_dist"

SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch, transformers as T
    torch.set_num_threads(1)
    import editkit
    from editkit import EditRequest
    from editkit.tokens import score_targets
    sys_path_ok = True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        methods = editkit.list_methods()
    assert "rank1_ft" in methods and "ft" in methods, methods
    # The plugin's attempt to take the built-in name "ft" is refused with a warning.
    assert editkit.get_method("ft").__module__.startswith("editkit.methods"), "built-in replaced"
    assert any("already registered" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert "codegen" in editkit.list_adapters()

    import sys
    sys.path.insert(0, sys.argv[1])
    from conftest import _fast_tokenizer
    tok = _fast_tokenizer("bytelevel")
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.CodeGenConfig(
        n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=64, vocab_size=len(tok),
        bos_token_id=0, eos_token_id=0, initializer_range=0.2)).eval()
    assert editkit.get_adapter(model).name == "codegen"  # the plugin's adapter, not built in
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
    Method = editkit.get_method("rank1_ft")
    before = score_targets(model, tok, [req.text], [req.target_new]).item()
    editor = Method(model, tok, Method.hparams_class(layer=1)).apply(req)
    after = score_targets(model, tok, [req.text], [req.target_new]).item()
    assert after > before + 1.0, (before, after)
    patch = editor.history[-1].patch
    (name,) = patch.deltas
    assert name == "transformer.h.1.mlp.fc_out.weight" and patch.deltas[name].rank == 1
    editor.revert()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    # The plugin's statistics text source is found by name, with no import of the plugin.
    from editkit.stats import text_source
    assert "toy_texts" in editkit.TEXT_SOURCES.names()
    source = text_source("toy_texts", 5)
    assert source.identity == "toy_texts:v1"
    assert list(source.texts(2))[1] == "Toy sentence number 1 about nothing in particular."
    print("PLUGIN-OK", before, after)
    """
)


@pytest.mark.slow
def test_installed_plugin_adds_method_and_adapter(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(target), str(PLUGIN)],
        capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    assert list(target.glob("editkit_toy_plugin-*.dist-info"))
    repo = str(Path(__file__).resolve().parent.parent)  # the editkit under test, not another install
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(target), repo, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PLUGIN-OK" in run.stdout


def test_runtime_registration_and_collisions():
    import editkit
    from editkit.methods.ft import FT

    with pytest.raises(ValueError, match="already registered"):
        editkit.METHODS.register("ft", FT)
    editkit.METHODS.register("ft_alias_for_test", "editkit.methods.ft:FT")
    try:
        assert editkit.get_method("ft_alias_for_test") is FT
    finally:
        editkit.METHODS._refs.pop("ft_alias_for_test")
        editkit.METHODS._loaded.pop("ft_alias_for_test", None)
    # Each registry checks what it loads by interface: an Editor class is no adapter, and an
    # adapter no method.
    for registry, ref, kind in ((editkit.ADAPTERS, "editkit.methods.ft:FT", "model adapter"),
                                (editkit.METHODS, "editkit.models.gpt2:ADAPTER", "method")):
        registry.register("wrong_kind_for_test", ref)
        try:
            with pytest.raises(TypeError, match=f"not a valid {kind}"):
                registry.get("wrong_kind_for_test")
        finally:
            registry._refs.pop("wrong_kind_for_test")


def test_text_sources_registry_resolves_names_for_stats(bytelevel_tokenizer, tmp_path):
    import torch

    import editkit
    from editkit.stats import TextSource, second_moment, text_source

    texts = ["Alpha beta gamma delta.", "Epsilon zeta eta theta iota."] * 4
    calls = []

    def source(*, n_samples, model=None, tokenizer=None, generated_length=128, **_):
        calls.append((n_samples, model is not None, tokenizer is not None))
        return TextSource("test_source:v1", "test texts", lambda: texts)

    editkit.TEXT_SOURCES.register("texts_for_test", source)
    try:
        assert text_source("texts_for_test", 5).identity == "test_source:v1"
        from conftest import tiny_model

        model = tiny_model("gpt2", len(bytelevel_tokenizer), n_layers=2)
        by_name = second_moment(model, 1, "texts_for_test", tokenizer=bytelevel_tokenizer,
                                n_samples=8, max_length=16, cache_dir=tmp_path, progress=False)
        direct = second_moment(model, 1, texts, tokenizer=bytelevel_tokenizer, n_samples=8,
                               max_length=16, use_cache=False, progress=False)
        assert calls[-1] == (8, True, True)
        assert torch.equal(by_name[1], direct[1])
        with pytest.raises(ValueError, match="already registered"):
            editkit.TEXT_SOURCES.register("texts_for_test", source)
    finally:
        editkit.TEXT_SOURCES._refs.pop("texts_for_test")
        editkit.TEXT_SOURCES._loaded.pop("texts_for_test", None)
    with pytest.raises(editkit.StatsError, match="texts_for_test.*neither an existing file"):
        text_source("texts_for_test", 5)


def test_testbed_registers_the_fact_world_corpus_as_declared_in_pyproject():
    import re
    from importlib import import_module

    from editkit import TEXT_SOURCES
    from editkit.stats import text_source
    from editkit.testbed import FactWorld  # importing the testbed registers its source

    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    section = pyproject.split('[project.entry-points."editkit.text_sources"]')[1].split("\n[")[0]
    ref = re.search(r'^fact_world = "([^"]+)"$', section, re.M).group(1)
    module, _, attr = ref.partition(":")
    assert getattr(import_module(module), attr) is TEXT_SOURCES.get("fact_world")
    source = text_source("fact_world", 10)
    assert source.identity == f"fact_world:{FactWorld().fingerprint()[:16]}"
    assert list(source.texts(3)) == FactWorld().texts()[:3]
