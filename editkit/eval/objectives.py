"""Scores of the editing objectives of Hase et al. (2023, "Does Localization Inform Editing?").

Every objective has one object o whose probability it moves (``EditRequest.optimised_target``:
target_new for ``inject`` and ``reverse_tracing`` (then o_noise), target_true for ``erase``,
``amplify`` and ``force``). With p = P(o | prompt) before and p' after the edit (the mean
per-token probability of ``" " + o``, exp of the mean log-probability, as CounterFact scores):

* **rewrite score** — the fraction of the possible change achieved, in the objective's
  direction (Hase et al. §3.3): raising objectives ``max(0, (p' − p) / (1 − p))``; ``erase``
  ``max(0, (p − p') / p)``. For ``force`` p and p' are read on the subject-noised prompt
  (``samples`` draws of causal tracing's noise, averaged), the input the objective is about.
* **paraphrase score** — the same on the paraphrase prompts (noised for ``force``), averaged.
* **neighbourhood score** — ``1 − |p' − p| / (|p − ½| + ½)`` on the neighbourhood prompts
  (the change of P(o) relative to the largest change possible from p), averaged.

These are the released code's definitions (``make_editing_results_df`` in
google/belief-localization); where it reads only the first paraphrase / neighbourhood prompt
we average over all of them. The CounterFact success rates (ES/PS/NS) stay the harness's.
The three scores are registered in :data:`editkit.eval.METRICS` as ``rewrite_score``,
``paraphrase_score`` and ``neighborhood_score`` (they read the record's objective and need the
unedited scores); :func:`objective_probs` / :func:`objective_scores` compute them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from editkit.eval.metrics import METRICS, Metric, MetricContext, RecordScores
from editkit.methods._locate.objectives import SubjectNoise, noise_std_of
from editkit.noise import normalise_prompt
from editkit.requests import TRUE_TARGET_OBJECTIVES, EditRequest, Objective
from editkit.tokens import score_targets

GROUPS = ("rewrite", "paraphrase", "neighborhood")


def rewrite_score(pre: float, post: float, objective: str) -> float:
    """Fraction of the possible change of P(o) achieved in the objective's direction, ≥ 0."""
    if objective == "erase":
        return max(0.0, (pre - post) / pre) if pre > 0 else 0.0
    return max(0.0, (post - pre) / (1.0 - pre)) if pre < 1 else 0.0


def neighborhood_score(pre: float, post: float) -> float:
    """``1 − |post − pre| / (|pre − ½| + ½)``: 1 unchanged, 0 moved as far as possible."""
    return 1.0 - abs(post - pre) / (abs(pre - 0.5) + 0.5)


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def objective_scores(pre: Mapping[str, Sequence[float]], post: Mapping[str, Sequence[float]],
                     objective: str) -> dict[str, float | None]:
    """``rewrite_score``, ``paraphrase_score``, ``neighborhood_score`` from per-prompt P(o)
    before (``pre``) and after (``post``) the edit, per group (a missing group: ``None``)."""
    out: dict[str, float | None] = {}
    for group, name in (("rewrite", "rewrite_score"), ("paraphrase", "paraphrase_score")):
        out[name] = _mean([rewrite_score(a, b, objective)
                           for a, b in zip(pre.get(group, []), post.get(group, []), strict=True)])
    out["neighborhood_score"] = _mean([
        neighborhood_score(a, b)
        for a, b in zip(pre.get("neighborhood", []), post.get("neighborhood", []), strict=True)])
    return out


@torch.no_grad()
def objective_probs(model: nn.Module, tokenizer, adapter, request: EditRequest, *,
                    n_neighbors: int | None = None, noise_std: float | None = None
                    ) -> dict[str, list[float]]:
    """Per group, per prompt P(o) with o the request's optimised object (for
    ``reverse_tracing`` pass the resolved request, whose target_new is o_noise). ``force``:
    the rewrite and paraphrase prompts are read with their subject noised (``samples`` draws,
    the objective's seed, mean probability); neighbourhood prompts are clean."""
    target = request.optimised_target
    groups = {"rewrite": [request.text], "paraphrase": list(request.paraphrases),
              "neighborhood": list(request.neighborhood)[:n_neighbors]}
    out: dict[str, list[float]] = {}
    ob = request.objective
    for group, prompts in groups.items():
        if not prompts:
            out[group] = []
            continue
        if ob.name == "force" and group != "neighborhood":
            nu = noise_std_of(model, tokenizer, adapter, request) if noise_std is None \
                else noise_std
            noise = SubjectNoise(model, tokenizer, adapter)
            for p in prompts:
                noise.add(normalise_prompt(p, request.subject) if "{}" not in p else p,
                          request.subject, nu, ob.samples, ob.seed)
            rows = [p.replace("{}", request.subject) for p in prompts for _ in range(ob.samples)]
            with noise.active():
                lp = score_targets(model, tokenizer, rows, [target] * len(rows))
            probs = lp.exp().view(len(prompts), ob.samples).mean(1)
        else:
            probs = score_targets(model, tokenizer, prompts, [target] * len(prompts)).exp()
        out[group] = [float(x) for x in probs]
    return out


# ------------------------------------------------------------------ registered metrics
def _objective_of(ctx: MetricContext) -> Objective:
    request = getattr(ctx.record, "request", None)
    return getattr(request, "objective", None) or Objective()


def _probs(scores: RecordScores, group: str, ob: Objective) -> list[float] | None:
    """P(o) per prompt from the harness's ``[lp(new), lp(true)]`` rows; ``force`` reads the
    ``<group>_noised`` rows (scored on noised prompts) and has none otherwise."""
    if ob.name == "force" and group != "neighborhood":
        group = f"{group}_noised"
    rows = scores.logprobs.get(group)
    if not rows:
        return None
    idx = 1 if ob.name in TRUE_TARGET_OBJECTIVES else 0
    return [float(np.exp(r[idx])) for r in rows]


def _registered(name: str, group: str):
    def fn(scores: RecordScores, ctx: MetricContext) -> float | None:
        if ctx.pre is None:
            return None
        ob = _objective_of(ctx)
        post, pre = _probs(scores, group, ob), _probs(ctx.pre, group, ob)
        if not post or not pre or len(post) != len(pre):
            return None
        return objective_scores({group: pre}, {group: post}, ob.name)[name]
    return fn


OBJECTIVE_METRICS: list[Metric] = [
    Metric("rewrite_score", "counterfact",
           "Hase et al. 2023 rewrite score: fraction of the possible change of P(o) achieved "
           "on the rewrite prompt, in the objective's direction", True,
           _registered("rewrite_score", "rewrite"), groups=("rewrite",),
           needs=frozenset({"pre"})),
    Metric("paraphrase_score", "counterfact",
           "rewrite score on the paraphrase prompts (Hase et al. 2023)", True,
           _registered("paraphrase_score", "paraphrase"), groups=("paraphrase",),
           needs=frozenset({"pre"})),
    Metric("neighborhood_score", "counterfact",
           "1 − |ΔP(o)| / (|P(o) − ½| + ½) on neighbourhood prompts (Hase et al. 2023)", True,
           _registered("neighborhood_score", "neighborhood"), groups=("neighborhood",),
           needs=frozenset({"pre"})),
]
for _m in OBJECTIVE_METRICS:
    METRICS.register(_m.name, _m, override=_m.name in METRICS)


def score_request(model: nn.Module, tokenizer, adapter, request: EditRequest,
                  pre: Mapping[str, Sequence[float]], **kw: Any) -> dict[str, float | None]:
    """The objective scores of ``request`` on ``model`` now, against ``pre`` probabilities."""
    post = objective_probs(model, tokenizer, adapter, request, **kw)
    return objective_scores(pre, post, request.objective.name)
