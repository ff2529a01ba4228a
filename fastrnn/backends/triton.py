"""The `triton` backend: a whole layer (every step, both directions) in one persistent kernel.

Legend as in base.py. The kernels (triton_kernels/recurrence.py) split each step into phases
separated by a software grid barrier. When every program's weight slices fit on-chip, one launch
runs the whole sequence with the weights loaded once (persistent); otherwise the same kernels run
one launch per phase, streaming the weights from global memory (step-wise). Weight gradients are
GEMMs over the saved states after the recurrence. CPU tensors run under the Triton interpreter
(TRITON_INTERPRET=1), which is how the kernels are tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from ..cells import CellSpec
from .base import Backend, LayerConfig, workspace_dtype

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CELL_IDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
_MIN_BLOCK = 16  # smallest tl.dot tile side on the GPU
_STREAM_BLOCK_K = 64
# Weight elements one program may keep on-chip (registers of 8 warps), by element size in bytes.
_RESIDENT_ELEMENTS = {4: 16384, 2: 32768}
_INT32_LIMIT = 2**31


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    return ""


def _kernels():
    from ..triton_kernels import recurrence
    return recurrence


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_k(plan: "Plan", size: int) -> int:
    """K chunk of a matmul over `size`: all of it (as a power of two >= 16) when resident."""
    return max(_MIN_BLOCK, _pow2(size)) if plan.resident else plan.block_k


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a layer is tiled and launched.

    block_h: hidden units per program; block_r: output columns (of P) per program, equal to
    block_h without projection; block_b: batch rows per chunk; resident: weight slices loaded
    once and kept on-chip, else streamed in block_k chunks; persistent: one launch runs every
    phase (all programs must be co-resident), else one launch per phase.
    """

    block_h: int
    block_r: int
    block_b: int
    resident: bool
    persistent: bool
    block_k: int = _STREAM_BLOCK_K

    def num_programs(self, hidden: int) -> int:
        return _cdiv(hidden, self.block_h)


def _resident_elements(cell: CellSpec, hidden: int, out_size: int, projects: bool,
                       block_h: int, block_r: int) -> int:
    """Weight elements one program keeps on-chip in the forward or backward, whichever is more."""
    forward = cell.gates * block_h * _pow2(out_size) + (_pow2(hidden) * block_r if projects else 0)
    backward = _pow2(cell.gates * hidden) * block_r + (_pow2(out_size) * block_h if projects else 0)
    return max(forward, backward)


def _block_r(hidden: int, out_size: int, projects: bool, block_h: int, minimum: int) -> int:
    if not projects:
        return block_h
    return max(minimum, _pow2(_cdiv(out_size, _cdiv(hidden, block_h))))


def plan_layer(config: LayerConfig, sm_count: int | None) -> Plan:
    """The plan for a layer on a GPU with `sm_count` SMs (None: the interpreter): persistent with
    on-chip weights when they fit and one program per SM suffices, else step-wise."""
    hidden = config.hidden_size
    projects = config.proj_size > 0
    out_size = config.proj_size or hidden
    block_b = _MIN_BLOCK if config.batch_size <= _MIN_BLOCK else 2 * _MIN_BLOCK
    if sm_count is None:  # the interpreter runs programs one after another: one program
        block_h = max(_MIN_BLOCK, _pow2(hidden))
        block_r = _block_r(hidden, out_size, projects, block_h, _MIN_BLOCK)
        return Plan(block_h, block_r, block_b, resident=True, persistent=True)
    block_h = _MIN_BLOCK
    while _cdiv(hidden, block_h) * config.num_directions > sm_count:
        block_h *= 2
    block_r = _block_r(hidden, out_size, projects, block_h, _MIN_BLOCK)
    budget = _RESIDENT_ELEMENTS[torch.finfo(config.dtype).bits // 8]
    if _resident_elements(config.cell, hidden, out_size, projects, block_h, block_r) <= budget:
        return Plan(block_h, block_r, block_b, resident=True, persistent=True)
    block_h = 2 * _MIN_BLOCK
    block_r = _block_r(hidden, out_size, projects, block_h, _MIN_BLOCK)
    return Plan(block_h, block_r, block_b, resident=False, persistent=False)


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_options(dtype: torch.dtype) -> dict:
    """float32 dots (tf32 only where torch allows it); bfloat16 in float32 under the interpreter,
    whose bfloat16 dot is wrong."""
    dot_fp32 = dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_FP32": dot_fp32, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _launch_phases(kernel, plan: Plan, num_programs: int, num_directions: int, num_phases: int,
                   **arguments) -> None:
    """Run phases 0 .. num_phases of `kernel`, in one launch when the plan is persistent."""
    per_launch = num_phases if plan.persistent else 1
    grid = (num_programs, num_directions)
    for begin in range(0, num_phases, per_launch):
        kernel[grid](phase_begin=begin, phase_end=min(begin + per_launch, num_phases),
                     num_programs=num_programs, num_warps=8 if plan.resident else 4,
                     **arguments)


def forward_layer(cell: CellSpec, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, plan: Plan):
    """The forward of base.py with a given plan. Returns (output, h_n, c_n, workspace)."""
    seq_len, batch, _ = x_gates.shape
    num_directions, gate_rows, out_size = w_hh.shape
    hidden = gate_rows // cell.gates
    dtype = x_gates.dtype
    if x_gates.stride(2) != 1:
        x_gates = x_gates.contiguous()
    h_state = x_gates.new_empty(2, num_directions, batch, out_size, dtype=torch.float32)
    h_state[0] = h0
    c_state = c0.to(torch.float32, copy=True).contiguous() if cell.has_cell_state else h_state
    m_state = (x_gates.new_empty(num_directions, batch, hidden, dtype=torch.float32)
               if w_hr is not None else h_state)
    output = x_gates.new_empty(seq_len, batch, num_directions * out_size)
    workspace = x_gates.new_empty(seq_len, batch, num_directions, cell.workspace_gates * hidden,
                                  dtype=workspace_dtype(dtype))
    counter = torch.zeros(num_directions, dtype=torch.int32, device=x_gates.device)
    phases_per_step = 2 if w_hr is not None else 1
    _launch_phases(
        _kernels()._recurrence_fwd_kernel, plan, plan.num_programs(hidden), num_directions,
        phases_per_step * seq_len,
        x_ptr=x_gates, stride_xt=x_gates.stride(0), stride_xb=x_gates.stride(1),
        h0_ptr=h0.contiguous(), w_hh_ptr=w_hh.contiguous(),
        b_hh_ptr=b_hh.contiguous() if b_hh is not None else h_state,
        w_hr_ptr=w_hr.contiguous() if w_hr is not None else h_state,
        lengths_ptr=lengths.contiguous() if lengths is not None else counter,
        output_ptr=output, workspace_ptr=workspace, h_state_ptr=h_state, m_state_ptr=m_state,
        c_state_ptr=c_state, counter_ptr=counter,
        B=batch, T=seq_len, H=hidden, P=out_size,
        CELL=_CELL_IDS[cell.name], G=cell.gates, WS=cell.workspace_gates,
        HAS_BIAS=b_hh is not None, HAS_PROJ=w_hr is not None, HAS_LENGTHS=lengths is not None,
        RESIDENT=plan.resident, BLOCK_B=plan.block_b, BLOCK_H=plan.block_h,
        BLOCK_R=plan.block_r,
        BLOCK_K=_block_k(plan, out_size),
        BLOCK_KH=_block_k(plan, hidden),
        **_dot_options(dtype),
    )
    h_n = h_state[seq_len % 2].to(dtype, copy=True)
    c_n = c_state.to(dtype) if cell.has_cell_state else x_gates.new_empty(0)
    return output, h_n, c_n, workspace


def _previous_states(h0, output, lengths):
    """[T, B, D, P] float32: the h each step of each direction started from.

    h0: [D, B, P]; output: [T, B, D*P]; lengths: [B] or None.
    """
    seq_len, batch, _ = output.shape
    num_directions, _, out_size = h0.shape
    states = output.view(seq_len, batch, num_directions, out_size).to(torch.float32)
    previous = torch.empty_like(states)
    previous[0, :, 0] = h0[0]
    previous[1:, :, 0] = states[:-1, :, 0]
    if num_directions == 2:
        previous[-1, :, 1] = h0[1]
        previous[:-1, :, 1] = states[1:, :, 1]
        if lengths is not None:  # a reverse sequence starts from h0 at its own last step
            steps = torch.arange(seq_len, device=lengths.device).unsqueeze(1)
            starts = (steps + 1 >= lengths.unsqueeze(0)).unsqueeze(2)  # [T, B, 1]
            previous[:, :, 1] = torch.where(starts, h0[1].to(torch.float32), previous[:, :, 1])
    return previous


def backward_layer(cell: CellSpec, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                   output, workspace, plan: Plan):
    """The backward of base.py with a given plan. Returns the six gradients."""
    seq_len, batch, _ = output.shape
    num_directions, gate_rows, out_size = w_hh.shape
    hidden = gate_rows // cell.gates
    dtype = output.dtype
    grad_x_gates = output.new_empty(seq_len, batch, num_directions * gate_rows)
    grad_hg = output.new_empty(seq_len, batch, num_directions, gate_rows, dtype=torch.float32)
    grad_h_state = output.new_empty(2, num_directions, batch, out_size, dtype=torch.float32)
    if grad_h_n is not None:
        grad_h_state[0] = grad_h_n
    else:
        grad_h_state[0] = 0
    grad_c_state = grad_h_state
    if cell.has_cell_state:
        grad_c_state = (grad_c_n.to(torch.float32, copy=True).contiguous() if grad_c_n is not None
                        else output.new_zeros(num_directions, batch, hidden, dtype=torch.float32))
    grad_projected = (output.new_empty(seq_len, batch, num_directions, out_size,
                                       dtype=torch.float32) if w_hr is not None else grad_hg)
    counter = torch.zeros(num_directions, dtype=torch.int32, device=output.device)
    _launch_phases(
        _kernels()._recurrence_bwd_kernel, plan, plan.num_programs(hidden), num_directions,
        2 * seq_len,
        grad_output_ptr=grad_output.contiguous() if grad_output is not None else output,
        h0_ptr=h0.contiguous(), c0_ptr=c0.contiguous() if cell.has_cell_state else h0,
        w_hh_ptr=w_hh.contiguous(), w_hr_ptr=w_hr.contiguous() if w_hr is not None else w_hh,
        lengths_ptr=lengths.contiguous() if lengths is not None else counter,
        output_ptr=output.contiguous(), workspace_ptr=workspace.contiguous(),
        grad_x_ptr=grad_x_gates, grad_hg_ptr=grad_hg, grad_proj_ptr=grad_projected,
        grad_h_state_ptr=grad_h_state, grad_c_state_ptr=grad_c_state, counter_ptr=counter,
        B=batch, T=seq_len, H=hidden, P=out_size,
        CELL=_CELL_IDS[cell.name], G=cell.gates, WS=cell.workspace_gates,
        HAS_GRAD_OUTPUT=grad_output is not None, HAS_PROJ=w_hr is not None,
        HAS_LENGTHS=lengths is not None, RESIDENT=plan.resident, BLOCK_B=plan.block_b,
        BLOCK_H=plan.block_h, BLOCK_R=plan.block_r,
        BLOCK_K=_block_k(plan, gate_rows),
        BLOCK_KP=_block_k(plan, out_size),
        **_dot_options(dtype),
    )
    grad_h0 = grad_h_state[seq_len % 2].to(dtype, copy=True)
    grad_c0 = grad_c_state.to(dtype) if cell.has_cell_state else output.new_empty(0)
    previous = _previous_states(h0, output, lengths)
    grad_w_hh = torch.einsum("tbdg,tbdp->dgp", grad_hg, previous).to(dtype)
    grad_b_hh = grad_hg.sum(dim=(0, 1)).to(dtype)
    if w_hr is not None:
        gates = workspace.unflatten(3, (cell.workspace_gates, hidden))
        unprojected = gates[:, :, :, 3] * torch.tanh(gates[:, :, :, 4])  # o * tanh(c)
        grad_w_hr = torch.einsum("tbdp,tbdh->dph", grad_projected, unprojected).to(dtype)
    else:
        grad_w_hr = output.new_empty(0)
    return grad_x_gates, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr


class TritonBackend(Backend):
    """Persistent Triton kernels; step-wise launches when the weights do not fit on-chip."""

    name = "triton"

    def available(self) -> tuple[bool, str]:
        error = _triton_import_error()
        return (not error), error

    def supports(self, config: LayerConfig) -> tuple[bool, str]:
        """CUDA tensors (CPU tensors under TRITON_INTERPRET=1) of float32/float16/bfloat16.

        Any H runs; the weights stay on-chip (persistent kernel) when
        max(G*BLOCK_H*P', H'*BLOCK_R, (G*H)'*BLOCK_R + P'*BLOCK_H) <= 16384 float32 or 32768
        16-bit elements (' = next power of two), with BLOCK_H the smallest power of two >= 16
        giving at most one program per SM (e.g. on 132 SMs, bidirectional: LSTM H <= 256 in
        float32, <= 512 in 16-bit; GRU H <= 256 / 512; RNN H <= 1024 / 2048); else the step-wise
        launches run.
        """
        if config.dtype not in _DTYPES:
            return False, f"dtype {config.dtype} is not float32, float16 or bfloat16"
        if config.device_type != "cuda" and not (config.device_type == "cpu" and _interpreting()):
            return False, "it needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        hidden, out_size = config.hidden_size, config.proj_size or config.hidden_size
        widest = max(config.cell.gates * hidden, config.cell.workspace_gates * hidden, out_size)
        if (2 * config.num_directions * config.batch_size * widest >= _INT32_LIMIT
                or config.num_directions * config.cell.gates * hidden * out_size >= _INT32_LIMIT):
            return False, "the per-step state or the weights exceed 2**31 elements"
        return True, ""

    def forward(self, cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, keep_workspace=True):
        config = LayerConfig.of(cell, x_gates, h0, w_hh, w_hr, lengths)
        plan = plan_layer(config, _sm_count(x_gates.device))
        return forward_layer(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, plan)

    def backward(self, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                 output, workspace):
        seq_len, batch, _ = output.shape
        config = LayerConfig.of(cell, output.new_empty(seq_len, batch, 0), h0, w_hh, w_hr, lengths)
        plan = plan_layer(config, _sm_count(output.device))
        return backward_layer(cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                              output, workspace, plan)


BACKEND = TritonBackend()
