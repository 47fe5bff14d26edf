"""The shared locate-then-edit core: the nested value config (JSON, validation, the old flat
form), presets as data (published, testbed, entry point), and the layering of methods."""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import warnings
from pathlib import Path

import pytest

import editkit
from editkit.hparams import Preset, find_preset, presets, register_preset
from editkit.methods._locate.hparams import LEGACY_FIELDS, ValueHyperParams
from editkit.methods.alphaedit import AlphaEditHyperParams
from editkit.methods.memit import MEMITHyperParams
from editkit.methods.rome import ROMEHyperParams

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def named(name: str):
    return types.SimpleNamespace(config=types.SimpleNamespace(name_or_path=name))


# ------------------------------------------------------------------ nested config
@pytest.mark.parametrize("cls", [ROMEHyperParams, MEMITHyperParams, AlphaEditHyperParams])
def test_nested_config_round_trips_through_json(cls):
    hp = cls.scaled(6)
    hp.value.lr = 0.25
    text = hp.to_json()
    assert json.loads(text)["value"]["lr"] == 0.25  # nested in the file, not flattened
    back = cls.from_json(text)
    assert back == hp and isinstance(back.value, ValueHyperParams)


def test_each_method_keeps_its_own_value_defaults():
    # ROME's v* and MEMIT's z differ in steps and clamp (the committed results use these).
    assert (ROMEHyperParams().value.num_grad_steps, ROMEHyperParams().value.clamp_norm_factor) \
        == (20, 4.0)
    assert (MEMITHyperParams().value.num_grad_steps,
            MEMITHyperParams().value.clamp_norm_factor) == (25, 0.75)
    # A partial dict fills in over the method's own defaults, not ROME's.
    partial = MEMITHyperParams.from_dict({"value": {"lr": 0.1}})
    assert (partial.value.lr, partial.value.num_grad_steps) == (0.1, 25)


def test_memit_repeats_no_value_field():
    memit = {f.name for f in dataclasses.fields(MEMITHyperParams)}
    rome = {f.name for f in dataclasses.fields(ROMEHyperParams)}
    assert not memit & set(LEGACY_FIELDS) and not rome & set(LEGACY_FIELDS)
    assert not hasattr(MEMITHyperParams, "value_hparams")


@pytest.mark.parametrize("run", ["rome_independent", "memit_batch", "rome_last_batch"])
def test_the_flat_form_of_committed_results_still_loads(run):
    """Results and patches saved before the nested config store flat ``v_*`` fields; they
    load into the nested form with a DeprecationWarning that names the new spelling."""
    stored = json.loads((RESULTS / "factworld" / run / "results.json").read_text())["hparams"]
    cls = MEMITHyperParams if run.startswith("memit") else ROMEHyperParams
    with pytest.warns(DeprecationWarning, match="v_num_grad_steps → value.num_grad_steps"):
        hp = cls.from_dict(stored)
    for old, new in LEGACY_FIELDS.items():
        want = stored[old]
        got = getattr(hp.value, new)
        assert (list(map(list, got)) if new == "context_template_length_params" else got) \
            == want
    flat_again = {k: v for k, v in hp.to_dict().items() if k != "value"}
    assert all(stored[k] == (list(v) if isinstance(v, tuple) else v)
               for k, v in flat_again.items())


def test_flat_keywords_and_attributes_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning):
        hp = ROMEHyperParams(layer=2, v_num_grad_steps=7)
    assert hp.value.num_grad_steps == 7
    with pytest.warns(DeprecationWarning):
        assert dataclasses.replace(hp, v_lr=0.1).value.lr == 0.1
    with pytest.warns(DeprecationWarning):
        hp.clamp_norm_factor = 2.0
    assert hp.value.clamp_norm_factor == 2.0
    with pytest.warns(DeprecationWarning):
        assert hp.v_loss_layer is None
    with pytest.raises(AttributeError):
        hp.no_such_field  # noqa: B018


def test_bad_nested_values_are_typed_errors():
    with pytest.raises(editkit.InvalidHyperParamsError, match="unknown keys"):
        ROMEHyperParams.from_dict({"value": {"learning_rate": 0.1}})
    with pytest.raises(editkit.InvalidHyperParamsError, match="ValueHyperParams or a dict"):
        ROMEHyperParams(value=3)
    with pytest.raises(editkit.InvalidHyperParamsError, match="length, count"):
        ValueHyperParams(context_template_length_params=[5])


# ------------------------------------------------------------------------ presets
def test_published_presets_carry_their_source():
    for method in ("rome", "memit", "alphaedit"):
        found = find_preset(method, named("openai-community/gpt2-xl"))
        assert found is not None and found.source
    rome = ROMEHyperParams.preset_for(named("openai-community/gpt2-xl"))
    assert (rome.layer, rome.value.loss_layer) == (17, 47)
    alpha = AlphaEditHyperParams.preset_for(named("EleutherAI/gpt-j-6B"))
    assert alpha.layers == (3, 4, 5, 6, 7, 8) and alpha.l2 == 1.0
    assert find_preset("rome", named("my-own-model")) is None


def test_testbed_presets_register_and_match_the_fact_world(tmp_path):
    from editkit.testbed import presets as tb
    from editkit.testbed.train import META_FILE

    tb.register()  # idempotent: the same presets again are accepted
    assert {p.model for p in presets("memit")} >= {tb.FACT_WORLD, tb.SMOLLM2}
    (tmp_path / META_FILE).write_text("{}")
    world = named(str(tmp_path))
    hp = MEMITHyperParams.preset_for(world)
    assert hp.layers == (0, 1) and hp.mom2_dataset == "fact_world"
    assert (hp.value.num_grad_steps, hp.value.weight_decay) == (25, 0.0)
    assert ROMEHyperParams.preset_for(world).value.num_grad_steps == 60
    smol = ROMEHyperParams.preset_for(named("HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert smol.layer == tb.SMOLLM2_ROME_LAYER and smol.value.loss_layer == 29


def test_preset_conflicts_are_refused_unless_replaced():
    mine = Preset("rome", "test-model-xyz", {"layer": 1}, "this test")
    register_preset(mine)
    with pytest.raises(editkit.InvalidHyperParamsError, match="already registered"):
        register_preset(Preset("rome", "test-model-xyz", {"layer": 2}, "elsewhere"))
    register_preset(Preset("rome", "test-model-xyz", {"layer": 2}, "elsewhere"), replace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a preset hit does not warn about scaled defaults
        assert ROMEHyperParams.preset_for(named("org/test-model-xyz")).layer == 2


def test_the_testbed_provider_is_an_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."editkit.presets"]', 1)[1]
    ref = section.split("=", 1)[1].split("\n", 1)[0].strip().strip('"')
    module, _, attr = ref.partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))


# ----------------------------------------------------------------------- layering
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("package", ["rome", "memit", "alphaedit", "_locate"])
def test_locate_then_edit_methods_import_neither_testbed_tracing_nor_rome(package):
    """Function-local imports included: algorithms never reach up to testbed/tracing/eval,
    and MEMIT/AlphaEdit use the shared core, not ROME's internals."""
    for path in (ROOT / "editkit" / "methods" / package).glob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("editkit.testbed", "editkit.tracing", "editkit.eval",
                                        "editkit.cli")), (path, name)
            if package in ("memit", "alphaedit", "_locate"):
                assert not name.startswith("editkit.methods.rome"), (path, name)
