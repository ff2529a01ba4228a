"""Benchmark configurations, the timed workloads, the correctness gate and the ratio report.

Legend: B batch, T time steps, I input size, H hidden size.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
import onnx_runtimes
from fastrnn.backends import why_not
from fastrnn.benchmark_configs import (DTYPES, PASSES, Config, cpu_configs,  # noqa: F401
                                       gpu_configs, layer_config)
# Largest normalised error (max |fastrnn - torch| / max |torch|) accepted before timing.
TOLERANCE = {"fp32": 1e-2, "bf16": 1e-1, "fp16": 1e-1, "int8": 5e-2}


def _round_through_bf16(tensor: torch.Tensor) -> torch.Tensor:
    """Values every benchmarked dtype holds exactly, so all dtypes solve the same problem."""
    return tensor.to(torch.bfloat16).float()


@dataclasses.dataclass
class Problem:
    """A float32 torch.nn module, its input and an output gradient, on one device."""

    module: nn.Module
    input: torch.Tensor | PackedSequence
    grad_output: torch.Tensor


def make_problem(config: Config, device: torch.device, seed: int = 0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if config.is_cell:
        module = getattr(nn, config.mode)(config.input_size, config.hidden)
    else:
        module = getattr(nn, config.mode)(config.input_size, config.hidden, config.layers,
                                          bidirectional=config.bidirectional)
    with torch.no_grad():
        for weight in module.parameters():
            weight.copy_(_round_through_bf16(weight))
    module = module.to(device)
    x = _round_through_bf16(torch.randn(config.seq, config.batch, config.input_size,
                                        generator=generator))
    if config.packed:
        low = math.ceil(config.seq / 3)
        lengths = torch.randint(low, config.seq + 1, (config.batch,), generator=generator)
        lengths[0] = config.seq
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        x = PackedSequence(x.data.to(device), x.batch_sizes, x.sorted_indices.to(device),
                           x.unsorted_indices.to(device))
        rows = x.data.shape[0]
    else:
        x = x.to(device)
        rows = None
    directions = 2 if config.bidirectional else 1
    out_shape = ((rows, directions * config.hidden) if rows is not None
                 else (config.seq, config.batch, directions * config.hidden))
    grad_output = _round_through_bf16(torch.randn(out_shape, generator=generator)).to(device)
    return Problem(module, x, grad_output)


def _input_as(x, dtype: torch.dtype, requires_grad: bool):
    if isinstance(x, PackedSequence):
        return PackedSequence(_input_as(x.data, dtype, requires_grad), x.batch_sizes,
                              x.sorted_indices, x.unsorted_indices)
    return x.detach().to(dtype, copy=True).requires_grad_(requires_grad)


def _data(x):
    return x.data if isinstance(x, PackedSequence) else x


class Workload:
    """One implementation of one config in one dtype, ready to run a pass."""

    def __init__(self, problem: Problem, implementation: str, dtype: str, stepwise: bool = False):
        torch_dtype = torch.float32 if dtype == "int8" else DTYPES[dtype]
        module = copy.deepcopy(problem.module).to(torch_dtype)
        if dtype == "int8":  # torch's dynamically quantized module, or fastrnn's int8 one
            module = fastrnn.quantize_int8(module) if implementation != "torch" else (
                _torch_int8(module))
        elif implementation != "torch":
            module = getattr(fastrnn, type(module).__name__).from_torch(module,
                                                                        backend=implementation)
        self.module = module
        self.device = problem.grad_output.device
        self.input = _input_as(problem.input, torch_dtype, requires_grad=False)
        self.input_with_grad = _input_as(problem.input, torch_dtype, requires_grad=True)
        self.grad_output = problem.grad_output.to(torch_dtype)
        self.grad_targets = [_data(self.input_with_grad), *self.module.parameters()]
        self.stepwise = stepwise

    def _run(self, x):
        """(output, final state) of the module on x [T, B, I]: one call, or stepwise one call per
        step with the state carried, the outputs [T, B, H] gathered as a layer returns them."""
        if not self.stepwise:
            return self.module(x)
        is_cell = not hasattr(self.module, "num_layers")
        state, outputs = None, []
        for step in range(x.shape[0]):
            if is_cell:
                state = self.module(x[step], state)
                outputs.append(state[0] if isinstance(state, tuple) else state)
            else:
                output, state = self.module(x[step:step + 1], state)
                outputs.append(output[0])
        return torch.stack(outputs), state

    def forward(self):
        with torch.no_grad():
            return self._run(self.input)

    def forward_backward(self):
        output, _ = self._run(self.input_with_grad)
        return torch.autograd.grad(_data(output), self.grad_targets, self.grad_output)

    def runner(self, pass_name: str):
        """A callable running one pass, synchronised on CUDA."""
        step = self.forward if pass_name == "fwd" else self.forward_backward
        if self.device.type != "cuda":
            return step

        def synchronised():
            result = step()
            torch.cuda.synchronize(self.device)
            return result

        return synchronised


class Yardstick:
    """A problem and torch.nn's float32 results on it, computed on first use: what the
    correctness gate compares fastrnn with."""

    def __init__(self, problem: Problem, stepwise: bool = False):
        self.problem = problem
        self.stepwise = stepwise
        self._expected: dict[str, list[torch.Tensor]] = {}

    def expected(self, pass_name: str) -> list[torch.Tensor]:
        if pass_name not in self._expected:
            workload = Workload(self.problem, "torch", "fp32", self.stepwise)
            if pass_name == "fwd":
                output, hidden = workload.forward()
                hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
                self._expected[pass_name] = [_data(output), *hidden]
            else:
                self._expected[pass_name] = list(workload.forward_backward())
        return self._expected[pass_name]


def mismatch(workload: Workload, pass_name: str, expected: list[torch.Tensor], dtype: str) -> str:
    """Why `workload` disagrees with torch.nn, or "" when it agrees within the loose tolerance."""
    if pass_name == "fwd":
        output, hidden = workload.forward()
        hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
        got, names = [_data(output), *hidden], ["output", "h_n", "c_n"]
    else:
        got = list(workload.forward_backward())
        names = ["grad_input"] + [name for name, _ in workload.module.named_parameters()]
    for name, value, want in zip(names, got, expected):
        scale = want.abs().max().item() or 1.0
        error = (value.float() - want).abs().max().item() / scale
        if not error <= TOLERANCE[dtype]:
            return f"{name} differs from torch.nn: normalised max error {error:.3g} > {TOLERANCE[dtype]}"
    return ""


def _torch_int8(module: nn.Module) -> nn.Module:
    """torch's dynamically quantized (qint8) twin of a torch.nn recurrence."""
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            nn.Sequential(module), {type(module)}, dtype=torch.qint8)[0]


def workload(problem: Problem, implementation: str, dtype: str, stepwise: bool):
    """The Workload of torch.nn or a fastrnn backend, or an ONNX runtime's (onnx_runtimes.py)."""
    if implementation in onnx_runtimes.RUNTIMES:
        return onnx_runtimes.ExportedWorkload(problem, implementation, dtype)
    return Workload(problem, implementation, dtype, stepwise)


def unsupported(config: Config, dtype: str, device: torch.device, implementation: str,
                pass_name: str) -> str:
    """Why fastrnn backend (or ONNX runtime) `implementation` does not run this case, or ""."""
    if dtype == "int8":
        if implementation != "cpu":
            return "int8 runs on fastrnn's cpu kernels (fastrnn.quantized), against torch's own"
        return "" if device.type == "cpu" and pass_name == "fwd" else "int8 is CPU inference"
    if implementation in onnx_runtimes.RUNTIMES:
        return onnx_runtimes.why_not(implementation, config, dtype, pass_name, device)
    return why_not(implementation, layer_config(config, dtype, device.type))


# ---- the report ------------------------------------------------------------------------------
def ratio_rows(timings: dict[tuple[str, str, str], dict[str, tuple]]) -> list[dict]:
    """One row per (config, dtype, pass) from ((min, median) seconds, torch.nn's paired (min,
    median) seconds or None) per implementation: torch.nn's own times, and each fastrnn backend's
    times and ratio of its fastest round to the fastest torch.nn round paired with it."""
    rows = []
    for (label, dtype, pass_name), times in timings.items():
        torch_min, torch_median = times["torch"][0] if "torch" in times else (None, None)
        backends = {}
        for name, ((fastest, median), paired) in times.items():
            if name != "torch":
                paired_min, paired_median = paired or (None, None)
                backends[name] = {
                    "min_ms": 1e3 * fastest, "median_ms": 1e3 * median,
                    "torch_paired_min_ms": paired_min and 1e3 * paired_min,
                    "torch_paired_median_ms": paired_median and 1e3 * paired_median,
                    "ratio": paired_min and fastest / paired_min}
        rows.append({"config": label, "dtype": dtype, "pass": pass_name,
                     "torch_min_ms": None if torch_min is None else 1e3 * torch_min,
                     "torch_median_ms": None if torch_median is None else 1e3 * torch_median,
                     "backends": backends})
    return rows


def ratio_table(rows: list[dict]) -> str:
    backends = sorted({name for row in rows for name in row["backends"]})
    header = ["config", "dtype", "pass", "torch min ms"] + [f"{name} ratio" for name in backends]
    lines = [header]
    for row in rows:
        torch_ms = row["torch_min_ms"]
        cells = [row["config"], row["dtype"], row["pass"],
                 "-" if torch_ms is None else f"{torch_ms:.2f}"]
        for name in backends:
            ratio = row["backends"].get(name, {}).get("ratio")
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        lines.append(cells)
    return aligned(lines, left=3)


def aligned(lines: list[list[str]], left: int) -> str:
    """Rows of cells (the first the header) as text columns: the first `left` columns to the
    left, the others to the right, a rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(width) if i < left else cell.rjust(width)
                      for i, (cell, width) in enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def write_json(path, rows: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")


def write_plot(path, rows: list[dict], title: str) -> str:
    """Draw the ratios as horizontal bars; returns a note when it could not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    rows = [row for row in rows if any(b["ratio"] for b in row["backends"].values())]
    if not rows:
        return "no fastrnn/torch ratio measured: no plot written"
    backends = sorted({name for row in rows for name in row["backends"]})
    labels = [f"{row['config']} {row['dtype']} {row['pass']}" for row in rows]
    bar = 0.8 / len(backends)
    figure, axes = plt.subplots(figsize=(10, 1.5 + 0.3 * len(rows) * len(backends)))
    for i, name in enumerate(backends):
        ratios = [row["backends"].get(name, {}).get("ratio") or float("nan") for row in rows]
        axes.barh([y + i * bar for y in range(len(rows))], [r - 1 for r in ratios], left=1,
                  height=bar, label=name)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xscale("log")
    axes.set_yticks([y + 0.4 - bar / 2 for y in range(len(rows))], labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("fastrnn time / torch.nn time (fastest round; < 1 is faster)")
    axes.set_title(title, fontsize=9)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return ""
