"""Plots of the localization study: edit success against tracing effect, and R² bars."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from editkit.study.regression import MODELS


def _grid(analysis: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    keys = list(analysis["cells"])
    methods = sorted({k.split("/")[0] for k in keys})
    objectives = []
    for k in keys:
        o = k.split("/")[1]
        if o not in objectives:
            objectives.append(o)
    return methods, objectives


def plot_scatter(analysis: Mapping[str, Any], path: str | Path) -> Path:
    """Rewrite score against tracing effect, one panel per method × objective, points
    coloured by edited layer, with the least-squares line of each layer (thin) and of all
    points (black, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, objectives = _grid(analysis)
    fig, axes = plt.subplots(len(methods), len(objectives), squeeze=False,
                             figsize=(3.2 * len(objectives), 2.8 * len(methods)))
    cmap = plt.get_cmap("viridis")
    for i, m in enumerate(methods):
        for j, o in enumerate(objectives):
            ax = axes[i][j]
            cell = analysis["cells"].get(f"{m}/{o}")
            ax.set_title(f"{m} · {o}", fontsize=9)
            if not cell:
                ax.axis("off")
                continue
            pts = cell["points"]
            lay, x, y = (np.asarray(pts[k], dtype=float) for k in ("layer", "effect", "score"))
            levels = sorted(set(lay.tolist()))
            for n, lv in enumerate(levels):
                sel = lay == lv
                color = cmap(n / max(len(levels) - 1, 1))
                ax.scatter(x[sel], y[sel], s=6, alpha=0.5, color=color, label=f"layer {int(lv)}")
                if sel.sum() > 1 and np.ptp(x[sel]) > 0:
                    b, a = np.polyfit(x[sel], y[sel], 1)
                    xs = np.linspace(x[sel].min(), x[sel].max(), 2)
                    ax.plot(xs, a + b * xs, color=color, lw=1)
            if len(x) > 1 and np.ptp(x) > 0:
                b, a = np.polyfit(x, y, 1)
                xs = np.linspace(x.min(), x.max(), 2)
                ax.plot(xs, a + b * xs, "k--", lw=1)
            r2 = cell.get("r2")
            if r2:
                ax.text(0.98, 0.5, f"R² layer {r2['layer']:.2f}\ntracing {r2['tracing']:.2f}"
                        f"\nboth {r2['both']:.2f}", transform=ax.transAxes, fontsize=7,
                        va="center", ha="right",
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            ax.set_xlabel("tracing effect", fontsize=8)
            ax.set_ylabel("rewrite score", fontsize=8)
            ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_r2_bars(analysis: Mapping[str, Any], path: str | Path) -> Path:
    """Per method, bars of R² (layer, tracing effect, both) for each objective with their
    bootstrap 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, objectives = _grid(analysis)
    fig, axes = plt.subplots(1, len(methods), squeeze=False,
                             figsize=(1.6 + 1.4 * len(objectives) * len(methods), 3.2))
    width = 0.8 / len(MODELS)
    for i, m in enumerate(methods):
        ax = axes[0][i]
        for k, model in enumerate(MODELS):
            vals, lo, hi = [], [], []
            for o in objectives:
                cell = analysis["cells"].get(f"{m}/{o}") or {}
                v = (cell.get("r2") or {}).get(model, np.nan)
                ci = (cell.get("ci95") or {}).get(model, [np.nan, np.nan])
                vals.append(v)
                lo.append(v - ci[0])
                hi.append(ci[1] - v)
            xs = np.arange(len(objectives)) + (k - 1) * width
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, label=model)
        ax.set_xticks(np.arange(len(objectives)))
        ax.set_xticklabels(objectives, rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(m)
        ax.set_ylabel("R² of rewrite score")
    axes[0][0].legend(fontsize=7, title="predictors", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
