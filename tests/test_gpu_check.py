"""benchmarks/gpu_check.sh fits the device tool (one command under 600 s, at most 8 files back)
and its summary gathers every step's figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DEVICE_COMMAND_LIMIT_S = 600


def _gpu_steps() -> list[tuple[str, int, int]]:
    """(name, budget, cap) of each step the script runs on a GPU (before its dry-run branch)."""
    text = SCRIPT.read_text()
    gpu_part = text[text.index('if [ "$DRY_RUN" -eq 0 ]; then'):text.index("\nelse\n")]
    return [(name, int(budget), int(cap))
            for name, budget, cap in re.findall(r"step ([\w-]+) (\d+) (\d+) ", gpu_part)]


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_budgets_fit_one_device_command():
    deadline = int(re.search(r"GPU_CHECK_DEADLINE:-(\d+)", SCRIPT.read_text()).group(1))
    steps = _gpu_steps()
    assert {name for name, _, _ in steps} >= {"install", "triton-smoke", "triton-tests",
                                              "cuda-build", "cuda-tests", "benchmarks"}
    assert sum(budget for _, budget, _ in steps) <= deadline  # the expected run fits
    assert all(budget <= cap < DEVICE_COMMAND_LIMIT_S for _, budget, cap in steps)
    assert deadline + 60 < DEVICE_COMMAND_LIMIT_S  # every cap is cut to the deadline


def test_summary_gathers_steps_and_fails_unless_all_ok(tmp_path):
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "device.txt").write_text("NVIDIA H200\n")
    (work / "steps.tsv").write_text("triton-smoke\tok\t0\t80\t90\t150\tcompiles\n"
                                    "triton-tests\tfailed\t1\t95\t100\t150\ttests\n"
                                    "benchmarks\tnot run\t\t0\t60\t90\tquick\n")
    (work / "triton-smoke.txt").write_text("NVIDIA H200\nok   triton LSTM B16: fwd 1.5 us/step\n"
                                           "persistent smoke (triton): 1/1 shapes ok\n")
    (work / "triton-tests.txt").write_text("F.\nFAILED tests/x.py::test_y - boom\n"
                                           "1 failed, 1 passed in 9.00s\n")
    (work / "results" / "ratios.json").write_text(json.dumps({"rows": [1]}))
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check_summary.py"),
                             str(work), str(out), "0"])
    assert result.returncode == 1
    summary = json.loads(out.read_text())
    steps = {step["step"]: step for step in summary["steps"]}
    assert steps["triton-smoke"]["smoke"] == ["ok   triton LSTM B16: fwd 1.5 us/step"]
    assert steps["triton-tests"]["pytest"] == "1 failed, 1 passed in 9.00s"
    assert steps["triton-tests"]["failed_tests"] == ["FAILED tests/x.py::test_y - boom"]
    assert steps["benchmarks"]["status"] == "not run"
    assert summary["benchmarks"] == {"rows": [1]} and summary["total_seconds"] == 175
    (work / "steps.tsv").write_text("triton-smoke\tok\t0\t80\t90\t150\tcompiles\n")
    assert subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check_summary.py"),
                           str(work), str(out), "0"]).returncode == 0
