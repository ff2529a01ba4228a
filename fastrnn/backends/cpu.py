"""The cpu backend: the fused C++ kernel of csrc/cpu/rnn_cpu.cpp, one layer (all directions) per
call. It is the extension `fastrnn._C_cpu` built by setup.py; when that is missing it is compiled
on first use from the sources next to the package (torch.utils.cpp_extension.load).

Legend as in base.py. bfloat16 and float16 run in float32 inside the kernel and are rounded on
output, except a bfloat16 forward's per-step products, which use bfloat16 dot products where the
CPU has them; the input projection of a float16 layer is torch's (F.linear in float16).
The input projection of float32 layers runs on the same packed GEMM (csrc/cpu/linear_cpu.cpp);
in eager mode it runs step by step inside the recurrence (`forward_from_input`; one GEMM before
it where W_ih exceeds 2 MiB per direction), as does that of bfloat16 layers on CPUs with
bfloat16 dot products (its x_gates then stay in float32).
A float32 or bfloat16 step of a cell, or a layer call with T = 1, is one call of cell_step (made
by fastrnn.ops.direct_step): projection, recurrent product and cell over the weights as they lie
(for bfloat16 at B <= 4 bfloat16 dot products, or on AVX2 float32 products of the bfloat16
values), nothing of them kept between calls, differentiated by a native autograd node whose
backward is cell_step_backward. Without gradients the step ops' kernels (and the int8 layer's)
are called without torch's dispatcher where nothing stands between them (`direct_calls`).
Layers of fewer than 8 rows run their input projection before the recurrence, as one GEMM over
all steps (bfloat16: in bfloat16 products, kept in float32): a step of a few rows is bound by
reading its weights, and W_ih read at every step would double that.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

from .base import Backend, LayerConfig

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_SOURCE_DIR = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cpu"


def _load_kernels() -> str:
    """Register the torch.ops.fastrnn_cpu ops; "" on success, else why they are not there."""
    if hasattr(torch.ops.fastrnn_cpu, "layer_forward"):
        return ""
    spec = importlib.util.find_spec("fastrnn._C_cpu")
    if spec is not None and spec.origin is not None:
        try:
            torch.ops.load_library(spec.origin)
            return ""
        except OSError as error:
            built_error = f"the built extension {spec.origin} does not load ({error})"
    else:
        built_error = "the extension fastrnn._C_cpu is not built"
    sources = sorted(str(source) for source in _SOURCE_DIR.glob("*.cpp"))
    if not sources:
        return f"{built_error} and its sources in {_SOURCE_DIR} are not there to compile"
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name="fastrnn_cpu_jit", sources=sources,
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False)
    except Exception as error:  # a compiler error of any kind means: not available here
        return f"{built_error} and compiling it failed: {error}"
    return ""


def _on_cpu_in(dtypes, *tensors) -> bool:
    """Whether the tensors (None aside) are CPU tensors of one dtype out of dtypes."""
    present = [t for t in tensors if t is not None]
    return all(t.device.type == "cpu" and t.dtype == present[0].dtype for t in present) and (
        present[0].dtype in dtypes)


def _float32_on_cpu(*tensors) -> bool:
    return _on_cpu_in((torch.float32,), *tensors)


def _packed_projection(x, w_ih, dtypes) -> bool:
    """Whether the packed GEMMs run this input projection: CPU tensors of `dtypes` and an input
    of at least one feature (torch's GEMMs take I = 0)."""
    return x.shape[-1] > 0 and _on_cpu_in(dtypes, x, w_ih)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self) -> None:
        self._unavailable: str | None = None  # None until the kernels were looked for

    def available(self) -> tuple[bool, str]:
        if self._unavailable is None:
            self._unavailable = _load_kernels()
        return not self._unavailable, self._unavailable

    def supports(self, config: LayerConfig) -> tuple[bool, str]:
        if config.device_type != "cpu":
            return False, f"it runs on CPU tensors only, not {config.device_type}"
        if config.dtype not in _DTYPES:
            return False, f"dtype {config.dtype} is not one of float32, float64, bfloat16, float16"
        return True, ""

    def direct_calls(self):
        """The built extension as a Python module, whose functions run ops without torch's
        dispatcher where a call allows (csrc/cpu/direct_calls.cpp); None where the kernels were
        compiled on first use (not as a Python module) or are not available."""
        if not self.available()[0]:
            return None
        try:
            module = importlib.import_module("fastrnn._C_cpu")
        except ImportError:
            return None
        return module if hasattr(module, "layer_forward_int8_direct") else None

    def forward(self, cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, keep_workspace=True):
        return tuple(torch.ops.fastrnn_cpu.layer_forward(cell.name, x_gates, h0, c0, w_hh, b_hh,
                                                         w_hr, lengths, keep_workspace))

    def backward(self, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                 output, workspace):
        return tuple(torch.ops.fastrnn_cpu.layer_backward(
            cell.name, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, output,
            workspace))

    def forward_from_input(self, cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                           keep_workspace=True):
        if not (_packed_projection(x, w_ih, (torch.float32, torch.bfloat16))
                and _on_cpu_in((torch.float32, torch.bfloat16), x, w_ih, b_ih, h0, c0, w_hh,
                               b_hh, w_hr)):
            return super().forward_from_input(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr,
                                              lengths, keep_workspace)
        return tuple(torch.ops.fastrnn_cpu.layer_forward_from_input(
            cell.name, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, keep_workspace))

    def input_projection(self, x, w_ih, b_ih):
        if not (_packed_projection(x, w_ih, (torch.float32,)) and _float32_on_cpu(b_ih, x)):
            return super().input_projection(x, w_ih, b_ih)
        return torch.ops.fastrnn_cpu.linear(x, w_ih, b_ih)

    def input_projection_backward(self, grad, x, w_ih, output_mask):
        if not (_packed_projection(x, w_ih, (torch.float32,)) and _float32_on_cpu(grad, x)):
            return super().input_projection_backward(grad, x, w_ih, output_mask)
        return tuple(torch.ops.fastrnn_cpu.linear_backward(grad, x, w_ih, output_mask))


BACKEND = CpuBackend()


def kernel_isa() -> str:
    """Which kernels the cpu backend runs here: "avx512_bf16", "avx512", "avx2" or "generic"
    (FASTRNN_CPU_ISA=avx2 or generic runs as on a CPU without AVX-512, or without AVX2 either);
    "" when they do not load."""
    if not BACKEND.available()[0]:
        return ""
    return torch.ops.fastrnn_cpu.kernel_isa()


def empty_cache() -> int:
    """Free the big buffers the cpu kernels keep between calls for reuse (at most
    FASTRNN_CPU_CACHE_MB, default 512 MiB; 0 keeps none). Returns the bytes freed."""
    if not hasattr(torch.ops.fastrnn_cpu, "empty_cache"):
        return 0
    return torch.ops.fastrnn_cpu.empty_cache()


def cached_bytes() -> int:
    """Bytes held in the cpu kernels' cache of free buffers."""
    if not hasattr(torch.ops.fastrnn_cpu, "cached_bytes"):
        return 0
    return torch.ops.fastrnn_cpu.cached_bytes()
