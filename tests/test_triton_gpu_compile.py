"""Every kernel a GPU run of tests/test_triton_backend.py launches compiles for sm_90 (offline, no
GPU, in a child process without the interpreter and with empty resource caches): the plans the
tests force and the plans the planner picks for the tests' layers. The interpreter accepts tiles
a GPU refuses (a tl.dot with K < 16), so only this test keeps such a plan off a GPU run.

Run directly, it prints one line per launch and exits 1 if any fails; with --save-table it also
adds what it compiled to the resource table shipped with the package (see fastrnn.gpu_report):

    python tests/test_triton_gpu_compile.py [--save-table]
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_gpu_test_launch_compiles_for_sm_90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTRNN_CACHE_DIR=str(tmp_path), TRITON_CACHE_DIR=str(tmp_path / "triton"),
               FASTRNN_RESOURCE_TABLE="")
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("compiled: ") and " 0 failed" in lines[-1], lines[-1]
    assert int(lines[-1].split()[1]) >= 24 + 2 * 17  # forced launches x 2 passes + planned


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["FASTRNN_RESOURCE_TABLE"] = ""  # compile everything here, answer nothing known
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from fastrnn.backends import triton_plan, triton_resources
    from triton_cases import GPU_SIZES, layer_config, multi_program_launches, planned_layers

    device = triton_plan.TARGETS["sm_90"]
    compiled = failed = 0
    for test, name, proj, plan, batch in multi_program_launches(GPU_SIZES):
        config = layer_config(name, batch, GPU_SIZES.hidden, GPU_SIZES.proj if proj else 0, 2,
                              True, torch.float32)
        for backward in (False, True):
            try:
                resources = triton_plan.kernel_resources(config, plan, backward, device.arch)
                verdict = f"ok {resources}"
                compiled += 1
            except Exception as error:  # noqa: BLE001 - reported
                verdict = f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                failed += 1
            print(f"{test} {name} proj={proj} {triton_plan.describe(plan)} "
                  f"{'bwd' if backward else 'fwd'}: {verdict}", flush=True)
    for config in planned_layers():
        for backward in (False, True):
            choice = triton_plan.choose(config, device, backward)
            programs = choice.plan.total_programs(config.hidden_size, config.batch_size,
                                                  config.num_directions)
            ok = choice.resources is not None and not (
                choice.plan.persistent and choice.resources.why_not(device, programs))
            compiled += ok
            failed += not ok
            print(f"planned {config.cell.name} B{config.batch_size} H{config.hidden_size} "
                  f"P{config.proj_size} D{config.num_directions} {str(config.dtype)[6:]} "
                  f"{'bwd' if backward else 'fwd'}: {'ok' if ok else 'FAILED'} "
                  f"{triton_plan.describe(choice.plan)} {choice.resources}", flush=True)
    print(f"compiled: {compiled} ok, {failed} failed")
    if "--save-table" in sys.argv[1:]:
        triton_resources.save_table()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
