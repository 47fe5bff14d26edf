"""The architectures added for issue 17, each on a tiny random model.

For every family (and the config variants that change its forward: OPT-350m's post-norm
head with ``project_out``, Falcon's three block layouts, ALiBi or rotary): its slots resolve
and ``kv_view`` maps the keys captured with hooks to the outputs; re-running the blocks through
``call_block`` plus ``head`` gives the model's logits; ROME inserts ``Ŵ k* = v*``, raises
log p(new) and reverts bit for bit; the fast causal tracer equals the naive oracle.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from conftest import replayed_logits

import editkit
from editkit.nethooks import Trace

H = 48

#: variant -> (adapter module, model_type, config kwargs, what block 0 receives)
#: "embed": block 0's input is ``adapter.embed(ids)``; "other": positions or a norm in between
VARIANTS: dict[str, tuple[str, str, dict, str]] = {
    "qwen3": ("qwen3", "qwen3", dict(head_dim=12), "embed"),
    "gemma": ("gemma", "gemma", dict(head_dim=12), "embed"),
    "gemma2": ("gemma2", "gemma2", dict(head_dim=12, final_logit_softcapping=10.0), "embed"),
    "gemma3_text": ("gemma3", "gemma3_text", dict(
        head_dim=12, final_logit_softcapping=10.0, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"]), "embed"),
    "phi3": ("phi3", "phi3", dict(pad_token_id=0), "embed"),
    "olmo2": ("olmo2", "olmo2", dict(pad_token_id=0), "embed"),
    "gpt_neo": ("gpt_neo", "gpt_neo", dict(), "other"),
    "opt": ("opt", "opt", dict(), "other"),
    "opt-350m": ("opt", "opt", dict(word_embed_proj_dim=32, do_layer_norm_before=False),
                 "other"),
    "bloom": ("bloom", "bloom", dict(), "other"),
    "falcon": ("falcon", "falcon", dict(), "embed"),
    "falcon-40b": ("falcon", "falcon", dict(new_decoder_architecture=True, num_kv_heads=2),
                   "embed"),
    "falcon-rw": ("falcon", "falcon", dict(alibi=True, parallel_attn=False, multi_query=False),
                  "embed"),
}
#: families whose embeddings are scaled by √d before block 0
SCALED = {"gemma", "gemma2", "gemma3_text"}


def tiny_family_config(variant: str, vocab_size: int, n_layers: int = 3):
    _, model_type, extra, _ = VARIANTS[variant]
    llama_like = dict(num_hidden_layers=n_layers, hidden_size=H, intermediate_size=96,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size)
    if model_type == "gpt_neo":
        return T.GPTNeoConfig(num_layers=n_layers, hidden_size=H, num_heads=4, window_size=4,
                              attention_types=[[["global", "local"], 1], [["global"], 1]],
                              max_position_embeddings=128, vocab_size=vocab_size)
    if model_type == "opt":
        kw = {"word_embed_proj_dim": H, **extra}
        return T.OPTConfig(num_hidden_layers=n_layers, hidden_size=H, ffn_dim=96,
                           num_attention_heads=4, max_position_embeddings=128, pad_token_id=1,
                           vocab_size=vocab_size, **kw)
    if model_type == "bloom":
        return T.BloomConfig(n_layer=n_layers, hidden_size=H, n_head=4, vocab_size=vocab_size)
    if model_type == "falcon":
        return T.FalconConfig(num_hidden_layers=n_layers, hidden_size=H, num_attention_heads=4,
                              vocab_size=vocab_size, **extra)
    cls = T.AutoConfig.for_model(model_type).__class__
    return cls(**llama_like, **extra)


def adapter_of(variant: str):
    return importlib.import_module(f"editkit.models.{VARIANTS[variant][0]}").ADAPTER


@pytest.fixture(scope="module", params=list(VARIANTS))
def family(request, bytelevel_tokenizer):
    """(variant, model, tokenizer, adapter); weights scaled up (×10: the default init gives
    near-uniform predictions) so that restorations and edits move P(answer) by far more than
    rounding."""
    variant, tok = request.param, bytelevel_tokenizer
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_family_config(variant, len(tok))).eval()
    assert model.config.model_type == VARIANTS[variant][1]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return variant, model, tok, adapter_of(variant)


def _ids(tok):
    return torch.tensor([tok("The Eiffel Tower is located in the city of")["input_ids"]])


# ------------------------------------------------------------------------ registration
def _pyproject_adapters() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    return meta["project"]["entry-points"]["editkit.adapters"]


def test_entry_points_name_the_adapters():
    table = _pyproject_adapters()
    for variant in VARIANTS:
        model_type = VARIANTS[variant][1]
        module, attr = table[model_type].split(":")
        adapter = getattr(importlib.import_module(module), attr)
        assert adapter is adapter_of(variant) and adapter.name == model_type
        # what the registry checks of an entry point's object (no stale install needed)
        registry = editkit.registry.Registry("model adapter", "editkit.tests.none",
                                             editkit.registry._is_adapter,
                                             editkit.UnsupportedModelError, "")
        registry.register(model_type, table[model_type])
        assert registry.get(model_type) is adapter


def test_list_adapters_lists_them():
    from importlib.metadata import distribution

    declared = set(_pyproject_adapters())
    installed = {ep.name for ep in distribution("editkit").entry_points
                 if ep.group == "editkit.adapters"}
    if not declared <= installed:  # metadata written by an older `pip install -e`
        pytest.skip(f"the installed editkit metadata lacks {sorted(declared - installed)}; "
                    "run `pip install -e .` to refresh entry points")
    assert declared <= set(editkit.list_adapters())
    assert editkit.get_adapter("falcon") is adapter_of("falcon")


def test_unknown_model_type_points_at_the_docs():
    with pytest.raises(editkit.UnsupportedModelError, match="docs/adapters.md") as info:
        editkit.get_adapter("mamba")
    assert "mamba" in str(info.value) and "editkit.adapters" in str(info.value)


# ------------------------------------------------------------------------- module map
def test_slots_resolve_and_kv_view_maps_keys_to_values(family):
    variant, model, tok, adapter = family
    n = adapter.num_layers(model)
    assert n == 3
    for slot in ("embedding", "lm_head"):
        assert isinstance(adapter.module(model, slot), torch.nn.Module)
    assert adapter.module(model, "embedding").weight.shape[0] == len(tok)
    for slot in ("mlp_in", "mlp_out", "attn_out"):
        name = adapter.module_name(slot, 1)
        module = model.get_submodule(name)
        with Trace(model, [name], retain_input=True, retain_output=True) as tr, \
                torch.no_grad():
            model(_ids(tok))
        W = adapter.kv_view(module.weight)
        bias = module.bias if getattr(module, "bias", None) is not None else 0
        # for Falcon's mlp_out this also checks that the kept output is the MLP's own
        # (the block adds the attention output into that tensor in place afterwards)
        torch.testing.assert_close(tr.inputs[name] @ W.T + bias, tr.outputs[name],
                                   rtol=1e-5, atol=1e-5)


# --------------------------------------------------- behaviour: head, block call, embedding
def test_block_calls_and_head_reproduce_the_forward(family):
    from editkit.replay import BlockReplay

    variant, model, tok, adapter = family
    ids = _ids(tok)
    replayed, full, calls = replayed_logits(model, adapter, ids)
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        # the replay checks itself against the full forward (a wrong adapter is refused); the
        # head at chosen positions reads the same logits
        replay = BlockReplay(model, adapter, 1, 2, {"input_ids": ids})
        torch.testing.assert_close(replay(), full, rtol=1e-5, atol=1e-5)
        rows, cols = torch.tensor([0, 0]), torch.tensor([1, ids.shape[1] - 1])
        torch.testing.assert_close(replay((rows, cols)), full[rows, cols], rtol=1e-5, atol=1e-5)
        emb = adapter.embed(model, ids)
        scale = adapter.embedding_scale(model)
        weight = adapter.module(model, "embedding").weight
        if variant in SCALED:
            assert scale == pytest.approx(H ** 0.5)
        else:
            assert scale == 1.0
        torch.testing.assert_close(emb, weight[ids] * scale)
        if VARIANTS[variant][3] == "embed":
            torch.testing.assert_close(adapter.block_input(calls[0]), emb)


def test_block_calls_replay_on_a_larger_batch(family):
    """A call recorded on one prompt replayed on copies of it (as causal tracing does with its
    noise samples): for ALiBi families the bias tensor must follow the batch."""
    from editkit.replay import BlockCalls, expand_batch

    variant, model, tok, adapter = family
    ids = _ids(tok)
    blocks = adapter.blocks(model)
    with torch.no_grad(), BlockCalls(blocks) as rec:
        full = model(ids, use_cache=False).logits
    calls = rec.result()
    with torch.no_grad():
        h = adapter.block_input(calls[0]).expand(3, -1, -1)
        for block, call in zip(blocks, calls, strict=True):
            h = adapter.call_block(block, h, expand_batch(call, 3))
        got = adapter.head(model, h)
    for row in got:
        torch.testing.assert_close(row, full[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- ROME
REQUEST = editkit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome",
                              "Paris")


# opt-350m's random ReLU MLP has units that never fire on the statistics text, so its C is
# singular (a typed StatsError): OPT's ROME path is covered by "opt", its head by the tests above
@pytest.mark.parametrize("family", [v for v in VARIANTS if v != "opt-350m"], indirect=True)
def test_rome_inserts_the_value_and_reverts_exactly(family, tmp_path):
    from conftest import snapshot, state_equal

    from editkit.methods.rome import ROME, ROMEHyperParams
    from editkit.tokens import score_targets

    variant, model, tok, adapter = family
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, adapter)
    hp.layer = 1
    hp.mom2_n_samples, hp.value.num_grad_steps, hp.value.lr = 200, 25, 5.0
    editor = ROME(model, tok, hp, adapter=adapter, stats_texts="pydoc",
                  cache_dir=str(tmp_path), context_templates=["{}", "Once upon a time. {}"])
    base = snapshot(model)

    def logp_new() -> float:
        return float(score_targets(model, tok, [REQUEST.text], [REQUEST.target_new])[0])

    before = logp_new()
    editor.apply(REQUEST)
    step = editor.last_step
    module = adapter.module(model, "mlp_out", hp.layer)
    with torch.no_grad():
        out = module(step.key_inserted[None])[0]
    scale = float(step.value.v_star.norm())
    torch.testing.assert_close(out, step.value.v_star, rtol=1e-4, atol=1e-4 * scale)
    # v* lowered the NLL of the new object, and the edited model gives it more mass
    assert step.value.nll[-1] < step.value.nll[0] - 0.05
    assert logp_new() > before + 0.05
    editor.revert()
    assert state_equal(model, base)


# ------------------------------------------------------------------------------ tracing
def test_fast_tracer_equals_the_oracle(family):
    from editkit.tracing import ALL_KINDS, causal_trace, trace_naive

    variant, model, tok, adapter = family
    kw = dict(kinds=ALL_KINDS, window=2, samples=3, noise_std=1.0, seed=1, adapter=adapter)
    fast = causal_trace(model, tok, "The city of {} is in", "Paris", **kw)
    naive = trace_naive(model, tok, "The city of {} is in", "Paris", **kw)
    for k in ALL_KINDS:
        assert float(np.abs(fast[k].scores - naive[k].scores).max()) < 1e-4, k
        assert fast[k].p_clean == pytest.approx(naive[k].p_clean, abs=1e-6)
    assert float(np.ptp(fast["hidden"].scores)) > 1e-4  # restorations do move P(answer)


# ---------------------------------------------------------------------------------- OPT
@pytest.mark.parametrize("family", ["opt", "opt-350m"], indirect=True)
def test_opt_mlp_rows_are_seen_as_tokens(family):
    """OPT's decoder layer flattens the residual stream to (batch·tokens, d) rows before
    ``fc1``/``fc2``; editkit's hooks view those rows as the block's (batch, tokens) so that
    keys, values, edits and restorations index a token as in every other family."""
    variant, model, tok, adapter = family
    ids = torch.cat([_ids(tok)] * 2)
    name = adapter.module_name("mlp_out", 1)
    raw = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: raw.append(o))
    try:
        with Trace(model, [name], retain_input=True, retain_output=True) as tr, \
                torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    assert raw[0].shape == (ids.numel(), H)  # what the module itself returns
    assert tr.inputs[name].shape == (*ids.shape, 96) and tr.outputs[name].shape == (*ids.shape, H)
    torch.testing.assert_close(tr.outputs[name].reshape(-1, H), raw[0])
    # an edit made on the token view lands on that token's row
    delta = torch.randn(H)

    def add(_, h):
        assert h.shape == (*ids.shape, H)
        h = h.clone()
        h[1, 3] += delta
        return h

    with Trace(model, [name], edit_output=add, retain_output=True) as edited, torch.no_grad():
        model(ids)
    diff = edited.outputs[name] - tr.outputs[name]
    torch.testing.assert_close(diff[1, 3], delta)
    diff[1, 3] = 0
    assert not diff.any()  # and nowhere else
