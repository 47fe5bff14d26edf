"""FT and FT+L: gradient descent on one weight matrix, optionally inside an L∞ ball.

The loss is the full multi-token NLL of ``" " + target_new`` after the rewrite prompt,
averaged over the request's target tokens (every token of a multi-token target counts, unlike
the reference repository's FT baseline, which scored only part of it).

Objectives (Hase et al. 2023; ``editkit.methods._locate.objectives``): the object is the
request's ``optimised_target``; ``erase`` minimises ``max(p̄ − floor, 0)`` with
p̄ = exp(−NLL) instead of the NLL; ``force`` trains on ``samples`` subject-noised copies of
the prompt (causal tracing's noise); ``reverse_tracing`` trains towards o_noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editkit.editor import Editor
from editkit.errors import EditFailedError
from editkit.methods._locate.objectives import replicas, resolve_request, subject_noise, target_term
from editkit.methods.ft.hparams import FTHyperParams, FTLHyperParams
from editkit.patch import Dense, Patch
from editkit.requests import OBJECTIVES, EditRequest, as_request_list
from editkit.tokens import target_nll


class FT(Editor):
    """Fine-tune the MLP output projection of one layer on the new targets."""

    name = "ft"
    hparams_class = FTHyperParams
    objectives = frozenset(OBJECTIVES)

    def edited_parameters(self) -> list[str]:
        return [self.adapter.weight_name(self.hparams.slot, self.hparams.layer)]

    def compute_update(self, requests: EditRequest | Sequence[EditRequest]) -> Patch:
        items = [resolve_request(self.model, self.tokenizer, self.adapter, r)
                 for r in as_request_list(requests)]
        hp = self.hparams
        (name,) = self.edited_parameters()
        weight = dict(self.model.named_parameters())[name]
        original = weight.detach().clone()
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        # one row per request, `samples` noised rows for `force` (mean over them = its NLL)
        rows = [(i, r) for i, r in enumerate(items) for _ in range(replicas(r))]
        prompts = [r.text for _, r in rows]
        targets = [r.optimised_target for _, r in rows]
        owner = torch.tensor([i for i, _ in rows])
        counts = torch.tensor([replicas(r) for r in items], dtype=torch.float32)
        objectives = [r.objective for r in items]
        noised = subject_noise(self.model, self.tokenizer, self.adapter, items,
                               lambda r: [r.prompt])
        noised.__enter__()
        try:
            for p in self.model.parameters():
                p.requires_grad_(p is weight)
            opt = torch.optim.Adam([weight], lr=hp.lr, weight_decay=hp.weight_decay)
            eps = hp.norm_constraint
            for step in range(hp.num_steps):
                opt.zero_grad(set_to_none=True)
                nll = target_nll(self.model, self.tokenizer, prompts, targets)
                if len(rows) != len(items) or any(o.name == "erase" for o in objectives):
                    per_request = torch.zeros(len(items), dtype=nll.dtype, device=nll.device)
                    per_request = per_request.index_add(0, owner.to(nll.device), nll)
                    nll = per_request / counts.to(nll.device, nll.dtype)
                    nll = target_term(nll, objectives)
                loss = nll.mean()
                if not torch.isfinite(loss):
                    self._non_finite(weight.dtype, f"the loss at step {step}")
                if loss.item() < hp.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                if eps is not None:  # FT+L: project back into the ε-box around W₀
                    with torch.no_grad():
                        weight.copy_(original + (weight - original).clamp(-eps, eps))
            with torch.no_grad():
                delta = (weight.detach().float() - original.float())
                if eps is not None:
                    delta = delta.clamp(-eps, eps)
            if not bool(torch.isfinite(delta).all()):
                self._non_finite(weight.dtype, "the weight update")
        finally:
            noised.__exit__(None, None, None)
            with torch.no_grad():
                weight.copy_(original)
            for n, p in self.model.named_parameters():
                p.requires_grad_(flags[n])
            weight.grad = None
        return self._new_patch({name: Dense(delta)}, items)

    def _non_finite(self, dtype: torch.dtype, what: str) -> None:
        """Raise for NaN/inf; in half precision the dtype, not the step size, is the cause."""
        if dtype == torch.float16:
            # Adam's ε (1e-8) is 0 in float16 and squared gradients overflow past 65504, so
            # fine-tuning float16 weights in place yields inf/NaN at any learning rate.
            raise EditFailedError(
                f"{self.name} produced NaN/inf in {what} because the model is in float16, whose "
                "range is too small for the Adam update; load the model in float32 or bfloat16 "
                "(e.g. from_pretrained(..., dtype=torch.float32)). The model was left unchanged")
        raise EditFailedError(
            f"{self.name} produced NaN/inf in {what} (model dtype {dtype}); lower the learning "
            f"rate (lr={self.hparams.lr}) or num_steps. The model was left unchanged")


class FTL(FT):
    """FT+L: fine-tuning with every weight change kept within ±ε (``norm_constraint``)."""

    name = "ft_l"
    hparams_class = FTLHyperParams

