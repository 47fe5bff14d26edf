"""benchmarks/gpu_check.py: a clean skip without CUDA, and its checks run on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_skips_cleanly_without_cuda(capsys):
    assert _load().main([]) == 0
    assert "skipped" in capsys.readouterr().out


def test_checks_an_edit_on_the_cpu(capsys):
    assert _load().main(["--device", "cpu", "--n", "2", "--methods", "ft",
                         "--dtypes", "float32", "bfloat16"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("ft ")]
    assert [r[1] for r in rows] == ["float32", "bfloat16"]
    for r in rows:  # ES of 2 records, exact revert, the edit stayed on the device
        assert float(r[2]) == 1.0 and r[3] == "True" and r[4] == "True"
