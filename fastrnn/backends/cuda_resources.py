"""What nvcc reports for the kernels of csrc/cuda (registers, spills), compiled for a target with
no GPU needed: the numbers `python -m fastrnn.gpu_report --backend cuda` prints next to each plan.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import tempfile

CUDA_SOURCES = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cuda"


def compile_cuda_kernels(target: str) -> dict[str, tuple[int, int, int]] | None:
    """{readable kernel name: (registers, spill store bytes, spill load bytes)} of every kernel
    in csrc/cuda, from `nvcc -Xptxas -v` for `target` (all files at once); None where nvcc is not
    on PATH. A file that fails to compile or compiles with a warning raises RuntimeError."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    kernels = {}
    with tempfile.TemporaryDirectory() as folder:
        jobs = [(source, subprocess.Popen(
            [nvcc, "-c", f"-arch={target}", "-std=c++17", "-O3", "-Xptxas", "-v", f"-I{CUDA_SOURCES}",
             "-o", os.path.join(folder, source.stem + ".o"), str(source)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for source in sorted(CUDA_SOURCES.glob("*.cu"))]
        for source, job in jobs:
            _, stderr = job.communicate()
            if job.returncode != 0 or "warning" in stderr.lower():
                raise RuntimeError(f"nvcc on {source.name} (exit {job.returncode}):\n{stderr}")
            for name, body in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?)(?=ptxas info"
                                         r"\s+: Compiling|\Z)", stderr, re.S):
                registers = re.search(r"Used (\d+) registers", body)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
                kernels[_readable(name)] = (int(registers.group(1)) if registers else -1,
                                            int(spills.group(1)) if spills else 0,
                                            int(spills.group(2)) if spills else 0)
    return kernels


def _readable(symbol: str) -> str:
    """forward_kernel<LstmCell, float> for a mangled kernel symbol (c++filt where installed)."""
    filt = shutil.which("c++filt")
    if filt is None:
        return symbol
    name = subprocess.run([filt, symbol], capture_output=True, text=True).stdout.strip()
    name = re.sub(r"fastrnn::|\(anonymous namespace\)::", "", name)
    return re.sub(r"^void |\([^()]*\)$", "", name)
