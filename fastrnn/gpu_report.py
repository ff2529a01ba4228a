"""Offline report of the GPU plans: what each benchmark layer would run, from compiled kernels.

    python -m fastrnn.gpu_report --target sm_90 [--backend triton|cuda]
                                 [--configs benchmarks|small|smoke|check|all] [--save-table]
    python -m fastrnn.gpu_report --device

--device prints the admission verdicts recorded on this machine (fastrnn.admission): each layer
configuration seen, the backend and plan checked, admitted or rejected, the errors against
float64 (fused / torch / allowed) and both times.

No GPU is needed. For the triton backend, each GPU benchmark config (fastrnn.benchmark_configs) x
dtype x pass is planned as on the target device (triton_plan.choose compiles the candidates for
it): one line with the plan, programs, num_warps, registers, spill bytes, shared bytes, whether it
fits and a modelled us per step (triton_plan.estimate_us_per_step). The last line is `fits: N/M`;
the exit status is 1 when a chosen persistent plan would not launch. For the cuda backend, each
config x dtype x pass is planned by cuda_plan.choose (path, blocks, blocks per SM, batch groups,
hidden units per block, batch tile rows, shared bytes, modelled us per step) next to the `nvcc -Xptxas -v`
registers and spills of its kernel; the exit status is 1 when a plan needs more than one block per
SM or any kernel spills.

--configs smoke plans the shapes of benchmarks/persistent_smoke.py; check, those and the benchmark
configs benchmarks/gpu_check.sh times (fastrnns, latency); all, every benchmark config and smoke.
--save-table writes every compiled resource the triton report used into the table shipped with
the package (fastrnn/backends/triton_resources.json) under the installed Triton version, so that
a first call on those shapes plans without compiling: run it under each supported Triton.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from .benchmark_configs import Config, gpu_configs, layer_config, smoke_configs  # noqa: E402

CHECKED_SUITES = ("fastrnns", "latency")  # benchmarks/gpu_check.sh: -k "fastrnns or latency"


def _configs(which: str) -> list[Config]:
    if which == "small":
        return [c for c in gpu_configs() if c.small]
    checked = [c for c in gpu_configs() if c.suite in CHECKED_SUITES]
    return {"benchmarks": gpu_configs(), "smoke": smoke_configs(),
            "check": smoke_configs() + checked, "all": gpu_configs() + smoke_configs()}[which]


def _layer_passes(which: str):
    """Yields (config, dtype, layer, backward) for each config x dtype x pass it benchmarks."""
    for config in _configs(which):
        for dtype in config.dtypes:
            layer = layer_config(config, dtype, "cuda")
            for backward in (False, True):
                if not backward or "fwd+bwd" in config.passes:
                    yield config, dtype, layer, backward


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
    for config, dtype, layer, backward in _layer_passes(which):
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


_CUDA_CELLS = {"lstm": "LstmCell", "gru": "GruCell", "rnn_tanh": "RnnCell<false>", "rnn_relu": "RnnCell<true>"}
_CUDA_SCALARS = {"fp32": "float", "bf16": "__nv_bfloat16", "fp16": "__half"}


def cuda_report(target: str, which: str) -> int:
    from .backends import cuda_plan, cuda_resources, triton_plan

    device = triton_plan.TARGETS[target]
    kernels = cuda_resources.compile_cuda_kernels(target)
    if kernels is None:
        print("nvcc is not on PATH: the cuda kernels cannot be compiled here")
        return 1
    print(f"# cuda plans for {device.name}, {device.sm_count} SMs; us/step modelled "
          f"(cuda_plan.estimate_us_per_step: barrier {cuda_plan.BARRIER_US} us per phase, tile "
          f"copies at {cuda_plan.L2_BYTES_PER_US_PER_SM // 1000} B/ns per SM, row dots at "
          f"{cuda_plan.FMA_PER_CLOCK} FMA/clock), not measured")
    widths = (42, 5, 4, 9, 6, 6, 6, 5, 5, 4, 6, 6, 7)
    _print_row(("config", "dtype", "pass", "path", "blocks", "per SM", "groups", "units", "tile",
                "regs", "spills", "shared", "us/step"), widths)
    lines, one_per_sm = 0, 0
    for config, dtype, layer, backward in _layer_passes(which):
        plan = cuda_plan.choose(layer, device, backward)
        name = (f"{'backward' if backward else 'forward'}_kernel<"
                f"{_CUDA_CELLS[layer.cell.name]}, {_CUDA_SCALARS[dtype]}>")
        registers, stores, loads = kernels[name]
        per_sm = plan.blocks_per_sm(layer.num_directions, device)
        fits = per_sm <= 1 and registers * cuda_plan.THREADS <= device.registers
        lines += 1
        one_per_sm += fits
        _print_row((config.label, dtype, "bwd" if backward else "fwd", plan.path,
                    plan.grid(layer.num_directions), per_sm, plan.groups, plan.units,
                    plan.tile_rows, registers, stores + loads, plan.shared_bytes,
                    f"{plan.us_per_step:.1f}"),
                   widths)
        if plan.reason:
            print(" " * (widths[0] + 2) + f"({plan.path} because {plan.reason})", flush=True)
    clean = sum(stores == 0 and loads == 0 for _, stores, loads in kernels.values())
    print(f"at most one block per SM: {one_per_sm}/{lines}")
    print(f"no spills: {clean}/{len(kernels)} kernels")
    return 0 if one_per_sm == lines and clean == len(kernels) else 1


def _print_row(values: tuple, widths: tuple) -> None:
    print("  ".join(str(v).ljust(w) for v, w in zip(values, widths)).rstrip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.gpu_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="sm_90", choices=["sm_90"])
    parser.add_argument("--backend", default="triton", choices=["triton", "cuda"])
    parser.add_argument("--configs", default="benchmarks",
                        choices=["benchmarks", "small", "smoke", "check", "all"])
    parser.add_argument("--save-table", action="store_true",
                        help="write the compiled resources used into the shipped table")
    parser.add_argument("--device", action="store_true",
                        help="print the admission verdicts recorded on this machine")
    args = parser.parse_args(argv)
    if args.device:
        from . import admission
        print(admission.report(seen_only=False))
        return 0
    if args.backend == "cuda":
        return cuda_report(args.target, args.configs)
    status = triton_report(args.target, args.configs)
    if args.save_table:
        from .backends import triton_resources
        triton_resources.save_table()
        print(f"saved: {triton_resources.SHIPPED_TABLE}")
    return status


if __name__ == "__main__":
    sys.exit(main())
