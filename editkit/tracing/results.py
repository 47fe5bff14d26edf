"""Results of causal tracing: one prompt's trace, and the average indirect effect over facts.

:class:`TraceResult` holds the restored probabilities of one prompt and kind; the indirect
effect of a cell is its score minus P*(o). :func:`average_indirect_effect` averages them by
token group (paper Fig. 2). Both round-trip through JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from editkit.errors import InvalidRequestError
from editkit.tracing.corruption import DEFAULT_SAMPLES
from editkit.tracing.kinds import WINDOW_LABEL, window_layers

#: Token groups of the AIE (paper Fig. 2).
GROUPS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


@dataclass
class TraceResult:
    """Causal trace of one prompt for one kind.

    ``scores[i, l]`` is P(answer) averaged over the noise samples after restoring token i at
    layer l (window centred on l for MLP/attention: ``window_label`` says "centre", the
    layers are :meth:`restored_layers`); ``indirect_effects = scores − p_corrupt``. Rows of
    tokens outside ``token_range`` (when one was asked for) are NaN: not traced.

    How it was corrupted: ``noise_std`` is ν, ``noise_multiple`` ν/σ when ν came from σ
    (``None`` when ν was given), ``sigma_source`` where σ came from, ``corruption`` the kind
    of corruption; ``weak_corruption`` is true when P(answer) barely moved
    (|p_clean − p_corrupt| < :data:`~editkit.tracing.corruption.WEAK_EFFECT` · p_clean).
    ``correct_prediction``: the model's top-1 token is the answer's first token.
    """

    kind: str
    scores: np.ndarray
    p_clean: float
    p_corrupt: float
    tokens: list[str]
    subject_range: tuple[int, int]
    window: int
    prompt: str = ""
    subject: str = ""
    answer: str = ""
    answer_id: int | None = None
    samples: int = DEFAULT_SAMPLES
    noise_std: float = 0.0
    correct_prediction: bool = True
    noise_multiple: float | None = None
    sigma_source: str = ""
    corruption: str = "gaussian"
    weak_corruption: bool = False
    window_label: str = WINDOW_LABEL
    token_range: list[int] | None = None

    def restored_layers(self, layer: int) -> list[int]:
        """The layers restored in column ``layer`` (its window's centre, clipped)."""
        return list(window_layers(layer, self.window, self.n_layers))

    @property
    def indirect_effects(self) -> np.ndarray:
        return self.scores - self.p_corrupt

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "scores": self.scores.tolist(), "p_clean": self.p_clean,
            "p_corrupt": self.p_corrupt, "tokens": list(self.tokens),
            "subject_range": list(self.subject_range), "window": self.window,
            "prompt": self.prompt, "subject": self.subject, "answer": self.answer,
            "answer_id": self.answer_id, "samples": self.samples, "noise_std": self.noise_std,
            "correct_prediction": self.correct_prediction,
            "noise_multiple": self.noise_multiple, "sigma_source": self.sigma_source,
            "corruption": self.corruption, "weak_corruption": self.weak_corruption,
            "window_label": self.window_label,
            "token_range": None if self.token_range is None else list(self.token_range),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TraceResult:
        d = dict(data)
        d["scores"] = np.asarray(d["scores"], dtype=np.float64)
        d["subject_range"] = tuple(d["subject_range"])
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


@dataclass
class AIEResult:
    """Average indirect effect over facts, per token group and layer (paper Fig. 2).

    ``mean[g, l]`` and ``stderr[g, l]`` for group ``groups[g]``; ``counts[g]`` facts had that
    group. Within a fact, the middle subject tokens (and the further tokens) are averaged
    first, so every fact counts once and the standard error is std / √count.
    """

    kind: str
    window: int
    groups: list[str]
    mean: np.ndarray
    stderr: np.ndarray
    counts: list[int]
    n_facts: int
    p_clean: float
    p_corrupt: float

    @property
    def total_effect(self) -> float:
        """Average total effect P(o) − P*(o)."""
        return self.p_clean - self.p_corrupt

    def curve(self, group: str = "last subject token") -> np.ndarray:
        return self.mean[self.groups.index(group)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "window": self.window, "groups": list(self.groups),
            "mean": self.mean.tolist(), "stderr": self.stderr.tolist(),
            "counts": list(self.counts), "n_facts": self.n_facts, "p_clean": self.p_clean,
            "p_corrupt": self.p_corrupt, "total_effect": self.total_effect,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AIEResult:
        d = {k: v for k, v in data.items() if k != "total_effect"}
        d["mean"] = np.asarray(d["mean"], dtype=np.float64)
        d["stderr"] = np.asarray(d["stderr"], dtype=np.float64)
        return cls(**d)


def token_groups(n_tokens: int, subject_range: tuple[int, int]) -> dict[str, list[int]]:
    """Token indices of each AIE group for a prompt (empty lists for absent groups)."""
    b, e = subject_range
    last = n_tokens - 1
    return {
        "first subject token": [b],
        "middle subject tokens": list(range(b + 1, e - 1)),
        "last subject token": [e - 1],
        "first subsequent token": [e] if e <= last else [],
        "further tokens": list(range(e + 1, last)),
        "last token": [last],
    }


def average_indirect_effect(results: Sequence[TraceResult], *, only_correct: bool = False
                            ) -> AIEResult:
    """AIE by token group and layer over ``results`` (one kind), with standard errors."""
    results = [r for r in results if r.correct_prediction or not only_correct]
    if not results:
        raise InvalidRequestError("no trace results to average; trace at least one fact")
    kinds = {r.kind for r in results}
    layers = {r.n_layers for r in results}
    if len(kinds) != 1 or len(layers) != 1:
        raise InvalidRequestError(
            f"average_indirect_effect needs results of one kind on one model; got kinds "
            f"{sorted(kinds)} and layer counts {sorted(layers)}"
        )
    n_layers = layers.pop()
    per_group: dict[str, list[np.ndarray]] = {g: [] for g in GROUPS}
    for r in results:
        ie = r.indirect_effects
        for g, idx in token_groups(len(r.tokens), r.subject_range).items():
            if idx and np.isfinite(ie[idx]).all():  # NaN: outside the traced token_range
                per_group[g].append(ie[idx].mean(axis=0))
    mean = np.zeros((len(GROUPS), n_layers))
    stderr = np.zeros((len(GROUPS), n_layers))
    counts = []
    for gi, g in enumerate(GROUPS):
        rows = np.stack(per_group[g]) if per_group[g] else np.zeros((0, n_layers))
        counts.append(len(rows))
        if len(rows):
            mean[gi] = rows.mean(axis=0)
        if len(rows) > 1:
            stderr[gi] = rows.std(axis=0, ddof=1) / math.sqrt(len(rows))
    return AIEResult(
        kind=results[0].kind, window=results[0].window, groups=list(GROUPS), mean=mean,
        stderr=stderr, counts=counts, n_facts=len(results),
        p_clean=float(np.mean([r.p_clean for r in results])),
        p_corrupt=float(np.mean([r.p_corrupt for r in results])),
    )


def aie_by_kind(traces: Sequence[Mapping[str, TraceResult]], *, only_correct: bool = False
                ) -> dict[str, AIEResult]:
    """:func:`average_indirect_effect` for every kind present in ``traces``."""
    if not traces:
        raise InvalidRequestError("no traces to average")
    return {k: average_indirect_effect([t[k] for t in traces], only_correct=only_correct)
            for k in traces[0]}
