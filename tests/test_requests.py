from __future__ import annotations

import pytest

from editkit import DatasetFormatError, EditRequest, InvalidRequestError
from editkit.requests import as_request_list

CF = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} plays the sport of",
        "relation_id": "P641",
        "subject": "LeBron James",
        "target_new": {"str": "football", "id": "Q2736"},
        "target_true": {"str": "basketball", "id": "Q5372"},
    },
    "paraphrase_prompts": ["He is great. LeBron James is a professional"],
    "neighborhood_prompts": ["Michael Jordan plays the sport of"],
    "attribute_prompts": ["Lionel Messi plays the sport of"],
    "generation_prompts": ["LeBron James is known for"],
}
ZSRE = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "pred": "Trinity College",
    "rephrase": "What university did Watts Humphrey take part in?",
    "alt": "University of Michigan",
    "answers": ["Illinois Institute of Technology"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
    "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
}


def test_text_fills_placeholder():
    r = EditRequest("{} plays the sport of", "LeBron James", "football", "basketball")
    assert r.text == "LeBron James plays the sport of"


def test_from_counterfact():
    r = EditRequest.from_counterfact(CF)
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "{} plays the sport of", "LeBron James", "football", "basketball")
    assert r.paraphrases == tuple(CF["paraphrase_prompts"])
    assert r.neighborhood == tuple(CF["neighborhood_prompts"])
    assert r.case_id == 7


def test_from_zsre():
    r = EditRequest.from_zsre(ZSRE)
    assert r.prompt == "What university did {} attend?"
    assert r.text == ZSRE["src"]
    assert r.target_new == "University of Michigan"
    assert r.target_true == "Illinois Institute of Technology"
    assert r.paraphrases == (ZSRE["rephrase"],)


def test_dict_round_trip():
    r = EditRequest.from_counterfact(CF)
    assert EditRequest.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"prompt": "plays the sport of"}, "plays the sport of"),
        ({"prompt": "{} and {} play"}, "{} and {} play"),
        ({"target_new": ""}, "target_new"),
        ({"target_new": "   "}, "target_new"),
        ({"subject": ""}, "subject"),
        ({"subject": 42}, "42"),
        ({"prompt": None}, "None"),
        ({"target_true": "football"}, "football"),
        ({"paraphrases": "one string"}, "one string"),
        ({"neighborhood": ["ok", 3]}, "neighborhood[1]"),
    ],
)
def test_invalid_requests(kwargs, needle):
    base = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}
    with pytest.raises(InvalidRequestError) as info:
        EditRequest(**{**base, **kwargs})
    assert needle in str(info.value)


def test_bad_records():
    with pytest.raises(DatasetFormatError, match="target_new"):
        bad = {**CF, "requested_rewrite": {**CF["requested_rewrite"]}}
        del bad["requested_rewrite"]["target_new"]
        EditRequest.from_counterfact(bad)
    with pytest.raises(DatasetFormatError, match="Nobody"):
        EditRequest.from_zsre({**ZSRE, "subject": "Nobody"})


def test_as_request_list():
    r = EditRequest("{} is", "x", "y")
    assert as_request_list(r) == [r]
    assert as_request_list((r, r)) == [r, r]
    for bad in ([], "text", {"prompt": "{}"}, [r, "x"]):
        with pytest.raises(InvalidRequestError):
            as_request_list(bad)
