"""Train MEND and KE on the fact world and compare them with FT+L and ROME on held-out subjects.

    python benchmarks/learned_quality.py --minutes 14 --threads 2 --out runs/learned
    python benchmarks/learned_quality.py --skip-training --out runs/learned   # re-score

The fact world's CounterFact-shaped records are split by subject (80 / 10 / 10 %, seed 0):
the hypernetworks train on the first part, validate (early stopping) on the second, and every
method is scored on the third, whose subjects never occur in a training prompt. Each test
record is edited alone, scored (ES / PS / NS over every paraphrase and neighbourhood prompt,
``editkit.eval.edit_quality``) and reverted.

Writes into ``--out``: one directory per method (hypernetwork, checkpoint, training log and
curves, as ``editkit train-<method>`` does) and ``results.json``. With ``--ship`` the trained
hypernetworks are copied to ``editkit/methods/<method>/data/fact_world/`` (package data, so
``MEND(model, tokenizer)`` works on the fact world without training) and ``--docs`` copies the
curves to ``docs/results/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/learned")
    parser.add_argument("--minutes", type=float, default=14.0, help="training budget per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=60, help="test records scored per method")
    parser.add_argument("--methods", nargs="+", default=["mend", "ke"])
    parser.add_argument("--baselines", nargs="+", default=["ft_l", "rome", "ft"])
    parser.add_argument("--skip-training", action="store_true",
                        help="load the hypernetworks from --out instead of training")
    parser.add_argument("--ship", action="store_true",
                        help="copy the hypernetworks into editkit/methods/<m>/data/fact_world")
    parser.add_argument("--docs", action="store_true", help="copy curves to docs/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import editkit
    from editkit.eval import counterfact_metrics, edit_quality
    from editkit.methods._learned.data import as_requests, split_by_subject, subjects_of
    from editkit.methods.ke import KE, KETrainConfig
    from editkit.methods.mend import MEND, MENDTrainConfig
    from editkit.testbed import FactWorld, load_fact_world

    model, tok = load_fact_world()
    world = FactWorld()
    train, val, test = split_by_subject(as_requests(world.records()), (0.8, 0.1, 0.1), seed=0)
    test_all, test = test, test[: args.n_test]
    out = Path(args.out)
    results: dict = {"split": {"train": len(train), "val": len(val), "test": len(test)},
                     "threads": args.threads, "methods": {}}
    classes = {"mend": (MEND, MENDTrainConfig), "ke": (KE, KETrainConfig)}
    editors = {}
    for m in args.methods:
        cls, cfg_cls = classes[m]
        run_dir = out / m
        if args.skip_training:
            editors[m] = cls.load(run_dir, model, tok)
        else:
            cfg = cfg_cls(max_steps=100_000, max_minutes=args.minutes, val_every=100,
                          val_size=60, patience=6, checkpoint_every=100, out_dir=str(run_dir))
            editors[m] = cls.train(model, tok, train, val, cfg,
                                   locality_texts=world.texts(3000),
                                   exclude_subjects=subjects_of(test),
                                   record_metrics=counterfact_metrics)
        log = json.loads((run_dir / "training_log.json").read_text())
        results["methods"][m] = {"training": log["summary"]}
        size = (run_dir / "hypernet.safetensors").stat().st_size
        results["methods"][m]["hypernet_bytes"] = size
        if args.ship:
            dest = ROOT / "editkit" / "methods" / m / "data" / "fact_world"
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / "hypernet.safetensors", dest / "hypernet.safetensors")
            meta = json.loads((run_dir / "hypernet.json").read_text())
            meta["split"] = {  # which fact-world records it was trained / validated on
                "how": "split_by_subject(FactWorld().records(), (0.8, 0.1, 0.1), seed=0)",
                **{f"{k}_case_ids": [r.case_id for r in part]
                   for k, part in (("train", train), ("val", val), ("test", test_all))},
            }
            (dest / "hypernet.json").write_text(json.dumps(meta, indent=2))
        if args.docs:
            shutil.copy2(run_dir / "training_curves.png",
                         ROOT / "docs" / "results" / f"learned_{m}_curves.png")

    rows = {"unedited": edit_quality((model, tok), test)}
    for m, ed in editors.items():
        rows[m] = edit_quality(ed, test, progress=True)
    for b in args.baselines:
        try:
            cls = editkit.get_method(b)
        except Exception:  # noqa: BLE001 (a baseline that is not installed is skipped)
            continue
        t = time.perf_counter()
        ed = cls(model, tok).prepare()
        prepare = time.perf_counter() - t
        rows[b] = {**edit_quality(ed, test, progress=True), "prepare_seconds": prepare}
    results["scores"] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"held-out subjects: {len(test)} test records; train {len(train)}, val {len(val)}")
    print("| method | ES | PS | NS | S | s/edit |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        sec = "–" if r.get("seconds_per_edit") is None else f"{r['seconds_per_edit']:.3f}"
        print(f"| {name} | {r['ES']:.3f} | {r['PS']:.3f} | {r['NS']:.3f} | {r['S']:.3f} | {sec} |")
    for m in args.methods:
        t = results["methods"][m]["training"]
        print(f"{m}: {t['steps']} steps, {t['seconds']:.0f} s wall, {t['cpu_seconds']:.0f} "
              f"CPU-s, stopped by {t['stop_reason']}, best step {t['best_step']}, hypernetwork "
              f"{results['methods'][m]['hypernet_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
