"""The benchmark suite runs end to end on a tiny selection and writes its ratio report."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_suite_smoke(tmp_path):
    command = [sys.executable, "-m", "pytest", "benchmarks/", "--quick", "--device", "cpu",
               "--rounds", "1", "--results-dir", str(tmp_path), "-p", "no:cacheprovider",
               "-k", "cpu-small-rnn and fp32 and not bwd", "-q"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fastrnn / torch.nn time ratios" in run.stdout
    report = json.loads((tmp_path / "ratios.json").read_text())
    (row,) = report["results"]
    assert row["config"] == "cpu-small-rnn-B16-T50-I256-H256" and row["pass"] == "fwd"
    assert row["torch_min_ms"] > 0


def test_keras_benchmarks_smoke(tmp_path):
    """The Keras configs run Keras' layer, fastrnn.keras's and fastrnn directly, check them
    against Keras' and write their report (skipped without Keras)."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("Keras is not installed")
    command = [sys.executable, "-m", "pytest", "benchmarks/", "--quick", "--device", "cpu",
               "--rounds", "1", "--results-dir", str(tmp_path), "-p", "no:cacheprovider",
               "-k", "keras and simplernn", "-q"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "KERAS_BACKEND": "torch"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fastrnn.keras / Keras time ratios" in run.stdout
    report = json.loads((tmp_path / "keras_ratios.json").read_text())
    (row,) = report["results"]
    assert row["config"] == "keras-simplernn-B32-T100-I64-U128" and row["pass"] == "fwd"
    assert row["keras_min_ms"] > 0 and row["speedup_vs_keras"] > 0
    assert row["keras_layer_over_fastrnn"] > 0
