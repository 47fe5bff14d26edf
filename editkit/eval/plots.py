"""Retention plot of a sequential evaluation (matplotlib, Agg backend, PNG/SVG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from editkit.errors import EditkitError
from editkit.eval.report import Report


def plot_retention(report: Report, path: str | Path,
                   metrics: Sequence[str] | None = None) -> Path:
    """Plot metrics over all records edited so far against the number of edits.

    ``metrics`` default: ES, PS, NS (CounterFact) or efficacy, paraphrase, specificity
    (zsRE), whichever the report has. Shaded bands are the 95% confidence intervals; dashed
    lines the unedited model's value on all records. Returns the written path.
    """
    if not report.curve:
        raise EditkitError(
            f"report of protocol {report.protocol!r} has no retention curve; run "
            "evaluate(..., protocol='sequential')"
        )
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if metrics is None:
        wanted = ("ES", "PS", "NS", "efficacy", "paraphrase", "specificity")
        metrics = [m for m in wanted if m in report.curve[-1]["post"]]
    xs = [p["n_edits"] for p in report.curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in metrics:
        scale = 100.0 if report.metric_info.get(m, {}).get("percent", True) else 1.0
        stats = [p["post"].get(m, {}) for p in report.curve]
        ys = [s.get("mean") for s in stats]
        if all(y is None for y in ys):
            continue
        ys_plot = [float("nan") if y is None else y * scale for y in ys]
        (line,) = ax.plot(xs, ys_plot, marker="o", label=m)
        lo = [s.get("lo") if s.get("lo") is not None else s.get("mean") for s in stats]
        hi = [s.get("hi") if s.get("hi") is not None else s.get("mean") for s in stats]
        if all(v is not None for v in lo + hi):
            ax.fill_between(xs, [v * scale for v in lo], [v * scale for v in hi],
                            color=line.get_color(), alpha=0.15)
        before = report.aggregate.get("pre", {}).get(m, {}).get("mean")
        if before is not None:
            ax.axhline(before * scale, color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.plot([], [], color="gray", linestyle="--", linewidth=0.8, label="unedited")
    if len(xs) > 2 and xs[-1] / max(xs[0], 1) >= 20:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("number of edits")
    ax.set_ylabel("score (%) over records edited so far")
    ax.set_title(f"{report.name} · {report.model} · sequential")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
