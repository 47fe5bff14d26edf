"""Issue 15, "Crashes a newcomer hits" and "Inputs": bad inputs of the Python API.

Every case of :data:`CASES` must raise its typed ``EditkitError`` whose message names the bad
value and the fix, and leave every model of the environment bit-for-bit unchanged
(``tests/badinput.py``). Beside the table: the behaviours that must *succeed* instead of
crashing (statistics clipped to the context, a corrupt template cache rebuilt, a saved copy
of the fact world keeping its presets) and the offline fail-fast tokenizer lookup.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from badinput import Bad, assert_refused
from conftest import tiny_model

import editkit
from editkit import EditRequest
from editkit.methods._learned.hparams import LearnedTrainConfig
from editkit.methods.alphaedit import AlphaEdit, AlphaEditHyperParams
from editkit.methods.ft import FT, FTHyperParams
from editkit.methods.memit import MEMIT, MEMITHyperParams
from editkit.methods.rome import ROME, ROMEHyperParams

GOOD = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}
TEMPLATES = ["{}", "The. {}"]
D_KEY = 4 * 48  # the tiny GPT-2's MLP width: keys of mlp_out
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Env:
    """A tiny GPT-2 (128 positions) and its tokenizer, plus models whose vocabulary does not
    match it; every model here is checked bit-for-bit after each case."""

    model: torch.nn.Module
    tok: object
    small_vocab: torch.nn.Module
    large_vocab: torch.nn.Module
    half: torch.nn.Module
    tmp: Path
    models: list[torch.nn.Module] = field(default_factory=list)


@pytest.fixture
def env(bytelevel_tokenizer, tmp_path) -> Env:
    tok = bytelevel_tokenizer
    e = Env(tiny_model("gpt2", len(tok)), tok, tiny_model("gpt2", len(tok) // 2),
            tiny_model("gpt2", 4 * len(tok)), tiny_model("gpt2", len(tok)).half(), tmp_path)
    e.models = [e.model, e.small_vocab, e.large_vocab, e.half]
    return e


def quiet(fn):
    """Run ``fn`` with the "no published hparams" warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def rome(env: Env, covariance: torch.Tensor | None = None, **hp) -> ROME:
    params = ROMEHyperParams(layer=1, **{"value": {"num_grad_steps": 2}, **hp})
    return ROME(env.model, env.tok, params, context_templates=TEMPLATES,
                covariance=torch.eye(D_KEY) if covariance is None else covariance)


def memit(env: Env, covariance: torch.Tensor | None = None) -> MEMIT:
    params = MEMITHyperParams(layers=(1,), mom2_update_weight=1.0, value={"num_grad_steps": 2})
    cov = torch.eye(D_KEY) if covariance is None else covariance
    return MEMIT(env.model, env.tok, params, context_templates=TEMPLATES, covariances={1: cov})


def alphaedit(env: Env, covariance: torch.Tensor) -> AlphaEdit:
    params = AlphaEditHyperParams(layers=(1,), value={"num_grad_steps": 2})
    return AlphaEdit(env.model, env.tok, params, context_templates=TEMPLATES,
                     covariances={1: covariance})


def request(**changes) -> EditRequest:
    return EditRequest(**{**GOOD, **changes})


def write(env: Env, name: str, text: str) -> str:
    path = env.tmp / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def ft_without_tokenizer(env: Env) -> FT:
    env.model.config.name_or_path = str(env.tmp)  # a directory, but no tokenizer in it
    return FT(env.model, None, FTHyperParams(layer=1))


def failing_texts():
    """A statistics text source that breaks while it is read (a disk gone away)."""
    yield "Some text."
    raise OSError("disk went away")


LONG_PROMPT = "{} " + "and then the story went on " * 40 + "plays the sport of"
NAN, INF = float("nan"), float("inf")

CASES = [
    # ------------------------------------------------------------- requests
    Bad("zero-width space in subject", lambda e: request(subject="LeBron\u200bJames"),
        editkit.InvalidRequestError, ("U+200B", "remove")),
    Bad("NUL in target", lambda e: request(target_new="foot\x00ball"),
        editkit.InvalidRequestError, ("U+0000", "target_new", "remove")),
    Bad("bidi override in prompt", lambda e: request(prompt="{} plays \u202ethe sport of"),
        editkit.InvalidRequestError, ("U+202E", "prompt", "remove")),
    Bad("lone zero-width joiner as target", lambda e: request(target_new="\u200d"),
        editkit.InvalidRequestError, ("U+200D", "remove")),
    Bad("soft hyphen in a paraphrase", lambda e: request(paraphrases=["LeBron Ja\xadmes plays"]),
        editkit.InvalidRequestError, ("paraphrases[0]", "U+00AD")),
    Bad("subject of no-break spaces", lambda e: request(subject="\xa0 \xa0"),
        editkit.InvalidRequestError, ("subject", "empty", "non-empty")),
    Bad("MEMIT conflict with {x} in the prompt",
        lambda e: memit(e).apply([request(prompt="{} likes {x} and plays"),
                                  request(prompt="{} likes {x} and plays", target_new="chess")]),
        editkit.InvalidRequestError, ("conflicting", "{x}", "chess", "separate batches")),
    Bad("MEMIT conflict differing only in spaces",
        lambda e: memit(e).apply([request(), request(prompt="{}  plays the sport  of",
                                                     target_new="chess")]),
        editkit.InvalidRequestError, ("conflicting", "chess", "one target")),
    # ------------------------------------------------------ hyperparameters
    Bad("NaN learning rate in JSON", lambda e: ROMEHyperParams.from_dict({"value": {"lr": NAN}}),
        editkit.InvalidHyperParamsError, ("value.lr", "nan", "finite number")),
    Bad("inf lambda in JSON",
        lambda e: MEMITHyperParams.from_dict({"mom2_update_weight": INF}),
        editkit.InvalidHyperParamsError, ("mom2_update_weight", "inf", "finite number")),
    Bad("string layer in JSON", lambda e: ROMEHyperParams.from_dict({"layer": "5"}),
        editkit.InvalidHyperParamsError, ("layer", "'5'", "integer")),
    Bad("string learning rate in JSON", lambda e: FTHyperParams.from_dict({"lr": "1e-3"}),
        editkit.InvalidHyperParamsError, ("lr", "1e-3", "finite number")),
    Bad("string for a boolean", lambda e: ROMEHyperParams.from_dict({"key_consistent": "no"}),
        editkit.InvalidHyperParamsError, ("key_consistent", "'no'", "boolean")),
    Bad("unknown key", lambda e: FTHyperParams.from_dict({"lerning_rate": 0.1}),
        editkit.InvalidHyperParamsError, ("lerning_rate", "spelling")),
    Bad("hparams JSON is a list", lambda e: FTHyperParams.from_json(write(e, "h.json", "[1]")),
        editkit.InvalidHyperParamsError, ("list", "JSON object")),
    Bad("hparams JSON malformed", lambda e: ROMEHyperParams.from_json('{"layer": 1,'),
        editkit.InvalidHyperParamsError, ("not valid JSON", "fix")),
    Bad("hparams file missing", lambda e: FTHyperParams.from_json(str(e.tmp / "nope.json")),
        editkit.InvalidHyperParamsError, ("nope.json", "existing JSON file")),
    Bad("NaN learning rate given to the editor",
        lambda e: FT(e.model, e.tok, FTHyperParams(layer=1, lr=NAN)),
        editkit.InvalidHyperParamsError, ("lr", "nan", "finite number")),
    Bad("inf clamp given to ROME", lambda e: rome(e, value={"clamp_norm_factor": INF}),
        editkit.InvalidHyperParamsError, ("clamp_norm_factor", "inf", "finite number")),
    Bad("unknown key in a dict given to the editor",
        lambda e: ROME(e.model, e.tok, {"layr": 1}, covariance=torch.eye(D_KEY)),
        editkit.InvalidHyperParamsError, ("layr", "spelling")),
    Bad("hparams JSON nested too deeply",
        lambda e: ROMEHyperParams.from_json('{"layer": ' + "[" * 100_000),
        editkit.InvalidHyperParamsError, ("nested too deeply", "fix")),
    Bad("NaN training learning rate", lambda e: LearnedTrainConfig(lr=NAN),
        editkit.InvalidHyperParamsError, ("lr", "nan", "finite number")),
    # ------------------------------------------------------- context size
    Bad("prompt longer than the context (FT)",
        lambda e: FT(e.model, e.tok, FTHyperParams(layer=1, num_steps=1)).apply(
            request(prompt=LONG_PROMPT)),
        editkit.InvalidRequestError, ("128", "shorten")),
    Bad("prompt plus prefixes longer than the context (ROME)",
        lambda e: rome(e).apply(request(prompt="{} " + "went on and on " * 30 + "plays")),
        editkit.InvalidRequestError, ("128", "context prefixes", "shorten")),
    Bad("paraphrase longer than the context",
        lambda e: FT(e.model, e.tok, FTHyperParams(layer=1, num_steps=1)).apply(
            request(paraphrases=[LONG_PROMPT.replace("{}", "LeBron James")])),
        editkit.InvalidRequestError, ("paraphrases", "128", "shorten")),
    Bad("context prefix longer than the context",
        lambda e: rome(e, value={"context_template_length_params": [[100, 2]]}),
        editkit.InvalidHyperParamsError, ("100", "128", "lengths below")),
    # ---------------------------------------------------------- preparation
    Bad("singular covariance (ROME)",
        lambda e: rome(e, covariance=torch.zeros(D_KEY, D_KEY)).apply(request()),
        editkit.StatsError, ("singular", "mom2_n_samples", "stats_texts")),
    Bad("NaN covariance (ROME)",
        lambda e: rome(e, covariance=torch.full((D_KEY, D_KEY), NAN)).apply(request()),
        editkit.StatsError, ("NaN", "mom2_n_samples")),
    Bad("singular system (MEMIT, C = 0)",
        lambda e: memit(e, covariance=torch.zeros(D_KEY, D_KEY)).apply(request()),
        editkit.StatsError, ("singular", "mom2_n_samples")),
    Bad("NaN covariance (AlphaEdit)",
        lambda e: alphaedit(e, torch.full((D_KEY, D_KEY), NAN)).apply(request()),
        editkit.StatsError, ("NaN", "mom2_n_samples")),
    Bad("singular system (AlphaEdit, C = 0)",
        lambda e: alphaedit(e, torch.zeros(D_KEY, D_KEY)).apply(request()),
        editkit.StatsError, ("singular", "raise l2", "mom2_n_samples")),
    Bad("statistics source fails while read",
        lambda e: ROME(e.model, e.tok, ROMEHyperParams(layer=1, mom2_n_samples=5),
                       context_templates=TEMPLATES, stats_texts=failing_texts(),
                       cache_dir=str(e.tmp)).apply(request()),
        editkit.EditFailedError, ("preparing", "disk went away", "stats_texts")),
    # ------------------------------------------------------------ tokenizer
    Bad("tokenizer larger than the embedding",
        lambda e: FT(e.small_vocab, e.tok, FTHyperParams(layer=1)),
        editkit.TokenizerError, ("800", "400", "own tokenizer")),
    Bad("tokenizer much smaller than the embedding",
        lambda e: FT(e.large_vocab, e.tok, FTHyperParams(layer=1)),
        editkit.TokenizerError, ("800", "3200", "own tokenizer")),
    Bad("no tokenizer, directory without tokenizer files", lambda e: ft_without_tokenizer(e),
        editkit.TokenizerError, ("no readable tokenizer files", "tokenizer=")),
    # ---------------------------------------------------------------- dtype
    Bad("FT in float16 diverges",
        lambda e: FT(e.half, e.tok, FTHyperParams(layer=1, lr=5e-3, num_steps=3)).apply(
            request()),
        editkit.EditFailedError, ("float16", "float32", "bfloat16")),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_is_refused(case: Bad, env: Env):
    assert len(env.tok) == 800  # the sizes the mentions above spell out
    quiet(lambda: assert_refused(case, env, models=env.models))


def test_table_is_large_and_distinct():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------- what must succeed
def test_statistics_clipped_to_the_context(env: Env):
    """mom2_max_length above the model's 128 positions reads texts of 128 tokens."""
    text = " ".join(["LeBron James plays the sport of basketball."] * 60)
    hp = ROMEHyperParams(layer=1, mom2_n_samples=4, mom2_max_length=4096,
                         value={"num_grad_steps": 2})
    editor = ROME(env.model, env.tok, hp, context_templates=TEMPLATES, stats_texts=[text] * 4,
                  cache_dir=str(env.tmp))
    assert editor.statistics_length() == 128
    editor.apply(request())
    assert len(editor.history) == 1
    # editkit.stats on its own clips too (the `editkit stats --max-length` path).
    from editkit.stats import second_moment

    cov = second_moment(env.model, 1, [text] * 2, tokenizer=env.tok, max_length=4096,
                        use_cache=False, progress=False)
    assert cov[1].shape == (D_KEY, D_KEY) and bool(torch.isfinite(cov[1]).all())


def test_corrupt_template_cache_is_rebuilt(env: Env, caplog):
    """A template cache holding a list (or garbage) is rebuilt, not trusted or crashed on."""
    hp = ROMEHyperParams(layer=1, value={"num_grad_steps": 1,
                                         "context_template_length_params": [[3, 2]]})
    root = env.tmp / "context_templates"
    first = ROME(env.model, env.tok, hp, covariance=torch.eye(D_KEY), cache_dir=str(env.tmp))
    first.prepare()
    (cached,) = root.glob("*.json")
    for garbage in ("[1, 2, 3]", '{"settings": {}, "templates": 7}', "{not json"):
        cached.write_text(garbage, encoding="utf-8")
        again = ROME(env.model, env.tok, hp, covariance=torch.eye(D_KEY),
                     cache_dir=str(env.tmp)).prepare()
        assert again.context_templates == first.context_templates
        assert json.loads(cached.read_text())["templates"] == first.context_templates


def test_memit_conflict_check_accepts_equal_targets_up_to_spacing(env: Env):
    from editkit.methods.memit import check_no_conflicts

    check_no_conflicts([request(prompt="{} likes {x}"), request(prompt="{}  likes {x} ",
                                                                  target_new=" football ")])


def test_joiners_inside_words_are_text():
    """ZWNJ is part of Persian spelling; only a lone or edge joiner is refused."""
    EditRequest(prompt="{} means", subject="می\u200cخواهم", target_new="I want")


def test_hparams_round_trip_still_reads_flat_names():
    with pytest.warns(DeprecationWarning, match="v_lr"):
        hp = ROMEHyperParams.from_dict({"layer": 2, "v_lr": 0.25})
    assert hp.value.lr == 0.25
    assert ROMEHyperParams.from_json(hp.to_json()) == hp
    assert math.isfinite(hp.value.lr)


def test_hub_name_without_tokenizer_fails_fast_offline(tmp_path):
    """With HF_HUB_OFFLINE=1 a hub id that is not cached is refused at once, never ~47 s of
    retries; the message says to pass tokenizer=. Run in a fresh process so the hub client
    reads the variable at import."""
    code = (
        "import time, torch, transformers as T\n"
        "from editkit.methods.ft import FT, FTHyperParams\n"
        "import editkit\n"
        "m = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64))\n"
        "m.config.name_or_path = 'editkit-test/no-such-model-xyz'\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    FT(m, None, FTHyperParams(layer=1))\n"
        "except editkit.TokenizerError as exc:\n"
        "    print(round(time.perf_counter() - t, 2)); print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITKIT_CACHE": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) >= 2, out.stdout + out.stderr
    assert float(lines[0]) < 5.0
    message = " ".join(lines[1:])
    assert "tokenizer=" in message and "HF_HUB_OFFLINE" in message
    assert "no-such-model-xyz" in message


def test_saved_fact_world_keeps_its_presets(tmp_path):
    """``save_pretrained`` of the fact world keeps its identity: the CLI on the saved copy
    uses the fact-world presets (p(new) ≈ 0.99), not the generic defaults that once crashed
    with an IndexError (mom2_max_length 128 on 64 positions) and then scored 0.53. About
    8 s on a CPU with an empty cache (the fact world's layer-0 statistics, then cached)."""
    from badinput import run_cli

    from editkit.testbed import FactWorld, is_fact_world_model, load_fact_world

    model, tok = load_fact_world()
    out = tmp_path / "fw"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    reloaded = type(model).from_pretrained(out)
    assert is_fact_world_model(reloaded)
    rw = FactWorld().records(n=1)[0]["requested_rewrite"]
    code, stdout, stderr = run_cli([
        "edit", "--model", str(out), "--method", "rome", "--prompt", rw["prompt"],
        "--subject", rw["subject"], "--target", rw["target_new"]["str"]])
    assert code == 0, stderr
    assert "Traceback" not in stdout + stderr
    after = next(line for line in stdout.splitlines() if line.strip().startswith("after"))
    p_new = float(after.rsplit("=", 1)[1].rstrip("]"))
    assert p_new > 0.9, stdout


def test_fact_world_identity_survives_save_pretrained(tmp_path):
    """The cheap part of the regression above: the identity field reaches config.json."""
    import transformers as T

    from editkit.testbed import is_fact_world_model, mark_fact_world

    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    assert not is_fact_world_model(model)
    mark_fact_world(model, "abc")
    model.save_pretrained(tmp_path)
    assert is_fact_world_model(T.GPT2LMHeadModel.from_pretrained(tmp_path))


def test_identity_field_selects_presets_after_save_pretrained(tmp_path):
    """A saved copy of a known model (here named as SmolLM2) in a directory of any name
    keeps the presets its loader's identity selects; name_or_path alone would not."""
    import transformers as T

    import editkit.testbed  # noqa: F401 - registers the testbed presets
    from editkit.hparams import IDENTITY_FIELD, find_preset, model_name

    config = T.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                           num_attention_heads=2, vocab_size=32)
    model = T.LlamaForCausalLM(config)
    setattr(model.config, IDENTITY_FIELD, "smollm2-135m-instruct")
    model.save_pretrained(tmp_path / "my-copy")
    copy = T.LlamaForCausalLM.from_pretrained(tmp_path / "my-copy")
    assert model_name(copy) == "smollm2-135m-instruct"
    assert find_preset("rome", copy).model == "smollm2-135m-instruct"


def test_offline_check_is_fast_in_process(env: Env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.model.config.name_or_path = "editkit-test/no-such-model-xyz"
    start = time.perf_counter()
    with pytest.raises(editkit.TokenizerError, match="tokenizer="):
        FT(env.model, None, FTHyperParams(layer=1))
    assert time.perf_counter() - start < 5.0


def test_unreachable_hub_fails_fast_without_offline_flag(env: Env, monkeypatch):
    """No HF_HUB_OFFLINE, but the hub host cannot be reached: one quick connection attempt
    decides, instead of the hub client's ~47 s of retries."""
    import socket

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                 "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    env.model.config.name_or_path = "editkit-test/no-such-model-xyz"
    start = time.perf_counter()
    with pytest.raises(editkit.TokenizerError, match="unreachable") as info:
        FT(env.model, None, FTHyperParams(layer=1))
    assert time.perf_counter() - start < 5.0
    assert "tokenizer=" in str(info.value)
