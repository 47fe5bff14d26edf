"""What ``editkit train-mend`` and ``editkit train-ke`` share: options, split, train, score.

    editkit train-mend --model factworld --data factworld --out runs/mend
    editkit train-ke --model path/to/model --data counterfact.json --out runs/ke --max-minutes 15

The records are split by subject into train / validation / test (``--split``); the test
subjects never occur in training prompts. The run writes the hypernetwork
(``hypernet.safetensors`` + ``hypernet.json``), ``checkpoint/``, ``training_log.json``,
``training_curves.png``, ``split.json`` and ``test_metrics.json`` (ES/PS/NS on the held-out
test subjects) into ``--out``. Rerunning the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from editkit.cli.common import (
    MODEL_CHOICES,
    OptionError,
    add_dtype_option,
    check_device,
    check_model,
    check_number,
    check_overrides,
    check_writable,
    describe,
    is_fact_world,
    load_model,
    read_json_option,
)
from editkit.eval import counterfact_metrics, edit_quality, load_requests
from editkit.methods._learned.data import split_by_subject, subjects_of
from editkit.methods._learned.io import write_json
from editkit.registry import get_method
from editkit.testbed import FactWorld


def add_train_parser(subparsers: Any, method: str) -> argparse.ArgumentParser:
    """Register ``train-<method>`` (its caller sets ``func``); returns its parser."""
    p = subparsers.add_parser(
        f"train-{method}", help=f"train a {method.upper()} hypernetwork for a model",
        description=f"Train the {method.upper()} hypernetwork on edit records, with "
                    "validation, early stopping and resumable checkpoints; report ES/PS/NS on "
                    "held-out subjects.\n\n" + describe(__doc__.split("\n\n", 1)[1]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_CHOICES)
    p.add_argument("--data", required=True,
                   help="'factworld' or a CounterFact / zsRE .json / .jsonl file")
    p.add_argument("--out", required=True, help="output directory (hypernetwork, logs, checkpoint)")
    p.add_argument("--config", default=None,
                   help="training configuration: JSON file or inline JSON object")
    p.add_argument("--hparams", default=None,
                   help="editor hyperparameters (layers, architecture): JSON file or inline JSON")
    p.add_argument("--steps", type=int, default=None, help="maximum training steps")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget")
    p.add_argument("--batch-size", type=int, default=None, help="edits per training step")
    p.add_argument("--lr", type=float, default=None, help="hypernetwork learning rate")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps")
    p.add_argument("--split", default="0.8,0.1,0.1",
                   help="train,validation,test fractions of the records, split by subject")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of sampling")
    p.add_argument("--locality", default=None,
                   help="text file of unrelated prompts (one per line) for the locality loss; "
                        "default for the fact world: its corpus")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if a checkpoint exists")
    p.add_argument("--eval-n", type=int, default=200,
                   help="test records to score after training (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_dtype_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(learned_method=method)
    return p


def _json_arg(value: str | None, flag: str = "--config") -> dict[str, Any]:
    return read_json_option(flag, value) or {}


def run_train(args: argparse.Namespace) -> int:
    """Run ``train-<method>``: split, train, save, score the test split; print a summary."""
    method = args.learned_method
    cls = get_method(method)
    try:
        fractions = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise OptionError(f"--split {args.split!r} must be three comma-separated fractions, "
                          "e.g. 0.8,0.1,0.1") from None
    if len(fractions) != 3 or not all(0 <= f <= 1 for f in fractions) or sum(fractions) <= 0:
        raise OptionError(f"--split {args.split!r} must have three fractions in [0, 1] "
                          "(train,val,test), e.g. 0.8,0.1,0.1")
    for flag, value, minimum in (("--steps", args.steps, 1), ("--max-minutes", args.max_minutes, 0),
                                 ("--batch-size", args.batch_size, 1), ("--lr", args.lr, 0),
                                 ("--val-every", args.val_every, 1),
                                 ("--eval-n", args.eval_n, 0), ("--threads", args.threads, 1)):
        check_number(flag, value, minimum=minimum)
    config_options = _json_arg(args.config, "--config")
    hparams = _json_arg(args.hparams, "--hparams") or None
    if hparams is not None:
        check_overrides(method, hparams, "--hparams")
    if args.locality and not Path(args.locality).expanduser().is_file():
        raise OptionError(f"--locality {args.locality!r} does not exist; pass a text file of "
                          "unrelated prompts, one per line")
    data_path = Path(args.data).expanduser()
    if data_path.suffix in (".json", ".jsonl") and not data_path.is_file():
        raise OptionError(f"--data {args.data!r} does not exist; pass 'factworld' or a "
                          "CounterFact / zsRE .json or .jsonl file")
    check_model(args.model)
    check_device(args.device)
    check_writable("--out", args.out, directory=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = load_requests(args.data)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.model_dtype)
    train, val, test = split_by_subject(records, fractions, seed=args.seed)
    config = {**config_options, "out_dir": args.out,
              "resume": not args.no_resume, "seed": args.seed, "progress": not args.quiet}
    for flag, key in (("steps", "max_steps"), ("max_minutes", "max_minutes"),
                      ("batch_size", "batch_size"), ("lr", "lr"), ("val_every", "val_every")):
        if getattr(args, flag) is not None:
            config[key] = getattr(args, flag)
    locality: list[str] = []
    if args.locality:
        locality = [line.strip() for line in Path(args.locality).read_text().splitlines()
                    if line.strip()]
    elif is_fact_world(str(args.data)):
        locality = FactWorld().texts(n=3000, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "split.json", {
        "fractions": list(fractions), "seed": args.seed,
        "subjects": {name: sorted(subjects_of(part))
                     for name, part in (("train", train), ("val", val), ("test", test))},
        "case_ids": {name: [r.case_id for r in part]
                     for name, part in (("train", train), ("val", val), ("test", test))},
    })
    print(f"{method}: {len(train)} train / {len(val)} validation / {len(test)} test records "
          f"(split by subject)")
    editor = cls.train(model, tokenizer, train, val, config, hparams=hparams,
                       locality_texts=locality, exclude_subjects=subjects_of(test),
                       record_metrics=counterfact_metrics)
    summary = editor.training_summary or {}
    print(f"trained {summary.get('steps')} steps in {summary.get('seconds')} s "
          f"(stopped: {summary.get('stop_reason')}; best step {summary.get('best_step')})")
    print(f"hypernetwork: {out}  log: {out / 'training_log.json'}  curves: "
          f"{out / 'training_curves.png'}")
    if args.eval_n and test:
        scored = edit_quality(editor, test[: args.eval_n], progress=not args.quiet)
        base = edit_quality((model, tokenizer), test[: args.eval_n])
        write_json(out / "test_metrics.json", {"edited": scored, "unedited": base})
        print(f"held-out test subjects (n={scored['n']}):")
        print("  | model     | ES    | PS    | NS    | S     |")
        for name, row in (("unedited", base), (method, scored)):
            cells = " | ".join("  -  " if row[k] is None else f"{row[k]:.3f}"
                               for k in ("ES", "PS", "NS", "S"))
            print(f"  | {name:<9} | {cells} |")
    return 0
