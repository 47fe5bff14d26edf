"""``Report``: the result of one evaluation run, as JSON and as a paper-style markdown table.

A report holds per-record values before and after editing, aggregates with 95% confidence
intervals, the retention curve of sequential runs, the editor's hyperparameters, the
editkit version, the run configuration and timings. ``to_json`` / ``from_json`` round-trip
it (plain JSON, nothing pickled); ``to_markdown`` renders the table the papers print,
unedited model first, then the edited one; :func:`compare` puts several reports side by
side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from editkit.errors import DatasetFormatError

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOT_FILE = "retention.png"


@dataclass
class Report:
    """One evaluation run. ``aggregate = {"pre": {metric: stats}, "post": {metric: stats}}``
    where ``stats = {"mean", "ci95", "lo", "hi", "std", "n"}`` (fractions, not percent);
    ``curve`` (sequential protocol) is a list of ``{"n_edits", "post": {metric: stats}}``.
    """

    method: str
    model: str
    dataset: str
    protocol: str
    metrics: list[str]
    metric_info: dict[str, dict[str, Any]]
    records: list[dict[str, Any]]
    aggregate: dict[str, dict[str, dict[str, Any]]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    editkit_version: str = ""
    label: str = ""

    @property
    def name(self) -> str:
        """The row label of tables: ``label`` if set, else the method name."""
        return self.label or self.method

    # ------------------------------------------------------------------ access
    def mean(self, metric: str, stage: str = "post") -> float | None:
        """Aggregate mean of ``metric`` (fraction) ``"pre"`` or ``"post"`` edit."""
        return self.aggregate.get(stage, {}).get(metric, {}).get("mean")

    def summary(self) -> dict[str, dict[str, float | None]]:
        """``{metric: {"pre": mean, "post": mean}}``."""
        return {m: {"pre": self.mean(m, "pre"), "post": self.mean(m, "post")}
                for m in self.metrics}

    # -------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form of the whole report (what :meth:`to_json` writes)."""
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON (one line per record); written to ``path`` if given (a
        directory gets results.json)."""
        data = json_safe(self.to_dict())
        records = data.pop("records")
        # One line per record keeps large runs readable and small.
        body = ",\n".join("  " + json.dumps(r, separators=(",", ":"), ensure_ascii=False,
                                              allow_nan=False) for r in records)
        head = json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False)
        text = head[:-2] + ',\n "records": [\n' + body + ("\n ]\n}" if body else "]\n}")
        if path is not None:
            write_results(text, path)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`."""
        names = set(cls.__dataclass_fields__)
        missing = {"method", "model", "dataset", "protocol", "metrics", "aggregate"} - set(data)
        if missing:
            raise DatasetFormatError(f"not an editkit eval report: missing {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names},
                   **{k: [] for k in ("records",) if k not in data},
                   **{k: {} for k in ("metric_info",) if k not in data})

    @classmethod
    def from_json(cls, path: str | Path) -> Report:
        """Read a report from a results.json file or a directory containing one."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DatasetFormatError(
                f"cannot read report {str(path)!r} ({exc.strerror}); give a results.json file "
                "or the --out directory of `editkit eval`"
            ) from exc
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}: invalid JSON ({exc.msg})") from exc
        return cls.from_dict(data)

    # ---------------------------------------------------------------- markdown
    def _info(self, metric: str) -> dict[str, Any]:
        return self.metric_info.get(metric, {"percent": True, "higher_is_better": True})

    def to_markdown(self, plot: str | None = None) -> str:
        """A paper-style table (unedited row, edited row), before → after, retention, timings.

        ``plot``: file name of the retention plot to link (sequential runs).
        """
        lines = [
            f"# {self.name} · {self.dataset} · {self.protocol}",
            "",
            f"Model `{self.model}` · {len(self.records)} records"
            + (f" ({len(self.failures)} failed)" if self.failures else "")
            + f" · editkit {self.editkit_version}",
            "",
            "Values are means over records with 95% confidence intervals; success and "
            "magnitude metrics in percent. ↑: higher is better.",
            "",
        ]
        lines += _table(
            self.metrics, self.metric_info,
            [(f"{self.model} (unedited)", self.aggregate.get("pre", {})),
             (self.name, self.aggregate.get("post", {}))],
        )
        lines += ["", "## Before → after", "",
                  "| Metric | Before | After | Δ | Better |", "|---|---|---|---|---|"]
        for m in self.metrics:
            info = self._info(m)
            pre = self.aggregate.get("pre", {}).get(m, {})
            post = self.aggregate.get("post", {}).get(m, {})
            delta = None
            if pre.get("mean") is not None and post.get("mean") is not None:
                delta = post["mean"] - pre["mean"]
            lines.append(
                f"| {m} | {_cell(pre, info)} | {_cell(post, info)} | {_signed(delta, info)} | "
                f"{'higher' if info.get('higher_is_better') else 'lower'} |"
            )
        if self.curve:
            curve_metrics = [m for m in self.metrics if m in self.curve[-1].get("post", {})]
            lines += ["", "## Retention (sequential editing)", "",
                      "Metrics over all records edited so far, after that many edits.", "",
                      "| Edits | " + " | ".join(curve_metrics) + " |",
                      "|---" * (len(curve_metrics) + 1) + "|"]
            for point in self.curve:
                cells = [_cell(point["post"].get(m, {}), self._info(m)) for m in curve_metrics]
                lines.append(f"| {point['n_edits']} | " + " | ".join(cells) + " |")
            if plot:
                lines += ["", f"![retention curve]({plot})"]
        if self.failures:
            lines += ["", "## Failed edits", ""]
            lines += [f"- case {f.get('case_id')}: {f.get('error')}" for f in self.failures]
        if self.timings:
            lines += ["", "## Timings", "", "| Stage | Seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in self.timings.items()
                      if isinstance(v, (int, float))]
        lines += ["", "## Configuration", "", "```json",
                  json.dumps(json_safe({"hparams": self.hparams, **self.config}), indent=1),
                  "```", ""]
        return "\n".join(lines)


# -------------------------------------------------------------------- formatting
def write_results(text: str, path: str | Path) -> Path:
    """Write a report's JSON ``text`` to ``path`` (a directory gets ``results.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _scale(info: Mapping[str, Any]) -> float:
    return 100.0 if info.get("percent", True) else 1.0


def _cell(stats: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    mean = stats.get("mean") if stats else None
    if mean is None:
        return "—"
    s = _scale(info)
    digits = 1 if s == 100.0 else 2
    text = f"{mean * s:.{digits}f}"
    if stats.get("ci95") is not None:
        text += f" ± {stats['ci95'] * s:.{digits}f}"
    return text


def _signed(delta: float | None, info: Mapping[str, Any]) -> str:
    if delta is None:
        return "—"
    s = _scale(info)
    return f"{delta * s:+.{1 if s == 100.0 else 2}f}"


def _table(metrics: Sequence[str], metric_info: Mapping[str, Mapping[str, Any]],
           rows: Sequence[tuple[str, Mapping[str, Any]]],
           extra: Sequence[tuple[str, Sequence[str]]] = ()) -> list[str]:
    head = ["Editor", *[name for name, _ in extra]]
    head += [f"{m} {'↑' if metric_info.get(m, {}).get('higher_is_better', True) else '↓'}"
             for m in metrics]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for i, (label, agg) in enumerate(rows):
        cells = [label, *[values[i] for _, values in extra]]
        cells += [_cell(agg.get(m, {}), metric_info.get(m, {})) for m in metrics]
        out.append("| " + " | ".join(cells) + " |")
    return out


def compare(reports: Sequence[Report | str | Path], title: str | None = None) -> str:
    """One markdown table with several runs side by side.

    ``reports``: :class:`Report` objects, ``results.json`` paths or ``--out`` directories.
    Each distinct (model, dataset) gets one "unedited" row (from the first run on it),
    followed by one row per run (method, protocol, number of records).
    """
    loaded = [r if isinstance(r, Report) else Report.from_json(r) for r in reports]
    if not loaded:
        raise DatasetFormatError("compare() needs at least one report")
    from editkit.eval.metrics import list_metrics

    order = list_metrics()
    metrics: list[str] = []
    info: dict[str, Any] = {}
    for r in loaded:
        for m in r.metrics:
            if m not in metrics:
                metrics.append(m)
            info.setdefault(m, r.metric_info.get(m, {}))
    metrics.sort(key=lambda m: order.index(m) if m in order else len(order))
    rows: list[tuple[str, Mapping[str, Any]]] = []
    protocols: list[str] = []
    counts: list[str] = []
    seen: set[tuple[str, str]] = set()
    for r in loaded:
        key = (r.model, r.dataset)
        if key not in seen:
            seen.add(key)
            rows.append((f"{r.model} (unedited)", r.aggregate.get("pre", {})))
            protocols.append("—")
            counts.append(str(len(r.records)))
        rows.append((r.name, r.aggregate.get("post", {})))
        protocols.append(r.protocol + (f" (k={r.config['batch_size']})"
                                       if r.protocol == "batch" and r.config.get("batch_size")
                                       else ""))
        counts.append(str(len(r.records) - len(r.failures)))
    lines = [f"# {title}", ""] if title else []
    datasets = sorted({r.dataset for r in loaded})
    lines += [f"Dataset: {', '.join(datasets)}. Means with 95% confidence intervals; success "
              "and magnitude metrics in percent.", ""]
    lines += _table(metrics, info, rows, extra=[("Protocol", protocols), ("n", counts)])
    return "\n".join(lines) + "\n"
