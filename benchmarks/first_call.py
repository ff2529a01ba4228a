"""What a first call on a new layer shape pays before the triton kernels launch: planning both
passes (triton_plan.choose), offline for sm_90 (no GPU), per smoke shape, from empty caches:
without the shipped resource table (every candidate up to the one taken is compiled) and with it.
A launch on a GPU then compiles the one kernel it runs per pass (not counted here).

    python benchmarks/first_call.py [--threads N] [--shapes stress|tiny|all]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

_CHILD = """
import sys, time
import torch
from fastrnn import benchmark_configs as bc
from fastrnn.backends import triton_plan
mode, batch, hidden, bidirectional, dtype = sys.argv[1:6]
shape = bc.Config("smoke", mode, int(batch), 1, int(hidden), bidirectional=bidirectional == "1")
config = bc.layer_config(shape, dtype, "cuda")
device = triton_plan.TARGETS["sm_90"]
start = time.perf_counter()
choices = [triton_plan.choose(config, device, backward) for backward in (False, True)]
seconds = time.perf_counter() - start
compiled = sum(len(choice.rejected) + 1 for choice in choices)
print(f"{seconds:.1f} {compiled} " + " / ".join(choice.plan.kind for choice in choices))
"""


def plan_once(shape, table: bool, threads: int) -> tuple[float, str]:
    """Seconds to plan both passes of `shape` in a fresh process with empty caches."""
    mode, batch, _, hidden, bidirectional, dtype = shape
    with tempfile.TemporaryDirectory() as folder:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(FASTRNN_CACHE_DIR=os.path.join(folder, "fastrnn"),
                   TRITON_CACHE_DIR=os.path.join(folder, "triton"),
                   FASTRNN_COMPILE_THREADS=str(threads))
        if not table:
            env["FASTRNN_RESOURCE_TABLE"] = ""
        result = subprocess.run([sys.executable, "-c", _CHILD, mode, str(batch), str(hidden),
                                 "1" if bidirectional else "0", dtype], capture_output=True,
                                text=True, env=env, check=True)
    seconds, candidates, kinds = result.stdout.split(maxsplit=2)
    return float(seconds), f"{candidates} variants looked at, {kinds.strip()}"


def main() -> int:
    from fastrnn.benchmark_configs import SMOKE_SHAPES, SMOKE_TINY_SHAPES
    from fastrnn.backends import triton_resources

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=triton_resources.compile_threads())
    parser.add_argument("--shapes", default="stress", choices=["stress", "tiny", "all"])
    args = parser.parse_args()
    shapes = {"stress": SMOKE_SHAPES, "tiny": SMOKE_TINY_SHAPES,
              "all": SMOKE_SHAPES + SMOKE_TINY_SHAPES}[args.shapes]
    print(f"# planning both passes for sm_90 from empty caches, {args.threads} compile threads")
    print("| shape | no table, s | with the shipped table, s | plans (fwd / bwd) |")
    print("|---|---|---|---|")
    totals = [0.0, 0.0]
    started = time.perf_counter()
    for shape in shapes:
        cold, detail = plan_once(shape, table=False, threads=args.threads)
        warm, _ = plan_once(shape, table=True, threads=args.threads)
        totals[0] += cold
        totals[1] += warm
        mode, batch, _, hidden, bidirectional, dtype = shape
        print(f"| {mode} B{batch} H{hidden}{' bi' if bidirectional else ''} {dtype} | {cold:.1f} "
              f"| {warm:.2f} | {detail} |", flush=True)
    wall = time.perf_counter() - started
    print(f"| total | {totals[0]:.1f} | {totals[1]:.2f} | wall {wall:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
