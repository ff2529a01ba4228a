"""Gathers what benchmarks/gpu_check.sh measured into one JSON file; exit status 1 unless every
step ran and passed.

    python3 benchmarks/gpu_check_summary.py WORK_DIR OUT_JSON DRY_RUN

WORK_DIR holds device.txt, steps.tsv (name, status, exit code, seconds, budget, cap, basis),
one NAME.txt per step and results/ratios.json from the benchmarks step.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_PYTEST_SUMMARY = re.compile(r"\b\d+ (passed|failed|error|errors|skipped)\b")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def step_figures(work: Path, name: str) -> dict:
    """What a step's output says: smoke result lines, the pytest counts, its last lines."""
    lines = _lines(work / f"{name}.txt")
    figures: dict = {"last_lines": lines[-3:]}
    smoke = [line for line in lines if line.startswith(("ok  ", "FAIL "))]
    if smoke:
        figures["smoke"] = smoke
    summaries = [line.strip("= ") for line in lines if _PYTEST_SUMMARY.search(line)
                 and (" in " in line or line.startswith("="))]
    if summaries:
        figures["pytest"] = summaries[-1]
    failed = [line for line in lines if line.startswith("FAILED ")]
    if failed:
        figures["failed_tests"] = failed[:40]
    return figures


def main(work_dir: str, out_json: str, dry_run: str) -> int:
    work = Path(work_dir)
    steps = []
    for row in _lines(work / "steps.tsv"):
        name, status, code, seconds, budget, cap, basis = row.split("\t")
        steps.append({"step": name, "status": status, "exit_code": code,
                      "seconds": int(seconds), "budget_s": int(budget), "cap_s": int(cap),
                      "budget_basis": basis, **step_figures(work, name)})
    ratios = work / "results" / "ratios.json"
    summary = {
        "dry_run": dry_run == "1",
        "device": _lines(work / "device.txt"),
        "total_seconds": sum(step["seconds"] for step in steps),
        "steps": steps,
        "benchmarks": json.loads(ratios.read_text()) if ratios.exists() else None,
    }
    Path(out_json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if steps and all(step["status"] == "ok" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
