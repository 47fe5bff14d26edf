"""The value v* that makes the model say the new object (ROME §3.1 eq. 4; MEMIT's z, eq. 16).

    v* = v₀ + δ,   δ = argmin  1/N Σⱼ −log p(o* | xⱼ + p; m := v₀ + δ)
                             + kl_factor · KL(p(· | "s is a"; m := v₀ + δ) ‖ p(· | "s is a"))
                             + weight_decay · ‖δ‖ / ‖v₀‖²

where ``m := v₀ + δ`` adds δ to the output of the edited module (ROME: the MLP value;
MEMIT: the residual stream) at the subject's last token of every prompt; v₀ is that output
on the bare prompt. Adam (lr ``lr``) runs ``num_updates`` steps (``num_grad_steps`` counted
as ``count_steps`` says), ``‖δ‖`` is clamped to
``clamp_norm_factor · ‖v₀‖`` after each, and it stops early once the loss is below
``early_stop_loss`` (all fields of :class:`ValueHyperParams`). The KL term is the paper's
"essence" drift, KL(edited ‖ original), as in the reference implementation.

Speed: each step recomputes only what depends on δ (:class:`ValueShortcuts`, all on by
default, each switchable and checked against the straightforward computation in
``tests/test_values.py``):

* ``skip_lower_layers``: layers below the edited one do not depend on δ.
  :class:`editkit.replay.BlockReplay` runs the model once, records the input of every block
  from the edited layer up, and afterwards re-runs only those blocks; it checks once that this
  reproduces the model's own logits (``ReplayMismatchError`` otherwise).
* ``reuse_prefix``: a token before the edit position never sees δ (attention is causal), so
  its keys and values at every block are fixed. Rows are grouped by edit position
  (:func:`plan_groups`); a group's common prefix is read once from the model's key/value
  cache and each step runs only the tokens from there on. A model whose cache cannot be
  driven that way, or whose replay with a prefix does not reproduce its logits, falls back
  to whole rows (logged).
* ``ragged_rows`` (with ``reuse_prefix``): instead of groups, one batch in which every row
  runs from its own edit position (its suffix moved to the front, its own part of the cached
  prefix unmasked, true position ids: ``BlockReplay(row_prefix=)``). Fewer tokens than
  groups padded to a common start and one call per block per step instead of one per group
  (per-call overhead dominates on small models, small matrix products are slow on large
  ones). Models that cannot take it fall back to the groups (logged).
* ``kl_once``: the KL term's reference distribution p(· | "s is a") is the unedited model's,
  taken from the construction pass before the loop instead of from step 0.
* ``edit_block_once``: δ is added to the output of the edited module, the last thing the
  edited block computes before its residual sum (ROME's MLP value; MEMIT's z is the block
  output itself). Nothing else in that block sees δ, so its output with δ is its output
  without δ plus δ at the edit positions: that output is computed once and each step runs
  only the blocks above it. A check at construction (a probe vector through the module's
  own hook) confirms it for the model at hand; where it fails (a norm after the MLP, an
  edited module earlier in its block) the block is re-run every step (logged).
* the head (final norm + unembedding) runs only at the positions the loss reads (always).
* early stopping (``early_stop_loss`` > 0; 0 runs every step): a request whose loss is below
  it keeps its δ (the reference's check, made before the update of that step).

Several requests can be optimised together (:func:`compute_values`, MEMIT's batched z): their
δᵢ are independent rows of one tensor, each prompt row carries one request's δ, and the loss
is the sum of the per-request losses, so each δᵢ gets exactly its own gradient; Adam is
elementwise, and clamping and early stopping are per request, so every request follows the
trajectory it would follow alone (to float round-off).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from editkit.errors import InvalidHyperParamsError, ReplayMismatchError
from editkit.methods._locate.hparams import ValueHyperParams
from editkit.methods._locate.keys import fact_token_index
from editkit.methods._locate.objectives import replicas, subject_noise, target_term
from editkit.methods._locate.templates import PLAIN, apply_template
from editkit.nethooks import Trace
from editkit.replay import BlockReplay, PrefixUnavailable, replay_tolerance
from editkit.requests import EditRequest
from editkit.tokens import encode, fill, pad_id, prompt_target_ids, right_pad

logger = logging.getLogger(__name__)

#: The essence prompt of the KL term (paper §3.1).
KL_PROMPT = "{} is a"


#: The replay of the upper blocks (kept under its former name for existing imports).
UpperLayers = BlockReplay


@dataclass
class ValueResult:
    """Outcome of the v* optimisation (float32 vectors on the model's device)."""

    v_star: torch.Tensor
    v0: torch.Tensor
    delta: torch.Tensor
    losses: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    steps: int = 0
    #: ∂loss/∂δ at δ = 0 (the first step's gradient; ``None`` if it stopped before it).
    first_grad: torch.Tensor | None = None


@dataclass(frozen=True)
class ValueShortcuts:
    """Which computations the v*/z loop skips (see the module docstring). All default on;
    turning one off gives the straightforward computation for that part (debugging,
    ``benchmarks/bench_rome.py``), with the same result to float round-off."""

    #: Re-run only the blocks from the edited layer up (off: full forward every step).
    skip_lower_layers: bool = True
    #: Run only tokens from each row group's first edit position (needs skip_lower_layers).
    reuse_prefix: bool = True
    #: KL reference distribution from the pass before the loop (off: from step 0's logits).
    kl_once: bool = True
    #: The edited block's output without δ computed once; each step adds δ to it and runs
    #: only the blocks above (needs skip_lower_layers; used where a check shows δ reaches
    #: the block's output unchanged, see :func:`_edit_block_base`).
    edit_block_once: bool = True
    #: With reuse_prefix: all rows in one batch, each from its own edit position (off, or
    #: where the model cannot run that way: rows grouped by :func:`plan_groups`).
    ragged_rows: bool = True


#: A group of rows costs this many row-tokens of work on top of its tokens (one more call
#: of every upper block per step); :func:`plan_groups` trades it against padding.
GROUP_OVERHEAD_TOKENS = 32


@dataclass
class _Rows:
    """Every prompt row of the requests optimised together, and what the loss reads."""

    seqs: list[list[int]]
    edit_idx: list[int]        # per row: the column δ is added at
    request_of_row: list[int]
    read_rows: list[int]       # per read position: row, column
    read_cols: list[int]
    target_ids: list[int]      # per target position (the first len(target_ids) reads)
    target_weight: list[float]
    target_request: list[int]
    kl_read: list[int]         # per request: index of its KL read position
    plain_row: list[int]       # per request: the row v₀ is read on
    objectives: list = field(default_factory=list)  # per request (objectives.target_term)


def _build_rows(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                fact_token: str) -> _Rows:
    """Per request one row per template (prefix + prompt + target[:-1]), then its KL prompt."""
    seqs: list[list[int]] = []
    edit_idx, req_of_row, t_rows, t_cols, t_ids, t_w, t_req = [], [], [], [], [], [], []
    kl_rows, kl_cols, plain = [], [], []
    plain_index = list(templates).index(PLAIN)
    for q, request in enumerate(requests):
        first = len(seqs)
        # objectives (Hase et al. 2023): the object optimised, and `force`'s noised copies
        reps = replicas(request)
        for template in templates:
            prompt = apply_template(template, request.prompt)
            prompt_ids, target_ids = prompt_target_ids(tokenizer, fill(prompt, request.subject),
                                                        request.optimised_target)
            for _ in range(reps):
                r = len(seqs)
                seqs.append(prompt_ids + target_ids[:-1])
                edit_idx.append(fact_token_index(tokenizer, prompt, request.subject, fact_token))
                req_of_row.append(q)
                for j, tid in enumerate(target_ids):
                    t_rows.append(r)
                    t_cols.append(len(prompt_ids) - 1 + j)
                    t_ids.append(tid)
                    t_w.append(1.0 / len(target_ids) / reps)  # mean per-token NLL of each prompt
                    t_req.append(q)
        plain.append(first + plain_index * reps)
        kl_col = fact_token_index(tokenizer, KL_PROMPT, request.subject, fact_token)
        kl_rows.append(len(seqs))
        kl_cols.append(kl_col)
        seqs.append(encode(tokenizer, fill(KL_PROMPT, request.subject)))
        edit_idx.append(kl_col)
        req_of_row.append(q)
    n_t = len(t_ids)
    return _Rows(seqs=seqs, edit_idx=edit_idx, request_of_row=req_of_row,
                 read_rows=t_rows + kl_rows, read_cols=t_cols + kl_cols, target_ids=t_ids,
                 target_weight=t_w, target_request=t_req,
                 kl_read=[n_t + q for q in range(len(requests))], plain_row=plain,
                 objectives=[r.objective for r in requests])


def plan_groups(lengths: Sequence[int], starts: Sequence[int],
                overhead: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Partition rows into groups that each run from their smallest ``start`` on.

    A group costs ``rows × (longest row − smallest start) + overhead`` row-tokens per step;
    rows sorted by start are split where that total is smallest (dynamic programming over
    contiguous runs). Returns lists of row indices.
    """
    order = sorted(range(len(starts)), key=lambda r: (starts[r], lengths[r]))
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = 0
        for i in range(j, 0, -1):  # group order[i-1 .. j-1]
            longest = max(longest, lengths[order[i - 1]])
            cost = best[i - 1] + (j - i + 1) * (longest - starts[order[i - 1]]) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


@dataclass
class _Group:
    """Rows run together: a replay (or the full model) and where δ goes / the loss reads."""

    rows: torch.Tensor         # global row index of each local row
    edit_cols: torch.Tensor    # column of δ, local (after the prefix)
    delta_index: torch.Tensor  # request of each local row
    reads: torch.Tensor        # global read positions answered by this group
    read_at: tuple[torch.Tensor, torch.Tensor]  # local (row, column) of each
    replay: BlockReplay | None
    inputs: dict[str, torch.Tensor]
    prefix: int = 0
    #: The edited block's output without δ (``edit_block_once``), else ``None``.
    base: torch.Tensor | None = None


def compute_value(model: nn.Module, tokenizer, adapter, hparams: Any,
                  request: EditRequest, templates: Sequence[str], *, layer: int | None = None,
                  skip_lower_layers: bool = True, slot: str = "mlp_out",
                  shortcuts: ValueShortcuts | None = None) -> ValueResult:
    """Optimise δ (eq. 4) and return v* = v₀ + δ. The model is left unchanged.

    ``hparams`` is a :class:`ValueHyperParams` (then ``layer`` is required) or any
    hyperparameters holding one as ``value`` and the edited ``layer`` (``ROMEHyperParams``).
    ``templates`` must contain the plain ``"{}"`` (v₀ is read on it). ``slot`` is the module
    of ``layer`` whose output δ is added to: ``"mlp_out"`` (ROME's MLP value) or ``"block"``
    (MEMIT's residual stream z, paper eq. 16). ``shortcuts`` switches the speed-ups
    (:class:`ValueShortcuts`); ``skip_lower_layers=False`` is the older spelling of
    ``ValueShortcuts(skip_lower_layers=False)``.
    """
    (result,) = compute_values(model, tokenizer, adapter, hparams, [request], templates,
                               layer=layer, skip_lower_layers=skip_lower_layers, slot=slot,
                               shortcuts=shortcuts)
    return result


def compute_values(model: nn.Module, tokenizer, adapter, hparams: Any,
                   requests: Sequence[EditRequest], templates: Sequence[str], *,
                   layer: int | None = None, skip_lower_layers: bool = True,
                   slot: str = "mlp_out", shortcuts: ValueShortcuts | None = None
                   ) -> list[ValueResult]:
    """:func:`compute_value` for several requests optimised together (one batched forward
    per step; the loss is the sum of the per-request losses, so each request's δ follows its
    own trajectory, with its own clamp and early stop). One :class:`ValueResult` each."""
    if isinstance(hparams, ValueHyperParams):
        hp = hparams
        if layer is None:
            raise InvalidHyperParamsError(
                "compute_value got a ValueHyperParams but no layer; pass layer=<edited block>")
    else:
        hp = hparams.value
        layer = hparams.layer if layer is None else layer
    sc = shortcuts or ValueShortcuts()
    if not skip_lower_layers:
        sc = ValueShortcuts(skip_lower_layers=False, reuse_prefix=False, kl_once=sc.kl_once)
    device = next(model.parameters()).device
    loss_layer = hp.read_layer(adapter.num_layers(model))
    rows = _build_rows(tokenizer, requests, templates, hp.fact_token)
    n_req = len(requests)
    edited = adapter.module_name(slot, layer)

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(subject_noise(  # `force` only; else a no-op
            model, tokenizer, adapter, requests,
            lambda r: [apply_template(t, r.prompt) for t in templates]))
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            groups = _make_groups(model, tokenizer, adapter, rows, layer, loss_layer, sc,
                                  device)
            if sc.skip_lower_layers and sc.edit_block_once:
                for g in groups:
                    g.base = _edit_block_base(model, g, edited)
            v0, kl_reference = _initial_values(model, adapter, rows, groups, edited, sc,
                                               loss_layer, device)
        results = _optimise(model, adapter, hp, rows, groups, edited, v0, kl_reference,
                            len(templates), n_req, loss_layer, device)
    finally:
        stack.close()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return results


def _make_groups(model, tokenizer, adapter, rows: _Rows, layer: int, loss_layer: int,
                 sc: ValueShortcuts, device) -> list[_Group]:
    lengths = [len(s) for s in rows.seqs]
    read_rows = torch.tensor(rows.read_rows)
    read_cols = torch.tensor(rows.read_cols)
    if sc.skip_lower_layers and sc.reuse_prefix and sc.ragged_rows:
        group = _ragged_group(model, tokenizer, adapter, rows, layer, loss_layer, device,
                              read_rows, read_cols)
        if group is not None:
            return [group]
    if sc.skip_lower_layers and sc.reuse_prefix:
        parts = plan_groups(lengths, rows.edit_idx)
    else:
        parts = [list(range(len(rows.seqs)))]
    groups = []
    for part in parts:
        local = {r: i for i, r in enumerate(part)}
        batch = right_pad([rows.seqs[r] for r in part], pad_id(tokenizer), device)
        inputs = dict(batch.model_inputs())
        reads = torch.tensor([i for i, r in enumerate(rows.read_rows) if r in local],
                             dtype=torch.long)
        at_rows = torch.tensor([local[int(r)] for r in read_rows[reads]], dtype=torch.long,
                               device=device)
        at_cols = read_cols[reads].to(device)
        replay, prefix = None, 0
        if sc.skip_lower_layers:
            prefix = min(rows.edit_idx[r] for r in part) if sc.reuse_prefix else 0
            replay, prefix = _replay(model, adapter, layer, loss_layer, inputs,
                                     (at_rows, at_cols), prefix)
        groups.append(_Group(
            rows=torch.tensor(part, dtype=torch.long, device=device),
            edit_cols=torch.tensor([rows.edit_idx[r] - prefix for r in part], device=device),
            delta_index=torch.tensor([rows.request_of_row[r] for r in part], device=device),
            reads=reads.to(device), read_at=(at_rows, at_cols - prefix), replay=replay,
            inputs=inputs, prefix=prefix))
    return groups


def _ragged_group(model, tokenizer, adapter, rows: _Rows, layer: int, loss_layer: int, device,
                  read_rows: torch.Tensor, read_cols: torch.Tensor) -> _Group | None:
    """All rows as one group, each run from its own edit column (``ragged_rows``), or
    ``None`` (logged) where the model cannot replay that way."""
    n = len(rows.seqs)
    batch = right_pad(rows.seqs, pad_id(tokenizer), device)
    inputs = dict(batch.model_inputs())
    at_rows, at_cols = read_rows.to(device), read_cols.to(device)
    try:
        replay = BlockReplay(model, adapter, layer, loss_layer, inputs,
                             check_at=(at_rows, at_cols), row_prefix=rows.edit_idx)
    except (PrefixUnavailable, ReplayMismatchError) as exc:
        logger.info("v*: rows cannot each run from their own edit position on this model "
                    "(%s); grouping them", exc)
        return None
    local = torch.arange(n, device=device)
    return _Group(rows=local, edit_cols=replay.suffix_cols(local, torch.tensor(
                      rows.edit_idx, device=device)),
                  delta_index=torch.tensor(rows.request_of_row, device=device),
                  reads=torch.arange(len(rows.read_rows), device=device),
                  read_at=(at_rows, replay.suffix_cols(at_rows, at_cols)), replay=replay,
                  inputs=inputs, prefix=replay.prefix)


def _edit_block_base(model, g: _Group, edited: str) -> torch.Tensor | None:
    """The edited block's output without δ (suffix columns), if adding δ to the edited
    module's output adds exactly δ to the block's output, else ``None`` (logged).

    The check sends a probe through the module's own hook (a fixed pseudo-random vector per
    row, as long as the block's output there, so a norm or nonlinearity after the module
    shows up far above round-off) and compares the block's output with base + probe."""
    replay = g.replay
    base = replay.hidden_out(replay.start)
    local = torch.arange(g.rows.shape[0], device=base.device)
    at = base[local, g.edit_cols].float()
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(at.shape, generator=gen).to(at.device)
    probe = probe * (at.norm(dim=-1, keepdim=True) / probe.norm(dim=-1, keepdim=True))

    def add_probe(_: str, h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[local, g.edit_cols] = h[local, g.edit_cols] + probe.to(h.dtype)
        return h

    with Trace(model, [edited], edit_output=add_probe):
        probed = replay.hidden_out(replay.start)
    expected = base.index_put((local, g.edit_cols), probe.to(base.dtype), accumulate=True)
    err = float((probed.float() - expected.float()).abs().max())
    tol = replay_tolerance(base.dtype) * (1.0 + float(expected.abs().max()))
    if err <= tol:
        return base
    logger.info("v*: %s's output does not reach its block's output unchanged (max |Δ| %.3g); "
                "re-running the edited block every step", edited, err)
    return None


def _replay(model, adapter, layer, loss_layer, inputs, check_at, prefix
            ) -> tuple[BlockReplay, int]:
    """A verified replay with ``prefix`` cached tokens, else (logged) with none."""
    if prefix:
        try:
            return BlockReplay(model, adapter, layer, loss_layer, inputs, check_at=check_at,
                               prefix=prefix), prefix
        except (PrefixUnavailable, ReplayMismatchError) as exc:
            logger.info("v*: no prefix reuse for this model (%s); replaying whole rows", exc)
    return BlockReplay(model, adapter, layer, loss_layer, inputs, check_at=check_at), 0


def _initial_values(model, adapter, rows: _Rows, groups: list[_Group], edited: str,
                    sc: ValueShortcuts, loss_layer: int, device
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """v₀ per request (n, d) on its plain row, and the KL reference log-probabilities
    (n, vocab) of the unedited model (``None`` when taken at step 0: ``kl_once`` off)."""
    n_req = len(rows.plain_row)
    v0: list[torch.Tensor | None] = [None] * n_req
    kl: list[torch.Tensor | None] = [None] * n_req
    kl_of = {int(rows.kl_read[q]): q for q in range(n_req)}
    for g in groups:
        plain = [(i, q) for q, r in enumerate(rows.plain_row)
                 for i in (g.rows == r).nonzero().flatten().tolist()]
        if plain:
            with Trace(model, [edited], retain_output=True) as tr:
                if g.replay is not None:  # the edited module sits in the first replayed block
                    g.replay.hidden_out(g.replay.start)
                else:
                    with Trace(model, [edited], stop=True):
                        model(**g.inputs, use_cache=False)
            for i, q in plain:
                v0[q] = tr.outputs[edited][i, g.edit_cols[i]].float()
        if sc.kl_once:
            mine = [(j, kl_of[int(x)]) for j, x in enumerate(g.reads.tolist()) if int(x) in kl_of]
            if mine:
                logits = (g.replay.reference if g.replay is not None
                          else _full_logits(model, adapter, g, loss_layer))
                for j, q in mine:
                    kl[q] = torch.log_softmax(logits[j].float(), dim=-1)
    reference = torch.stack(kl) if sc.kl_once else None  # type: ignore[arg-type]
    return torch.stack(v0), reference  # type: ignore[arg-type]


def _full_logits(model, adapter, g: _Group, loss_layer: int) -> torch.Tensor:
    """The straightforward path: the full model up to ``loss_layer``, head at the reads."""
    last_block = adapter.module_name("block", loss_layer)
    with Trace(model, [last_block], retain_output=True, stop=True, detach=False) as full:
        model(**g.inputs, use_cache=False)
    return adapter.head(model, full.outputs[last_block], g.read_at)


def _optimise(model, adapter, hp: ValueHyperParams, rows: _Rows, groups: list[_Group],
              edited: str, v0: torch.Tensor, kl_reference: torch.Tensor | None,
              n_templates: int, n_req: int, loss_layer: int, device) -> list[ValueResult]:
    delta = torch.zeros_like(v0, requires_grad=True)
    current: list[_Group] = []

    def add_delta(_: str, h: torch.Tensor) -> torch.Tensor:
        g = current[0]
        h = h.clone()
        local = torch.arange(g.rows.shape[0], device=h.device)
        h[local, g.edit_cols] = h[local, g.edit_cols] + delta[g.delta_index].to(h.dtype)
        return h

    n_reads = len(rows.read_rows)
    order = torch.cat([g.reads for g in groups])
    target_ids = torch.tensor(rows.target_ids, device=device)
    target_w = torch.tensor(rows.target_weight, dtype=torch.float32, device=device)
    target_req = torch.tensor(rows.target_request, device=device)
    kl_read = torch.tensor(rows.kl_read, device=device)
    n_t = target_ids.shape[0]
    opt = torch.optim.Adam([delta], lr=hp.lr)
    v0_norm = v0.norm(dim=1)
    max_norm = hp.clamp_norm_factor * v0_norm
    results = [ValueResult(v_star=v0[q], v0=v0[q], delta=delta[q].detach())
               for q in range(n_req)]
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    frozen = torch.zeros_like(v0)
    # hp.num_updates Adam updates, each after a loss evaluation, then one last evaluation at
    # the final δ (no backward), so that nll[-1] is the NLL of the returned v*, not of the δ
    # one update before it. With count_steps="reference" this is the reference's loop
    # (num_grad_steps evaluations, one update fewer).
    n_updates = hp.num_updates
    for step in range(n_updates + 1):
        final = step == n_updates
        opt.zero_grad(set_to_none=True)
        parts = []
        with torch.set_grad_enabled(not final), \
                Trace(model, [edited], edit_output=add_delta, detach=False):
            for g in groups:
                current[:] = [g]
                if g.base is not None:  # edit_block_once: δ onto the stored block output
                    local = torch.arange(g.rows.shape[0], device=device)
                    hidden = g.base.index_put((local, g.edit_cols),
                                              delta[g.delta_index].to(g.base.dtype),
                                              accumulate=True)
                    parts.append(g.replay(g.read_at, first=g.replay.start + 1, hidden=hidden))
                elif g.replay is not None:
                    parts.append(g.replay(g.read_at))
                else:
                    parts.append(_full_logits(model, adapter, g, loss_layer))
        logits = torch.empty(n_reads, parts[0].shape[-1], device=device, dtype=parts[0].dtype)
        logits = logits.index_copy(0, order, torch.cat(parts))
        logp = torch.log_softmax(logits.float(), dim=-1)
        token_lp = logp[torch.arange(n_t, device=device), target_ids]
        nll = torch.zeros(n_req, device=device).index_add(
            0, target_req, -(token_lp * target_w)) / n_templates
        kl_lp = logp[kl_read]
        if kl_reference is None:
            kl_reference = kl_lp.detach().clone()  # step 0: δ = 0, the unedited model
        kl = (kl_lp.exp() * (kl_lp - kl_reference)).sum(-1)  # KL(edited ‖ original)
        decay = delta.norm(dim=1) / v0_norm ** 2
        loss = target_term(nll, rows.objectives) + hp.kl_factor * kl + hp.weight_decay * decay
        values = loss.detach().tolist()
        for q in range(n_req):
            if bool(active[q]):
                results[q].losses.append(values[q])
                results[q].nll.append(float(nll[q].detach()))
                logger.debug("v* step %d, request %d: loss %.4f (nll %.4f, kl %.4f)", step, q,
                             values[q], float(nll[q].detach()), float(kl[q].detach()))
                if values[q] < hp.early_stop_loss:
                    active[q] = False
                    frozen[q] = delta[q].detach()
        if final or not bool(active.any()):
            break
        (loss * active).sum().backward()
        if step == 0:
            for q in range(n_req):
                results[q].first_grad = delta.grad[q].detach().clone()
        opt.step()
        with torch.no_grad():
            for q in range(n_req):
                if bool(active[q]):
                    results[q].steps += 1
            norm = delta.norm(dim=1)
            scale = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
            delta.mul_(scale[:, None])
            # a request that stopped keeps its δ (Adam's momentum would still move it)
            delta.copy_(torch.where(active[:, None], delta, frozen))
    for q in range(n_req):
        results[q].delta = delta[q].detach().clone()
        results[q].v_star = (v0[q] + results[q].delta).detach()
    return results
