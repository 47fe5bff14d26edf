"""Plots of causal traces: token × layer heatmaps, AIE curves, severed bars, layer sweeps.

Figures are built with ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot and no
global backend switch), so they work headless and never open windows. matplotlib is imported
only when a figure is made. Every ``plot_*``
function returns the figure and, given ``path``, also writes it in each of ``formats``
(default PNG and SVG; ``path``'s suffix is replaced).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from editkit.tracing.results import GROUPS, AIEResult, TraceResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from editkit.tracing.layers import SweepResult

FORMATS = ("png", "svg")

#: Colour maps of the paper's figures: hidden purple, MLP green, attention red.
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds",
         "hidden_sever_mlp": "Purples", "hidden_sever_attn": "Purples"}
LINE_COLORS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red",
               "hidden_sever_mlp": "tab:olive", "hidden_sever_attn": "tab:pink"}
TITLES = {
    "hidden": "single restored hidden state",
    "mlp": "run of {w} restored MLP outputs",
    "attn": "run of {w} restored attention outputs",
    "mlp_1": "single restored MLP output",
    "attn_1": "single restored attention output",
    "hidden_sever_mlp": "hidden state, its token's later MLPs frozen",
    "hidden_sever_attn": "hidden state, its token's later attention frozen",
}
GROUP_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:red")


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # matplotlib is optional: only plots need it
        raise ImportError("editkit.tracing.plots needs matplotlib: pip install matplotlib"
                          ) from exc
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig: Figure, path: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix in ``formats``; returns the files."""
    stem = Path(path)
    if stem.suffix.lstrip(".") in ("png", "svg", "pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        target = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(target, format=fmt, bbox_inches="tight")
        out.append(target)
    return out


def _title(kind: str, window: int) -> str:
    if window == 1 and f"{kind}_1" in TITLES:
        return TITLES[f"{kind}_1"]
    return TITLES.get(kind, kind).format(w=window)


def _xlabel(kind: str, window: int) -> str:
    if kind.startswith("hidden") or window == 1:
        return "restored layer"
    # windows are labelled by their centre l, restoring [l − ⌊w/2⌋, l + ⌈w/2⌉) clipped to the
    # network, as in the reference's heatmaps (kinds.window_layers)
    return f"centre of a window of {window} restored layers (clipped at the ends)"


def _heatmap(ax, result: TraceResult, colorbar: bool = True) -> None:
    scores = result.scores
    mesh = ax.pcolormesh(scores, cmap=CMAPS.get(result.kind, "Purples"),
                         vmin=min(result.p_corrupt, float(scores.min())),
                         vmax=max(float(scores.max()), result.p_corrupt + 1e-9))
    ax.invert_yaxis()
    b, e = result.subject_range
    labels = [f"{tok!r}*" if b <= i < e else repr(tok) for i, tok in enumerate(result.tokens)]
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=7)
    n_layers = scores.shape[1]
    step = max(1, n_layers // 8)
    ticks = list(range(0, n_layers, step))
    ax.set_xticks(np.asarray(ticks) + 0.5, [str(t) for t in ticks], fontsize=7)
    ax.set_xlabel(_xlabel(result.kind, result.window))
    ax.set_title(_title(result.kind, result.window), fontsize=9)
    if colorbar:
        cb = ax.figure.colorbar(mesh, ax=ax, shrink=0.8)
        cb.set_label(f"p({result.answer.strip() or '?'})", fontsize=8)


def plot_trace(result: TraceResult, path: str | Path | None = None,
               formats: Sequence[str] = FORMATS) -> Figure:
    """Heatmap of one trace: P(answer) after restoring (token, layer); ``*`` marks the subject."""
    fig = _figure(1.6 + 0.28 * result.n_layers, 1.0 + 0.3 * len(result.tokens))
    _heatmap(fig.add_subplot(), result)
    if path is not None:
        save_figure(fig, path, formats)
    return fig


def plot_traces(results: Mapping[str, TraceResult], path: str | Path | None = None,
                formats: Sequence[str] = FORMATS) -> Figure:
    """The traces of one prompt side by side, one panel per kind (paper Fig. 1 e–g)."""
    items = list(results.values())
    if not items:
        raise ValueError("no trace results to plot")
    first = items[0]
    fig = _figure(max(3.5, (1.4 + 0.25 * first.n_layers)) * len(items),
                  1.2 + 0.3 * len(first.tokens))
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    for ax, res in zip(axes, items, strict=True):
        _heatmap(ax, res)
    fig.suptitle(f"{first.prompt.replace('{}', first.subject)!r} → {first.answer!r}  "
                 f"(p clean {first.p_clean:.3f}, corrupted {first.p_corrupt:.3f})", fontsize=9)
    if path is not None:
        save_figure(fig, path, formats)
    return fig


def plot_aie(aies: Mapping[str, AIEResult], path: str | Path | None = None,
             formats: Sequence[str] = FORMATS, z: float = 1.96) -> Figure:
    """AIE by layer for every token group, one panel per kind, bands = ±z standard errors.

    (``z = 1.96``: 95 % intervals, as in the paper's line plots.)
    """
    items = list(aies.items())
    if not items:
        raise ValueError("no AIE results to plot")
    fig = _figure(4.2 * len(items), 3.2)
    axes = fig.subplots(1, len(items), squeeze=False, sharey=True)[0]
    for ax, (kind, aie) in zip(axes, items, strict=True):
        x = np.arange(aie.mean.shape[1])
        for gi, group in enumerate(aie.groups):
            if aie.counts[gi] == 0:
                continue
            y, se = aie.mean[gi], aie.stderr[gi]
            color = GROUP_COLORS[gi % len(GROUP_COLORS)]
            ax.fill_between(x, y - z * se, y + z * se, color=color, alpha=0.2, linewidth=0)
            ax.plot(x, y, color=color, label=group)
        ax.axhline(0.0, color="0.6", linewidth=0.6)
        ax.set_title(f"AIE of {_title(kind, aie.window)}\n({aie.n_facts} facts)", fontsize=9)
        ax.set_xlabel(_xlabel(kind, aie.window))
        _integer_ticks(ax)
    axes[0].set_ylabel("average indirect effect on p(o)")
    axes[-1].legend(fontsize=7, frameon=False)
    if path is not None:
        save_figure(fig, path, formats)
    return fig


def plot_aie_heatmaps(aies: Mapping[str, AIEResult], path: str | Path | None = None,
                      formats: Sequence[str] = FORMATS) -> Figure:
    """AIE as token-group × layer heatmaps, one per kind (paper Fig. 2 style, clipped at 0)."""
    items = list(aies.items())
    if not items:
        raise ValueError("no AIE results to plot")
    top = max(float(np.clip(a.mean, 0, None).max()) for _, a in items) or 1e-9
    fig = _figure(4.0 * len(items), 2.4)
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    for ax, (kind, aie) in zip(axes, items, strict=True):
        mesh = ax.pcolormesh(np.clip(aie.mean, 0, None), cmap=CMAPS.get(kind, "Purples"),
                             vmin=0.0, vmax=top)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(GROUPS)) + 0.5,
                      [g if c else f"({g})" for g, c in zip(aie.groups, aie.counts,
                                                            strict=True)], fontsize=7)
        n_layers = aie.mean.shape[1]
        step = max(1, n_layers // 8)
        ticks = list(range(0, n_layers, step))
        ax.set_xticks(np.asarray(ticks) + 0.5, [str(t) for t in ticks], fontsize=7)
        ax.set_title(f"AIE, {_title(kind, aie.window)}", fontsize=9)
        fig.colorbar(mesh, ax=ax, shrink=0.8)
    if path is not None:
        save_figure(fig, path, formats)
    return fig


SUBJECT_GROUPS = ("first subject token", "middle subject tokens", "last subject token")


def plot_severed(aies: Mapping[str, AIEResult], groups: Sequence[str] | str = SUBJECT_GROUPS,
                 path: str | Path | None = None, formats: Sequence[str] = FORMATS) -> Figure:
    """Bars of the AIE of a hidden state with and without its token's later MLP / attention
    (paper Fig. 7): how much of the effect flows through each module type. One panel per token
    group in ``groups`` (the paper shows the last subject token); ±1.96 standard errors."""
    kinds = [k for k in ("hidden", "hidden_sever_mlp", "hidden_sever_attn") if k in aies]
    if not kinds:
        raise ValueError("plot_severed needs AIE results of kind 'hidden' or a severed kind")
    groups = [groups] if isinstance(groups, str) else list(groups)
    first = aies[kinds[0]]
    groups = [g for g in groups if first.counts[first.groups.index(g)] > 0]
    n_layers = first.mean.shape[1]
    fig = _figure(max(4.0, 0.45 * n_layers + 1.5) * len(groups), 3.0)
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    width = 0.8 / len(kinds)
    x = np.arange(n_layers)
    labels = {"hidden": "effect of single state", "hidden_sever_mlp": "with MLP severed",
              "hidden_sever_attn": "with attention severed"}
    for ax, group in zip(axes, groups, strict=True):
        for i, kind in enumerate(kinds):
            aie = aies[kind]
            gi = aie.groups.index(group)
            ax.bar(x + (i - (len(kinds) - 1) / 2) * width, aie.mean[gi], width,
                   yerr=1.96 * aie.stderr[gi], color=LINE_COLORS[kind], label=labels[kind],
                   error_kw={"linewidth": 0.6})
        ax.set_xlabel("restored layer")
        _integer_ticks(ax)
        ax.set_title(f"{group} ({first.n_facts} facts)", fontsize=9)
    axes[0].set_ylabel("average indirect effect on p(o)")
    axes[-1].legend(fontsize=7, frameon=False)
    if path is not None:
        save_figure(fig, path, formats)
    return fig


def plot_layer_sweep(sweep: SweepResult, path: str | Path | None = None,
                     formats: Sequence[str] = FORMATS) -> Figure:
    """Edit success per layer (efficacy, paraphrase, specificity) against the traced MLP AIE."""
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    x = np.asarray(sweep.layers)
    ax.plot(x, sweep.efficacy, "o-", color="tab:blue", label="efficacy")
    ax.plot(x, sweep.paraphrase, "s--", color="tab:orange", label="paraphrase")
    ax.plot(x, sweep.specificity, "^:", color="tab:gray", label="specificity")
    ax.plot(x, sweep.score, "D-", color="black", linewidth=1, label="score (harmonic mean)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("edited layer")
    _integer_ticks(ax)
    ax.set_ylabel(f"{sweep.method} edit success")
    handles, labels = ax.get_legend_handles_labels()
    if sweep.trace_curve is not None:
        twin = ax.twinx()
        line = twin.plot(x, sweep.trace_curve, "-", color="tab:green", linewidth=2,
                         label="MLP AIE at last subject token")
        twin.set_ylabel("traced MLP AIE")
        handles += line
        labels += [line[0].get_label()]
    corr = "" if sweep.correlation is None else f", corr(AIE, efficacy) = {sweep.correlation:.2f}"
    ax.set_title(f"{sweep.method}: best layer {sweep.best_layer}"
                 + ("" if sweep.traced_layer is None else f", traced layer {sweep.traced_layer}")
                 + corr, fontsize=9)
    ax.legend(handles, labels, fontsize=7, frameon=False, loc="lower left")
    if path is not None:
        save_figure(fig, path, formats)
    return fig
