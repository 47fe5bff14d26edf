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

Speed: layers below the edited one do not depend on δ. :class:`editkit.replay.BlockReplay`
runs the model once, captures the input (residual stream) and call arguments of every block
from the edited layer up, and afterwards re-runs only those blocks and the adapter's head (at
the positions the loss reads); it checks once that this reproduces the model's own logits
(``ReplayMismatchError`` otherwise). ``skip_lower_layers=False`` keeps the naive full forward
for comparison (``benchmarks/bench_rome.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from editkit.errors import InvalidHyperParamsError
from editkit.methods._locate.hparams import ValueHyperParams
from editkit.methods._locate.keys import fact_token_index
from editkit.methods._locate.templates import PLAIN, apply_template
from editkit.nethooks import Trace
from editkit.replay import BlockReplay
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


@dataclass
class _Rows:
    batch: Any
    edit_idx: torch.Tensor
    target_rows: torch.Tensor
    target_cols: torch.Tensor
    target_ids: torch.Tensor
    target_weight: torch.Tensor
    plain_row: int
    kl_row: int
    kl_col: int


def _build_rows(tokenizer, request: EditRequest, templates: Sequence[str], fact_token: str,
                device) -> _Rows:
    """One row per template (prefix + prompt + target[:-1]) and the KL prompt last."""
    seqs, edit_idx, t_rows, t_cols, t_ids, t_w = [], [], [], [], [], []
    for r, template in enumerate(templates):
        prompt = apply_template(template, request.prompt)
        prompt_ids, target_ids = prompt_target_ids(tokenizer, fill(prompt, request.subject),
                                                    request.target_new)
        seqs.append(prompt_ids + target_ids[:-1])
        edit_idx.append(fact_token_index(tokenizer, prompt, request.subject, fact_token))
        for j, tid in enumerate(target_ids):
            t_rows.append(r)
            t_cols.append(len(prompt_ids) - 1 + j)
            t_ids.append(tid)
            t_w.append(1.0 / len(target_ids))  # mean per-token NLL of each prompt
    kl_col = fact_token_index(tokenizer, KL_PROMPT, request.subject, fact_token)
    seqs.append(encode(tokenizer, fill(KL_PROMPT, request.subject)))
    edit_idx.append(kl_col)
    as_t = lambda xs, dt=torch.long: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
    return _Rows(
        batch=right_pad(seqs, pad_id(tokenizer), device),
        edit_idx=as_t(edit_idx), target_rows=as_t(t_rows), target_cols=as_t(t_cols),
        target_ids=as_t(t_ids), target_weight=as_t(t_w, torch.float32),
        plain_row=list(templates).index(PLAIN), kl_row=len(templates), kl_col=kl_col,
    )


def compute_value(model: nn.Module, tokenizer, adapter, hparams: Any,
                  request: EditRequest, templates: Sequence[str], *, layer: int | None = None,
                  skip_lower_layers: bool = True, slot: str = "mlp_out") -> ValueResult:
    """Optimise δ (eq. 4) and return v* = v₀ + δ. The model is left unchanged.

    ``hparams`` is a :class:`ValueHyperParams` (then ``layer`` is required) or any
    hyperparameters holding one as ``value`` and the edited ``layer`` (``ROMEHyperParams``).
    ``templates`` must contain the plain ``"{}"`` (v₀ is read on it). ``slot`` is the module
    of ``layer`` whose output δ is added to: ``"mlp_out"`` (ROME's MLP value) or ``"block"``
    (MEMIT's residual stream z, paper eq. 16).
    """
    if isinstance(hparams, ValueHyperParams):
        hp = hparams
        if layer is None:
            raise InvalidHyperParamsError(
                "compute_value got a ValueHyperParams but no layer; pass layer=<edited block>")
    else:
        hp = hparams.value
        layer = hparams.layer if layer is None else layer
    device = next(model.parameters()).device
    loss_layer = hp.read_layer(adapter.num_layers(model))
    rows = _build_rows(tokenizer, request, templates, hp.fact_token, device)
    n_rows = rows.batch.input_ids.shape[0]
    row_index = torch.arange(n_rows, device=device)
    read_rows = torch.cat([rows.target_rows, rows.target_rows.new_tensor([rows.kl_row])])
    read_cols = torch.cat([rows.target_cols, rows.target_cols.new_tensor([rows.kl_col])])
    edited = adapter.module_name(slot, layer)
    inputs = {**rows.batch.model_inputs()}

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        # v₀ is read during the first pass (which also records the upper blocks' inputs).
        with torch.no_grad(), Trace(model, [edited], retain_output=True) as tr:
            if skip_lower_layers:
                upper = BlockReplay(model, adapter, layer, loss_layer, inputs,
                                    check_at=(read_rows, read_cols), verify=False)
            else:
                with Trace(model, [edited], stop=True):
                    model(**inputs, use_cache=False)
        if skip_lower_layers:  # once v₀ is read: no hook of ours inside the replayed blocks
            upper.verify()
        v0 = tr.outputs[edited][rows.plain_row, rows.edit_idx[rows.plain_row]].float()
        d_out = v0.shape[0]

        if skip_lower_layers:
            def logits_at() -> torch.Tensor:
                return upper((read_rows, read_cols))
        else:
            last_block = adapter.module_name("block", loss_layer)

            def logits_at() -> torch.Tensor:
                with Trace(model, [last_block], retain_output=True, stop=True,
                           detach=False) as full:
                    model(**inputs, use_cache=False)
                return adapter.head(model, full.outputs[last_block], (read_rows, read_cols))

        delta = torch.zeros(d_out, device=device, requires_grad=True)

        def add_delta(_: str, h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            h[row_index, rows.edit_idx] = h[row_index, rows.edit_idx] + delta.to(h.dtype)
            return h

        opt = torch.optim.Adam([delta], lr=hp.lr)
        v0_norm = v0.norm()
        max_norm = hp.clamp_norm_factor * v0_norm
        kl_init: torch.Tensor | None = None
        result = ValueResult(v_star=v0, v0=v0, delta=delta.detach())
        # num_updates Adam updates, each after a loss evaluation, and one last evaluation at
        # the final δ (no backward): so result.nll[-1] is the NLL of the returned v*, not of
        # the δ one update before it. With count_steps="reference" this is exactly the
        # reference's loop (num_grad_steps evaluations, one update fewer).
        n_updates = hp.num_updates
        for step in range(n_updates + 1):
            final = step == n_updates
            opt.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(not final), \
                    Trace(model, [edited], edit_output=add_delta, detach=False):
                logits = logits_at()
            logp = torch.log_softmax(logits.float(), dim=-1)
            n_t = rows.target_ids.shape[0]
            token_lp = logp[torch.arange(n_t, device=device), rows.target_ids]
            nll = -(token_lp * rows.target_weight).sum() / len(templates)
            kl_lp = logp[n_t]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = (kl_lp.exp() * (kl_lp - kl_init)).sum()  # KL(edited ‖ original)
            decay = delta.norm() / v0_norm ** 2
            loss = nll + hp.kl_factor * kl + hp.weight_decay * decay
            loss_value = float(loss.detach())
            result.losses.append(loss_value)
            result.nll.append(float(nll.detach()))
            logger.debug("v* step %d: loss %.4f (nll %.4f, kl %.4f, decay %.4f)", step,
                         loss_value, float(nll.detach()), float(kl.detach()),
                         float(decay.detach()))
            if loss_value < hp.early_stop_loss or final:
                break
            loss.backward()
            opt.step()
            result.steps += 1
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    result.delta = delta.detach().clone()
    result.v_star = (v0 + result.delta).detach()
    return result
