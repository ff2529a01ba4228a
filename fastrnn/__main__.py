"""`python -m fastrnn`: a self-check against torch.nn, then a short speed comparison.

Runs on whatever device is present (CUDA if available, else CPU) with the `auto` backend unless
`--backend` says otherwise, and prints two small tables. Exit status 1 if the self-check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import admission
from fastrnn.backends import cpu
from fastrnn.backends.base import LayerConfig
from fastrnn.cells import CELLS_BY_MODE

PAIRS = {"LSTM": (nn.LSTM, fastrnn.LSTM), "GRU": (nn.GRU, fastrnn.GRU), "RNN": (nn.RNN, fastrnn.RNN)}

CHECKS = [  # (module, kwargs, packed)
    ("LSTM", dict(num_layers=2, bidirectional=True), False),
    ("LSTM", dict(proj_size=3, batch_first=True), True),
    ("GRU", dict(num_layers=2, bidirectional=True), True),
    ("RNN", dict(nonlinearity="relu"), False),
    ("RNN", dict(nonlinearity="tanh", bidirectional=True), True),
]

SPEED = {  # (module, batch, seq, hidden, dtype) per device type
    "cpu": [("LSTM", 16, 50, 256, torch.float32), ("GRU", 16, 50, 256, torch.float32),
            ("RNN", 16, 50, 256, torch.float32)],
    "cuda": [("LSTM", 64, 100, 512, torch.float32), ("LSTM", 64, 100, 512, torch.bfloat16),
             ("LSTM", 64, 100, 512, torch.float16), ("GRU", 64, 100, 512, torch.bfloat16),
             ("LSTM", 1, 100, 256, torch.float32)],
}


def self_check(device: torch.device, backend: str | None) -> bool:
    """fastrnn against torch.nn in float64 (float32 on CUDA): outputs, states and gradients."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    tolerance = 1e-9 if dtype == torch.float64 else 2e-3
    print(f"self-check against torch.nn on {device.type}, {dtype}:")
    ok = True
    for index, (name, kwargs, packed) in enumerate(CHECKS):
        torch.manual_seed(index)
        reference = PAIRS[name][0](6, 8, dtype=dtype, device=device, **kwargs)
        module = PAIRS[name][1].from_torch(reference, backend=backend)
        batch_first = kwargs.get("batch_first", False)
        x = torch.randn(*((4, 5) if batch_first else (5, 4)), 6, dtype=dtype, device=device)
        lengths = torch.tensor([5, 2, 4, 1])  # T = 5, B = 4
        results = []
        for m in (reference, module):
            leaf = x.clone().requires_grad_()
            inp = pack_padded_sequence(leaf, lengths, batch_first, enforce_sorted=False) if packed else leaf
            output, hidden = m(inp)
            output = output.data if packed else output
            hidden = hidden if isinstance(hidden, tuple) else (hidden,)
            loss = output.sin().sum() + sum(h.square().sum() for h in hidden)
            grads = torch.autograd.grad(loss, [leaf, *m.parameters()])
            results.append([output, *hidden, *grads])
        errors = [(a - b).abs().max().item() for a, b in zip(*results)]
        worst = max(errors)
        passed = worst <= tolerance
        ok &= passed
        layout = ", ".join(f"{k}={v}" for k, v in kwargs.items()) + (", packed" if packed else "")
        print(f"  {name:5s} {layout:48s} max error {worst:.1e}  {'ok' if passed else 'FAILED'}")
    return ok


def _median_ms(fn, device: torch.device, repeat: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _served_by(backend: str | None, module, x: torch.Tensor, training: bool) -> str:
    """The backend that served the module's (first) layer for input x."""
    config = LayerConfig(CELLS_BY_MODE[module.mode], x.device.type, x.dtype, x.shape[1],
                         x.shape[0], module.hidden_size, 0, 1, False)
    chosen = admission.serving_backend(backend, config, input_size=module.input_size,
                                       has_bias=module.bias, training=training, device=x.device)
    return chosen.name if chosen is not None else "?"


def speed(device: torch.device, backend: str | None, repeat: int) -> None:
    """Median forward and forward+backward times of torch.nn and fastrnn, side by side; each
    fastrnn layer is called once first, and the compiles that starts are waited for, so that
    the times are those of the backend admission lets serve (fastrnn.admission)."""
    print(f"\nspeed on {device.type} (median of {repeat}, ms; ratio < 1 means fastrnn is faster):")
    print(f"  {'config':30s} {'backend f/fb':13s} {'torch fwd':>9s} {'fastrnn':>9s} {'ratio':>6s}"
          f" {'torch f+b':>9s} {'fastrnn':>9s} {'ratio':>6s}")
    for name, batch, seq, hidden, dtype in SPEED[device.type]:
        torch.manual_seed(0)
        reference = PAIRS[name][0](hidden, hidden, device=device, dtype=dtype)
        module = PAIRS[name][1].from_torch(reference, backend=backend)
        x = torch.randn(seq, batch, hidden, device=device, dtype=dtype)
        row = []
        for m in (reference, module):
            def forward():
                with torch.no_grad():
                    m(x)

            def forward_backward():
                m(x.requires_grad_())[0].sum().backward()
            forward()
            forward_backward()
            admission.PREPARER.wait()
            row.append((_median_ms(forward, device, repeat), _median_ms(forward_backward, device, repeat)))
        (t_f, t_fb), (f_f, f_fb) = row
        label = f"{name} B{batch} T{seq} H{hidden} {str(dtype)[6:]}"
        chosen = f"{_served_by(backend, module, x, False)}/{_served_by(backend, module, x, True)}"
        print(f"  {label:30s} {chosen:13s} {t_f:9.2f} {f_f:9.2f} {f_f / t_f:6.2f} {t_fb:9.2f}"
              f" {f_fb:9.2f} {f_fb / t_fb:6.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, choices=fastrnn.backends.BACKEND_NAMES)
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions per measurement")
    parser.add_argument("--no-speed", action="store_true", help="only run the self-check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"fastrnn {fastrnn.__version__}, torch {torch.__version__}, device {device}")
    print("backends: " + ", ".join(f"{n} ({'available' if not r else 'unavailable: ' + r})"
                                   for n, r in fastrnn.available_backends().items()))
    isa = cpu.kernel_isa()
    if isa:
        print(f"cpu kernels: {isa}")
    ok = self_check(device, args.backend)
    if not args.no_speed:
        speed(device, args.backend, args.repeat)
        if device.type == "cuda":
            print("\nadmission of the fused GPU plans (fastrnn.admission):")
            print(admission.report())
    print("\nself-check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
