"""Offline report of the GPU plans: what each benchmark layer would run, from compiled kernels.

    python -m fastrnn.gpu_report --target sm_90 [--backend triton|cuda] [--configs benchmarks|small]

No GPU is needed. For the triton backend, each GPU benchmark config (fastrnn.benchmark_configs) x
dtype x pass is planned as on the target device (triton_plan.choose compiles the candidates for
it): one line with the plan, programs, num_warps, registers, spill bytes, shared bytes, whether it
fits and a modelled us per step (triton_plan.estimate_us_per_step). The last line is `fits: N/M`;
the exit status is 1 when a chosen persistent plan would not launch. For the cuda backend, each
kernel of csrc/cuda is compiled with `nvcc -Xptxas -v` and its registers and spills are listed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from .benchmark_configs import Config, gpu_configs, layer_config  # noqa: E402

CUDA_SOURCES = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"


def _configs(which: str) -> list[Config]:
    configs = gpu_configs()
    return [c for c in configs if c.small] if which == "small" else configs


def triton_report(target: str, which: str) -> int:
    from .backends import triton_plan

    device = triton_plan.TARGETS[target]
    print(f"# triton plans for {device.name}, {device.sm_count} SMs; us/step modelled "
          f"(barrier {triton_plan.BARRIER_US} us per phase + L2 reads at "
          f"{triton_plan.L2_BYTES_PER_US_PER_SM // 1000} B/ns per SM), not measured")
    widths = (42, 5, 4, 10, 8, 6, 5, 4, 6, 6, 4, 7)
    _print_row(("config", "dtype", "pass", "plan", "programs", "groups", "warps", "regs",
                "spills", "shared", "fits", "us/step"), widths)
    lines, fitting, broken = 0, 0, 0
    for config in _configs(which):
        for dtype in config.dtypes:
            layer = layer_config(config, dtype, "cuda")
            for backward in (False, True):
                if backward and "fwd+bwd" not in config.passes:
                    continue
                choice = triton_plan.choose(layer, device, backward)
                plan, resources = choice.plan, choice.resources
                programs = plan.total_programs(layer.hidden_size, layer.batch_size,
                                               layer.num_directions)
                reason = resources.why_not(device, programs) if plan.persistent else ""
                compiled = ((resources.registers, resources.spill_bytes, resources.shared_bytes)
                            if resources else ("?", "?", "?"))
                fits = plan.persistent and not reason
                lines += 1
                fitting += fits
                broken += plan.persistent and bool(reason)
                estimate = triton_plan.estimate_us_per_step(layer, plan, backward)
                _print_row((config.label, dtype, "bwd" if backward else "fwd", plan.kind,
                            programs, plan.batch_groups, plan.num_warps, *compiled,
                            "yes" if fits else "no", f"{estimate:.1f}"),
                           widths)
                for rejected in choice.rejected:
                    print(" " * (widths[0] + 2) + f"(passed over: {rejected})", flush=True)
    print(f"fits: {fitting}/{lines}")
    return 1 if broken else 0


def cuda_report(target: str) -> int:
    arch = target.removeprefix("sm_")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc is not on PATH: the cuda kernels cannot be compiled here")
        return 1
    widths = (52, 4, 12, 11, 6)
    _print_row(("kernel", "regs", "spill stores", "spill loads", "shared"), widths)
    kernels, clean = 0, 0
    with tempfile.TemporaryDirectory() as folder:
        for source in sorted(CUDA_SOURCES.glob("*.cu")):
            result = subprocess.run(
                [nvcc, "-c", f"-arch=sm_{arch}", "-std=c++17", "-O3", "-Xptxas", "-v",
                 f"-I{CUDA_SOURCES}", "-o", os.path.join(folder, source.stem + ".o"), str(source)],
                capture_output=True, text=True, check=True)
            for name, body in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?)(?=ptxas info"
                                         r"\s+: Compiling|\Z)", result.stderr, re.S):
                registers = re.search(r"Used (\d+) registers", body)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
                shared = re.search(r"(\d+) bytes smem", body)
                stores, loads = (spills.group(1), spills.group(2)) if spills else ("0", "0")
                kernels += 1
                clean += stores == "0" and loads == "0"
                _print_row((_readable(name), registers.group(1) if registers else "?", stores,
                            loads, shared.group(1) if shared else "0"), widths)
    print(f"no spills: {clean}/{kernels} (plans are chosen at run time by the cuda binding)")
    return 0


def _readable(symbol: str) -> str:
    """forward_kernel<LstmCell, float> for a mangled kernel symbol (c++filt where installed)."""
    filt = shutil.which("c++filt")
    if filt is None:
        return symbol
    name = subprocess.run([filt, symbol], capture_output=True, text=True).stdout.strip()
    name = re.sub(r"fastrnn::|\(anonymous namespace\)::", "", name)
    return re.sub(r"^void |\([^()]*\)$", "", name)


def _print_row(values: tuple, widths: tuple) -> None:
    print("  ".join(str(v).ljust(w) for v, w in zip(values, widths)).rstrip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.gpu_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="sm_90", choices=["sm_90"])
    parser.add_argument("--backend", default="triton", choices=["triton", "cuda"])
    parser.add_argument("--configs", default="benchmarks", choices=["benchmarks", "small"])
    args = parser.parse_args(argv)
    if args.backend == "cuda":
        return cuda_report(args.target)
    return triton_report(args.target, args.configs)


if __name__ == "__main__":
    sys.exit(main())
