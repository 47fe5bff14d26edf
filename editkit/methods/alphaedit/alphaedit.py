"""AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing").

MEMIT's update trades new keys against preserved ones through λC. AlphaEdit removes the
trade-off: with K₀ the keys of knowledge to preserve (summarised by C = E[k kᵀ]) and P the
projector onto the null space of C (eigenvectors whose eigenvalue is below a threshold),
every update of the form Δ P leaves Δ P k₀ ≈ 0 for preserved keys k₀. The paper's objective

    min_Δ ‖(Δ P) K₁ − R‖² + ‖Δ P‖² + ‖(Δ P) K_p‖²            (K_p: keys edited earlier)

has the solution Δ P = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹ (paper eq. 14, α = ``l2``).
Its transpose is X = (P (K_p K_pᵀ + K₁ K₁ᵀ) + α I)⁻¹ P K₁ Rᵀ, and α X = P (K₁ Rᵀ − A X)
shows X lies in range(P), so the update satisfies Δ P = Δ exactly (up to round-off).

K_p is the model's state, not the editor's: each AlphaEdit patch stores the keys K₁ it
inserted (``metadata["alphaedit"]["edited_keys"]``) and K_p K_pᵀ is summed over the AlphaEdit
patches in the model's edit history when an update is computed. So ``compute_update`` stays
pure, a rolled-back ``apply`` leaves no trace, and reverting an edit drops its keys from the
constraint of every later edit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from editkit.errors import InvalidHyperParamsError, StatsError
from editkit.methods._locate.editor import SINGULAR_FIX
from editkit.methods._locate.hparams import accepts_flat_fields
from editkit.methods._locate.linalg import float64_on, solve_device
from editkit.methods.memit import MEMIT, MEMITHyperParams
from editkit.patch import Patch


@accepts_flat_fields
@dataclasses.dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    """MEMIT's fields plus the null-space settings.

    Attributes:
        nullspace_threshold: The null space the update is confined to is spanned by C's
            smallest eigenvectors holding at most this share of tr(C) (scale free; the
            reference thresholds eigenvalues at an absolute 1e-2 on GPT-scale statistics).
        l2: The ridge α of the projected solve, in units of C's mean eigenvalue
            (α = l2 · tr(C)/d), so it means the same for keys of any scale.
        remember_edits: Constrain each update by the keys of the AlphaEdit edits currently
            applied to the model (K_p; sequential editing, as in the paper). Reverted edits
            leave K_p with their patch.
    """

    nullspace_threshold: float = 1e-2
    l2: float = 1.0
    remember_edits: bool = True

    PRESET_METHOD: ClassVar[str] = "alphaedit"

    def validate(self, model, adapter) -> None:
        super().validate(model, adapter)
        if not 0 < self.nullspace_threshold < 1:
            raise InvalidHyperParamsError(
                f"nullspace_threshold={self.nullspace_threshold!r} must be in (0, 1): the "
                "share of tr(C) the null space may carry")
        self.check_positive(l2=self.l2)


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀ U₀ᵀ over C's least-energetic eigenvectors (float64).

    U₀ holds the eigenvectors of smallest eigenvalue whose eigenvalues sum to at most
    ``threshold · tr(C)``: the directions the preserved keys occupy least. An exactly
    rank-deficient C gives its exact null space; a full-rank C (small models, few keys per
    dimension) still gives the directions that carry only a ``threshold`` share of the keys'
    second moment, so preserved keys move by at most about √threshold of their norm.
    """
    c = cov.detach().to(dtype=torch.float64, device="cpu")
    if not bool(torch.isfinite(c).all()):
        raise StatsError(f"the key covariance C holds NaN or inf, so its null space is "
                         f"undefined; {SINGULAR_FIX}")
    eigvals, eigvecs = torch.linalg.eigh((c + c.T) / 2)  # ascending
    energy = torch.cumsum(eigvals.clamp_min(0), 0)
    null = eigvecs[:, energy <= threshold * energy[-1]]
    return null @ null.T


def solve_projected_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor,
                           previous: torch.Tensor | None, l2: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (R, Y) with Δ = R Yᵀ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹, float64.

    ``keys`` K₁ (d_in, n), ``resid`` R (d_out, n), ``projector`` P (d_in, d_in),
    ``previous`` K_p K_pᵀ (d_in, d_in) or None. Y = (P A + α I)⁻¹ P K₁, A = K_p K_pᵀ + K₁K₁ᵀ.
    """
    device = solve_device(keys.device)  # the layer's device (no host round trip on a GPU)
    k, r, p = float64_on(keys, device), float64_on(resid, device), float64_on(projector, device)
    a = k @ k.T if previous is None else float64_on(previous, device) + k @ k.T
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=device)
    solved, info = torch.linalg.solve_ex(p @ a + l2 * eye, p @ k)
    if int(info) != 0 or not bool(torch.isfinite(solved).all()):
        raise StatsError(
            f"the projected system (ridge α = {l2:.3g}) is singular, so the update cannot be "
            f"solved; raise l2, or {SINGULAR_FIX}")
    return r, solved


class AlphaEdit(MEMIT):
    """MEMIT whose per-layer updates live in the null space of the preserved keys."""

    name = "alphaedit"
    hparams_class = AlphaEditHyperParams
    #: Only error injection: MEMIT's z and keys would follow the other objectives (Hase et
    #: al. 2023) too, but how a null-space-projected update behaves under them is untested,
    #: so AlphaEdit refuses them (UnsupportedObjectiveError) instead of guessing.
    objectives = frozenset({"inject"})

    def _prepare(self) -> None:
        super()._prepare()
        hp = self.hparams
        self.projectors = {layer: null_space_projector(self.covariances[layer],
                                                       hp.nullspace_threshold)
                           for layer in hp.layers}
        # α = l2 · (mean eigenvalue of C): the ridge in units of a typical key's energy.
        self.ridges = {layer: hp.l2 * float(torch.trace(self.covariances[layer].double()))
                       / self.covariances[layer].shape[0] for layer in hp.layers}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (ids of the AlphaEdit edits summed, their K_p K_pᵀ per layer): sequential editing
        # adds only the newest edit's keys; a revert (ids no longer a prefix) recomputes.
        self._moments: tuple[tuple[int, ...], dict[int, torch.Tensor]] = ((), {})

    def edited_key_moments(self) -> dict[int, torch.Tensor]:
        """K_p K_pᵀ per layer (float64) over the AlphaEdit edits applied to the model now,
        summed in the order they were applied."""
        edits = [e for e in self.history if e.patch.metadata.get("alphaedit", {}).get(
            "edited_keys")]
        ids = tuple(e.id for e in edits)
        done, moments = self._moments
        if ids[:len(done)] != done:
            done, moments = (), {}
        moments = dict(moments)
        for edit in edits[len(done):]:
            for layer, rows in edit.patch.metadata["alphaedit"]["edited_keys"].items():
                k = torch.tensor(rows, dtype=torch.float32).to(torch.float64).T  # (d_in, n)
                moments[int(layer)] = moments.get(int(layer), 0) + k @ k.T
        self._moments = (ids, moments)
        return dict(moments)

    def compute_update(self, requests) -> Patch:
        self.prepare()
        self._previous = self.edited_key_moments() if self.hparams.remember_edits else {}
        self._batch_keys: dict[int, torch.Tensor] = {}
        patch = super().compute_update(requests)
        # The keys are stored as float32 values (what K_p sums); JSON so patches stay
        # self-describing when saved.
        patch.metadata["alphaedit"] = {"edited_keys": {
            str(layer): k.T.tolist() for layer, k in self._batch_keys.items()}}
        return patch

    def layer_update(self, layer: int, keys: torch.Tensor,
                     resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._batch_keys[layer] = keys.detach().float().cpu()
        return solve_projected_update(keys, resid, self.projectors[layer],
                                      self._previous.get(layer), self.ridges[layer])
