"""A separately installed distribution adds a method and an adapter through entry points."""

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
    assert "opt" in editkit.list_adapters()

    import sys
    sys.path.insert(0, sys.argv[1])
    from conftest import _fast_tokenizer
    tok = _fast_tokenizer("bytelevel")
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.OPTConfig(
        num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4,
        vocab_size=len(tok), word_embed_proj_dim=32, init_std=0.2)).eval()
    assert editkit.get_adapter(model).name == "opt"
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
    Method = editkit.get_method("rank1_ft")
    before = score_targets(model, tok, [req.text], [req.target_new]).item()
    editor = Method(model, tok, Method.hparams_class(layer=1)).apply(req)
    after = score_targets(model, tok, [req.text], [req.target_new]).item()
    assert after > before + 1.0, (before, after)
    patch = editor.history[-1].patch
    (name,) = patch.deltas
    assert name == "model.decoder.layers.1.fc2.weight" and patch.deltas[name].rank == 1
    editor.revert()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
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
    editkit.ADAPTERS.register("not_an_adapter_for_test", "editkit.methods.ft:FT")
    try:
        with pytest.raises(TypeError, match="not a valid model adapter"):
            editkit.ADAPTERS.get("not_an_adapter_for_test")
    finally:
        editkit.ADAPTERS._refs.pop("not_an_adapter_for_test")
