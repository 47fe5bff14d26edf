"""MEMIT: insert many memories at once, spread over several MLP layers (Meng et al. 2023).

For a batch of requests i with subjects sᵢ:

1. Target residuals (paper §4.3, eq. 16): zᵢ = hᴸᵢ + δᵢ at the output of the last edit layer
   L, with δᵢ optimised exactly like ROME's v* (``compute_values`` with ``slot="block"``).
   The δᵢ are independent, so up to ``z_batch_size`` requests are optimised together (one
   batched forward per step, each request with its own loss, clamp and early stop; equal to
   one after another, ``tests/test_values.py``); ``z_batch_size=1`` runs them one by one.
2. For each edit layer l ∈ R, low to high (§4.3, Alg. 1):
   - kᵢˡ: the MLP key at layer l and the subject's last token, averaged over context
     prefixes (computed on the model already updated at the layers below l);
   - rᵢ = (zᵢ − hᴸᵢ) / (number of layers left, l included): the residual still missing at
     L, spread evenly over the remaining layers;
   - Δˡ = R Kᵀ (λ C + K Kᵀ)⁻¹ (eq. 14), solved in float64 with ``torch.linalg.solve``, and
     in effect before the next layer's keys are computed.

``compute_update`` is pure: "in effect" means a forward hook adds Δˡ k to the output of
layer l's ``mlp_out`` while the later layers' keys and residuals are read, so the weights
are never written (an interrupted computation leaves nothing to restore). The hook computes
(W + Δ) k as W k + Δ k, equal to the written-weights form up to float round-off.

Memory grows with the number of edits n only through K (d_in × n) and R (d_out × n): each
Δˡ is kept as the rank-n product R (A⁻¹K)ᵀ unless the dense matrix is smaller, the residuals
are read a few hundred prompts at a time, and no n × n matrix is ever formed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from editkit.errors import InvalidHyperParamsError, InvalidRequestError, StatsError
from editkit.methods._locate.editor import SINGULAR_FIX, LocateEditor
from editkit.methods._locate.keys import fact_token_index, keys_at
from editkit.methods._locate.linalg import float64_on, solve_device
from editkit.methods._locate.objectives import replicas, resolve_request, subject_noise
from editkit.methods._locate.templates import apply_template
from editkit.methods._locate.values import ValueShortcuts, compute_values
from editkit.methods.memit.hparams import MEMITHyperParams
from editkit.nethooks import Trace
from editkit.patch import Dense, LowRank, Patch
from editkit.requests import OBJECTIVES, EditRequest, as_request_list
from editkit.tokens import encode, fill, pad_id, right_pad

logger = logging.getLogger(__name__)


def check_no_conflicts(requests: Sequence[EditRequest]) -> None:
    """Refuse a batch in which one (subject, prompt) pair is asked for two different targets."""
    seen: dict[tuple[str, str], str] = {}
    for r in requests:
        # Spacing does not change the fact asked for ("Paris " and " Paris" are one target,
        # "{}  plays" and "{} plays" one prompt); prompts are user text, so they are filled by
        # replacement, never str.format (a literal "{x}" in a prompt must not be a field).
        key = (_normal(r.subject), _normal(r.prompt))
        if key in seen and seen[key] != _normal(r.target_new):
            raise InvalidRequestError(
                f"conflicting requests in one batch: {r.text!r} → {seen[key]!r} and → "
                f"{r.target_new!r}; keep one target per subject and relation (or edit them in "
                "separate batches)"
            )
        seen[key] = _normal(r.target_new)


#: Bare prompts per forward when reading the residuals hᴸ of a batch of requests.
RESIDUAL_BATCH = 256


def return_freed_heap() -> None:
    """Give the C heap's freed pages back to the system (glibc only; a no-op elsewhere).

    Each z batch allocates and frees tensors of many sizes; glibc keeps the freed pages, and
    over 10,000 fact-world edits the process grew by ~0.25 MB per edit of memory it no
    longer used (5.7 GB peak). ``malloc_trim`` costs milliseconds per batch of seconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without it)
        return None


def _normal(text: str) -> str:
    return " ".join(text.split())


def solve_layer_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor | None,
                       lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (R, A⁻¹K) of Δ = R Kᵀ (λC + K Kᵀ)⁻¹ (eq. 14), in float64.

    ``keys``: K as (d_in, n); ``resid``: R as (d_out, n); ``cov``: C (d_in, d_in) or None
    (then C = I). Δ = R @ (A⁻¹K)ᵀ because A = λC + KKᵀ is symmetric.
    """
    device = solve_device(keys.device)  # the layer's device (no host round trip on a GPU)
    k, r = float64_on(keys, device), float64_on(resid, device)
    c = (torch.eye(k.shape[0], dtype=torch.float64, device=device) if cov is None
         else float64_on(cov, device))
    a = lam * c + k @ k.T
    solved, info = torch.linalg.solve_ex(a, k)
    if int(info) != 0 or not bool(torch.isfinite(solved).all()):
        raise StatsError(
            f"λC + KKᵀ (λ = {lam}) is singular or ill-conditioned, so the update cannot be "
            f"solved; raise mom2_update_weight, or {SINGULAR_FIX}")
    return r, solved


@contextmanager
def added_outputs(modules: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """While active, each module's output y becomes ``y + (x @ right) @ leftᵀ`` for its input
    x: the module behaves as if ``left @ rightᵀ`` (values × keys) were added to its weight.

    With n edits the factors cost n·(d_in + d_out) per token; once that exceeds d_in·d_out the
    product is formed once instead, so reading the next layer's keys for n requests stays
    linear in n (the factors would make it n²: 714 s of 2,706 at 10,000 fact-world edits)."""
    def hook(left: torch.Tensor, right: torch.Tensor):
        (d_out, n), d_in = left.shape, right.shape[0]
        if n * (d_in + d_out) > d_in * d_out:
            dense_t = (left @ right.T).T.contiguous()  # (d_in, d_out)

            def add_dense(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor
                          ) -> torch.Tensor:
                x = args[0]
                return out + (x.float() @ dense_t.to(x.device)).to(out.dtype)

            return add_dense

        def add(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            extra = (x.float() @ right.to(x.device)) @ left.to(x.device).T
            return out + extra.to(out.dtype)

        return add

    handles = [m.register_forward_hook(hook(left, right)) for m, (left, right) in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class MEMIT(LocateEditor):
    """Mass-Editing Memory in a Transformer: one patch for a whole batch of requests.

    Extra keyword arguments (see ``LocateEditor``): ``context_templates``, ``covariances``
    (dict layer → C), ``stats_texts``, ``cache_dir``; patches record them under
    ``metadata["settings"]``. ``z_batch_size``: requests whose z is optimised together
    (memory grows with it: each brings ~20 prompt rows; 1 = one after another);
    ``value_shortcuts``: the z loop's speed-ups (:class:`ValueShortcuts`).
    """

    #: Default number of requests whose z are optimised in one batch.
    z_batch_size: int = 16

    name = "memit"
    hparams_class = MEMITHyperParams
    sequential = False
    #: Hase et al. (2023)'s objectives: z optimises each request's objective; for ``force``
    #: the keys (and the residual hᴸ) are read on the subject-noised prompts.
    objectives = frozenset(OBJECTIVES)

    def __init__(self, model: nn.Module, tokenizer=None, hparams: MEMITHyperParams | None = None,
                 adapter=None, *, context_templates: Sequence[str] | None = None,
                 covariances: dict[int, torch.Tensor] | None = None, stats_texts: Any = None,
                 cache_dir: str | None = None, z_batch_size: int | None = None) -> None:
        super().__init__(model, tokenizer, hparams, adapter, context_templates=context_templates,
                         covariances=covariances, stats_texts=stats_texts, cache_dir=cache_dir)
        if z_batch_size is not None:
            if not isinstance(z_batch_size, int) or isinstance(z_batch_size, bool) \
                    or z_batch_size < 1:
                raise InvalidHyperParamsError(
                    f"z_batch_size={z_batch_size!r} must be a positive integer (1 optimises "
                    "the requests' z one after another)")
            self.z_batch_size = z_batch_size
        self.value_shortcuts = ValueShortcuts()
        self.last_timings: dict[str, float] = {}
        self.last_targets: torch.Tensor | None = None  # z of the last batch, (n, d)

    def edited_parameters(self) -> list[str]:
        return [self.adapter.weight_name("mlp_out", layer) for layer in self.hparams.layers]

    def validate_requests(self, requests: list[EditRequest]) -> None:
        check_no_conflicts(requests)

    def _prepare(self) -> None:
        self._prepare_templates()
        self._prepare_statistics(self.hparams.layers)

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
        sizes = [1] + [count for _, count in self.hparams.value.context_template_length_params]
        return sizes if sum(sizes) == len(self.context_templates) else [len(self.context_templates)]

    def _keys(self, layer: int, requests: Sequence[EditRequest]) -> torch.Tensor:
        """K at ``layer``: each request's key averaged over template groups; (d_in, n)."""
        groups = self._template_groups()
        cols = []
        for r in requests:
            reps = replicas(r)  # `force`: every noise draw of each prompt, then their mean
            prompts = [apply_template(t, r.prompt) for t in self.context_templates
                       for _ in range(reps)]
            keys = keys_at(self.model, self.tokenizer, self.adapter, layer, prompts,
                           r.subject, self.hparams.value.fact_token)
            if reps > 1:
                keys = keys.view(len(self.context_templates), reps, -1).mean(1)
            cols.append(torch.stack([g.mean(0) for g in keys.split(groups)]).mean(0))
        return torch.stack(cols, dim=1)

    def _residuals_at_last_layer(self, requests: Sequence[EditRequest]) -> torch.Tensor:
        """hᴸ at the subject's last token of each bare prompt; (n, d).

        ``RESIDUAL_BATCH`` prompts per forward: one forward of all n prompts held n × tokens ×
        d_ff activations at once (≈ 1.5 GB at 10,000 fact-world edits)."""
        name = self.adapter.module_name("block", self.hparams.layers[-1])
        device = next(self.model.parameters()).device
        rows = []
        for i in range(0, len(requests), RESIDUAL_BATCH):
            part = requests[i:i + RESIDUAL_BATCH]
            batch = right_pad([encode(self.tokenizer, fill(r.prompt, r.subject)) for r in part],
                              pad_id(self.tokenizer), device)
            idx = torch.tensor([fact_token_index(self.tokenizer, r.prompt, r.subject,
                                                 self.hparams.value.fact_token) for r in part])
            with torch.no_grad(), Trace(self.model, [name], retain_output=True, stop=True) as tr:
                self.model(**batch.model_inputs(), use_cache=False)
            rows.append(tr.outputs[name][torch.arange(len(part)), idx].float())
        return torch.cat(rows)

    def targets(self, requests: Sequence[EditRequest]) -> list[torch.Tensor]:
        """zᵢ of each request (eq. 16), ``z_batch_size`` requests per optimisation."""
        hp, size = self.hparams, max(1, int(self.z_batch_size))
        out: list[torch.Tensor] = []
        for i in range(0, len(requests), size):
            out += [res.v_star for res in compute_values(
                self.model, self.tokenizer, self.adapter, hp.value, requests[i:i + size],
                self.context_templates, layer=hp.layers[-1], slot="block",
                shortcuts=self.value_shortcuts)]
            return_freed_heap()
        return out

    def compute_update(self, requests: EditRequest | Sequence[EditRequest]) -> Patch:
        items = as_request_list(requests)
        check_no_conflicts(items)
        self.prepare()
        items = [resolve_request(self.model, self.tokenizer, self.adapter, r) for r in items]
        hp = self.hparams
        t0 = time.perf_counter()
        z = torch.stack(self.targets(items))
        t_z = time.perf_counter() - t0
        self.last_targets = z.detach()
        names = self.edited_parameters()
        deltas: dict[str, LowRank | Dense] = {}
        applied: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(hp.layers):
            # Keys and residuals are read with the lower layers' updates in effect (Alg. 1).
            with added_outputs(applied), subject_noise(  # no-op unless a request is `force`
                    self.model, self.tokenizer, self.adapter, items,
                    lambda r: [apply_template(t, r.prompt) for t in self.context_templates]):
                keys = self._keys(layer, items)
                resid = (z - self._residuals_at_last_layer(items)).T / (len(hp.layers) - i)
            left, right = self.layer_update(layer, keys, resid)
            d_out, d_in = left.shape[0], right.shape[0]
            if len(items) * (d_out + d_in) < d_out * d_in:
                deltas[names[i]] = self.adapter.lowrank_delta(left.float(), right.float())
            else:
                deltas[names[i]] = self.adapter.dense_delta((left @ right.T).float())
            applied[self.adapter.module(self.model, "mlp_out", layer)] = (left.float(),
                                                                         right.float())
        self.last_timings = {"z": t_z, "layers": time.perf_counter() - t0 - t_z}
        return self._new_patch(deltas, items, memit={"timings": self.last_timings},
                               settings=self.settings_metadata())
