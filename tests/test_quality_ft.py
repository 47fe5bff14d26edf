"""FT and FT+L on the offline fact world (independent edits, reverted after each)."""

from __future__ import annotations

import pytest
import torch

from editkit import EditRequest
from editkit.eval import edit_quality
from editkit.methods.ft import FT, FTL
from editkit.testbed import FactWorld, load_fact_world

pytestmark = pytest.mark.slow


def rates(editor_cls, records, model, tok):
    """(ES, PS, NS) over ``records``, each edited alone and reverted."""
    requests = [EditRequest.from_counterfact(r) for r in records]
    q = edit_quality(editor_cls(model, tok), requests, n_neighbors=5)
    return q["ES"], q["PS"], q["NS"]


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
