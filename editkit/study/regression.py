"""How much of the variance in edit success the tracing effect explains (Hase et al. 2023, §4).

The paper regresses the rewrite score y of every (fact, edited layer) pair on

* the **layer** alone (a categorical predictor: one indicator per layer),
* the **tracing effect** alone (the fact's causal-tracing effect at that layer),
* **both**,

and compares the R² values: where editing works is explained by the layer, hardly at all by
the tracing effect (R² of "both" barely above that of "layer"). Here each fit is ordinary
least squares with an intercept, solved from the normal equations with
``torch.linalg.solve`` in float64; the layer indicators use reference coding (the first
layer is the baseline), so the design has full rank. Confidence intervals: a cluster
bootstrap over facts (all layers of a resampled fact come along, since one fact's rows are
not independent), percentile 95 % intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from editkit.errors import InvalidRequestError

MODELS = ("layer", "tracing", "both")


def r_squared(design: np.ndarray, y: np.ndarray) -> float:
    """R² = 1 − SS_res / SS_tot of the least-squares fit of ``y`` on ``design`` (which holds
    the intercept column). A constant ``y`` (SS_tot = 0) gives 0."""
    x = torch.as_tensor(design, dtype=torch.float64)
    t = torch.as_tensor(y, dtype=torch.float64)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    if ss_tot <= 1e-300:
        return 0.0
    gram = x.T @ x
    # a tiny ridge keeps a design with an all-constant column (e.g. zero tracing effects)
    # solvable without moving a well-posed fit measurably
    gram = gram + 1e-10 * torch.eye(gram.shape[0], dtype=torch.float64) * gram.diagonal().mean()
    beta = torch.linalg.solve(gram, x.T @ t)
    ss_res = float(((t - x @ beta) ** 2).sum())
    return 1.0 - ss_res / ss_tot


def design_matrix(layers: np.ndarray, effects: np.ndarray, model: str,
                  levels: Sequence[int] | None = None) -> np.ndarray:
    """The design of ``model`` ("layer", "tracing" or "both"): intercept, then one indicator
    per layer level but the first, then the tracing effect."""
    if model not in MODELS:
        raise InvalidRequestError(f"regression model {model!r}; use one of {MODELS}")
    n = len(layers)
    cols = [np.ones(n)]
    if model in ("layer", "both"):
        levels = sorted(set(int(v) for v in layers)) if levels is None else list(levels)
        cols += [(layers == lv).astype(float) for lv in levels[1:]]
    if model in ("tracing", "both"):
        cols.append(np.asarray(effects, dtype=float))
    return np.stack(cols, axis=1)


def fit_r2(layers: np.ndarray, effects: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """R² of the three regressions and ``added`` = R²(both) − R²(layer), the share of the
    variance the tracing effect explains beyond the layer."""
    layers, effects, y = (np.asarray(a, dtype=float) for a in (layers, effects, y))
    levels = sorted(set(int(v) for v in layers))
    out = {m: r_squared(design_matrix(layers, effects, m, levels), y) for m in MODELS}
    out["added"] = out["both"] - out["layer"]
    return out


@dataclass
class R2Result:
    """R² of each regression with its bootstrap 95 % interval, over ``n_facts`` facts."""

    r2: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_facts: int
    n_rows: int
    n_boot: int

    def to_dict(self) -> dict:
        return {"r2": self.r2, "ci95": {k: list(v) for k, v in self.ci.items()},
                "n_facts": self.n_facts, "n_rows": self.n_rows, "n_boot": self.n_boot}


def bootstrap_r2(facts: Sequence, layers: Sequence[int], effects: Sequence[float],
                 y: Sequence[float], n_boot: int = 1000, seed: int = 0) -> R2Result:
    """:func:`fit_r2` on the rows (one per fact × layer) and percentile 95 % intervals from
    ``n_boot`` resamples of the facts with replacement (each drawn fact brings all its rows)."""
    facts = np.asarray([str(f) for f in facts])
    layers_a, eff, yy = (np.asarray(a, dtype=float) for a in (layers, effects, y))
    if not (len(facts) == len(layers_a) == len(eff) == len(yy)):
        raise InvalidRequestError("facts, layers, effects and y must have one entry per row")
    if len(yy) < 3:
        raise InvalidRequestError(f"{len(yy)} rows are too few for a regression; edit more facts")
    point = fit_r2(layers_a, eff, yy)
    ids = sorted(set(facts.tolist()))
    rows_of = {f: np.flatnonzero(facts == f) for f in ids}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        pick = rng.integers(0, len(ids), len(ids))
        idx = np.concatenate([rows_of[ids[i]] for i in pick])
        fit = fit_r2(layers_a[idx], eff[idx], yy[idx])
        for k, v in fit.items():
            draws[k].append(v)
    ci = {k: ((float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if v
              else (float("nan"), float("nan"))) for k, v in draws.items()}
    return R2Result(r2=point, ci=ci, n_facts=len(ids), n_rows=len(yy), n_boot=n_boot)
