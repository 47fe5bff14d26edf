"""ROME speed: seconds per edit by phase, what each v* shortcut saves, early stopping, and
statistics throughput for one layer vs all layers in one pass.

    python benchmarks/bench_rome.py [--edits 5] [--stats-texts 400] [--threads 2]
                                    [--skip-stats] [--smollm2 N]

The v* shortcuts (:class:`editkit.methods.rome.ValueShortcuts`) are timed cumulatively,
interleaved per request (all steps forced): the straightforward loop (full forward every
step), + replaying only the blocks from the edit layer up, + running only the tokens after
each row group's cached prefix, + the KL reference taken once. The work per step (blocks,
tokens, head positions) is printed beside it, so the skipped computation is visible.

Models: the offline fact-world GPT-2 (if built) and a tiny random GPT-2 with 12 layers.
Every number printed is measured in this one run, on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import warnings

import torch
import transformers

import editkit
from editkit import EditRequest
from editkit.methods._locate.values import _build_rows, plan_groups
from editkit.methods.rome import ROME, ROMEHyperParams, ValueShortcuts, compute_value
from editkit.stats import second_moment

REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("{} plays the sport of", "LeBron James", "football", "basketball"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} was developed by", "Windows 95", "Apple", "Microsoft"),
    EditRequest("{} is a citizen of", "Angela Merkel", "Canada", "Germany"),
    EditRequest("{}'s capital city is", "Italy", "Paris", "Rome"),
]


def pydoc_tokenizer():
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(topics.values()), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>")


def random_gpt2(tok, n_layers=12):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layers, n_embd=64, n_head=4, n_positions=256,
                                     vocab_size=len(tok))
    return transformers.GPT2LMHeadModel(config).eval()


def fact_world_requests(n):
    from editkit.testbed import FactWorld

    return [EditRequest.from_counterfact(r) for r in FactWorld().records(n=n, seed=1)]


_OFF = dict(skip_lower_layers=False, reuse_prefix=False, kl_once=False, edit_block_once=False,
            ragged_rows=False)
SHORTCUTS = {
    "straightforward (full forward)": ValueShortcuts(**_OFF),
    "+ skip lower layers": ValueShortcuts(**{**_OFF, "skip_lower_layers": True}),
    "+ cached prefix (row groups)": ValueShortcuts(**{**_OFF, "skip_lower_layers": True,
                                                      "reuse_prefix": True}),
    "+ KL reference once": ValueShortcuts(**{**_OFF, "skip_lower_layers": True,
                                             "reuse_prefix": True, "kl_once": True}),
    "+ edited block once": ValueShortcuts(ragged_rows=False),
    "+ ragged rows (all on)": ValueShortcuts(),
}


def work_per_step(tok, hp, requests, templates, n_layers):
    """Row-tokens through the upper blocks and head rows per step, with and without the
    cached prefix (averaged over requests)."""
    full, suffix, ragged, head = [], [], [], []
    for req in requests:
        rows = _build_rows(tok, [req], templates, hp.value.fact_token)
        lengths = [len(s) for s in rows.seqs]
        full.append(len(lengths) * max(lengths))
        groups = plan_groups(lengths, rows.edit_idx)
        suffix.append(sum(len(g) * (max(lengths[r] for r in g) - min(rows.edit_idx[r] for r in g))
                          for g in groups))
        ragged.append(len(lengths) * max(n - e for n, e in zip(lengths, rows.edit_idx,
                                                               strict=True)))
        head.append(len(rows.read_rows))
    blocks = n_layers - hp.layer
    print(f"work per v* step: blocks {hp.layer}..{n_layers - 1} ({blocks} of {n_layers}; "
          f"{blocks - 1} with the edited block once); row-tokens "
          f"{statistics.mean(ragged):.0f} in one batch of ragged rows, "
          f"{statistics.mean(suffix):.0f} in row groups with the cached prefix vs "
          f"{statistics.mean(full):.0f} whole rows (x{statistics.mean(full) / statistics.mean(suffix):.2f}); "
          f"head at {statistics.mean(head):.0f} loss positions of {statistics.mean(full):.0f}")


def value_shortcuts(model, tok, adapter, hp, requests, templates):
    """Seconds of v* per edit with the shortcuts switched on one after another."""
    hp_all = dataclasses.replace(hp, value=dataclasses.replace(hp.value, early_stop_loss=0.0))
    work_per_step(tok, hp, requests, templates, adapter.num_layers(model))
    times: dict[str, list[float]] = {k: [] for k in SHORTCUTS}
    results: dict[str, list[torch.Tensor]] = {k: [] for k in SHORTCUTS}
    for req in requests:  # interleaved: every configuration on each request in turn
        for name, sc in SHORTCUTS.items():
            t = time.perf_counter()
            res = compute_value(model, tok, adapter, hp_all, req, templates, shortcuts=sc)
            times[name].append(time.perf_counter() - t)
            results[name].append(res.v_star)
    base = statistics.median(times[next(iter(SHORTCUTS))])
    prev = base
    print(f"v* per edit ({hp.value.num_grad_steps} steps forced), median of {len(requests)}:")
    for name in SHORTCUTS:
        med = statistics.median(times[name])
        diff = max(float((a - b).norm() / b.norm()) for a, b in
                   zip(results[name], results[next(iter(SHORTCUTS))], strict=True))
        print(f"  {name:32s} {med:8.4f}s  x{med / base:.3f} of straightforward, "
              f"x{med / prev:.3f} of the previous line; max rel. |Δv*| {diff:.1e}")
        prev = med


def early_stopping(model, tok, adapter, hp, requests, templates):
    """Steps and seconds with the early stop vs all steps, and whether v* is unchanged
    where the stop never triggers."""
    hp_all = dataclasses.replace(hp, value=dataclasses.replace(hp.value, early_stop_loss=0.0))
    steps, t_stop, t_all, same, stopped = [], [], [], 0, 0
    for req in requests:
        t = time.perf_counter()
        a = compute_value(model, tok, adapter, hp, req, templates)
        t_stop.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = compute_value(model, tok, adapter, hp_all, req, templates)
        t_all.append(time.perf_counter() - t)
        steps.append(a.steps)
        if a.steps < hp.value.num_grad_steps:
            stopped += 1
        else:
            same += bool(torch.equal(a.v_star, b.v_star))
    n = hp.value.num_grad_steps
    print(f"early stop (loss < {hp.value.early_stop_loss}): {stopped}/{len(requests)} edits "
          f"stopped; Adam updates {statistics.mean(steps):.1f} of {n} on average "
          f"({100 * (1 - statistics.mean(steps) / n):.0f}% saved), v* time "
          f"x{statistics.median(t_stop) / statistics.median(t_all):.3f} of all steps; "
          f"edits running all steps with identical v*: {same}/{len(requests) - stopped}")


def bench_model(label, model, tok, hp, requests, stats_source, stats_texts, cache,
                skip_stats=False):
    adapter = editkit.get_adapter(model)
    n_layers = adapter.num_layers(model)
    print(f"\n=== {label}: {n_layers} layers, d_model {model.config.hidden_size}, "
          f"edit layer {hp.layer}, {len(requests)} edits ===")

    # --- per-phase seconds of full ROME edits (templates generated, not cached)
    editor = ROME(model, tok, hp, stats_texts=stats_source, cache_dir=cache)
    t = time.perf_counter()
    editor.prepare()
    prep = editor.prepare_timings
    print(f"prepare: templates {prep['templates']:.3f}s  statistics {prep['stats']:.3f}s "
          f"(once per model; cached on disk afterwards); total {time.perf_counter() - t:.3f}s")
    phases = {"k_star": [], "v_star": [], "update": []}
    for req in requests:
        editor.compute_update(req)
        for k in phases:
            phases[k].append(editor.last_step.timings[k])
    mean = {k: statistics.mean(v) for k, v in phases.items()}
    total = sum(mean.values())
    print("seconds per edit: " + "  ".join(f"{k} {v:.4f}" for k, v in mean.items())
          + f"  total {total:.4f}")

    value_shortcuts(model, tok, adapter, hp, requests, editor.context_templates)
    early_stopping(model, tok, adapter, hp, requests, editor.context_templates)
    if skip_stats:
        return

    # --- statistics throughput: 1 layer vs all layers in one pass
    kw = {"tokenizer": tok, "n_samples": stats_texts, "max_length": 128, "batch_size": 16,
          "use_cache": False, "progress": False}
    texts = list(_texts(stats_source, stats_texts))
    n_tok = sum(min(len(tok(t)["input_ids"]), 128) for t in texts)
    single = {}
    for layer in range(n_layers):
        t = time.perf_counter()
        second_moment(model, [layer], texts, **kw)
        single[layer] = time.perf_counter() - t
    t = time.perf_counter()
    second_moment(model, list(range(n_layers)), texts, **kw)
    together = time.perf_counter() - t
    for layer in sorted({0, hp.layer, n_layers - 1}):
        print(f"stats 1 layer ({layer:2d}): {single[layer]:.3f}s, "
              f"{n_tok / single[layer]:,.0f} tokens/s")
    print(f"stats all {n_layers} layers in one pass: {together:.3f}s, "
          f"{n_tok / together:,.0f} tokens/s (x{n_layers} the keys per token)")
    print(f"one pass vs {n_layers} separate single-layer passes (each stopped at its layer): "
          f"{together:.3f}s vs {sum(single.values()):.3f}s -> "
          f"x{sum(single.values()) / together:.1f}")


def _texts(source, n):
    from editkit.stats import text_source

    return text_source(source, n).texts(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--stats-texts", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-stats", action="store_true", help="no statistics throughput part")
    ap.add_argument("--smollm2", type=int, default=0, metavar="N",
                    help="also N edits on SmolLM2-135M (slow: ~1 min per v* on 2 cores)")
    ap.add_argument("--skip-random", action="store_true", help="no tiny random GPT-2 part")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU")

    with tempfile.TemporaryDirectory() as cache:
        try:
            from editkit.testbed import load_fact_world

            model, tok = load_fact_world(train_if_missing=False)
        except FileNotFoundError as exc:
            print(f"\n(fact world skipped: {exc})")
        else:
            hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
            bench_model("fact world", model, tok, hp, fact_world_requests(args.edits),
                        "fact_world", args.stats_texts, cache, args.skip_stats)

        if args.smollm2:
            from editkit.testbed.smollm2 import load_smollm2

            model, tok = load_smollm2()
            hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
            bench_model("SmolLM2-135M", model, tok, hp, REQUESTS[: args.smollm2], "pydoc",
                        args.stats_texts, cache, args.skip_stats)
        if args.skip_random:
            return
        tok = pydoc_tokenizer()
        model = random_gpt2(tok)
        hp = ROMEHyperParams.scaled(12)
        hp.mom2_n_samples = args.stats_texts
        bench_model("tiny random GPT-2", model, tok, hp, REQUESTS[: args.edits], "pydoc",
                    args.stats_texts, cache, args.skip_stats)


if __name__ == "__main__":
    main()
