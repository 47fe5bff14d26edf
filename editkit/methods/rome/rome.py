"""Step 3 of ROME and the editor: insert (k, v*) with a rank-one update (paper §3.1, eq. 2).

    minimise ‖Ŵ K − V‖  subject to  Ŵ k = v*   ⇒   Ŵ = W + Λ (C⁻¹ k)ᵀ,
    Λ = (v* − W k) / ((C⁻¹ k)ᵀ k),   C = K Kᵀ (the keys' second moment, ``editkit.stats``).

With ``u = C⁻¹ k*`` the update is ``Δ = (v* − W k) uᵀ / (uᵀ k)``: rank one, ``Ŵ k = v*``
exactly, and every key with ``kᵀ C⁻¹ k* = 0`` is mapped as before. The reference inserts the
bare prompt's key ``k`` while ``u`` uses the template average ``k*``; ``key_consistent=True``
(r-ROME, Gupta et al. 2024) inserts ``k*`` in both places.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editkit.errors import EditFailedError, InvalidRequestError, StatsError
from editkit.methods._locate.editor import SINGULAR_FIX, LocateEditor
from editkit.methods._locate.keys import KeyResult, compute_key
from editkit.methods._locate.linalg import float64_on, solve_device
from editkit.methods._locate.objectives import replicas, resolve_request, subject_noise
from editkit.methods._locate.templates import apply_template
from editkit.methods._locate.values import ValueResult, ValueShortcuts, compute_value
from editkit.methods.rome.hparams import ROMEHyperParams
from editkit.patch import Patch
from editkit.requests import OBJECTIVES, EditRequest, as_request_list

logger = logging.getLogger(__name__)


class KeySolver:
    """``u = (λC)⁻¹ k`` by an LU factorisation of ``λC`` computed once (float64, no inverse)."""

    def __init__(self, cov: torch.Tensor, weight: float = 1.0, layer: int | None = None,
                 device: torch.device | str | None = None) -> None:
        # On the edited layer's device (``device``), so that solving per edit moves nothing.
        self.device = solve_device(cov.device if device is None else device)
        c = float64_on(cov, self.device) * float(weight)
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise StatsError(f"the key covariance must be square, got shape {tuple(c.shape)}")
        self.dim = c.shape[0]
        self.where = "" if layer is None else f" of layer {layer}"
        if not bool(torch.isfinite(c).all()):
            raise StatsError(f"the key covariance C{self.where} holds NaN or inf; "
                             f"{SINGULAR_FIX}")
        lu, pivots, info = torch.linalg.lu_factor_ex(c)
        if int(info) != 0:
            raise StatsError(
                f"the key covariance C{self.where} is singular (pivot {int(info)} of {self.dim} "
                f"is zero), so C⁻¹k cannot be solved; {SINGULAR_FIX}")
        self.lu, self.pivots = lu, pivots

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        k64 = float64_on(k, self.device)
        u = torch.linalg.lu_solve(self.lu, self.pivots, k64[:, None])[:, 0]
        if not bool(torch.isfinite(u).all()):
            raise StatsError(f"solving C⁻¹k with the key covariance C{self.where} gave NaN or "
                             f"inf: C is too ill-conditioned; {SINGULAR_FIX}")
        return u


def left_vector(cov: torch.Tensor | KeySolver | None, k_star: torch.Tensor,
                weight: float = 1.0) -> torch.Tensor:
    """``u = (λC)⁻¹ k*`` in float64 (``torch.linalg.solve``); ``u = k*`` without C."""
    device = solve_device(k_star.device)
    if cov is None:
        return float64_on(k_star, device)
    if isinstance(cov, KeySolver):
        return cov.solve(k_star)
    return torch.linalg.solve(float64_on(cov, device) * float(weight), float64_on(k_star, device))


def rank_one_update(weight_kv: torch.Tensor, u: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(left, right)`` of ``Δ = (value − W key) uᵀ / (uᵀ key)`` (float64, on the
    key's device; see :mod:`editkit.methods._locate.linalg`).

    ``weight_kv`` is W in keys→values orientation (``v = W k``, see ``ModelAdapter.kv_view``);
    ``value`` is the target of ``W key`` (any bias of the layer already subtracted). Then
    ``(W + left rightᵀ) key = value``.
    """
    device = solve_device(key.device)
    w, k, v, u = (float64_on(t, device) for t in (weight_kv, key, value, u))
    denom = torch.dot(u, k)
    if not torch.isfinite(denom) or denom.abs() < 1e-12 * u.norm() * k.norm():
        raise EditFailedError(
            f"uᵀk = {float(denom):.3g} is (nearly) zero, so the key cannot be inserted; the key "
            "statistics may be degenerate: raise mom2_n_samples or use another mom2_dataset"
        )
    return (v - w @ k) / denom, u


@dataclass
class ROMEStep:
    """What one ROME edit computed (for inspection and tests)."""

    request: EditRequest
    keys: KeyResult
    value: ValueResult
    key_inserted: torch.Tensor
    u: torch.Tensor
    timings: dict[str, float]


class ROME(LocateEditor):
    """Rank-One Model Editing (Meng et al. 2022).

    Extra keyword arguments:
        context_templates: Prefix templates (each with one ``{}``) instead of sampling them
            from the model; ``"{}"`` (the bare prompt) is always included first.
        covariance: A precomputed ``C = E[k kᵀ]`` for ``hparams.layer`` (skips ``stats``).
        stats_texts: Text source for C instead of ``hparams.mom2_dataset`` (a list of
            strings, a path or a ``datasets.Dataset``; see ``editkit.stats``).
        cache_dir: Root of the statistics / template caches (default ``$EDITKIT_CACHE``).

    After each edit ``last_step`` holds k*, v*, u and per-phase timings. Every patch records
    the settings above under ``metadata["settings"]`` (see ``LocateEditor``).
    """

    name = "rome"
    hparams_class = ROMEHyperParams
    sequential = True
    #: Hase et al. (2023)'s objectives: v* optimises the request's objective
    #: (``editkit.methods._locate.objectives``); for ``force`` k* is read on noised prompts.
    objectives = frozenset(OBJECTIVES)

    def __init__(self, model: nn.Module, tokenizer=None, hparams: ROMEHyperParams | None = None,
                 adapter=None, *, context_templates: Sequence[str] | None = None,
                 covariance: torch.Tensor | None = None, stats_texts: Any = None,
                 cache_dir: str | None = None) -> None:
        super().__init__(model, tokenizer, hparams, adapter, context_templates=context_templates,
                         stats_texts=stats_texts, cache_dir=cache_dir)
        if covariance is not None:
            self.covariances = {self.hparams.layer: covariance}
            self._given["covariances"] = True
        self._solver: KeySolver | None = None
        self._skip_lower_layers = True  # False: the naive v* loop (benchmarks only)
        #: The v* loop's speed-ups (each switchable for debugging and benchmarks).
        self.value_shortcuts = ValueShortcuts()
        self.prepare_timings: dict[str, float] = {}
        self.last_step: ROMEStep | None = None

    def edited_parameters(self) -> list[str]:
        return [self.adapter.weight_name("mlp_out", self.hparams.layer)]

    # ---------------------------------------------------------------- prepare
    def _prepare(self) -> None:
        hp = self.hparams
        t0 = time.perf_counter()
        self._prepare_templates()
        t1 = time.perf_counter()
        if hp.mom2_adjustment:
            self._prepare_statistics([hp.layer])
            cov = self.covariances[hp.layer]
            d_in = self.adapter.kv_view(self._weight()).shape[1]
            if tuple(cov.shape) != (d_in, d_in):
                raise StatsError(
                    f"covariance has shape {tuple(cov.shape)} but layer {hp.layer}'s keys have "
                    f"{d_in} dimensions; pass the statistics of that layer"
                )
            self._solver = KeySolver(cov.to(getattr(torch, hp.mom2_dtype)), hp.mom2_update_weight,
                                     layer=hp.layer, device=self._weight().device)
        self.prepare_timings = {"templates": t1 - t0, "stats": time.perf_counter() - t1}

    def _weight(self) -> torch.Tensor:
        return dict(self.model.named_parameters())[self.edited_parameters()[0]]

    # ---------------------------------------------------------------- update
    def compute_update(self, requests: EditRequest | Sequence[EditRequest]) -> Patch:
        """The rank-one patch of one request (ROME edits one fact per update)."""
        items = as_request_list(requests)
        if len(items) != 1:
            raise InvalidRequestError(
                f"ROME computes one rank-one update per request, got {len(items)} requests in "
                "one compute_update call; use apply([...]) to edit them one after another"
            )
        (request,) = items
        self.prepare()
        hp = self.hparams
        request = resolve_request(self.model, self.tokenizer, self.adapter, request)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        # `force`: k* averages the keys of the noised prompts (every template × noise draw),
        # the keys the edited layer sees on the inputs the objective is about
        templates = [tpl for tpl in self.context_templates for _ in range(replicas(request))]
        with subject_noise(self.model, self.tokenizer, self.adapter, [request],
                           lambda r: [apply_template(tpl, r.prompt)
                                      for tpl in self.context_templates]):
            keys = compute_key(self.model, self.tokenizer, self.adapter, hp.layer, request,
                               templates, hp.value.fact_token)
        timings["k_star"] = time.perf_counter() - t
        t = time.perf_counter()
        value = compute_value(self.model, self.tokenizer, self.adapter, hp.value, request,
                              self.context_templates, layer=hp.layer,
                              skip_lower_layers=self._skip_lower_layers,
                              shortcuts=self.value_shortcuts)
        timings["v_star"] = time.perf_counter() - t
        t = time.perf_counter()
        # Eq. 2: u = C⁻¹k*, Ŵ = W + (v* − Wk)uᵀ/(uᵀk), k = k* (r-ROME) or the bare prompt's.
        key_in = keys.k_star if hp.key_consistent else keys.k_plain
        u = left_vector(self._solver, keys.k_star)
        module = self.adapter.module(self.model, "mlp_out", hp.layer)
        weight = self._weight()
        with torch.no_grad():
            zero = torch.zeros(1, u.shape[0], dtype=weight.dtype, device=weight.device)
            bias = module(zero)[0].double()  # the layer's output at k = 0
        left, right = rank_one_update(self.adapter.kv_view(weight), u, key_in,
                                      value.v_star.double().to(bias.device) - bias)
        delta = self.adapter.lowrank_delta(left.float(), right.float())
        timings["update"] = time.perf_counter() - t
        self.last_step = ROMEStep(request, keys, value, key_in.detach(), u, timings)
        logger.info("ROME %r → %r: nll %.3f → %.3f in %d steps, ‖δ‖/‖v₀‖ = %.3f",
                    request.text, request.target_new, value.nll[0], value.nll[-1], value.steps,
                    float(value.delta.norm() / value.v0.norm()))
        return self._new_patch(
            {self.edited_parameters()[0]: delta}, [request],
            rome={"layer": hp.layer, "nll_start": value.nll[0], "nll_end": value.nll[-1],
                  "steps": value.steps,
                  "delta_rel_norm": float(value.delta.norm() / value.v0.norm()),
                  "key_consistent": hp.key_consistent, "timings": timings},
            settings=self.settings_metadata(),
        )
