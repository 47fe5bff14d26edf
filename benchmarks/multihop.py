#!/usr/bin/env python
"""Single-hop edit success vs multi-hop success (MQuAKE metrics) per editing method.

On the chain world (``--model chainworld``): 2-hop records of the eval people (chains
``birth_country`` and ``employer_city``), ``--n`` records with the edit on the first hop (the
person's own fact) and ``--n`` with the edit on the second hop (the bridge entity's fact: a
city's country, a company's headquarters). On SmolLM2 (``--model smollm2``): the shipped
two-hop records (``editkit/testbed/data/two_hop/``), first-hop and, where the record has
one, second-hop edits.

Every record is edited alone and reverted (independent protocol). Each scored record is
appended to ``<out>/<method>.jsonl`` as soon as it is done (a partial run is usable and a
rerun skips the records already there); at the end ``<out>/summary.json`` and
``<out>/summary.md`` hold means with 95% CIs per method × edited hop, overall and on the
records whose chain the unedited model knew (every hop and the multi-hop answer).

    python benchmarks/multihop.py --model chainworld --methods ft_l,rome,memit,alphaedit \\
        --n 60 --out docs/results/multihop/chainworld
    python benchmarks/multihop.py --model smollm2 --methods rome --n 40 \\
        --out docs/results/multihop/smollm2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

METRICS = ("edit_success", "hop_acc_pre", "multihop_cloze_pre", "multihop_cloze",
           "multihop_cloze_any", "multihop_gen_pre", "multihop_gen", "hop_acc_post")


def hparams_for(method: str, model: Any, chain_world: bool) -> dict[str, Any]:
    """The method's defaults for ``model``; on the chain world the covariance statistics come
    from the chain world's own corpus (the fact-world presets name the default world's)."""
    import editkit

    cls = editkit.get_method(method)
    hp = cls.hparams_class.for_model(model, editkit.get_adapter(model)).to_dict()
    if chain_world and "mom2_dataset" in hp:
        hp["mom2_dataset"] = "chain_world"
    return hp


def load(model_name: str, n: int, seed: int, chains: list[str] | None = None,
         hops: tuple[int, ...] = (1, 2)) -> tuple[Any, Any, list[Any]]:
    from editkit.eval.multihop import load_mquake

    if model_name == "chainworld":
        from editkit.testbed import ChainWorld, load_chain_world

        world = ChainWorld()
        raw = []
        for hop in hops:
            raw += world.multihop_records(n, seed,
                                          chains=chains or ["birth_country", "employer_city"],
                                          edit_hops=[hop])
        model, tok = load_chain_world()
    elif model_name == "smollm2":
        from editkit.testbed.smollm2 import load_smollm2
        from editkit.testbed.two_hop import two_hop_records

        # interleaved (chain 1 hop 1, chain 1 hop 2, ...): a run cut short stays balanced
        per_hop = [two_hop_records(n, edit_hop=hop) for hop in hops]
        raw = [r for group in zip(*per_hop, strict=True) for r in group]
        model, tok = load_smollm2()
    else:
        raise SystemExit(f"--model must be chainworld or smollm2, got {model_name!r}")
    return model, tok, load_mquake(raw)


def known(values: dict[str, Any]) -> bool:
    """The unedited model knew every hop and preferred the old multi-hop answer."""
    return values.get("hop_acc_pre") == 1.0 and values.get("multihop_cloze_pre") == 1.0


#: Record subsets of the summary: all; those whose chain the unedited model knew; on the
#: chain world, the people whose chain sentences were / were not in the training corpus.
SUBSETS = {
    "all": lambda r: True,
    "known": lambda r: known(r["values"]),
    "composition_seen": lambda r: r["labels"].get("composition_seen") is True,
    "composition_held_out": lambda r: r["labels"].get("composition_seen") is False,
}
TITLES = {
    "all": "all records",
    "known": "records whose chain the unedited model knew (every hop and the multi-hop answer)",
    "composition_seen": "chain world: people whose chain sentences were in the corpus",
    "composition_held_out": "chain world: people whose chain sentences were held out",
}


def summarize(out: Path, methods: list[str]) -> dict[str, Any]:
    from editkit.eval.metrics import mean_ci

    summary: dict[str, Any] = {}
    for method in methods:
        path = out / f"{method}.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if not r.get("error")]
        hops = sorted({str(r["labels"].get("edit_hop")) for r in rows})
        for subset, keep in SUBSETS.items():
            for hop in hops:
                sel = [r for r in rows if str(r["labels"].get("edit_hop")) == hop and keep(r)]
                if sel:
                    summary.setdefault(method, {}).setdefault(subset, {})[hop] = {
                        m: mean_ci([r["values"].get(m) for r in sel]) for m in METRICS}
    return summary


def markdown(summary: dict[str, Any]) -> str:
    def cell(v: dict[str, Any]) -> str:
        if v["mean"] is None:
            return "–"
        if v["ci95"] is None:
            return f"{v['mean']:.2f}"
        return f"{v['mean']:.2f} ± {v['ci95']:.2f}"

    lines = []
    for subset, title in TITLES.items():
        if not any(subset in by for by in summary.values()):
            continue
        lines += [f"### {title}", "",
                  "| method | edited hop | n | " + " | ".join(METRICS) + " |",
                  "|" + "---|" * (len(METRICS) + 3)]
        for method, by in summary.items():
            for hop, ms in by.get(subset, {}).items():
                n = max(v["n"] for v in ms.values())
                lines.append(f"| {method} | {hop} | {n} | "
                             + " | ".join(cell(ms[m]) for m in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="chainworld", choices=("chainworld", "smollm2"))
    p.add_argument("--methods", default="ft_l,rome,memit,alphaedit")
    p.add_argument("--n", type=int, default=60, help="records per edited hop")
    p.add_argument("--chains", default=None,
                   help="chain-world chains (default birth_country,employer_city)")
    p.add_argument("--hops", default="1,2", help="edited hops (default 1,2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-generation", action="store_true",
                   help="skip the greedy-generation metrics")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    from editkit.eval.multihop import evaluate_multihop

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    chains = args.chains.split(",") if args.chains else None
    hops = tuple(int(h) for h in args.hops.split(","))
    model, tok, records = load(args.model, args.n, args.seed, chains, hops)
    for method in methods:
        path = args.out / f"{method}.jsonl"
        done = set()
        if path.exists():
            done = {json.loads(line)["case_id"] for line in path.read_text().splitlines()
                    if line.strip()}
        todo = [r for r in records if r.case_id not in done]
        if not todo:
            continue
        hp = hparams_for(method, model, args.model == "chainworld")
        t0 = time.perf_counter()
        with path.open("a", encoding="utf-8") as fh:
            def write(row: dict[str, Any], fh=fh) -> None:
                fh.write(json.dumps(row) + "\n")
                fh.flush()

            evaluate_multihop(method, model, tok, todo, hparams=hp, progress=True,
                              skip_errors=True, generation=not args.no_generation,
                              on_record=write)
        print(f"{method}: {len(todo)} records in {time.perf_counter() - t0:.0f} s",
              flush=True)
        (args.out / f"{method}.hparams.json").write_text(json.dumps(hp, indent=1) + "\n")
    # the summary covers every method with results in --out (earlier runs included)
    order = ["ft", "ft_l", "rome", "memit", "alphaedit"]
    present = sorted((p.stem for p in args.out.glob("*.jsonl")),
                     key=lambda m: (order.index(m) if m in order else len(order), m))
    summary = summarize(args.out, present)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = markdown(summary)
    (args.out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
