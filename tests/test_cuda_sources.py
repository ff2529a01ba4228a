"""The CUDA kernels compile anywhere nvcc is installed (no GPU, no torch headers needed)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

SOURCE_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
KERNEL_SOURCES = sorted(SOURCE_DIR.glob("*.cu"))
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
def test_kernels_compile_with_nvcc(tmp_path):
    """Every csrc/cuda/*.cu compiles for sm_90, all files at once in parallel, without warnings."""
    jobs = []
    for path in KERNEL_SOURCES:
        command = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O3", f"-I{SOURCE_DIR}",
                   "-o", str(tmp_path / f"{path.stem}.o"), str(path)]
        jobs.append((path, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)))
    failures = []
    for path, job in jobs:
        output, _ = job.communicate(timeout=300)
        if job.returncode != 0 or "warning" in output.lower():
            failures.append(f"{path.name} (exit {job.returncode}):\n{output}")
        else:
            assert (tmp_path / f"{path.stem}.o").stat().st_size > 0
    assert not failures, "\n".join(failures)
