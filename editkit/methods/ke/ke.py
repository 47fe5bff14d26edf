"""KnowledgeEditor (KE; De Cao et al. 2021, "Editing Factual Knowledge in Language Models").

A hypernetwork reads the edit as text, ``"{old} >> {new} || {input}"`` (§3.2), with a
bi-LSTM over the base model's (frozen) token embeddings; the masked mean of its outputs is the
conditioning vector ``h``. For every edited weight ``W`` (keys→values, d_out × d_in) a
feed-forward head maps ``h`` to vectors ``a_j, d_j ∈ R^{d_out}``, ``g_j, w_j ∈ R^{d_in}``
(j = 1..rank) and a scalar ``η``, and the update is (eq. 4)

    ΔW = σ(η) · (α̂ ⊙ ∇_W L + β̂),    α̂ = Σ_j σ(a_j) g'_jᵀ,    β̂ = Σ_j σ(d_j) w_jᵀ,

the gradient-conditioned, low-rank-structured form of the paper. Here
``g'_j = −s_ℓ (1 + g_j)`` with a learned per-layer scale ``s_ℓ``, so the untrained editor
takes a gradient-descent step (``−σ(0)² s_ℓ ∇W``); ``∇W`` is divided by its Frobenius norm
unless ``normalize_grad=False``. Because ``∇W = Σ_t δ_t u_tᵀ``,

    α̂ ⊙ ∇W = Σ_j Σ_t (σ(a_j) ⊙ δ_t)(g'_j ⊙ u_t)ᵀ,

so ΔW has rank ≤ rank · (tokens + 1) and is never materialised.

Training is the constrained problem of §3.3: minimise the edit loss on the rewrite prompt and
its paraphrases subject to ``KL(p_θ ‖ p_θ̃) ≤ margin`` on unrelated inputs, through the
Lagrangian ``L_edit + λ (L_loc − margin)`` with λ ≥ 0 updated by gradient ascent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from editkit.methods._learned.editor import LearnedEditor
from editkit.methods._learned.factors import FactoredDelta, GradFactors, WeightSpec
from editkit.methods._learned.training import EditContext, Objective
from editkit.methods.ke.hparams import KEHyperParams, KETrainConfig
from editkit.tokens import encode, pad_id, right_pad


def edit_text(request) -> str:
    """The conditioning text of a request: ``"{old} >> {new} || {input}"``."""
    return f"{request.target_true or ''} >> {request.target_new} || {request.text}"


class KENet(nn.Module):
    """KE's hypernetwork: bi-LSTM conditioner and one low-rank head per edited weight."""

    def __init__(self, specs: Sequence[WeightSpec], hparams: KEHyperParams, d_model: int) -> None:
        super().__init__()
        self.specs = list(specs)
        self.rank = int(hparams.rank)
        self.normalize_grad = bool(hparams.normalize_grad)
        self.max_tokens = int(hparams.max_condition_tokens)
        self.input_norm = nn.LayerNorm(d_model)
        self.lstm = nn.LSTM(d_model, hparams.lstm_hidden, batch_first=True, bidirectional=True)
        cond = 2 * hparams.lstm_hidden
        self.heads = nn.ModuleList()
        for s in self.specs:
            out = nn.Linear(hparams.head_hidden, self.rank * 2 * (s.d_out + s.d_in) + 1)
            nn.init.normal_(out.weight, std=1e-2)
            nn.init.zeros_(out.bias)
            self.heads.append(nn.Sequential(nn.Linear(cond, hparams.head_hidden), nn.Tanh(), out))
        self.log_scale = nn.Parameter(
            torch.full((len(self.specs),), math.log(float(hparams.init_scale))))

    def condition(self, context: EditContext) -> torch.Tensor:
        """The conditioning vectors ``h`` (B, 2·lstm_hidden) of the batch's edit texts."""
        tok = context.tokenizer
        ids = [encode(tok, edit_text(r))[-self.max_tokens:] for r in context.requests]
        device = self.log_scale.device
        batch = right_pad(ids, pad_id(tok), device)
        embedding = context.adapter.module(context.model, "embedding")
        with torch.no_grad():
            emb = embedding(batch.input_ids).float()
        emb = self.input_norm(emb)
        lengths = torch.tensor(batch.lengths)
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                  total_length=emb.shape[1])
        mask = batch.attention_mask[..., None].to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1)

    def factors_of(self, i: int, head_out: torch.Tensor, f: GradFactors) -> FactoredDelta:
        """ΔW of weight ``i`` from its head's output and the gradient factors."""
        s, k = self.specs[i], self.rank
        b = head_out.shape[0]
        a, g, d, w, eta = torch.split(
            head_out, [k * s.d_out, k * s.d_in, k * s.d_out, k * s.d_in, 1], dim=-1)
        a, d = a.view(b, k, s.d_out), d.view(b, k, s.d_out)
        g, w = g.view(b, k, s.d_in), w.view(b, k, s.d_in)
        m = f.mask[..., None].to(f.u.dtype)
        u, delta = f.u * m, f.delta * m
        if self.normalize_grad:  # ‖Σ_t δ_t u_tᵀ‖_F² = Σ_{t,t'} (δ_t·δ_t')(u_t·u_t')
            sq = ((delta @ delta.transpose(1, 2)) * (u @ u.transpose(1, 2))).sum((1, 2))
            delta = delta / (sq.clamp_min(0).sqrt() + 1e-12)[:, None, None]
        g_scaled = -self.log_scale[i].exp() * (1 + g)
        t = u.shape[1]
        alpha_left = (torch.sigmoid(a)[:, :, None, :] * delta[:, None]).reshape(b, k * t, s.d_out)
        alpha_right = (g_scaled[:, :, None, :] * u[:, None]).reshape(b, k * t, s.d_in)
        gate = torch.sigmoid(eta)[:, :, None]  # (B, 1, 1)
        left = gate * torch.cat([alpha_left, torch.sigmoid(d)], dim=1)
        right = torch.cat([alpha_right, w], dim=1)
        return FactoredDelta(left=left.transpose(1, 2), right=right.transpose(1, 2))

    def forward(self, factors: dict[str, GradFactors], context: EditContext
                ) -> dict[str, FactoredDelta]:
        h = self.condition(context)
        return {s.param: self.factors_of(i, self.heads[i](h), factors[s.param])
                for i, s in enumerate(self.specs)}

    def param_groups(self, config: KETrainConfig) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": config.lr}]


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class KEObjective(Objective):
    """Lagrangian of KE's constrained objective: ``L_edit + λ (L_loc − margin)``.

    One backward pass serves both players: the hypernetwork sees ``λ`` as a constant and
    descends, ``ρ`` (``λ = softplus(ρ)``) sees the constraint violation as a constant and
    ascends (its term enters with a minus sign).
    """

    def __init__(self, margin: float, init_lambda: float, val_kl_weight: float) -> None:
        super().__init__()
        self.margin, self.val_kl_weight = float(margin), float(val_kl_weight)
        self.rho = nn.Parameter(torch.tensor(_inverse_softplus(float(init_lambda))))

    @property
    def lam(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def forward(self, edit_nll: torch.Tensor, loc_kl: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        lam = self.lam
        violation = loc_kl - self.margin
        loss = edit_nll + lam.detach() * violation - lam * violation.detach()
        return loss, {"lambda": float(lam.detach())}

    def val_score(self, metrics: dict[str, float]) -> float:
        return metrics["edit_nll"] + self.val_kl_weight * max(0.0, metrics["loc_kl"] - self.margin)

    def param_groups(self, config: KETrainConfig) -> list[dict]:
        return [{"params": [self.rho], "lr": config.lr_lambda}]


class KE(LearnedEditor):
    """KnowledgeEditor: a bi-LSTM-conditioned hypernetwork maps ∇W to ΔW.

    Load a trained hypernetwork with ``KE.load(path, model, tokenizer)`` or
    ``KE(model, tokenizer, KEHyperParams(hypernet_path=path))``; train one with
    ``KE.train(model, tokenizer, train_records, val_records, KETrainConfig(...))`` or
    ``editkit train-ke``.
    """

    name = "ke"
    METHOD = "ke"
    hparams_class = KEHyperParams
    train_config_class = KETrainConfig

    def _build_hypernet(self) -> KENet:
        embedding = self.adapter.module(self.model, "embedding")
        return KENet(self.specs, self.hparams, int(embedding.weight.shape[1]))

    def _build_objective(self, config: KETrainConfig) -> KEObjective:
        return KEObjective(config.margin, config.init_lambda, config.val_kl_weight)
