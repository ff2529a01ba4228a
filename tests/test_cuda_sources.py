"""The CUDA kernels compile anywhere nvcc is installed (no GPU, no torch headers needed)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from fastrnn.backends import cuda_plan
from fastrnn.backends.cuda_resources import compile_cuda_kernels
from fastrnn.backends.triton_plan import TARGETS
from fastrnn.benchmark_configs import gpu_configs

SOURCE_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
KERNEL_SOURCES = sorted(SOURCE_DIR.glob("*.cu"))
H100 = TARGETS["sm_90"]
CUDA_HEADERS = {"cuda_runtime.h", "cooperative_groups.h", "cuda_fp16.h", "cuda_bf16.h"}
STANDARD_HEADERS = {"algorithm", "cstdint"}


def test_kernel_sources_exist():
    assert {path.name for path in KERNEL_SOURCES} >= {"forward.cu", "backward.cu"}


@pytest.mark.parametrize("path", sorted(SOURCE_DIR.glob("*.cu*")) + sorted(SOURCE_DIR.glob("*.h")),
                         ids=lambda path: path.name)
def test_kernels_are_framework_free(path):
    """Kernel sources include only CUDA, standard and their own headers (no ATen/c10/torch)."""
    for header in re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text()):
        local = (SOURCE_DIR / header).exists()
        assert local or header in CUDA_HEADERS | STANDARD_HEADERS, f"{path.name} includes {header}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernels_compile_for_sm90_without_warnings_or_spills():
    """Every kernel of csrc/cuda/*.cu compiles for sm_90 (nvcc -Xptxas -v, all files at once),
    without warnings, with no spills and registers for one 256-thread block per SM."""
    kernels = compile_cuda_kernels("sm_90")
    cells = ("LstmCell", "GruCell", "RnnCell<false>", "RnnCell<true>")
    expected = {f"{kind}_kernel<{cell}, {scalar}>" for kind in ("forward", "backward") for cell in cells
                for scalar in ("float", "__half", "__nv_bfloat16")}
    assert set(kernels) == expected
    for name, (registers, spill_stores, spill_loads) in kernels.items():
        assert (spill_stores, spill_loads) == (0, 0), f"{name} spills"
        assert 0 < registers * cuda_plan.THREADS <= H100.registers, f"{name}: {registers} registers"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_report_plans_every_benchmark_config():
    """`python -m fastrnn.gpu_report --backend cuda` (in a child process: the report compiles for
    the GPU, not the interpreter): for each GPU benchmark config, dtype and pass a plan of at most
    one block per SM with its kernel's registers and a modelled us/step; exit status 0."""
    result = subprocess.run([sys.executable, "-m", "fastrnn.gpu_report", "--backend", "cuda"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if len(line.split()) == 13 and line.split()[2] in ("fwd", "bwd")]
    expected = sum(len(c.dtypes) * (2 if "fwd+bwd" in c.passes else 1) for c in gpu_configs())
    assert len(rows) == expected
    assert all(row[5] == "1" and int(row[9]) > 0 for row in rows)  # blocks per SM, registers
    long_forward = next(row for row in rows if row[0].startswith("long-") and row[2] == "fwd")
    assert long_forward[3] == "resident" and float(long_forward[-1]) <= 7.0
    assert lines[-2:] == [f"at most one block per SM: {expected}/{expected}", "no spills: 24/24 kernels"]
