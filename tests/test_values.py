"""The v*/z loop's shortcuts equal the straightforward computation (issue 16).

Each shortcut of :class:`ValueShortcuts` (replaying only the upper blocks, running only the
tokens after a cached prefix, the KL reference taken once) and MEMIT's batched z are checked
against the plain full-forward loop: the first step's loss and gradient w.r.t. δ, and the
final v*, on a GPT-2 and a LLaMA-family tiny model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import editkit
from editkit import EditRequest
from editkit.methods._locate.hparams import ValueHyperParams
from editkit.methods._locate.values import (
    ValueShortcuts,
    _build_rows,
    _edit_block_base,
    _make_groups,
    compute_value,
    compute_values,
    plan_groups,
)

REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("{} plays the sport of", "LeBron James", "football", "basketball"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
]
TEMPLATES = ["{}", "Once upon a time. {}", "The weather was nice today and. {}",
             "Python is a language. {}"]
STRAIGHT = ValueShortcuts(skip_lower_layers=False, reuse_prefix=False, kl_once=False)
CONFIGS = {
    "all": ValueShortcuts(),
    "no_prefix": ValueShortcuts(reuse_prefix=False),
    "kl_at_step0": ValueShortcuts(kl_once=False),
    "full_forward_kl_once": ValueShortcuts(skip_lower_layers=False, kl_once=True),
    "edit_block_each_step": ValueShortcuts(edit_block_once=False),
    "row_groups": ValueShortcuts(ragged_rows=False),
    "edit_block_once_no_prefix": ValueShortcuts(reuse_prefix=False, edit_block_once=True),
}


@pytest.fixture(params=["gpt2", "llama"])
def model_tok(request, bytelevel_tokenizer, sentencepiece_tokenizer):
    tok = bytelevel_tokenizer if request.param == "gpt2" else sentencepiece_tokenizer
    return tiny_model(request.param, len(tok), n_layers=4), tok


def _hp(**kw) -> ValueHyperParams:
    base = dict(num_grad_steps=6, lr=0.5, early_stop_loss=0.0, kl_factor=0.0625,
                weight_decay=0.5, clamp_norm_factor=4.0)
    return ValueHyperParams(**{**base, **kw})


def _value(model, tok, sc, request=REQUESTS[0], slot="mlp_out", **kw):
    return compute_value(model, tok, editkit.get_adapter(model), _hp(**kw), request, TEMPLATES,
                         layer=1, slot=slot, shortcuts=sc)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("slot", ["mlp_out", "block"])
def test_first_step_loss_and_gradient_equal_the_full_forward(model_tok, config, slot):
    model, tok = model_tok
    fast = _value(model, tok, CONFIGS[config], slot=slot, num_grad_steps=1)
    slow = _value(model, tok, STRAIGHT, slot=slot, num_grad_steps=1)
    torch.testing.assert_close(fast.v0, slow.v0, rtol=1e-5, atol=1e-5)
    assert fast.losses[0] == pytest.approx(slow.losses[0], rel=1e-5, abs=1e-6)
    assert fast.nll[0] == pytest.approx(slow.nll[0], rel=1e-5, abs=1e-6)
    scale = float(slow.first_grad.abs().max())
    assert scale > 0
    torch.testing.assert_close(fast.first_grad, slow.first_grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("config", ["all", "no_prefix", "edit_block_each_step", "row_groups"])
def test_v_star_equals_the_full_forward_loop(model_tok, config):
    model, tok = model_tok
    fast = _value(model, tok, CONFIGS[config])
    slow = _value(model, tok, STRAIGHT)
    assert fast.steps == slow.steps == 6
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.v_star, slow.v_star, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast.v_star, fast.v0)  # the loop did move δ


@pytest.mark.parametrize("objective", ["erase", "amplify", "reverse_tracing", "force"])
def test_every_objective_gets_the_same_v_star_with_the_shortcuts(model_tok, objective):
    """The objectives of Hase et al. (``force``'s noised subject rows included) go through the
    same cached prefix, ragged rows and once-computed edited block as ``inject``."""
    model, tok = model_tok
    request = dataclasses.replace(REQUESTS[0], objective=objective)
    fast = _value(model, tok, CONFIGS["all"], request=request)
    slow = _value(model, tok, STRAIGHT, request=request)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.v_star, slow.v_star, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast.v_star, fast.v0)


def test_prefix_reuse_is_in_effect_and_runs_fewer_tokens(model_tok):
    """The rows are grouped with a positive cached prefix (no silent fallback) and every
    step feeds the upper blocks fewer tokens than the rows hold."""
    model, tok = model_tok
    adapter = editkit.get_adapter(model)
    rows = _build_rows(tok, REQUESTS[:1], TEMPLATES, "subject_last")
    with torch.no_grad():
        groups = _make_groups(model, tok, adapter, rows, 1, 3, ValueShortcuts(), "cpu")
    assert sorted(int(r) for g in groups for r in g.rows) == list(range(len(rows.seqs)))
    assert any(g.prefix > 0 for g in groups)
    for g in groups:  # δ's column lies inside the run part of every row
        assert bool((g.edit_cols >= 0).all())
    widths: list[int] = []
    top = adapter.blocks(model)[3]
    handle = top.register_forward_pre_hook(
        lambda m, a, kw: widths.append((a[0] if a else kw["hidden_states"]).shape[1]),
        with_kwargs=True)
    try:
        _value(model, tok, ValueShortcuts(), num_grad_steps=3)
    finally:
        handle.remove()
    steps_widths = widths[-3 * len(groups):]
    assert sum(steps_widths) < 3 * len(groups) * max(len(s) for s in rows.seqs)
    assert max(steps_widths) < max(len(s) for s in rows.seqs)


def test_ragged_rows_run_each_row_from_its_own_edit_position(model_tok):
    """ragged_rows (default): one batch, every row from its δ column on (no fallback to
    groups on GPT-2 or LLaMA), and the run part is as wide as the longest row suffix."""
    model, tok = model_tok
    adapter = editkit.get_adapter(model)
    rows = _build_rows(tok, REQUESTS[:2], TEMPLATES, "subject_last")
    with torch.no_grad():
        (group,) = _make_groups(model, tok, adapter, rows, 1, 3, ValueShortcuts(), "cpu")
        grouped = _make_groups(model, tok, adapter, rows, 1, 3,
                               ValueShortcuts(ragged_rows=False), "cpu")
    assert group.replay.row_prefix.tolist() == rows.edit_idx
    assert bool((group.edit_cols == 0).all())
    suffixes = [len(s) - e for s, e in zip(rows.seqs, rows.edit_idx, strict=True)]
    assert group.replay.hidden.shape[1] == max(suffixes)
    assert len(set(rows.edit_idx)) > 1  # the rows really start at different columns
    # fewer row-tokens than the groups padded to a common start
    assert group.replay.hidden.shape[:2].numel() <= sum(g.replay.hidden.shape[:2].numel()
                                                        for g in grouped)
    # the replay's logits at the reads are the model's own (verified at construction too)
    at = group.read_at
    torch.testing.assert_close(group.replay(at), group.replay.reference, rtol=1e-5, atol=1e-5)


def test_construction_pass_in_row_chunks_changes_nothing(model_tok, monkeypatch):
    """The whole-row pass of a prefix replay runs PREFIX_PASS_ROWS rows at a time (a large z
    batch's logits are never all held): with chunks of 2 rows, batched z equal the
    straightforward loop's."""
    import editkit.replay

    model, tok = model_tok
    monkeypatch.setattr(editkit.replay, "PREFIX_PASS_ROWS", 2)
    adapter = editkit.get_adapter(model)
    rows = _build_rows(tok, REQUESTS, TEMPLATES, "subject_last")
    with torch.no_grad():  # no silent fallback: the chunked pass verifies as one ragged batch
        (group,) = _make_groups(model, tok, adapter, rows, 1, 3, ValueShortcuts(), "cpu")
    assert group.replay.row_prefix is not None and len(rows.seqs) > 2
    fast = compute_values(model, tok, adapter, _hp(), REQUESTS, TEMPLATES, layer=1,
                          slot="block")
    slow = compute_values(model, tok, adapter, _hp(), REQUESTS, TEMPLATES, layer=1,
                          slot="block", shortcuts=STRAIGHT)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.v_star, b.v_star, rtol=1e-4, atol=1e-4)


def test_lower_layers_run_a_fixed_number_of_times(bytelevel_tokenizer):
    model = tiny_model("gpt2", len(bytelevel_tokenizer), n_layers=5)
    blocks = editkit.get_adapter(model).blocks(model)
    counts = []
    for steps in (2, 5):
        calls = [0] * 5

        def count(m, a, i, calls=calls):
            calls[i] += 1

        handles = [b.register_forward_pre_hook(lambda m, a, i=i, c=count: c(m, a, i))
                   for i, b in enumerate(blocks)]
        try:
            res = compute_value(model, bytelevel_tokenizer, editkit.get_adapter(model),
                                _hp(num_grad_steps=steps), REQUESTS[0], TEMPLATES, layer=2)
        finally:
            for h in handles:
                h.remove()
        assert res.steps == steps
        counts.append(calls)
    assert counts[0][:2] == counts[1][:2]  # below the edit layer: independent of the steps
    extra = counts[1][4] - counts[0][4]  # 3 more steps: one call per row group each
    assert extra > 0 and extra % 3 == 0


@pytest.mark.parametrize("slot", ["mlp_out", "block"])
def test_edit_block_once_runs_the_edited_block_a_fixed_number_of_times(bytelevel_tokenizer,
                                                                        slot):
    """With edit_block_once the edited block (layer 2) runs only before the loop, whatever
    the number of steps, and the blocks above it once per row group and step; switched
    off, the edited block runs every step too."""
    tok = bytelevel_tokenizer
    model = tiny_model("gpt2", len(tok), n_layers=5)
    adapter = editkit.get_adapter(model)
    blocks = adapter.blocks(model)

    def calls_per_block(steps, sc):
        calls = [0] * 5
        handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(
            i, calls[i] + 1)) for i, b in enumerate(blocks)]
        try:
            res = compute_value(model, tok, adapter, _hp(num_grad_steps=steps), REQUESTS[0],
                                TEMPLATES, layer=2, slot=slot, shortcuts=sc)
        finally:
            for h in handles:
                h.remove()
        assert res.steps == steps
        return calls

    once = [calls_per_block(s, ValueShortcuts()) for s in (2, 5)]
    each = [calls_per_block(s, ValueShortcuts(edit_block_once=False)) for s in (2, 5)]
    assert once[0][2] == once[1][2]  # the edited block: not per step
    extra_above = once[1][3] - once[0][3]
    assert extra_above > 0 and extra_above % 3 == 0  # blocks above: every step
    assert each[1][2] - each[0][2] == extra_above  # switched off: the edited block too


def test_edit_block_once_falls_back_where_delta_is_not_additive(bytelevel_tokenizer):
    """A nonlinearity between the edited module and its block's output (as a norm after
    the MLP would be) fails the construction check: the edited block is then re-run every
    step and v* still equals the straightforward loop."""
    tok = bytelevel_tokenizer
    model = tiny_model("gpt2", len(tok), n_layers=4)
    adapter = editkit.get_adapter(model)
    mlp = model.get_submodule(adapter.module_name("mlp_out", 1).rsplit(".", 1)[0])
    handle = mlp.register_forward_hook(lambda m, a, out: torch.tanh(out))
    try:
        rows = _build_rows(tok, REQUESTS[:1], TEMPLATES, "subject_last")
        with torch.no_grad():
            groups = _make_groups(model, tok, adapter, rows, 1, 3, ValueShortcuts(), "cpu")
            edited = adapter.module_name("mlp_out", 1)
            assert all(_edit_block_base(model, g, edited) is None for g in groups)
            block_edit = adapter.module_name("block", 1)
            assert all(_edit_block_base(model, g, block_edit) is not None for g in groups)
        fast = _value(model, tok, ValueShortcuts())
        slow = _value(model, tok, STRAIGHT)
    finally:
        handle.remove()
    torch.testing.assert_close(fast.v_star, slow.v_star, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses),
                               rtol=1e-4, atol=1e-5)


def test_kl_reference_once_is_the_unedited_distribution(model_tok):
    """With δ = 0 the KL term is 0 either way: the reference taken before the loop is the
    unedited model's distribution."""
    model, tok = model_tok
    once = _value(model, tok, ValueShortcuts(), num_grad_steps=1, weight_decay=0.0,
                  kl_factor=1.0)
    step0 = _value(model, tok, ValueShortcuts(kl_once=False), num_grad_steps=1,
                   weight_decay=0.0, kl_factor=1.0)
    # loss = nll + KL at δ = 0: KL ≈ 0 against either reference
    assert once.losses[0] - once.nll[0] == pytest.approx(0.0, abs=1e-6)
    assert step0.losses[0] - step0.nll[0] == pytest.approx(0.0, abs=1e-9)


def test_early_stop_equals_running_exactly_those_steps(model_tok):
    model, tok = model_tok
    kw = dict(weight_decay=0.0)  # tiny random models: ‖v₀‖ is small, the decay term dominates
    full = _value(model, tok, ValueShortcuts(), num_grad_steps=12, **kw)
    assert full.losses[4] < full.losses[3]
    # a threshold the loss crosses after 4 updates: it stops there, with their δ
    threshold = (full.losses[3] + full.losses[4]) / 2
    stopped = _value(model, tok, ValueShortcuts(), num_grad_steps=12, early_stop_loss=threshold,
                     **kw)
    assert stopped.steps == 4 and len(stopped.losses) == 5
    exact = _value(model, tok, ValueShortcuts(), num_grad_steps=4, **kw)
    torch.testing.assert_close(stopped.v_star, exact.v_star, rtol=0, atol=0)
    # never reached: the same as running every step
    never = _value(model, tok, ValueShortcuts(), num_grad_steps=12, early_stop_loss=1e-12, **kw)
    assert never.steps == 12
    torch.testing.assert_close(never.v_star, full.v_star, rtol=0, atol=0)


@pytest.mark.parametrize("slot", ["mlp_out", "block"])
def test_batched_values_equal_sequential_ones(model_tok, slot):
    model, tok = model_tok
    adapter = editkit.get_adapter(model)
    single = [_value(model, tok, ValueShortcuts(), request=r, slot=slot) for r in REQUESTS]
    # one request stops early in the batch: its threshold is crossed before the others'
    hp = _hp()
    batched = compute_values(model, tok, adapter, hp, REQUESTS, TEMPLATES, layer=1, slot=slot)
    for one, many in zip(single, batched, strict=True):
        assert one.steps == many.steps
        torch.testing.assert_close(many.v0, one.v0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(many.losses), torch.tensor(one.losses),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(many.v_star, one.v_star, rtol=1e-4, atol=1e-4)


def test_batched_early_stop_is_per_request(model_tok):
    model, tok = model_tok
    adapter = editkit.get_adapter(model)
    kw = dict(weight_decay=0.0, num_grad_steps=12)
    probe = [_value(model, tok, ValueShortcuts(), request=r, **kw) for r in REQUESTS]
    # a threshold between the requests' final losses: some stop, some run on
    finals = sorted(p.losses[-1] for p in probe)
    threshold = (finals[0] + finals[1]) / 2
    hp = _hp(early_stop_loss=threshold, **kw)
    single = [_value(model, tok, ValueShortcuts(), request=r, early_stop_loss=threshold, **kw)
              for r in REQUESTS]
    batched = compute_values(model, tok, adapter, hp, REQUESTS, TEMPLATES, layer=1)
    assert len({s.steps for s in single}) > 1  # they really stop at different steps
    for one, many in zip(single, batched, strict=True):
        assert one.steps == many.steps
        torch.testing.assert_close(many.v_star, one.v_star, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 12)), min_size=1, max_size=30),
       st.integers(0, 64))
def test_plan_groups_is_a_partition_no_worse_than_one_group(rows, overhead):
    starts = [s for s, _ in rows]
    lengths = [s + extra for s, extra in rows]
    groups = plan_groups(lengths, starts, overhead)
    assert sorted(r for g in groups for r in g) == list(range(len(rows)))

    def cost(g):
        return len(g) * (max(lengths[r] for r in g) - min(starts[r] for r in g)) + overhead

    assert sum(map(cost, groups)) <= cost(list(range(len(rows))))


def test_shortcuts_are_a_frozen_switchboard():
    sc = ValueShortcuts()
    assert sc.skip_lower_layers and sc.reuse_prefix and sc.kl_once and sc.edit_block_once
    with pytest.raises(dataclasses.FrozenInstanceError):
        sc.reuse_prefix = False  # type: ignore[misc]
