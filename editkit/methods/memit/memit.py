"""MEMIT: insert many memories at once, spread over several MLP layers (Meng et al. 2023).

For a batch of requests i with subjects sᵢ:

1. Target residuals (paper §4.3, eq. 16): zᵢ = hᴸᵢ + δᵢ at the output of the last edit layer
   L, with δᵢ optimised exactly like ROME's v* (``compute_value`` with ``slot="block"``).
2. For each edit layer l ∈ R, low to high (§4.3, Alg. 1):
   - kᵢˡ: the MLP key at layer l and the subject's last token, averaged over context
     prefixes (computed on the model already updated at the layers below l);
   - rᵢ = (zᵢ − hᴸᵢ) / (number of layers left, l included): the residual still missing at
     L, spread evenly over the remaining layers;
   - Δˡ = R Kᵀ (λ C + K Kᵀ)⁻¹ (eq. 14), solved in float64 with ``torch.linalg.solve``, and
     applied before the next layer's keys are computed.

Memory grows with the number of edits n only through K (d_in × n) and R (d_out × n): each
Δˡ is kept as the rank-n product R (A⁻¹K)ᵀ unless the dense matrix is smaller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.editor import Editor
from editkit.errors import InvalidRequestError, StatsError
from editkit.methods._locate.keys import keys_at
from editkit.methods._locate.templates import (
    apply_template,
    check_templates,
    generate_context_templates,
)
from editkit.methods._locate.values import compute_value
from editkit.methods.memit.hparams import MEMITHyperParams
from editkit.patch import Dense, LowRank, Patch
from editkit.requests import EditRequest, as_request_list

logger = logging.getLogger(__name__)


def check_no_conflicts(requests: Sequence[EditRequest]) -> None:
    """Refuse a batch in which one (subject, prompt) pair is asked for two different targets."""
    seen: dict[tuple[str, str], str] = {}
    for r in requests:
        key = (r.subject, r.prompt)
        if key in seen and seen[key].strip() != r.target_new.strip():
            raise InvalidRequestError(
                f"conflicting requests in one batch: {r.prompt.format(r.subject)!r} → "
                f"{seen[key]!r} and → {r.target_new!r}; keep one target per subject and "
                "relation (or edit them in separate batches)"
            )
        seen[key] = r.target_new


def solve_layer_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor | None,
                       lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (R, A⁻¹K) of Δ = R Kᵀ (λC + K Kᵀ)⁻¹ (eq. 14), in float64.

    ``keys``: K as (d_in, n); ``resid``: R as (d_out, n); ``cov``: C (d_in, d_in) or None
    (then C = I). Δ = R @ (A⁻¹K)ᵀ because A = λC + KKᵀ is symmetric.
    """
    k = keys.detach().to(dtype=torch.float64, device="cpu")
    r = resid.detach().to(dtype=torch.float64, device="cpu")
    c = (torch.eye(k.shape[0], dtype=torch.float64) if cov is None
         else cov.detach().to(dtype=torch.float64, device="cpu"))
    a = lam * c + k @ k.T
    return r, torch.linalg.solve(a, k)


class MEMIT(Editor):
    """Mass-Editing Memory in a Transformer: one patch for a whole batch of requests.

    Extra keyword arguments (as ROME): ``context_templates``, ``covariances`` (dict layer →
    C), ``stats_texts``, ``cache_dir``.
    """

    name = "memit"
    hparams_class = MEMITHyperParams
    sequential = False

    def __init__(self, model: nn.Module, tokenizer=None, hparams: MEMITHyperParams | None = None,
                 adapter=None, *, context_templates: Sequence[str] | None = None,
                 covariances: dict[int, torch.Tensor] | None = None, stats_texts: Any = None,
                 cache_dir: str | None = None) -> None:
        super().__init__(model, tokenizer, hparams, adapter)
        self.context_templates = (check_templates(context_templates)
                                  if context_templates is not None else None)
        self.covariances = dict(covariances) if covariances else None
        self._stats_texts = stats_texts
        self._cache_dir = cache_dir
        self.last_timings: dict[str, float] = {}
        self.last_targets: torch.Tensor | None = None  # z of the last batch, (n, d)

    def edited_parameters(self) -> list[str]:
        return [self.adapter.weight_name("mlp_out", layer) for layer in self.hparams.layers]

    def validate_requests(self, requests: list[EditRequest]) -> None:
        check_no_conflicts(requests)

    def _prepare(self) -> None:
        hp = self.hparams
        if self.context_templates is None:
            cache = Path(self._cache_dir) / "context_templates" if self._cache_dir else None
            self.context_templates = generate_context_templates(
                self.model, self.tokenizer, hp.context_template_length_params,
                seed=hp.context_template_seed, cache_dir=cache)
        if self.covariances is None:
            from editkit.stats import second_moment

            source = self._stats_texts if self._stats_texts is not None else hp.mom2_dataset
            self.covariances = second_moment(
                self.model, list(hp.layers), source, tokenizer=self.tokenizer,
                n_samples=hp.mom2_n_samples, max_length=hp.mom2_max_length,
                dtype=hp.mom2_dtype, adapter=self.adapter,
                cache_dir=Path(self._cache_dir) / "stats" if self._cache_dir else None)
        missing = [layer for layer in hp.layers if layer not in self.covariances]
        if missing:
            raise StatsError(f"no key statistics for layers {missing}; pass covariances for "
                             f"every layer in {list(hp.layers)}")

    # ------------------------------------------------------------------ steps
    def layer_update(self, layer: int, keys: torch.Tensor,
                     resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (left, right) of this layer's Δ = left @ rightᵀ (eq. 14)."""
        return solve_layer_update(keys, resid, self.covariances[layer],
                                  self.hparams.mom2_update_weight)

    def _template_groups(self) -> list[int]:
        """Sizes of the context-template groups: the bare prompt, then one per prefix length.

        MEMIT averages a key within each group and then over groups, so the bare prompt
        weighs as much as all prefixes of one length together. Templates passed in by the
        user that do not follow the generated layout form one group.
        """
        sizes = [1] + [count for _, count in self.hparams.context_template_length_params]
        return sizes if sum(sizes) == len(self.context_templates) else [len(self.context_templates)]

    def _keys(self, layer: int, requests: Sequence[EditRequest]) -> torch.Tensor:
        """K at ``layer``: each request's key averaged over template groups; (d_in, n)."""
        groups = self._template_groups()
        cols = []
        for r in requests:
            prompts = [apply_template(t, r.prompt) for t in self.context_templates]
            keys = keys_at(self.model, self.tokenizer, self.adapter, layer, prompts,
                           r.subject, self.hparams.fact_token)
            cols.append(torch.stack([g.mean(0) for g in keys.split(groups)]).mean(0))
        return torch.stack(cols, dim=1)

    def _residuals_at_last_layer(self, requests: Sequence[EditRequest]) -> torch.Tensor:
        """hᴸ at the subject's last token of each bare prompt; (n, d)."""
        from editkit.methods._locate.keys import fact_token_index
        from editkit.nethooks import Trace
        from editkit.tokens import encode, fill, pad_id, right_pad

        name = self.adapter.module_name("block", self.hparams.layers[-1])
        device = next(self.model.parameters()).device
        batch = right_pad([encode(self.tokenizer, fill(r.prompt, r.subject)) for r in requests],
                          pad_id(self.tokenizer), device)
        idx = torch.tensor([fact_token_index(self.tokenizer, r.prompt, r.subject,
                                             self.hparams.fact_token) for r in requests])
        with torch.no_grad(), Trace(self.model, [name], retain_output=True, stop=True) as tr:
            self.model(**batch.model_inputs(), use_cache=False)
        return tr.outputs[name][torch.arange(len(requests)), idx].float()

    def compute_update(self, requests: EditRequest | Sequence[EditRequest]) -> Patch:
        items = as_request_list(requests)
        check_no_conflicts(items)
        self.prepare()
        hp = self.hparams
        t0 = time.perf_counter()
        vhp = hp.value_hparams()
        z = torch.stack([
            compute_value(self.model, self.tokenizer, self.adapter, vhp, r,
                          self.context_templates, slot="block").v_star
            for r in items])
        t_z = time.perf_counter() - t0
        self.last_targets = z.detach()
        params = dict(self.model.named_parameters())
        names = self.edited_parameters()
        originals = {n: params[n].detach().clone() for n in names}
        deltas: dict[str, LowRank | Dense] = {}
        try:
            for i, layer in enumerate(hp.layers):
                keys = self._keys(layer, items)
                resid = (z - self._residuals_at_last_layer(items)).T / (len(hp.layers) - i)
                left, right = self.layer_update(layer, keys, resid)
                name = names[i]
                d_out, d_in = left.shape[0], right.shape[0]
                if len(items) * (d_out + d_in) < d_out * d_in:
                    delta = self.adapter.lowrank_delta(left.float(), right.float())
                else:
                    delta = self.adapter.dense_delta((left @ right.T).float())
                deltas[name] = delta
                with torch.no_grad():  # later layers' keys see this layer's update
                    p = params[name]
                    p.copy_((p.float() + delta.materialize().to(p.device)).to(p.dtype))
        finally:
            with torch.no_grad():
                for n, value in originals.items():
                    params[n].copy_(value)
        self.last_timings = {"z": t_z, "layers": time.perf_counter() - t0 - t_z}
        # The weights are the originals again here, so the patch's base fingerprint is right.
        return self._new_patch(deltas, items, memit={"timings": self.last_timings})
