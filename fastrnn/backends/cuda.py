"""The CUDA backend: hand-written persistent kernels (csrc/cuda), the fallback where Triton is absent.

Legend as in base.py; X+ is a last dimension X padded to cuda_plan.PAD elements with zeros. The
extension is the prebuilt `fastrnn._C_cuda`, or else built once from csrc/cuda with
torch.utils.cpp_extension.load. Each pass is planned by cuda_plan.choose for the device (at most
one block per SM); `BACKEND.runs` records the plan and the path that ran for the last forward and
backward. The kernels run the recurrence; the weight grads are GEMMs here over the saved states.
FASTRNN_CUDA_STEPWISE=1 asks for the step-wise path (one launch per step and phase). Step-wise
without being asked for (a cooperative grid the device refused at launch: no cooperative launch,
MPS, a partition holding SMs) warns once with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import pathlib
import warnings

import torch
import torch.nn.functional as F

from ..cells import CellSpec
from . import cuda_plan
from .base import Backend, LayerConfig
from .triton_plan import cuda_device

MAX_SIZE = 8192  # largest H and P (kFastrnnMaxSize in csrc/cuda/fastrnn_cuda.h)
_CELL_CODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SOURCE_DIR = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cuda"
_SOURCES = ("binding.cpp", "forward.cu", "backward.cu")


def _empty(like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype)


def _stepwise() -> bool:
    return os.environ.get("FASTRNN_CUDA_STEPWISE", "") not in ("", "0")


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=5)


@functools.cache
def _choose(config: LayerConfig, index: int, backward: bool, stepwise: bool) -> cuda_plan.Plan:
    return cuda_plan.choose(config, cuda_device(index), backward, stepwise)


def plan_pass(config: LayerConfig, device: torch.device, backward: bool) -> cuda_plan.Plan:
    """The plan of one pass on `device`: cuda_plan.choose, step-wise where asked for
    (FASTRNN_CUDA_STEPWISE). A device that refuses the cooperative launch at run time (no
    cooperative launch, MPS, a partition) runs step-wise with a warning (CudaBackend._record)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _choose(dataclasses.replace(config, seq_len=0), index, backward, _stepwise())


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """x with its last dimension zero-padded to `size`, contiguous."""
    return F.pad(x, (0, size - x.shape[-1])).contiguous()


def _check_lengths(lengths, seq_len: int) -> None:
    """The error the cpu backend gives for lengths outside [1, T] (one device sync; skipped
    while a CUDA graph is being captured)."""
    if lengths is None or (lengths.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if lengths.numel() and not bool(((lengths >= 1) & (lengths <= seq_len)).all()):
        raise RuntimeError("fastrnn cuda: lengths must lie in [1, T]")


def _load_extension():
    """The compiled module: the prebuilt one, else a JIT build from csrc/cuda."""
    try:
        from .. import _C_cuda  # type: ignore[attr-defined]
        return _C_cuda
    except ImportError:
        pass
    sources = [_SOURCE_DIR / name for name in _SOURCES]
    missing = [str(path) for path in sources if not path.exists()]
    if missing:
        raise RuntimeError(f"fastrnn._C_cuda is not built and its sources are missing: {', '.join(missing)}")
    from torch.utils.cpp_extension import load
    return load(name="fastrnn_cuda", sources=[str(path) for path in sources],
                extra_include_paths=[str(_SOURCE_DIR)], extra_cuda_cflags=["-O3"], verbose=False)


def _source_hash() -> str:
    """What identifies the kernels: a hash of csrc/cuda, else of the prebuilt extension."""
    digest = hashlib.sha256()
    files = [_SOURCE_DIR / name for name in (*_SOURCES, "recurrence.cuh", "fastrnn_cuda.h")]
    if not all(path.exists() for path in files):
        spec = importlib.util.find_spec("fastrnn._C_cuda")
        files = [pathlib.Path(spec.origin)] if spec is not None and spec.origin else []
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class CudaBackend(Backend):
    """Persistent cooperative CUDA kernels; the extension is loaded (or built) by `prepare`, on a
    background thread under auto, else at the first launch."""

    name = "cuda"
    needs_admission = True

    def __init__(self):
        self._module = None
        self._load_error = ""
        # "forward" / "backward" -> (plan, path that ran) of the last call
        self.runs: dict[str, tuple[cuda_plan.Plan, str]] = {}

    def available(self) -> tuple[bool, str]:
        if torch.version.cuda is None:
            return False, "this torch build has no CUDA"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        if self._load_error:
            return False, self._load_error
        return True, ""

    def _loaded(self):
        """The extension module, loaded or built now if it is not yet (a clear error where that
        fails, and `available` says so from then on)."""
        if self._module is None:
            try:
                self._module = _load_extension()
            except Exception as error:  # a failed build is a reason, not a crash
                self._load_error = f"the CUDA extension could not be loaded or built: {error}"
                raise RuntimeError(f"fastrnn backend 'cuda': {self._load_error}") from error
        return self._module

    def prepared(self, config, training, device):
        return self._module is not None

    def prepare(self, config, training, device):
        self._loaded()

    def plan_description(self, config, training, device):
        passes = (False, True) if training else (False,)
        return "; ".join(
            f"{'bwd' if backward else 'fwd'} "
            f"{plan_pass(config, device, backward).describe(config.num_directions, cuda_device(device.index or 0))}"
            for backward in passes)

    def build_id(self) -> str:
        return f"cuda kernels {_source_hash()}"

    def supports(self, config: LayerConfig) -> tuple[bool, str]:
        if config.device_type != "cuda":
            return False, f"tensors are on {config.device_type}, not cuda"
        if config.dtype not in _DTYPES:
            return False, f"dtype {config.dtype} is not float32, float16 or bfloat16"
        hidden = config.hidden_size
        out = config.proj_size or hidden
        if hidden > MAX_SIZE or out > MAX_SIZE:
            return False, f"hidden size {hidden} or proj size {out} exceeds {MAX_SIZE}"
        planned = dataclasses.replace(config, seq_len=0)
        for backward in (False, True):
            try:
                _choose(planned, torch.cuda.current_device(), backward, False)
            except ValueError as error:  # not even one batch row fits a block's shared memory
                return False, str(error)
        return True, ""

    def _record(self, pass_name: str, plan: cuda_plan.Plan, path_code: int) -> None:
        path = cuda_plan.PATHS[path_code]
        self.runs[pass_name] = (plan, path)
        if path != plan.path:
            _warn_once(f"refused-{pass_name}-{plan.groups}x{plan.blocks}",
                       f"fastrnn: the device refused the cooperative cuda {pass_name} grid of "
                       f"{plan.groups * plan.blocks} blocks per direction (no cooperative launch, "
                       "or MPS, a partition or another process holds SMs), so it ran one launch "
                       "per step and phase (slow)")

    def forward(self, cell: CellSpec, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths,
                keep_workspace: bool = True):
        seq_len, batch, _ = x_gates.shape
        num_directions, gate_rows, out_size = w_hh.shape
        hidden = gate_rows // cell.gates
        dtype = x_gates.dtype
        f32 = torch.float32
        _check_lengths(lengths, seq_len)
        plan = plan_pass(LayerConfig.of(cell, x_gates, h0, w_hh, w_hr, lengths), x_gates.device, False)
        out_padded, hidden_padded = cuda_plan.padded(out_size), cuda_plan.padded(hidden)
        output = x_gates.new_empty(seq_len, batch, num_directions * out_size)
        workspace = x_gates.new_empty(seq_len, batch, num_directions, cell.workspace_gates * hidden, dtype=f32)
        h_state = x_gates.new_zeros(2, num_directions, batch, out_padded, dtype=f32)  # [2, D, B, P+]
        h_state[0, ..., :out_size] = h0
        c_state = c0.to(f32).contiguous().clone() if cell.has_cell_state else _empty(x_gates)
        u_state = (x_gates.new_zeros(num_directions, batch, hidden_padded, dtype=f32) if w_hr is not None
                   else _empty(x_gates))
        path = self._loaded().forward(
            _CELL_CODES[cell.name], x_gates, _lengths(lengths, x_gates), _padded(w_hh.to(dtype), out_padded),
            _empty(x_gates, dtype) if b_hh is None else b_hh.to(dtype).contiguous(),
            _empty(x_gates, dtype) if w_hr is None else _padded(w_hr.to(dtype), hidden_padded),
            output, workspace, h_state, c_state, u_state, plan.as_list())
        self._record("forward", plan, path)
        h_n = h_state[seq_len % 2, ..., :out_size].to(dtype)
        c_n = c_state.to(dtype) if cell.has_cell_state else _empty(x_gates, dtype)
        return output, h_n, c_n, workspace

    def backward(self, cell: CellSpec, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr,
                 lengths, output, workspace):
        seq_len, batch, _ = output.shape
        num_directions, gate_rows, out_size = w_hh.shape
        hidden = gate_rows // cell.gates
        dtype = output.dtype
        f32 = torch.float32
        _check_lengths(lengths, seq_len)
        config = LayerConfig.of(cell, output.new_empty(seq_len, batch, 0), h0, w_hh, w_hr, lengths)
        plan = plan_pass(config, output.device, True)
        out_padded, gates_padded = cuda_plan.padded(out_size), cuda_plan.padded(gate_rows)
        lengths_arg = _lengths(lengths, output)
        projected = w_hr is not None
        carry = (grad_h_n.to(f32).contiguous().clone() if grad_h_n is not None
                 else output.new_zeros(num_directions, batch, out_size, dtype=f32))
        grad_c = _empty(output)
        if cell.has_cell_state:
            grad_c = (grad_c_n.to(f32).contiguous().clone() if grad_c_n is not None
                      else output.new_zeros(num_directions, batch, hidden, dtype=f32))
        grad_hg = output.new_zeros(2, num_directions, batch, gates_padded, dtype=f32)  # [2, D, B, (G*H)+]
        grad_step = (output.new_zeros(num_directions, batch, out_padded, dtype=f32) if projected
                     else _empty(output))  # [D, B, P+]
        grad_proj = (output.new_empty(seq_len, batch, num_directions, out_size, dtype=f32) if projected
                     else _empty(output))
        grad_x = output.new_empty(seq_len, batch, num_directions, gate_rows, dtype=f32)
        grad_h0 = output.new_empty(num_directions, batch, out_size, dtype=f32)
        h0_f = h0.to(f32).contiguous()
        c0_f = c0.to(f32).contiguous() if cell.has_cell_state else _empty(output)
        workspace = workspace.to(f32).contiguous()
        path = self._loaded().backward(
            _CELL_CODES[cell.name], _empty(output, dtype) if grad_output is None else grad_output.to(dtype),
            lengths_arg, _padded(w_hh.to(dtype).transpose(1, 2), gates_padded),
            _padded(w_hr.to(dtype).transpose(1, 2), out_padded) if projected else _empty(output, dtype),
            output.contiguous(), workspace, h0_f, c0_f, carry, grad_c, grad_hg, grad_step, grad_proj,
            grad_x, grad_h0, plan.as_list())
        self._record("backward", plan, path)
        grad_w_hh, grad_b_hh, grad_w_hr = _weight_grads(
            cell, grad_x, grad_proj if projected else None, workspace, output, h0_f, lengths)
        grad_c0 = grad_c.to(dtype) if cell.has_cell_state else _empty(output, dtype)
        return (grad_x.flatten(2).to(dtype), grad_h0.to(dtype), grad_c0, grad_w_hh.to(dtype),
                grad_b_hh.to(dtype), _empty(output, dtype) if grad_w_hr is None else grad_w_hr.to(dtype))


def _lengths(lengths, like: torch.Tensor) -> torch.Tensor:
    """lengths as contiguous int64 on the device, or an empty tensor for 'all T'."""
    if lengths is None:
        return _empty(like, torch.int64)
    return lengths.to(device=like.device, dtype=torch.int64).contiguous()


def _weight_grads(cell: CellSpec, grad_x, grad_proj, workspace, output, h0, lengths):
    """grad_w_hh [D, G*H, P], grad_b_hh [D, G*H], grad_w_hr [D, P, H] or None, in float32.

    grad_x [T, B, D, G*H] and grad_proj [T, B, D, P] (or None) come from the kernel, zero at
    t >= length; workspace [T, B, D, W*H]; output [T, B, D*P]; h0 [D, B, P] float32.
    """
    seq_len, batch, num_directions, gate_rows = grad_x.shape
    hidden = gate_rows // cell.gates
    grad_hg = grad_x
    if cell.name == "gru":  # the hidden-side grad of n is r * grad of n's pre-activation
        grad_hg = grad_x.clone()
        grad_hg[..., 2 * hidden:] *= workspace[..., :hidden]
    states = output.to(torch.float32).unflatten(2, (num_directions, -1))  # [T, B, D, P]
    h_prev = torch.empty_like(states)
    h_prev[0, :, 0] = h0[0]
    h_prev[1:, :, 0] = states[:-1, :, 0]
    if num_directions == 2:  # direction 1 starts from h0 at its own last step, length - 1
        last = (torch.full((batch,), seq_len, device=output.device, dtype=torch.int64) if lengths is None
                else lengths.to(device=output.device, dtype=torch.int64)) - 1
        first_step = torch.arange(seq_len, device=output.device).unsqueeze(1) == last  # [T, B]
        shifted = torch.cat([states[1:, :, 1], states.new_zeros(1, batch, states.shape[-1])])
        h_prev[:, :, 1] = torch.where(first_step.unsqueeze(2), h0[1], shifted)
    # [D, G*H, T*B] @ [D, T*B, P]
    grad_w_hh = grad_hg.permute(2, 3, 0, 1).flatten(2) @ h_prev.permute(2, 0, 1, 3).flatten(1, 2)
    grad_b_hh = grad_hg.sum(dim=(0, 1))
    grad_w_hr = None
    if grad_proj is not None:
        o, c = workspace[..., 3 * hidden:4 * hidden], workspace[..., 4 * hidden:]
        unprojected = o * c.tanh()  # [T, B, D, H]
        grad_w_hr = grad_proj.permute(2, 3, 0, 1).flatten(2) @ unprojected.permute(2, 0, 1, 3).flatten(1, 2)
    return grad_w_hh, grad_b_hh, grad_w_hr


BACKEND = CudaBackend()
