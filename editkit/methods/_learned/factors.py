"""Rank-one-per-token gradients of linear layers, factored weight deltas, and their hooks.

For a linear layer ``v = W u + b`` applied at every token ``t``, the gradient of a loss ``L``
with respect to ``W`` (keys→values layout) is a sum of outer products (MEND, Mitchell et al.
2022, eq. 1):

    ∇_W L = Σ_t δ_t u_tᵀ,        δ_t = ∂L/∂v_t,  u_t = the layer's input at token t.

:func:`capture_factors` records ``u_t`` and ``δ_t`` for chosen layers in one forward and one
backward pass of the frozen model: a zero tensor that requires grad is added to each layer's
output, and the gradient with respect to that tensor is ``δ``. No parameter gradient is
computed or stored, so the model is left untouched.

Both learned editors turn those factors into a weight change that is again a sum of outer
products, :class:`FactoredDelta` ``ΔW = L Rᵀ`` (``L`` (d_out, r), ``R`` (d_in, r)). During
training the change is never written into the weights: :func:`rowwise_deltas` adds
``ΔW_e x`` to the layer's output for every row of a batch, with a different edit ``e`` per
row, so a whole batch of independent edits is evaluated in one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from editkit.nethooks import hidden_of, with_hidden
from editkit.patch import Delta
from editkit.tokens import build_scoring_batch, target_token_logprobs


@dataclass(frozen=True)
class WeightSpec:
    """One edited weight: parameter and module name, adapter slot, block, kv shape."""

    param: str
    module: str
    slot: str
    layer: int
    d_out: int
    d_in: int

    @property
    def shape_key(self) -> str:
        return f"{self.d_in}x{self.d_out}"


def weight_specs(model: nn.Module, adapter, layers: Sequence[int],
                 slots: Sequence[str]) -> list[WeightSpec]:
    """Specs of the ``slots`` weights of ``layers`` (block-major order)."""
    params = dict(model.named_parameters())
    specs = []
    for layer in layers:
        for slot in slots:
            name = adapter.weight_name(slot, layer)
            d_out, d_in = adapter.kv_view(params[name]).shape
            specs.append(WeightSpec(name, adapter.module_name(slot, layer), slot, layer,
                                    int(d_out), int(d_in)))
    return specs


@dataclass
class GradFactors:
    """Per-token layer inputs ``u`` (B, T, d_in) and output gradients ``delta`` (B, T, d_out).

    ``mask`` (B, T) marks the tokens that carry gradient (real tokens before each row's last
    one; padding and the final token, whose output no loss reads, are excluded). Row ``b``
    belongs to edit ``b``: ``weight_grad()[b] = Σ_t δ_bt u_btᵀ`` is that edit's gradient.
    """

    u: torch.Tensor
    delta: torch.Tensor
    mask: torch.Tensor

    def weight_grad(self) -> torch.Tensor:
        """(B, d_out, d_in) per-edit gradient ``Σ_t δ_t u_tᵀ`` in keys→values layout."""
        m = self.mask[..., None].to(self.u.dtype)
        return torch.einsum("bto,bti->boi", self.delta * m, self.u * m)


@dataclass
class FactoredDelta:
    """Per-edit weight changes ``ΔW_b = left_b @ right_bᵀ`` (keys→values layout).

    ``left`` (B, d_out, r), ``right`` (B, d_in, r). Columns may be zero (masked tokens).
    """

    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        """(B, d_out, d_in) materialised deltas."""
        return self.left @ self.right.transpose(1, 2)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily stop gradient tracking for every parameter of ``model`` (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def capture_factors(model: nn.Module, tokenizer, specs: Sequence[WeightSpec],
                    prompts: Sequence[str], targets: Sequence[str]
                    ) -> tuple[dict[str, GradFactors], torch.Tensor]:
    """``u`` and ``δ`` of every spec's layer for the NLL of ``" " + target`` after each prompt.

    The loss of row ``b`` is its mean per-token NLL (the edit loss of the papers); rows do
    not interact, so row ``b``'s factors give exactly the gradient of edit ``b`` alone.
    Returns ``({param name: GradFactors}, per-row NLL (B,))``. The model must not track
    parameter gradients (see :func:`frozen_parameters`); it is not modified.
    """
    device = next(model.parameters()).device
    sb = build_scoring_batch(tokenizer, list(prompts), list(targets), device)
    by_module = {s.module: s for s in specs}
    inputs: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            inputs[name] = _first_input(args, kwargs).detach()
            out = hidden_of(output)
            z = torch.zeros_like(out, requires_grad=True)
            zeros[name] = z
            return with_hidden(output, out + z)

        return hook

    handles = []
    try:
        for name in by_module:
            handles.append(model.get_submodule(name).register_forward_hook(
                make_hook(name), with_kwargs=True))
        with torch.enable_grad():
            logits = model(**sb.batch.model_inputs()).logits
            nll = torch.stack([-lp.mean() for lp in target_token_logprobs(logits, sb)])
            names = list(by_module)
            grads = torch.autograd.grad(nll.sum(), [zeros[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    lengths = torch.tensor(sb.batch.lengths, device=device)
    width = sb.batch.input_ids.shape[1]
    mask = torch.arange(width, device=device)[None, :] < (lengths[:, None] - 1)
    out: dict[str, GradFactors] = {}
    for name, g in zip(names, grads, strict=True):
        spec = by_module[name]
        out[spec.param] = GradFactors(inputs[name].float(), g.float(), mask)
    return out, nll.detach()


@contextmanager
def rowwise_deltas(model: nn.Module, deltas: dict[str, FactoredDelta],
                   rows: torch.Tensor) -> Iterator[None]:
    """Within the block, module ``m`` outputs ``W x + b + ΔW_{rows[i]} x`` for batch row ``i``.

    ``deltas`` maps module names to the factored deltas of a batch of edits; ``rows`` (N,)
    gives the edit index of each of the N rows of the batch the model is called on. This is
    what applying each edit's patch to its own copy of the model computes, for all rows in
    one pass (and differentiable with respect to the deltas).
    """
    handles = []

    def make_hook(name: str):
        fd = deltas[name]

        def hook(module, args, kwargs, output):
            x = _first_input(args, kwargs)
            out = hidden_of(output)
            left, right = fd.left[rows], fd.right[rows]
            coeff = torch.einsum("nsi,nir->nsr", x.float(), right)
            corr = torch.einsum("nsr,nor->nso", coeff, left)
            return with_hidden(output, out + corr.to(out.dtype))

        return hook

    try:
        for name in deltas:
            handles.append(model.get_submodule(name).register_forward_hook(
                make_hook(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def row_target_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str],
                        targets: Sequence[str]) -> torch.Tensor:
    """Mean per-token log-prob of each ``" " + target`` after its prompt (keeps the graph)."""
    device = next(model.parameters()).device
    sb = build_scoring_batch(tokenizer, list(prompts), list(targets), device)
    logits = model(**sb.batch.model_inputs()).logits
    return torch.stack([lp.mean() for lp in target_token_logprobs(logits, sb)])


def to_patch_delta(adapter, fd: FactoredDelta, min_norm: float = 0.0) -> Delta:
    """One patch delta for the sum of all edits of ``fd``: ``Σ_b left_b right_bᵀ``.

    Zero columns are dropped; the result is a ``LowRank`` of that rank in the parameter's
    layout, or a ``Dense`` delta when that is smaller
    (``rank · (d_out + d_in) ≥ d_out · d_in``).
    """
    left = fd.left.detach().float().transpose(0, 1).reshape(fd.left.shape[1], -1)
    right = fd.right.detach().float().transpose(0, 1).reshape(fd.right.shape[1], -1)
    keep = (left.abs().amax(0) > min_norm) & (right.abs().amax(0) > min_norm)
    if not bool(keep.any()):
        keep[0] = True  # an all-zero delta still needs one column
    left, right = left[:, keep], right[:, keep]
    d_out, d_in = left.shape[0], right.shape[0]
    if left.shape[1] * (d_out + d_in) >= d_out * d_in:
        return adapter.dense_delta(left @ right.T)
    return adapter.lowrank_delta(left, right)
