"""The localization study: R² regressions, the study run on a tiny model, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from editkit import EditRequest
from editkit.errors import InvalidHyperParamsError, InvalidRequestError, UnsupportedObjectiveError
from editkit.study import StudyConfig, analyse, bootstrap_r2, fit_r2, r_squared, run_localization
from editkit.study.localization import make_editor, set_field
from editkit.study.regression import design_matrix
from tests.badinput import assert_cli_refused


# ------------------------------------------------------------------------ regression
def test_layer_r2_is_the_between_group_share_of_the_variance():
    """With layer as the only (categorical) predictor the fit is each layer's mean, so
    R² = Σ_g n_g (ȳ_g − ȳ)² / Σ (y − ȳ)² (one-way ANOVA), in closed form."""
    rng = np.random.default_rng(0)
    layers = np.repeat([0, 1, 2, 3], 25)
    y = layers * 0.2 + rng.normal(0, 0.3, layers.size)
    mean = y.mean()
    between = sum((layers == g).sum() * (y[layers == g].mean() - mean) ** 2 for g in range(4))
    closed = between / ((y - mean) ** 2).sum()
    assert r_squared(design_matrix(layers, np.zeros_like(y), "layer"), y) == pytest.approx(
        closed, abs=1e-10)


def test_tracing_r2_is_the_squared_correlation_and_both_nests_layer():
    rng = np.random.default_rng(1)
    layers = np.repeat([0, 1, 2], 30)
    effect = rng.normal(size=layers.size)
    y = 0.5 * effect + layers + rng.normal(0, 0.5, layers.size)
    fit = fit_r2(layers, effect, y)
    assert fit["tracing"] == pytest.approx(np.corrcoef(effect, y)[0, 1] ** 2, abs=1e-10)
    assert fit["both"] >= max(fit["layer"], fit["tracing"]) - 1e-12
    assert fit["added"] == pytest.approx(fit["both"] - fit["layer"])
    exact = fit_r2(layers, effect, 2 * effect - layers)  # y exactly linear in both
    assert exact["both"] == pytest.approx(1.0, abs=1e-9)


def test_constant_scores_explain_nothing_and_bad_inputs_are_refused():
    assert r_squared(np.ones((5, 1)), np.full(5, 0.3)) == 0.0
    with pytest.raises(InvalidRequestError, match="regression model"):
        design_matrix(np.zeros(3), np.zeros(3), "quadratic")
    with pytest.raises(InvalidRequestError, match="one entry per row"):
        bootstrap_r2(["a"], [0, 1], [0.0], [0.0])


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(2)
    facts = np.repeat(np.arange(40), 4)
    layers = np.tile(np.arange(4), 40)
    effect = rng.normal(size=facts.size)
    y = 0.3 * layers + 0.1 * effect + rng.normal(0, 0.3, facts.size)
    a = bootstrap_r2(facts, layers, effect, y, n_boot=200, seed=3)
    b = bootstrap_r2(facts, layers, effect, y, n_boot=200, seed=3)
    assert a.to_dict() == b.to_dict()
    assert a.n_facts == 40 and a.n_rows == 160
    for k in ("layer", "tracing", "both"):
        lo, hi = a.ci[k]
        assert lo <= a.r2[k] + 0.05 and a.r2[k] - 0.05 <= hi and lo < hi
    assert a.r2["layer"] > a.r2["tracing"]  # the layer drives y here


# ------------------------------------------------------------------- study plumbing
def test_overrides_and_unsupported_methods(gpt2_and_tok):
    from editkit.methods.rome.hparams import ROMEHyperParams

    hp = set_field(ROMEHyperParams(), "value.num_grad_steps", 7)
    assert hp.value.num_grad_steps == 7
    hp = set_field(hp, "value.context_template_length_params", [[5, 2]])
    assert hp.value.context_template_length_params == ((5, 2),)
    with pytest.raises(InvalidHyperParamsError, match="no field"):
        set_field(hp, "value.steps", 1)
    with pytest.raises(UnsupportedObjectiveError, match="mend"):
        StudyConfig(methods=("mend",), objectives=("inject", "erase"))
    with pytest.raises(InvalidRequestError, match="unknown objective"):
        StudyConfig(objectives=("delete",))
    model, tok = gpt2_and_tok
    assert make_editor("ft", model, tok, 2).hparams.layer == 2


FACTS = [
    EditRequest("{} plays the sport of", "LeBron James", "football", target_true="basketball",
                paraphrases=("LeBron James is a player of",),
                neighborhood=("Michael Jordan plays the sport of",), case_id=1),
    EditRequest("{} is located in", "The Eiffel Tower", "Rome", target_true="Paris",
                neighborhood=("The Louvre is located in",), case_id=2),
    EditRequest("{} was born in", "Ada Lovelace", "Berlin", target_true="London", case_id=3),
]


def test_study_runs_resumes_and_analyses(gpt2_and_tok, tmp_path):
    model, tok = gpt2_and_tok
    config = StudyConfig(methods=("ft",), layers=(0, 1), objectives=("inject", "erase"),
                         samples=2, force_samples=2, overrides={"ft": {"num_steps": 2}})
    run_localization(model, tok, FACTS, config, tmp_path, progress=False)
    traces = [json.loads(x) for x in (tmp_path / "traces.jsonl").read_text().splitlines()]
    edits = [json.loads(x) for x in (tmp_path / "edits.jsonl").read_text().splitlines()]
    assert len(traces) == 3 and len(edits) == 3 * 2 * 2
    n_layers = model.config.n_layer
    assert all(len(t["effect_mlp"]) == len(t["effect_hidden"]) == n_layers for t in traces)
    for e in edits:
        assert 0.0 <= e["rewrite_score"] <= 1.0
        assert e["target"] == ("basketball", "Paris", "London")[int(e["case_id"]) - 1] \
            if e["objective"] == "erase" else e["target"] in ("football", "Rome", "Berlin")
    # a rerun recomputes nothing
    run_localization(model, tok, FACTS, config, tmp_path, progress=False)
    assert len((tmp_path / "edits.jsonl").read_text().splitlines()) == len(edits)
    result = analyse(tmp_path, n_boot=20)
    cell = result["cells"]["ft/erase"]
    assert cell["n_facts"] == 3 and cell["layers"] == [0, 1]
    assert set(cell["r2"]) == {"layer", "tracing", "both", "added"}
    assert len(cell["points"]["score"]) == 6
    eff = {str(t["case_id"]): t["effect_mlp"] for t in traces}
    assert cell["points"]["effect"][0] == eff["1"][0]  # fact 1, layer 0: its traced effect
    from editkit.study.localization import markdown_tables
    from editkit.study.plots import plot_r2_bars, plot_scatter

    md = markdown_tables(result)
    assert "| ft | erase | 3 |" in md and "| (tracing effect, mlp) |" in md
    for plot in (plot_scatter, plot_r2_bars):
        path = plot(result, tmp_path / f"{plot.__name__}.png")
        assert path.stat().st_size > 1000


def test_cli_study_refusals(tmp_path):
    assert_cli_refused(["study"], status=2, mentions=["localization"])
    assert_cli_refused(["study", "localization", "--model", "factworld", "--objectives",
                        "inject,delete", "--out", str(tmp_path / "o")], status=2,
                       mentions=["delete"])
    assert_cli_refused(["study", "localization", "--model", "factworld", "--methods", "mend",
                        "--objectives", "erase", "--out", str(tmp_path / "o")], status=2,
                       mentions=["mend", "erase"])
    assert_cli_refused(["study", "localization", "--model", "factworld", "--set", "rome",
                        "--out", str(tmp_path / "o")], status=2, mentions=["METHOD:FIELD"])
    assert_cli_refused(["study", "localization", "--model", "factworld", "--analyse-only",
                        "--out", str(tmp_path / "missing")], status=2, mentions=["no study"])
