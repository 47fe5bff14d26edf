"""FT and FT+L on the offline fact world (independent edits, reverted after each)."""

from __future__ import annotations

import pytest
import torch

from editkit import EditRequest
from editkit.methods.ft import FT, FTL
from editkit.testbed import FactWorld, load_fact_world
from editkit.tokens import score_targets

pytestmark = pytest.mark.slow


def rates(editor_cls, records, model, tok):
    es = ps = ns = 0.0
    for rec in records:
        req = EditRequest.from_counterfact(rec)
        editor = editor_cls(model, tok).apply(req)
        pp, nb = list(req.paraphrases), list(req.neighborhood)[:5]
        s = score_targets(model, tok, [req.text] * 2, [req.target_new, req.target_true])
        es += float(s[0] > s[1])
        s = score_targets(model, tok, pp * 2, [req.target_new] * len(pp) + [req.target_true] * len(pp))
        ps += float((s[: len(pp)] > s[len(pp):]).float().mean())
        s = score_targets(model, tok, nb * 2, [req.target_new] * len(nb) + [req.target_true] * len(nb))
        ns += float((s[: len(nb)] < s[len(nb):]).float().mean())
        editor.revert()
    n = len(records)
    return es / n, ps / n, ns / n


def test_ft_and_ftl_on_the_fact_world():
    model, tok = load_fact_world()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    records = FactWorld().records(n=20)
    ft = rates(FT, records, model, tok)
    ftl = rates(FTL, records, model, tok)
    print(f"FT   ES/PS/NS = {ft[0]:.2f}/{ft[1]:.2f}/{ft[2]:.2f}")
    print(f"FT+L ES/PS/NS = {ftl[0]:.2f}/{ftl[1]:.2f}/{ftl[2]:.2f}")
    assert ft[0] >= 0.9
    assert ftl[0] > 0.0 and ftl[2] >= ft[2] - 0.05  # the ε-box buys locality, not efficacy
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
