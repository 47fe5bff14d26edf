"""ROME speed: seconds per edit by phase, the v* speed-up from not re-running lower layers,
and statistics throughput for one layer vs all layers in one pass.

    python benchmarks/bench_rome.py [--edits 5] [--stats-texts 400] [--threads 2]

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
from editkit.methods.rome import ROME, ROMEHyperParams, compute_value
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


def bench_model(label, model, tok, hp, requests, stats_source, stats_texts, cache):
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

    # --- v* with vs without skipping the lower layers (all steps forced)
    hp_all = dataclasses.replace(hp, value=dataclasses.replace(hp.value, early_stop_loss=0.0))
    for layer in sorted({hp.layer, n_layers // 2, (3 * n_layers) // 4}):
        hp_l = dataclasses.replace(hp_all, layer=layer)
        times = {True: [], False: []}
        for req in requests:
            for fast in (False, True):
                t = time.perf_counter()
                compute_value(model, tok, adapter, hp_l, req, editor.context_templates,
                              skip_lower_layers=fast)
                times[fast].append(time.perf_counter() - t)
        slow, fast = statistics.mean(times[False]), statistics.mean(times[True])
        print(f"v* ({hp_l.value.num_grad_steps} steps) at layer {layer:2d}: full forward "
              f"{slow:.4f}s, upper layers only {fast:.4f}s -> speed-up x{slow / fast:.2f}")

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
                        "fact_world", args.stats_texts, cache)

        tok = pydoc_tokenizer()
        model = random_gpt2(tok)
        hp = ROMEHyperParams.scaled(12)
        hp.mom2_n_samples = args.stats_texts
        bench_model("tiny random GPT-2", model, tok, hp, REQUESTS[: args.edits], "pydoc",
                    args.stats_texts, cache)


if __name__ == "__main__":
    main()
