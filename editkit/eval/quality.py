"""CounterFact edit success of one request, and of any editor over a list of requests.

The light path to the CounterFact numbers, for code that holds ``EditRequest``\\ s rather
than evaluation records (the layer sweep, the learned editors' CLI, benchmarks, tests):
:func:`request_logprobs` scores ``" " + target_new`` and ``" " + target_true`` after every
prompt of a request in one batched call, and :func:`~editkit.eval.metrics.counterfact_metrics`
turns the log-probabilities into ES / PS / NS / EM / PM / NM; the full harness
(:func:`editkit.eval.evaluate`) reaches the same function through its metric registry.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from editkit.editor import Editor
from editkit.errors import InvalidRequestError
from editkit.eval.metrics import counterfact_metrics, harmonic_mean, select_neighborhood
from editkit.protocols import TokenizerLike
from editkit.requests import EditRequest
from editkit.tokens import score_targets

#: The CounterFact numbers :func:`edit_quality` averages over requests.
SUCCESS_METRICS = ("ES", "PS", "NS")


@torch.no_grad()
def request_logprobs(model: nn.Module, tokenizer: TokenizerLike, request: EditRequest, *,
                     n_neighbors: int | None = None) -> dict[str, list[list[float]]]:
    """Per prompt of ``request``, ``[lp(new), lp(true)]``: mean per-token log-probabilities.

    Groups ``rewrite`` (the request's text), ``paraphrase`` and ``neighborhood`` (all, or
    the first ``n_neighbors``: :func:`~editkit.eval.metrics.select_neighborhood`), the
    input of :func:`~editkit.eval.metrics.counterfact_metrics`.
    """
    if request.target_true is None:
        raise InvalidRequestError(
            f"request {request.text!r} has no target_true; CounterFact success compares "
            "P(target_new) with P(target_true), so give the request a target_true"
        )
    groups = {"rewrite": [request.text], "paraphrase": list(request.paraphrases),
              "neighborhood": select_neighborhood(request.neighborhood, n_neighbors)}
    prompts = [p for ps in groups.values() for p in ps]
    k = len(prompts)
    lp = score_targets(model, tokenizer, prompts * 2,
                       [request.target_new] * k + [request.target_true] * k).tolist()
    out: dict[str, list[list[float]]] = {}
    i = 0
    for group, ps in groups.items():
        out[group] = [[lp[j], lp[k + j]] for j in range(i, i + len(ps))]
        i += len(ps)
    return out


def edit_success(model: nn.Module, tokenizer: TokenizerLike, request: EditRequest, *,
                 n_neighbors: int | None = None) -> dict[str, float | None]:
    """ES / PS / NS / EM / PM / NM of ``request`` on ``model`` as it is now (edited or not).

    A group without prompts gives ``None`` (e.g. PS of a request without paraphrases).
    """
    return counterfact_metrics(request_logprobs(model, tokenizer, request,
                                                n_neighbors=n_neighbors))


def edit_quality(editor: Editor | tuple[nn.Module, TokenizerLike],
                 requests: Sequence[EditRequest], *, n_neighbors: int | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Mean ES / PS / NS and S over ``requests``, each edited alone and then reverted.

    ``editor`` is an :class:`Editor`, or a ``(model, tokenizer)`` pair to score the
    unedited model. Requests without ``target_true`` are skipped. Returns ``ES``, ``PS``,
    ``NS`` (means over the requests that have the group; ``None`` if none has it), ``S``
    (:func:`~editkit.eval.metrics.harmonic_mean` of the three), ``n`` (requests scored) and
    ``seconds_per_edit`` (mean wall time of ``apply``; ``None`` for the unedited model).
    """
    if isinstance(editor, tuple):
        model, tokenizer, ed = editor[0], editor[1], None
    else:
        model, tokenizer, ed = editor.model, editor.tokenizer, editor
    values: dict[str, list[float]] = {k: [] for k in SUCCESS_METRICS}
    seconds = []
    items = [r for r in requests if r.target_true is not None]
    for r in tqdm(items, disable=not progress, desc="edit+score"):
        if ed is None:
            scores = edit_success(model, tokenizer, r, n_neighbors=n_neighbors)
        else:
            start = time.perf_counter()
            with ed.applied(r):
                seconds.append(time.perf_counter() - start)
                scores = edit_success(model, tokenizer, r, n_neighbors=n_neighbors)
        for k in SUCCESS_METRICS:
            if scores[k] is not None:
                values[k].append(scores[k])
    out: dict[str, Any] = {k: (sum(v) / len(v) if v else None) for k, v in values.items()}
    present = [out[k] for k in SUCCESS_METRICS if out[k] is not None]
    out["S"] = harmonic_mean(present) if present else None
    out["n"] = len(items)
    out["seconds_per_edit"] = sum(seconds) / len(seconds) if seconds else None
    return out
