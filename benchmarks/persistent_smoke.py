"""The persistent launches of a GPU backend at the shapes that stress them: each layer runs forward
and backward against torch.nn (cuDNN), twice on a side stream, and must agree bitwise with itself
and within tolerance with torch.nn. Prints one line per shape with the plans chosen and the
forward time per step. Run under a watchdog (benchmarks/gpu_check.sh): a hang is a failure.
`--shapes tiny` runs small layers without timing them (for compute-sanitizer). `--admission`
instead runs each shape as a user would (backend auto), inference and training, until admission
(fastrnn.admission) has a verdict, and prints the verdict table: a line "ok" per admitted
configuration, "FAIL" per rejected one.

    python benchmarks/persistent_smoke.py [--backend triton|cuda] [--shapes stress|tiny]
                                          [--admission]
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton.testing

import fastrnn
from fastrnn import admission
from fastrnn.backends import cuda as cuda_backend
from fastrnn.backends import triton as triton_backend
from fastrnn.backends.base import LayerConfig
from fastrnn.benchmark_configs import DTYPES, SMOKE_SHAPES, SMOKE_TINY_SHAPES
from fastrnn.cells import CELLS_BY_MODE

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def _plans(backend: str, module, x) -> str:
    """The plans the backend takes for the module's first layer, forward and backward."""
    config = LayerConfig(cell=CELLS_BY_MODE[module.mode], device_type="cuda", dtype=x.dtype,
                         batch_size=x.shape[0], seq_len=x.shape[1],
                         hidden_size=module.hidden_size, proj_size=0,
                         num_directions=2 if module.bidirectional else 1, variable_lengths=False)
    if backend == "cuda":
        plans = [cuda_backend.plan_pass(config, x.device, backward) for backward in (False, True)]
        return "; ".join(f"{name} {plan.describe(config.num_directions, triton_backend.cuda_device(0))}"
                         for name, plan in zip(("fwd", "bwd"), plans))
    forward = triton_backend.plan_layer(config, x.device)
    backward = triton_backend.plan_layer(config, x.device, backward=True)
    return (f"fwd {forward.kind} x{forward.batch_groups} groups, "
            f"bwd {backward.kind} x{backward.batch_groups} groups")


def check(backend, timed, mode, batch, seq_len, hidden, bidirectional, dtype) -> bool:
    torch.manual_seed(0)
    reference = getattr(torch.nn, mode)(hidden, hidden, batch_first=True,
                                        bidirectional=bidirectional).cuda().to(dtype)
    module = getattr(fastrnn, mode).from_torch(reference, backend=backend)
    x = torch.randn(batch, seq_len, hidden, device="cuda", dtype=dtype, requires_grad=True)
    expected, _ = reference(x)
    (grad_expected,) = torch.autograd.grad(expected.float().square().sum(), x)
    stream = torch.cuda.Stream()
    runs = []
    with torch.cuda.stream(stream):
        for _ in range(2):
            output, _ = module(x)
            (grad,) = torch.autograd.grad(output.float().square().sum(), x)
            runs.append((output, grad))
    stream.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    scale = expected.float().abs().max().item()
    error = (runs[0][0].float() - expected.float()).abs().max().item() / scale
    grad_error = ((runs[0][1].float() - grad_expected.float()).abs().max().item()
                  / grad_expected.float().abs().max().item())
    timing = ""
    if timed:
        with torch.no_grad():
            seconds = triton.testing.do_bench(lambda: module(x)) / 1e3
            cudnn = triton.testing.do_bench(lambda: reference(x)) / 1e3
        steps = seq_len * (2 if bidirectional else 1)
        timing = f"; fwd {seconds * 1e6 / steps:.2f} us/step (cuDNN {cudnn * 1e6 / steps:.2f})"
    ok = same and error <= TOLERANCE[dtype] and grad_error <= 10 * TOLERANCE[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {backend} {mode} B{batch} T{seq_len} H{hidden}"
          f"{' bi' if bidirectional else ''} {str(dtype)[6:]}: {_plans(backend, module, x)}; "
          f"bitwise repeat {same}, error {error:.1e}, grad error {grad_error:.1e}{timing}", flush=True)
    return ok


def admit(mode, batch, seq_len, hidden, bidirectional, dtype) -> None:
    """Run one shape through auto, inference then training, until each has a verdict (the first
    call starts the compiles in the background, a call after them runs the check)."""
    torch.manual_seed(0)
    module = getattr(fastrnn, mode)(hidden, hidden, batch_first=True,
                                    bidirectional=bidirectional).cuda().to(dtype)
    x = torch.randn(batch, seq_len, hidden, device="cuda", dtype=dtype)
    for _ in range(2):
        with torch.no_grad():
            module(x)
        module(x.requires_grad_())[0].float().sum().backward()
        admission.PREPARER.wait()
    torch.cuda.synchronize()


def admission_table(shapes) -> int:
    """Admission of each shape; the verdict table; the number of rejected configurations."""
    for shape in shapes:
        admit(*shape)
    entries = admission.STORE.entries(seen_only=True)
    for entry in entries:
        verdict = {True: "ok  ", False: "FAIL"}.get(entry.get("admitted"), "FAIL")
        times = entry.get("times_ms") or ["?", "?"]
        print(f"{verdict} admission {admission.describe(entry['fields'])}: "
              f"{entry['fields']['backend']} {entry.get('plan') or ''}; fused {times[0]} ms, "
              f"torch {times[1]} ms{'; ' + entry['reason'] if entry.get('reason') else ''}",
              flush=True)
    print(admission.report())
    return sum(entry.get("admitted") is not True for entry in entries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="triton", choices=["triton", "cuda"])
    parser.add_argument("--shapes", default="stress", choices=["stress", "tiny"])
    parser.add_argument("--admission", action="store_true",
                        help="run the shapes through auto and print the admission verdicts")
    args = parser.parse_args()
    shapes = [(*shape[:-1], DTYPES[shape[-1]])
              for shape in (SMOKE_SHAPES if args.shapes == "stress" else SMOKE_TINY_SHAPES)]
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if args.admission:
        rejected = admission_table(shapes)
        print(f"admission: {len(shapes) * 2 - rejected}/{len(shapes) * 2} configurations "
              "admitted")
        return 1 if rejected else 0
    failures = sum(not check(args.backend, args.shapes == "stress", *shape) for shape in shapes)
    print(f"persistent smoke ({args.backend}): {len(shapes) - failures}/{len(shapes)} shapes ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
