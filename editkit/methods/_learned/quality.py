"""CounterFact success rates of any editor under the independent protocol (edit, score, revert).

ES: ``P(new) > P(true)`` on the rewrite prompt; PS: the same on paraphrase prompts; NS:
neighbourhood prompts keep ``P(true) > P(new)``; each P is the mean per-token log-probability
of ``" " + target`` (:func:`editkit.tokens.score_targets`). S is the harmonic mean of ES, PS, NS.
Used by the learned editors' CLI and benchmarks to compare with other methods on the same
records; the full evaluation harness is :mod:`editkit.eval`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from editkit.requests import EditRequest
from editkit.tokens import score_targets


def _rates(model, tokenizer, r: EditRequest, n_neighbors: int | None) -> dict[str, float]:
    para = list(r.paraphrases)
    neigh = list(r.neighborhood)[:n_neighbors] if n_neighbors else list(r.neighborhood)
    prompts = [r.text, *para, *neigh]
    lp = score_targets(model, tokenizer, prompts + prompts,
                       [r.target_new] * len(prompts) + [r.target_true] * len(prompts))
    new, true = lp[: len(prompts)], lp[len(prompts):]
    wins = (new > true).float()
    out = {"es": float(wins[0])}
    if para:
        out["ps"] = float(wins[1:1 + len(para)].mean())
    if neigh:
        out["ns"] = float(1 - wins[1 + len(para):].mean())
    return out


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def edit_quality(editor, requests: Sequence[EditRequest], *, n_neighbors: int | None = 10,
                 progress: bool = False) -> dict[str, Any]:
    """Mean ES / PS / NS (and S) over ``requests``, each edited alone and then reverted.

    ``editor=None`` scores the unedited model (``editor`` must then be a ``(model, tokenizer)``
    pair). Requests without ``target_true`` are skipped. Also returns the mean seconds per
    ``apply``.
    """
    if isinstance(editor, tuple):
        model, tokenizer, ed = editor[0], editor[1], None
    else:
        model, tokenizer, ed = editor.model, editor.tokenizer, editor
    sums: dict[str, list[float]] = {"es": [], "ps": [], "ns": []}
    seconds = []
    items = [r for r in requests if r.target_true is not None]
    for r in tqdm(items, disable=not progress, desc="edit+score"):
        if ed is not None:
            start = time.perf_counter()
            ed.apply(r)
            seconds.append(time.perf_counter() - start)
        try:
            rates = _rates(model, tokenizer, r, n_neighbors)
        finally:
            if ed is not None:
                ed.revert()
        for k, v in rates.items():
            sums[k].append(v)
    out: dict[str, Any] = {k: (sum(v) / len(v) if v else None) for k, v in sums.items()}
    present = [out[k] for k in ("es", "ps", "ns") if out[k] is not None]
    out["s"] = harmonic_mean(present) if present else None
    out["n"] = len(items)
    out["seconds_per_edit"] = sum(seconds) / len(seconds) if seconds else None
    return out
