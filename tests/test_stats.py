"""Second-moment statistics: correctness, one pass for many layers, early stop, cache, resume,
distributed equality, text sources and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import editkit
from editkit.stats import length_batches, model_fingerprint, second_moment, text_source

TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "LeBron James plays the sport of basketball.",
    "Danielle Darrieux's mother tongue is French.",
    "A short one.",
    "Statistics of keys are collected over every token position of generic text, padding "
    "excluded, and accumulated in double precision.",
    "Rome is the capital of Italy.",
    "x",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
] * 3


@pytest.fixture
def model_tok(bytelevel_tokenizer):
    return tiny_model("gpt2", len(bytelevel_tokenizer), n_layers=4), bytelevel_tokenizer


def moment(model, tok, layers, tmp_path, **kw):
    texts = kw.pop("texts", TEXTS)
    opts = {"tokenizer": tok, "n_samples": 100, "max_length": 32, "batch_size": 5,
            "cache_dir": tmp_path / "cache", "progress": False}
    opts.update(kw)
    return second_moment(model, layers, texts, **opts)


class BlockCounter:
    """Counts forward calls of every block (and can fail on the n-th call of one block)."""

    def __init__(self, model, fail_block: int | None = None, fail_at: int | None = None):
        self.blocks = editkit.get_adapter(model).blocks(model)
        self.calls = [0] * len(self.blocks)
        self.fail_block, self.fail_at = fail_block, fail_at

    def __enter__(self):
        def hook(i):
            def fn(module, args):
                self.calls[i] += 1
                if i == self.fail_block and self.calls[i] == self.fail_at:
                    raise RuntimeError("simulated crash")
            return fn

        self.handles = [b.register_forward_pre_hook(hook(i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def naive_moment(model, tok, layer, texts, max_length):
    """E[k kᵀ] from one full forward per text (no batching, no padding)."""
    adapter = editkit.get_adapter(model)
    module = adapter.module(model, "mlp_out", layer)
    keys = []
    handle = module.register_forward_hook(lambda m, args, out: keys.append(args[0][0]))
    try:
        with torch.no_grad():
            for t in texts:
                ids = tok(t, truncation=True, max_length=max_length)["input_ids"]
                model(torch.tensor([ids]))
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    return k.T @ k / k.shape[0]


def test_matches_naive_per_text_computation(model_tok, tmp_path):
    model, tok = model_tok
    got = moment(model, tok, [2], tmp_path, dtype="float64", use_cache=False)[2]
    want = naive_moment(model, tok, 2, TEXTS, 32)
    # keys are float32 model activations; batching with padding changes them at that level
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert torch.allclose(got, got.T)
    # PSD up to the float32 rounding of each batch's Gram matrix
    eig = torch.linalg.eigvalsh(got)
    assert eig.min() > -1e-6 * float(eig.max())


def test_one_pass_for_many_layers_equals_single_layer_passes(model_tok, tmp_path):
    model, tok = model_tok
    together = moment(model, tok, [0, 1, 3], tmp_path / "a", dtype="float64")
    for layer in (0, 1, 3):
        alone = moment(model, tok, layer, tmp_path / f"b{layer}", dtype="float64")[layer]
        torch.testing.assert_close(together[layer], alone, rtol=0, atol=0)
    assert together[0].dtype == torch.float64
    assert not torch.allclose(together[0], together[1])


def test_forward_stops_after_deepest_needed_layer(model_tok, tmp_path):
    model, tok = model_tok
    with BlockCounter(model) as counter:
        moment(model, tok, [0, 1], tmp_path, use_cache=False, sort_by_length=False)
    n_batches = -(-len(TEXTS) // 5)
    assert counter.calls[:2] == [n_batches, n_batches]
    assert counter.calls[2:] == [0, 0]


def test_cache_hit_skips_the_model_and_returns_the_same(model_tok, tmp_path):
    model, tok = model_tok
    first = moment(model, tok, [1, 2], tmp_path)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 2
    with BlockCounter(model) as counter:
        again = moment(model, tok, [1, 2], tmp_path)
    assert sum(counter.calls) == 0
    for layer in (1, 2):
        assert torch.equal(first[layer], again[layer])
        assert first[layer].dtype == torch.float32
    # Another sample count or text source is another key.
    with BlockCounter(model) as counter:
        moment(model, tok, [1], tmp_path, n_samples=7)
    assert sum(counter.calls) > 0


def test_cache_key_follows_the_weights_that_shape_the_keys(model_tok):
    model, tok = model_tok
    adapter = editkit.get_adapter(model)
    before = {layer: model_fingerprint(model, adapter, layer) for layer in range(4)}
    with torch.no_grad():  # what ROME does at layer 2: change its own mlp_out only
        adapter.module(model, "mlp_out", 2).weight.add_(0.01)
    after = {layer: model_fingerprint(model, adapter, layer) for layer in range(4)}
    assert after[2] == before[2] and after[1] == before[1]  # own keys do not depend on it
    assert after[3] != before[3]  # later keys do
    with torch.no_grad():
        adapter.module(model, "mlp_in", 0).weight.mul_(1.01)
    assert all(model_fingerprint(model, adapter, layer) != before[layer] for layer in range(4))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_cache_file_is_detected_and_recomputed(model_tok, tmp_path, damage):
    model, tok = model_tok
    first = moment(model, tok, [1], tmp_path)[1]
    (path,) = (tmp_path / "cache").rglob("*.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip bytes of the tensor payload: the header still parses, the checksum does not
        path.write_bytes(data[:-64] + bytes(b ^ 0xFF for b in data[-64:]))
    with BlockCounter(model) as counter:
        again = moment(model, tok, [1], tmp_path)[1]
    assert sum(counter.calls) > 0
    assert torch.equal(first, again)
    with BlockCounter(model) as counter:  # and the rewritten file is good again
        moment(model, tok, [1], tmp_path)
    assert sum(counter.calls) == 0


def test_interrupted_run_resumes_from_checkpoint(model_tok, tmp_path):
    model, tok = model_tok
    plain = {"sort_by_length": False}  # one forward per batch of 5 texts: countable
    reference = moment(model, tok, [0, 2], tmp_path / "ref", dtype="float64", use_cache=False,
                       **plain)
    n_batches = -(-len(TEXTS) // 5)
    with BlockCounter(model, fail_block=0, fail_at=4), pytest.raises(RuntimeError, match="crash"):
        moment(model, tok, [0, 2], tmp_path, dtype="float64", checkpoint_every=1, **plain)
    partial = list((tmp_path / "cache").rglob("*partial*"))
    assert len(partial) == 1
    with BlockCounter(model) as counter:
        resumed = moment(model, tok, [0, 2], tmp_path, dtype="float64", checkpoint_every=1,
                         **plain)
    assert counter.calls[0] == n_batches - 3  # batches 1-3 came from the checkpoint
    for layer in (0, 2):
        torch.testing.assert_close(resumed[layer], reference[layer], rtol=1e-12, atol=1e-15)
    assert not list((tmp_path / "cache").rglob("*partial*"))


def test_text_files_and_lists_give_the_same_statistics(model_tok, tmp_path):
    model, tok = model_tok
    docs = TEXTS[:8]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    want = moment(model, tok, [1], tmp_path / "a", texts=docs, use_cache=False)[1]
    for src in (txt, str(jsonl), iter(docs)):
        got = moment(model, tok, [1], tmp_path / "b", texts=src, use_cache=False)[1]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # identities: content for lists, path/size/mtime for files
    assert text_source(docs, 100).identity == text_source(list(docs), 100).identity
    assert text_source(docs, 100).identity != text_source(docs[:-1], 100).identity
    assert text_source(txt, 100).identity.startswith("file:")


def test_datasets_dataset_source(model_tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    model, tok = model_tok
    ds = datasets.Dataset.from_dict({"text": TEXTS[:8]})
    got = moment(model, tok, [1], tmp_path, texts=ds, use_cache=False)[1]
    want = moment(model, tok, [1], tmp_path, texts=TEXTS[:8], use_cache=False)[1]
    torch.testing.assert_close(got, want)


def test_pydoc_source_works_offline(model_tok, tmp_path):
    model, tok = model_tok
    c = moment(model, tok, [0], tmp_path, texts="pydoc", n_samples=20)[0]
    assert c.shape == (192, 192) and torch.isfinite(c).all() and c.diagonal().min() > 0


def test_generated_source_samples_the_model_seeded_and_cached(model_tok, tmp_path, monkeypatch):
    from editkit.stats import generate_texts

    model, tok = model_tok
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "editkit"))
    texts = generate_texts(model, tok, 6, length=8, seed=3, batch_size=4, progress=False)
    assert len(texts) == 6 and all(isinstance(t, str) and t for t in texts)
    # Same seed → same texts, served from the JSON cache without sampling again.
    calls = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1))
    assert generate_texts(model, tok, 6, length=8, seed=3, batch_size=4, progress=False) == texts
    assert not calls
    monkeypatch.undo()
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "editkit"))
    other = generate_texts(model, tok, 6, length=8, seed=4, batch_size=4, progress=False)
    assert other != texts
    # The statistics of texts="generated" are those of the texts sampled with the default seed.
    c = moment(model, tok, [1], tmp_path, texts="generated", n_samples=6, max_length=8)[1]
    sampled = generate_texts(model, tok, 6, length=8, progress=False)
    want = naive_moment(model, tok, 1, sampled, 8)
    torch.testing.assert_close(c.double(), want, rtol=1e-5, atol=1e-6)


def test_generated_source_needs_the_model():
    from editkit.errors import StatsError
    from editkit.stats import text_source

    with pytest.raises(StatsError, match="model="):
        text_source("generated", 10)


def test_errors_name_the_problem(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    with pytest.raises(editkit.InvalidHyperParamsError, match="layer=7"):
        moment(model, tok, [1, 7], tmp_path)
    with pytest.raises(editkit.StatsError, match="tokenizer"):
        second_moment(model, [1], TEXTS, progress=False, cache_dir=tmp_path)
    with pytest.raises(editkit.StatsError, match="no_such_corpus"):
        moment(model, tok, [1], tmp_path, texts="no_such_corpus")
    with pytest.raises(editkit.StatsError, match="dtype"):
        moment(model, tok, [1], tmp_path, dtype="int8")
    with pytest.raises(editkit.StatsError, match="no tokens"):
        moment(model, tok, [1], tmp_path, texts=["  ", ""])
    # the default source without the datasets package, and offline with it
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(editkit.StatsError, match=r"texts=\[") as info:
        moment(model, tok, [1], tmp_path, texts=None)
    assert "datasets" in str(info.value)

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(editkit.StatsError, match="hub unreachable") as info:
        moment(model, tok, [1], tmp_path, texts="wikitext")
    assert "pydoc" in str(info.value)


WORKER = textwrap.dedent("""
    import json, sys, torch, transformers
    import editkit
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    rank, world, init, model_dir, out, texts = sys.argv[1:7]
    torch.distributed.init_process_group("gloo", init_method=init, rank=int(rank),
                                         world_size=int(world))
    from editkit.stats import second_moment
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = []
    block0 = editkit.get_adapter(model).blocks(model)[0]
    block0.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    res = second_moment(model, [0, 2], texts, tokenizer=tok, n_samples=100, max_length=32,
                        batch_size=3, dtype="float64", use_cache=False, progress=False)
    with open(out + f".rank{rank}.json", "w") as f:
        json.dump({"texts": sum(rows)}, f)
    if int(rank) == 0:
        save_file({f"l{k}": v for k, v in res.items()}, out)
    torch.distributed.barrier()  # neither rank tears gloo down while the other still talks
    torch.distributed.destroy_process_group()
""")


def saved_model_and_corpus(model_tok, tmp_path) -> tuple[Path, Path]:
    """The model as a save_pretrained directory and TEXTS as a .txt corpus, for subprocesses."""
    model, tok = model_tok
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS) + "\n")
    return model_dir, corpus


def assert_equals_one_process(model_tok, corpus: Path, got: dict[int, torch.Tensor]) -> None:
    """``got`` (layers 0 and 2, from several processes) equals one process's C."""
    model, tok = model_tok
    single = second_moment(model, [0, 2], corpus, tokenizer=tok, n_samples=100, max_length=32,
                           batch_size=3, dtype="float64", use_cache=False, progress=False)
    assert sorted(got) == [0, 2]
    for layer in (0, 2):  # other batches (other padding) change keys at float32 precision
        scale = float(single[layer].abs().max())
        torch.testing.assert_close(got[layer], single[layer], rtol=1e-5, atol=1e-6 * scale)


def test_distributed_two_processes_equal_single_process(model_tok, tmp_path):
    model_dir, corpus = saved_model_and_corpus(model_tok, tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "dist.safetensors"
    init = f"file://{tmp_path / 'pg_init'}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(model_dir),
                               str(out), str(corpus)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    from safetensors.torch import load_file

    dist = load_file(str(out))
    shares = [json.loads(Path(f"{out}.rank{r}.json").read_text())["texts"] for r in range(2)]
    assert shares == [len(TEXTS) // 2, len(TEXTS) // 2]  # each rank read its half
    assert_equals_one_process(model_tok, corpus, {layer: dist[f"l{layer}"] for layer in (0, 2)})


def test_cache_dir_defaults_to_editkit_cache(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "root"))
    second_moment(model, [1], TEXTS, tokenizer=tok, n_samples=5, max_length=16, progress=False)
    assert list(Path(tmp_path / "root" / "stats").rglob("*.safetensors"))


def test_stats_cli_computes_and_caches(model_tok, tmp_path, capsys):
    import argparse

    from editkit import cli as stats_cli

    model, tok = model_tok
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    parser = argparse.ArgumentParser()
    stats_cli.add_parser(parser.add_subparsers())
    argv = ["stats", str(tmp_path / "m"), "--layers", "all", "--texts", "pydoc", "--n-samples",
            "30", "--max-length", "32", "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    args = parser.parse_args(argv)
    assert stats_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "layer 3: C (192, 192)" in out and "4 layer(s)" in out
    assert len(list((tmp_path / "c").rglob("mom2_l*.safetensors"))) == 4
    args = parser.parse_args([*argv[:3], "9", *argv[4:]])
    assert stats_cli.run(args) == 2  # a usage error, on stderr like every subcommand's
    assert "--layers 9 out of range" in capsys.readouterr().err
    args = parser.parse_args([*argv, "--batch-tokens", "0"])
    assert stats_cli.run(args) == 2
    assert "--batch-tokens 0 is out of range" in capsys.readouterr().err


def test_stats_cli_under_torchrun_shards_and_equals_one_process(model_tok, tmp_path):
    """``torchrun --nproc_per_node 2 -m editkit.cli stats``: the CLI joins the gloo group, the
    two ranks split the texts, rank 0 writes the cache, and C equals the one-process C."""
    model_dir, corpus = saved_model_and_corpus(model_tok, tmp_path)
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{repo}{os.pathsep}{env.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "editkit.cli", "stats", str(model_dir), "--layers", "0", "2", "--texts",
           str(corpus), "--n-samples", "100", "--max-length", "32", "--batch-size", "3",
           "--dtype", "float64", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 layer(s)" in done.stdout and "over 2 processes" in done.stdout
    assert done.stdout.count("layer 0: C") == 1  # only rank 0 prints
    from safetensors.torch import load_file

    files = {p.name.split("_")[1]: p for p in (tmp_path / "cache").rglob("mom2_l*.safetensors")}
    assert sorted(files) == ["l0", "l2"]
    assert_equals_one_process(model_tok, corpus, {
        layer: load_file(str(files[f"l{layer}"]))["mom2"] for layer in (0, 2)})


# ------------------------------------------------------------- length-sorted batches
def test_length_batches_keep_every_text_within_the_budget():
    gen = torch.Generator().manual_seed(0)
    ids = [list(range(int(n))) for n in torch.randint(1, 40, (200,), generator=gen)]
    groups = length_batches(ids, 5 * 40)
    assert sorted(map(len, ids)) == sorted(len(s) for g in groups for s in g)
    assert all(len(g) * max(map(len, g)) <= 5 * 40 for g in groups)
    assert length_batches([list(range(50))], 10) == [[list(range(50))]]  # too long: alone
    padded = sum(len(g) * max(map(len, g)) for g in groups)
    plain = sum(len(c) * max(map(len, c)) for c in (ids[i:i + 5] for i in range(0, 200, 5)))
    assert padded < 0.75 * plain  # the point of sorting: far less padding


def test_length_sorted_batches_give_the_plain_loops_statistics(model_tok, tmp_path):
    model, tok = model_tok
    texts = TEXTS * 3  # more than one window of 8 batches
    seen = []
    block = editkit.get_adapter(model).blocks(model)[0]
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
    try:
        kw = {"dtype": "float64", "use_cache": False, "texts": texts, "batch_size": 2}
        plain = moment(model, tok, [0, 3], tmp_path, sort_by_length=False, **kw)
        n_plain = len(seen)
        plain_tokens = sum(b * t for b, t in seen)
        sorted_ = moment(model, tok, [0, 3], tmp_path, **kw)
    finally:
        handle.remove()
    sorted_tokens = sum(b * t for b, t in seen[n_plain:])
    for layer in (0, 3):
        torch.testing.assert_close(sorted_[layer], plain[layer], rtol=1e-6,
                                   atol=1e-7 * float(plain[layer].abs().max()))
    torch.testing.assert_close(sorted_[3], naive_moment(model, tok, 3, texts, 32), rtol=1e-5,
                               atol=1e-6 * float(plain[3].abs().max()))
    assert sorted_tokens < plain_tokens  # fewer padded positions run through the model


def test_batch_tokens_caps_each_forward_and_keeps_the_statistics(model_tok, tmp_path):
    model, tok = model_tok
    seen = []
    block = editkit.get_adapter(model).blocks(model)[0]
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
    kw = {"dtype": "float64", "use_cache": False, "texts": TEXTS * 3}
    try:
        wide = moment(model, tok, [2], tmp_path, batch_tokens=10_000, **kw)
        n_wide = len(seen)
        narrow = moment(model, tok, [2], tmp_path, batch_tokens=40, **kw)
    finally:
        handle.remove()
    assert all(b * t <= 40 or b == 1 for b, t in seen[n_wide:])  # only a long text alone
    assert len(seen) - n_wide > 2 * n_wide  # the cap, not the text count, cut the batches
    torch.testing.assert_close(narrow[2], wide[2], rtol=1e-6,
                               atol=1e-7 * float(wide[2].abs().max()))
    with pytest.raises(editkit.StatsError, match="batch_tokens"):
        moment(model, tok, [2], tmp_path, batch_tokens=0, **kw)
    from editkit.stats import BATCH_TOKENS

    assert max(b * t for b, t in seen[:n_wide]) > BATCH_TOKENS  # uncapped, they are larger
    seen.clear()
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
    try:  # on the CPU the default caps 100 texts x 32 tokens at BATCH_TOKENS per forward
        moment(model, tok, [2], tmp_path, batch_size=100, **kw)
    finally:
        handle.remove()
    assert max(b * t for b, t in seen) <= BATCH_TOKENS < 100 * 32


def test_length_sorted_run_resumes_from_checkpoint(model_tok, tmp_path):
    model, tok = model_tok
    kw = {"dtype": "float64", "batch_size": 1, "checkpoint_every": 1}  # windows of 8 texts
    reference = moment(model, tok, [1], tmp_path / "ref", use_cache=False, **kw)
    with BlockCounter(model, fail_block=0, fail_at=12), pytest.raises(RuntimeError, match="crash"):
        moment(model, tok, [1], tmp_path, **kw)
    assert len(list((tmp_path / "cache").rglob("*partial*"))) == 1
    resumed = moment(model, tok, [1], tmp_path, **kw)
    torch.testing.assert_close(resumed[1], reference[1], rtol=1e-12, atol=1e-15)
