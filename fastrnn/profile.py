"""Profile a few forward+backward iterations of one recurrent layer stack under torch.profiler.

    python -m fastrnn.profile --cell lstm --batch 64 --seq 100 --hidden 512 [--input 512]
        [--layers 1] [--bidirectional] [--dtype float32] [--backend auto|reference|cpu|triton|cuda|torch]
        [--device cuda] [--iters 5] [--trace fastrnn_trace.json]

Prints the ops/kernels that took the most time and writes a Chrome trace (open it in
chrome://tracing or https://ui.perfetto.dev). `--backend torch` profiles torch.nn instead.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from . import modules
from .backends import BACKEND_NAMES

CELL_MODULES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}),
                "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
                "rnn_relu": ("RNN", {"nonlinearity": "relu"})}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", choices=CELL_MODULES, default="lstm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--input", type=int, default=None, help="input size (default: hidden)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--backend", choices=[*BACKEND_NAMES, "torch"], default="auto",
                        help="fastrnn backend, or 'torch' for torch.nn (default: auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5, help="profiled iterations")
    parser.add_argument("--warmup", type=int, default=2, help="iterations run before profiling")
    parser.add_argument("--trace", default="fastrnn_trace.json", help="Chrome trace output path")
    parser.add_argument("--rows", type=int, default=25, help="rows of the printed table")
    return parser


def build_layer(args) -> nn.Module:
    name, extra = CELL_MODULES[args.cell]
    library = nn if args.backend == "torch" else modules
    if args.backend != "torch":
        extra = {**extra, "backend": args.backend}
    return getattr(library, name)(args.input or args.hidden, args.hidden, args.layers,
                                  bidirectional=args.bidirectional, device=args.device,
                                  dtype=DTYPES[args.dtype], **extra)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    layer = build_layer(args)
    x = torch.randn(args.seq, args.batch, args.input or args.hidden, device=device,
                    dtype=DTYPES[args.dtype], requires_grad=True)

    def iteration():
        with record_function("forward"):
            output, _ = layer(x)
        with record_function("backward"):
            output.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        iteration()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        for _ in range(args.iters):
            iteration()

    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{layer} backend={args.backend} dtype={args.dtype} device={device} "
          f"B={args.batch} T={args.seq}: {args.iters} forward+backward iterations")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows))
    profiler.export_chrome_trace(args.trace)
    print(f"Chrome trace written to {args.trace}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
