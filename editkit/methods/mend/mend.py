"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022).

For an edited linear layer with keys→values weight ``W`` (d_out × d_in), the edit loss's
gradient is ``∇_W L = Σ_t δ_t u_tᵀ`` (eq. 1; :mod:`editkit.methods._learned.factors`).
MEND transforms every token's pair instead of the full gradient (eqs. 2–4):

    û_t = (u_t − μ_u) / σ_u,   δ̂_t = (δ_t − μ_δ) / σ_δ            (running statistics)
    z_t = [û_t; δ̂_t] ⊙ (1 + s_ℓ) + b_ℓ                              (per-layer scale/shift)
    z_t ← z_t + U·relu(V z_t + c) + d     (per block; U = 0 at init: the identity)
    (ũ_t, δ̃_t) = split(z_t)
    ΔW_ℓ = −η_ℓ Σ_t δ̃_t ũ_tᵀ                                        (learned step η_ℓ)

One editor network per distinct weight shape, shared by the layers with that shape (each
layer has its own scale/shift, statistics and η). Training minimises
``cedit · L_edit + cloc · L_loc`` (Algorithm 1): the edited model's NLL of the new target
after the rewrite prompt and its paraphrases, and the KL divergence of its next-token
distribution from the base model's on unrelated prompts.

The patch of one edit is ``−η Σ_t δ̃_t ũ_tᵀ`` itself: a ``LowRank`` delta of rank = number of
tokens of the edit (or ``Dense`` when that would be larger).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from editkit.methods._learned.editor import LearnedEditor
from editkit.methods._learned.factors import FactoredDelta, GradFactors, WeightSpec
from editkit.methods._learned.training import EditContext, Objective
from editkit.methods.mend.hparams import MENDHyperParams, MENDTrainConfig


class RunningNorm(nn.Module):
    """Feature-wise running mean and variance (Chan et al.'s parallel Welford update).

    Until two samples have been seen it is the identity, so an untrained MEND is a plain
    gradient step. Statistics are float64 buffers (saved with the hypernetwork).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (N, dim) to the statistics."""
        if x.shape[0] == 0:
            return
        x = x.double()
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.count + n_b
        diff = mean_b - self.mean
        self.mean += diff * (n_b / n)
        self.m2 += m2_b + diff**2 * (self.count * n_b / n)
        self.count.copy_(n)

    def std(self) -> torch.Tensor:
        var = self.m2 / (self.count - 1)
        std = var.clamp_min(0).sqrt()
        return std.clamp_min(1e-5 * float(std.mean()) + 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:
            return x
        return (x - self.mean.to(x.dtype)) / self.std().to(x.dtype)


class LowRankResidual(nn.Module):
    """``z ← z + U relu(V z + c) + d`` with rank-``r`` U, V; U = 0 initially (identity)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + F.relu(self.down(z)) @ self.up.T + self.bias


class GradientMLP(nn.Module):
    """The editor network of one weight shape: ``(û, δ̂) → (ũ, δ̃)``, per-layer modulation."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modes: int) -> None:
        super().__init__()
        dim = d_in + d_out
        self.d_in = d_in
        self.mode_scale = nn.Parameter(torch.zeros(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.blocks = nn.ModuleList(LowRankResidual(dim, rank) for _ in range(n_blocks))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], dim=-1)
        z = z * (1 + self.mode_scale[mode]) + self.mode_shift[mode]
        for block in self.blocks:
            z = block(z)
        return z[..., : self.d_in], z[..., self.d_in:]


class MENDNet(nn.Module):
    """All of MEND's trainable state for a set of edited weights.

    ``forward(factors)`` maps each weight's gradient factors to a :class:`FactoredDelta`
    ``ΔW = −η Σ_t δ̃_t ũ_tᵀ`` per edit.
    """

    def __init__(self, specs: Sequence[WeightSpec], hparams: MENDHyperParams) -> None:
        super().__init__()
        self.specs = list(specs)
        self.normalize = bool(hparams.normalize)
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(self.specs):
            groups.setdefault(s.shape_key, []).append(i)
        self.modes = [groups[s.shape_key].index(i) for i, s in enumerate(self.specs)]
        self.nets = nn.ModuleDict({
            key: GradientMLP(self.specs[idx[0]].d_in, self.specs[idx[0]].d_out, hparams.rank,
                             hparams.n_blocks, len(idx))
            for key, idx in groups.items()
        })
        self.u_norms = nn.ModuleList(RunningNorm(s.d_in) for s in self.specs)
        self.delta_norms = nn.ModuleList(RunningNorm(s.d_out) for s in self.specs)
        self.edit_lr = nn.Parameter(torch.full((len(self.specs),), float(hparams.init_edit_lr)))

    def transform(self, i: int, f: GradFactors) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ũ, δ̃)`` of weight ``i`` for the factors ``f`` (masked tokens set to 0)."""
        u, delta, mask = f.u, f.delta, f.mask
        if self.normalize:
            if self.training:
                self.u_norms[i].update(u[mask])
                self.delta_norms[i].update(delta[mask])
            u, delta = self.u_norms[i](u), self.delta_norms[i](delta)
        s = self.specs[i]
        u_t, delta_t = self.nets[s.shape_key](u, delta, self.modes[i])
        m = mask[..., None].to(u_t.dtype)
        return u_t * m, delta_t * m

    def forward(self, factors: dict[str, GradFactors], context: EditContext | None = None
                ) -> dict[str, FactoredDelta]:
        out = {}
        for i, s in enumerate(self.specs):
            u_t, delta_t = self.transform(i, factors[s.param])
            out[s.param] = FactoredDelta(left=-self.edit_lr[i] * delta_t.transpose(1, 2),
                                         right=u_t.transpose(1, 2))
        return out

    def param_groups(self, config: MENDTrainConfig) -> list[dict]:
        rest = [p for n, p in self.named_parameters() if n != "edit_lr"]
        return [{"params": rest, "lr": config.lr},
                {"params": [self.edit_lr], "lr": config.lr_lr}]


class MENDObjective(Objective):
    """``cedit · L_edit + cloc · L_loc`` (MEND Algorithm 1, line 7)."""

    def __init__(self, cedit: float, cloc: float) -> None:
        super().__init__()
        self.cedit, self.cloc = float(cedit), float(cloc)

    def forward(self, edit_nll: torch.Tensor, loc_kl: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.cedit * edit_nll + self.cloc * loc_kl, {}

    def val_score(self, metrics: dict[str, float]) -> float:
        return self.cedit * metrics["edit_nll"] + self.cloc * metrics["loc_kl"]


class MEND(LearnedEditor):
    """MEND editor: a trained gradient-transform network turns the edit's gradient into ΔW.

    Load a trained hypernetwork with ``MEND.load(path, model, tokenizer)`` or
    ``MEND(model, tokenizer, MENDHyperParams(hypernet_path=path))``; train one with
    ``MEND.train(model, tokenizer, train_records, val_records, MENDTrainConfig(...))`` or
    ``editkit train-mend``.
    """

    name = "mend"
    METHOD = "mend"
    hparams_class = MENDHyperParams
    train_config_class = MENDTrainConfig

    def _build_hypernet(self) -> MENDNet:
        return MENDNet(self.specs, self.hparams)

    def _build_objective(self, config: MENDTrainConfig) -> MENDObjective:
        return MENDObjective(config.cedit, config.cloc)
