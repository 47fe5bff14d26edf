"""Sharded runs: ``trace`` and ``eval`` under ``torchrun`` (two gloo processes) equal one
process exactly; ``trace_records(group=)`` and ``evaluate(group=)`` from Python; the
``--dtype`` and hub-id options of the command line.

Exact equality needs the same number of intra-op threads on both sides (a float reduction
split over other threads rounds differently): torchrun starts its workers with
``OMP_NUM_THREADS=1`` and the test process runs with one thread (``conftest.py``).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import editkit
from editkit.cli import main
from editkit.cli.common import check_model, load_model
from editkit.distributed import gather_in_order, rank_and_world, shard_indices
from editkit.errors import ModelUnavailableError
from editkit.eval.runner import evaluate
from editkit.testbed import FactWorld, load_fact_world
from editkit.tracing.trace import trace_records

REPO = Path(__file__).resolve().parent.parent
N_RECORDS = 3


def torchrun(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 ARGS`` from the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# ----------------------------------------------------------------------- helpers
def test_shards_cover_every_item_once_and_gather_restores_the_order():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3):
            shards = [shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert gather_in_order({2: "c", 0: "a", 1: "b"}, 3) == ["a", "b", "c"]
    with pytest.raises(editkit.EditkitError, match=r"no result for items \[1\]"):
        gather_in_order({0: "a", 2: "c"}, 3)


def test_a_group_needs_an_initialised_process_group():
    assert rank_and_world(None) == (0, 1)
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(editkit.EditkitError, match="init_process_group"):
        rank_and_world(object())


# ------------------------------------------------------------------ command line
TRACE_ARGS = ["trace", "--model", "factworld", "--n", str(N_RECORDS), "--samples", "2",
              "--kinds", "hidden,mlp", "--examples", "1", "--no-progress"]
EVAL_ARGS = ["eval", "--model", "factworld", "--method", "ft", "--data", "factworld", "--n",
             str(N_RECORDS), "--no-progress"]


def test_trace_cli_under_torchrun_equals_one_process(tmp_path):
    """Two processes split the records; rank 0 writes the traces in record order, equal to
    one process's byte for byte; only rank 0 prints."""
    assert main([*TRACE_ARGS, "--out", str(tmp_path / "one")]) == 0
    # "--" keeps torchrun's own parser off the subcommand's options (--n would be ambiguous).
    done = torchrun(["-m", "editkit", "--", *TRACE_ARGS, "--out", str(tmp_path / "two")],
                    tmp_path)
    assert done.stdout.count("traced 3 prompt(s)") == 1 and "over 2 processes" in done.stdout
    one = json.loads((tmp_path / "one" / "traces.json").read_text())
    two = json.loads((tmp_path / "two" / "traces.json").read_text())
    assert len(two) == N_RECORDS
    assert [r["hidden"]["subject"] for r in two] == [
        r["requested_rewrite"]["subject"] for r in FactWorld().records(N_RECORDS)]  # in order
    assert two == one


def test_eval_cli_under_torchrun_equals_one_process(tmp_path):
    """The independent protocol's records are split over two processes; every per-record
    metric, raw log-prob and aggregate equals the one-process run exactly."""
    assert main([*EVAL_ARGS, "--out", str(tmp_path / "one")]) == 0
    torchrun(["-m", "editkit", "--", *EVAL_ARGS, "--out", str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [r["case_id"] for r in two["records"]] == [r["case_id"] for r in one["records"]]
    assert two["records"] == one["records"]
    assert two["aggregate"] == one["aggregate"]
    assert two["timings"]["processes"] == 2 and "processes" not in one["timings"]


def test_sequential_eval_refuses_to_be_sharded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*EVAL_ARGS, "--protocol", "sequential", "--out", str(tmp_path / "o")]) == 2
    assert "cannot be sharded" in capsys.readouterr().err


# ------------------------------------------------------------------------ Python
WORKER = textwrap.dedent("""
    import pickle, sys, torch
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    from editkit.eval.runner import evaluate
    from editkit.testbed import FactWorld, load_fact_world
    from editkit.tracing.trace import trace_records
    model, tok = load_fact_world()
    records = FactWorld().records(int(sys.argv[2]))
    group = torch.distributed.group.WORLD
    traces = trace_records(model, tok, records, kinds="hidden", samples=2, progress=False,
                           group=group)
    report = evaluate("ft", model, tok, records, progress=False, group=group)
    batch = evaluate("ft", model, tok, records, protocol="batch", batch_size=2, progress=False,
                     group=group)
    if torch.distributed.get_rank() == 0:
        with open(sys.argv[1], "wb") as f:
            pickle.dump({"traces": [{k: r.to_dict() for k, r in t.items()} for t in traces],
                         "records": report.records, "aggregate": report.aggregate,
                         "batch": batch.records}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


def test_trace_records_and_evaluate_accept_a_process_group(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out.pkl"
    torchrun([str(script), str(out), str(N_RECORDS)], tmp_path)
    got = pickle.loads(out.read_bytes())
    model, tok = load_fact_world()
    records = FactWorld().records(N_RECORDS)
    traces = trace_records(model, tok, records, kinds="hidden", samples=2, progress=False)
    assert got["traces"] == [{k: r.to_dict() for k, r in t.items()} for t in traces]
    report = evaluate("ft", model, tok, records, progress=False)
    assert got["records"] == report.records
    assert got["aggregate"] == report.aggregate
    # the batch protocol shards whole batches ([0, 1] on rank 0, [2] on rank 1)
    batch = evaluate("ft", model, tok, records, protocol="batch", batch_size=2, progress=False)
    assert got["batch"] == batch.records


# ------------------------------------------------------------- --dtype and hub ids
def test_dtype_option_loads_the_weights_in_that_dtype():
    model, _ = load_model("factworld", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(editkit.EditkitError, match="--dtype 'float64' is not a model dtype"):
        load_model("factworld", dtype="float64")


@pytest.mark.parametrize("command", ["trace", "eval", "edit", "apply", "demo", "train-mend",
                                     "suggest-layer"])
def test_dtype_choices_are_checked_before_loading(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--dtype", "float64", "--help"])
    assert info.value.code == 2  # argparse refuses the value before anything runs
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_stats_takes_the_model_dtype_as_model_dtype(capsys):
    with pytest.raises(SystemExit):
        main(["stats", "--help"])
    text = capsys.readouterr().out
    assert "--model-dtype {float32,bfloat16,float16}" in text and "--dtype {float32,float64}" in text


def test_hub_id_offline_fails_fast_with_a_typed_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE") as info:
        check_model("some-org/some-model")
    assert time.perf_counter() - start < 5
    assert "huggingface-cli download some-org/some-model" in str(info.value)


def test_hub_id_offline_on_the_command_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"),
           "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "editkit", "trace", "--model",
                           "some-org/some-model", "--n", "1", "--out", str(tmp_path / "o")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 30  # interpreter start-up included; no hub retries
    assert done.returncode == 2, done.stderr
    assert "some-org/some-model" in done.stderr and "hub" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_hub_is_found_in_one_quick_attempt(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="unreachable"):
        check_model("some-org/some-model")
    assert time.perf_counter() - start < 5


def test_a_local_directory_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    with pytest.raises(editkit.EditkitError, match="no config.json"):
        check_model("org/name")


def test_a_cached_hub_id_loads_offline_in_the_requested_dtype(gpt2_and_tok, tmp_path):
    """A hub id whose snapshot is in the hub cache loads with HF_HUB_OFFLINE=1 (no network)."""
    model, tok = gpt2_and_tok
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-gpt2"
    model.save_pretrained(repo / "snapshots" / commit)
    tok.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": str(REPO)}
    code = ("from editkit.cli.common import load_model\n"
            "m, t = load_model('some-org/tiny-gpt2', dtype='bfloat16')\n"
            "print(type(m).__name__, {str(p.dtype) for p in m.parameters()}, len(t))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["GPT2LMHeadModel", "{'torch.bfloat16'}", str(len(tok))]
