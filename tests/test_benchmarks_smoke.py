"""The benchmark suite runs end to end on a tiny selection and writes its ratio report."""

import json
import subprocess
import sys
from pathlib import Path

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
