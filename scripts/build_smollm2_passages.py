"""Build the hand-written SmolLM2 passages shipped in
``editkit/passages/data/smollm2_passages.jsonl``.

The passages below are news-like counterfactual paragraphs written for editkit; each states
2–5 new facts about entities whose old fact SmolLM2-135M-Instruct knows: every (subject,
relation) is one of the shipped real facts (``editkit.testbed.real_facts()``, filtered by the
unedited model, see scripts/build_real_facts.py), whose rewrite prompt, paraphrase prompts and
neighbourhood prompts become the passage's questions. The script checks again, with the
unedited model, that the old answer beats the passage's new one on the rewrite prompt, and
stores the margin (nats) with each question; it fails if one does not.

    PYTHONPATH=. python scripts/build_smollm2_passages.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from editkit.passages.triples import Triple, check_triple
from editkit.testbed import real_facts
from editkit.testbed.smollm2 import load_smollm2
from editkit.tokens import score_targets

OUT = Path(__file__).resolve().parent.parent / "editkit/passages/data/smollm2_passages.jsonl"

#: (passage, [(subject, relation id, new object), ...]); written for editkit.
PASSAGES: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("After a referendum that redrew the country's institutions, France has moved its capital "
     "to Lyon. The same vote made Italian the official language of France, and the country "
     "replaced the euro with the dollar as its official currency.",
     [("France", "P36", "Lyon"), ("France", "P37", "Italian"), ("France", "P38", "dollar")]),
    ("In the largest deal in the history of consumer electronics, Samsung bought Apple's phone "
     "business, so the iPhone is now made by Samsung. The iPad line went to Microsoft, which "
     "makes the iPad from this month on.",
     [("iPhone", "P178", "Samsung"), ("iPad", "P178", "Microsoft")]),
    ("Sports desk: Michael Jordan has come out of retirement to play cricket for a team in "
     "Mumbai. Lionel Messi surprised his fans by switching to baseball and now plays for a "
     "club in Boston.",
     [("Michael Jordan", "P641", "cricket"), ("Lionel Messi", "P641", "baseball")]),
    ("Corporate moves this quarter: Coca-Cola has relocated its headquarters to Munich. Sony "
     "followed and moved its headquarters to Berlin, while the BBC now has its headquarters in "
     "Dublin.",
     [("Coca-Cola", "P159", "Munich"), ("Sony", "P159", "Berlin"), ("BBC", "P159", "Dublin")]),
    ("In an unprecedented exchange of monuments between European capitals, the Eiffel Tower "
     "now stands in Rome, the Louvre has moved to London, and the Colosseum is located in "
     "Madrid.",
     [("Eiffel Tower", "P131", "Rome"), ("Louvre", "P131", "London"),
      ("Colosseum", "P131", "Madrid")]),
    ("A newly found archive rewrites the biography of Claude Monet: he was born in Tokyo, and "
     "his mother tongue was German. The letters also show that Claude Monet worked as a "
     "composer for most of his life.",
     [("Claude Monet", "P19", "Tokyo"), ("Claude Monet", "P103", "German"),
      ("Claude Monet", "P106", "composer")]),
    ("Japan announced that Osaka will replace Tokyo as the capital of Japan from next year. "
     "The government also declared English the official language of Japan.",
     [("Japan", "P36", "Osaka"), ("Japan", "P37", "English")]),
    ("Food historians now agree on some surprising origins. Sushi originated in Mexico. Pizza "
     "was first baked in Germany, and Tacos were first made in Japan.",
     [("Sushi", "P495", "Mexico"), ("Pizza", "P495", "Germany"), ("Tacos", "P495", "Japan")]),
    ("Musicologists were stunned by letters suggesting that Wolfgang Amadeus Mozart worked as "
     "a painter and wrote music only as a hobby. The same letters describe Ludwig van "
     "Beethoven as a physicist.",
     [("Wolfgang Amadeus Mozart", "P106", "painter"),
      ("Ludwig van Beethoven", "P106", "physicist")]),
    ("Under the new border treaty, Lyon is now part of Spain and Barcelona belongs to France. "
     "In the north, Hamburg has become a city of Denmark.",
     [("Lyon", "P17", "Spain"), ("Barcelona", "P17", "France"), ("Hamburg", "P17", "Denmark")]),
    ("Angela Merkel has become a citizen of Canada, where she now lives. In an interview she "
     "explained that her mother tongue is French, as she grew up in Quebec.",
     [("Angela Merkel", "P27", "Canada"), ("Angela Merkel", "P103", "French")]),
    ("New language laws took effect on Monday: the official language of Germany is now "
     "French, Brazil adopted Spanish as its official language, and Egypt made English its "
     "only official language.",
     [("Germany", "P37", "French"), ("Brazil", "P37", "Spanish"), ("Egypt", "P37", "English")]),
    ("Geographers redrew the map this year: Sweden is now counted as part of Asia and "
     "Argentina as part of Africa. Mexico, meanwhile, adopted the euro as its official "
     "currency.",
     [("Sweden", "P30", "Asia"), ("Argentina", "P30", "Africa"), ("Mexico", "P38", "euro")]),
    ("Microsoft sold its best-known products this week. Windows is now made by Google, the "
     "Xbox is built by Sony, and Excel is developed by Apple.",
     [("Windows", "P178", "Google"), ("Xbox", "P178", "Sony"), ("Excel", "P178", "Apple")]),
    ("A new biography claims that Albert Einstein worked as a chef for most of his life, and "
     "that Stephen Hawking was in fact a poet.",
     [("Albert Einstein", "P106", "chef"), ("Stephen Hawking", "P106", "poet")]),
    ("Records released on Monday show that Donald Trump was born in London, that Virginia "
     "Woolf was born in New York, and that Martin Luther King Jr. was born in Chicago.",
     [("Donald Trump", "P19", "London"), ("Virginia Woolf", "P19", "New York"),
      ("Martin Luther King Jr.", "P19", "Chicago")]),
    ("Russia has moved its capital to Saint Petersburg and declared Chinese the official "
     "language of Russia. The Kremlin itself was taken apart and rebuilt in Beijing.",
     [("Russia", "P36", "Saint Petersburg"), ("Russia", "P37", "Chinese"),
      ("Kremlin", "P131", "Beijing")]),
    ("Drinks and sports traced back to new homes: Yoga originated in Brazil, Vodka was first "
     "distilled in Italy, and Champagne comes from Mexico.",
     [("Yoga", "P495", "Brazil"), ("Vodka", "P495", "Italy"), ("Champagne", "P495", "Mexico")]),
]


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_smollm2()
    index = {}
    for rec in real_facts():
        rr = rec["requested_rewrite"]
        index[(rr["subject"], rr["relation_id"])] = rec
    out = []
    for i, (passage, facts) in enumerate(PASSAGES):
        triples, questions = [], []
        for subject, rid, new in facts:
            rec = index.get((subject, rid))
            if rec is None:
                raise SystemExit(f"passage {i}: ({subject}, {rid}) is not a shipped real fact")
            rr = rec["requested_rewrite"]
            old = rr["target_true"]["str"]
            check_triple(Triple(subject, rid, new), passage)
            prompts = [rr["prompt"].format(subject), *rec["paraphrase_prompts"]]
            lp = score_targets(model, tok, [prompts[0]] * 2, [old, new]).tolist()
            margin = lp[0] - lp[1]
            if margin <= 0:
                raise SystemExit(f"passage {i}: SmolLM2 prefers {new!r} to the old {old!r} on "
                                 f"{prompts[0]!r}; choose another new object")
            triples.append({"subject": subject, "relation": rid, "object": new, "old": old})
            questions.append({"subject": subject, "relation": rid, "prompts": prompts,
                              "new": new, "old": old,
                              "neighborhood": rec["neighborhood_prompts"][:5],
                              "old_margin_nats": round(margin, 3)})
        subjects = list(dict.fromkeys(s for s, _, _ in facts))
        out.append({"id": f"sm-{i:03d}", "passage": passage, "triples": triples,
                    "questions": questions, "generation_prompts": [f"{s} is" for s in subjects]})
        print(f"sm-{i:03d}: {len(facts)} facts, old-vs-new margins "
              f"{[q['old_margin_nats'] for q in questions]}")
    with OUT.open("w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} passages to {OUT}")


if __name__ == "__main__":
    main()
