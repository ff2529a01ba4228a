"""The `triton` backend: a whole layer (every step, both directions) in one persistent kernel.

Legend as in base.py. The kernels (triton_kernels/recurrence.py) split each step into phases
separated by a software grid barrier. One cooperative launch runs the whole sequence, with the
weight slices either kept on-chip (resident) or streamed from L2 every step; triton_plan.py picks
the plan from the compiled kernels' resources. Only when no persistent plan fits do the same
kernels run one launch per phase (step-wise), with a warning. Weight gradients are
GEMMs over the saved states after the recurrence. CPU tensors run under the Triton interpreter
(TRITON_INTERPRET=1), which is how the kernels are tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

from ..cells import CellSpec
from .base import Backend, LayerConfig, workspace_dtype
from .triton_plan import (Choice, Device, Plan, backward_constexprs, choose, cuda_device,
                          describe, forward_constexprs, interpreter_plan, interpreting,
                          state_dtype)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31
# Polls of a barrier before a persistent launch gives up on it (seconds on a GPU; a plan chosen
# here never needs that long, so reaching it means the programs were not all resident).
_SPIN_LIMIT = 1 << 24
_INTERPRETER_SPIN_LIMIT = 1 << 20
_warned: set[str] = set()


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


@functools.lru_cache(maxsize=1024)
def _choose(config: LayerConfig, device: Device, backward: bool, allow_tf32: bool) -> Choice:
    """triton_plan.choose, once per layer shape (the tf32 flag changes the kernels compiled)."""
    return choose(config, device, backward)


def plan_layer(config: LayerConfig, device: torch.device, backward: bool = False) -> Plan:
    """The plan of one pass: a single program under the interpreter; on a GPU the first
    candidate whose compiled kernel fits with every program co-resident (triton_plan.choose),
    else step-wise launches, with one warning saying why."""
    if device.type != "cuda":
        return interpreter_plan(config)
    config = dataclasses.replace(config, seq_len=0)  # plans do not depend on T
    choice = _choose(config, cuda_device(device.index or 0), backward,
                     torch.backends.cuda.matmul.allow_tf32)
    if not choice.plan.persistent:
        reason = "; ".join(choice.rejected)
        pass_name = "backward" if backward else "forward"
        key = f"{config} {pass_name}"
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"fastrnn: the triton {pass_name} of this {config.cell.mode} layer runs "
                          f"one launch per phase (slow) because no persistent plan fits: {reason}",
                          stacklevel=4)
    return choice.plan


@functools.cache
def _cooperative_launch_option() -> dict:
    """{"launch_cooperative_grid": True} where the installed Triton can launch cooperatively."""
    from triton.backends.nvidia.compiler import CUDAOptions
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return {"launch_cooperative_grid": True} if "launch_cooperative_grid" in fields else {}


def _no_lengths(device: torch.device) -> torch.Tensor:
    """The int32 placeholder passed as lengths_ptr when every sequence has T steps."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _launch_phases(kernel, plan: Plan, hidden: int, batch: int, num_directions: int,
                   num_phases: int, device: torch.device, label: tuple,
                   warm_on: torch.device | None = None, **arguments) -> None:
    """Run phases 0 .. num_phases of `kernel`: in one cooperative launch when the plan is
    persistent (so the driver refuses, rather than deadlocks, a grid that cannot be resident),
    else one launch per phase. Raises when a barrier timed out; `label` (config, pass) names the
    launch to `timed_out`. warm_on: only compile the kernel for that CUDA device (the arguments
    are meta tensors), as a launch there would."""
    per_launch = num_phases if plan.persistent else 1
    num_programs = plan.num_programs(hidden)
    groups = plan.num_groups(batch)
    counter = torch.zeros(num_directions, groups, dtype=torch.int32, device=device)
    grid = (num_programs * groups, num_directions)
    on_gpu = (warm_on or device).type == "cuda"
    options = _cooperative_launch_option() if on_gpu and plan.persistent else {}
    spin_limit = _SPIN_LIMIT if on_gpu else _INTERPRETER_SPIN_LIMIT
    for begin in range(0, num_phases, per_launch):
        launch = kernel.warmup if warm_on is not None else kernel[grid]
        launch(phase_begin=begin, phase_end=min(begin + per_launch, num_phases),
               num_programs=num_programs, group_rows=plan.group_rows(batch),
               spin_limit=spin_limit, num_warps=plan.num_warps, num_stages=1,
               counter_ptr=counter, **options, **arguments,
               **({"grid": grid} if warm_on is not None else {}))
        if warm_on is not None:
            return  # every launch of a step-wise plan runs the same compiled kernel
    _barrier_watch.check(counter, label)


class _BarrierWatch:
    """Reports barriers that timed out without waiting for the GPU: each launch's counters are
    copied to pinned memory behind an event, and read once the event has passed (at a later
    launch); on the CPU (interpreter) they are read at once. The labels of launches that timed
    out are kept in `timed_out` (admission rejects their configurations)."""

    def __init__(self):
        self._pending: list = []
        self.timed_out: set[tuple] = set()

    def check(self, counter: torch.Tensor, label: tuple) -> None:
        if counter.device.type != "cuda":
            self._raise_if_timed_out(counter, label)
            return
        if not torch.cuda.is_current_stream_capturing():
            host = torch.empty(counter.shape, dtype=counter.dtype, pin_memory=True)
            host.copy_(counter, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, host, label))
        done = [event.query() for event, _, _ in self._pending]
        ready = [(host, label) for (_, host, label), passed in zip(self._pending, done) if passed]
        self._pending = [entry for entry, passed in zip(self._pending, done) if not passed]
        for host, label in ready:
            self._raise_if_timed_out(host, label)

    def _raise_if_timed_out(self, counter: torch.Tensor, label: tuple) -> None:
        timed_out = int(_kernels().TIMED_OUT.value)
        if bool(((counter & timed_out) != 0).any()):
            self.timed_out.add(label)
            raise RuntimeError(
                "fastrnn: a persistent triton launch timed out at its grid barrier: its programs "
                "were not all resident at once (another kernel or process holding SMs, MPS or a "
                "partitioned GPU). Its results are invalid; run with FASTRNN_BACKEND=cuda or "
                "torch, or free the GPU.")


_barrier_watch = _BarrierWatch()


def _label(config: LayerConfig, backward: bool) -> tuple:
    return dataclasses.replace(config, seq_len=0), backward


def forward_layer(cell: CellSpec, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, plan: Plan,
                  warm_on: torch.device | None = None):
    """The forward of base.py with a given plan. Returns (output, h_n, c_n, workspace).
    warm_on: the tensors are meta tensors, and the kernel is only compiled for that device."""
    seq_len, batch, _ = x_gates.shape
    num_directions, gate_rows, out_size = w_hh.shape
    hidden = gate_rows // cell.gates
    dtype = x_gates.dtype
    if x_gates.stride(2) != 1:
        x_gates = x_gates.contiguous()
    h_state = x_gates.new_empty(2, num_directions, batch, out_size, dtype=state_dtype(dtype))
    h_state[0] = h0
    c_state = c0.to(torch.float32, copy=True).contiguous() if cell.has_cell_state else h_state
    m_state = (x_gates.new_empty(num_directions, batch, hidden, dtype=torch.float32)
               if w_hr is not None else h_state)
    output = x_gates.new_empty(seq_len, batch, num_directions * out_size)
    workspace = x_gates.new_empty(seq_len, batch, num_directions, cell.workspace_gates * hidden,
                                  dtype=workspace_dtype(dtype))
    config = LayerConfig.of(cell, x_gates, h0, w_hh, w_hr, lengths)
    phases_per_step = 2 if w_hr is not None else 1
    _launch_phases(
        _kernels()._recurrence_fwd_kernel, plan, hidden, batch, num_directions,
        phases_per_step * seq_len, x_gates.device, _label(config, False), warm_on,
        x_ptr=x_gates, stride_xt=x_gates.stride(0), stride_xb=x_gates.stride(1),
        h0_ptr=h0.contiguous(), w_hh_ptr=w_hh.contiguous(),
        b_hh_ptr=b_hh.contiguous() if b_hh is not None else h_state,
        w_hr_ptr=w_hr.contiguous() if w_hr is not None else h_state,
        lengths_ptr=lengths.contiguous() if lengths is not None else _no_lengths(x_gates.device),
        output_ptr=output, workspace_ptr=workspace, h_state_ptr=h_state, m_state_ptr=m_state,
        c_state_ptr=c_state, B=batch, T=seq_len, H=hidden, P=out_size,
        **forward_constexprs(config, plan, has_bias=b_hh is not None),
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
                   output, workspace, plan: Plan, warm_on: torch.device | None = None):
    """The backward of base.py with a given plan. Returns the six gradients. warm_on: as in
    forward_layer."""
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
    config = LayerConfig.of(cell, output.new_empty(seq_len, batch, 0), h0, w_hh, w_hr, lengths)
    _launch_phases(
        _kernels()._recurrence_bwd_kernel, plan, hidden, batch, num_directions, 2 * seq_len,
        output.device, _label(config, True), warm_on,
        grad_output_ptr=grad_output.contiguous() if grad_output is not None else output,
        h0_ptr=h0.contiguous(), c0_ptr=c0.contiguous() if cell.has_cell_state else h0,
        w_hh_ptr=w_hh.contiguous(), w_hr_ptr=w_hr.contiguous() if w_hr is not None else w_hh,
        lengths_ptr=lengths.contiguous() if lengths is not None else _no_lengths(output.device),
        output_ptr=output.contiguous(), workspace_ptr=workspace.contiguous(),
        grad_x_ptr=grad_x_gates, grad_hg_ptr=grad_hg, grad_proj_ptr=grad_projected,
        grad_h_state_ptr=grad_h_state, grad_c_state_ptr=grad_c_state,
        B=batch, T=seq_len, H=hidden, P=out_size,
        **backward_constexprs(config, plan, has_grad_output=grad_output is not None),
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


def _warm(config: LayerConfig, training: bool, device: torch.device) -> None:
    """Compile, without launching, the kernels a call of `config` on `device` launches (as if
    with biases and a gradient of the output), so that the call finds them in Triton's cache."""
    cell, batch, hidden = config.cell, config.batch_size, config.hidden_size
    out_size, num_directions = config.proj_size or hidden, config.num_directions
    meta = dict(device="meta", dtype=config.dtype)
    gate_rows = cell.gates * hidden
    x_gates = torch.empty(1, batch, num_directions * gate_rows, **meta)
    h0 = torch.empty(num_directions, batch, out_size, **meta)
    c0 = torch.empty(num_directions, batch, hidden, **meta) if cell.has_cell_state else None
    w_hh = torch.empty(num_directions, gate_rows, out_size, **meta)
    b_hh = torch.empty(num_directions, gate_rows, **meta)
    w_hr = torch.empty(num_directions, out_size, hidden, **meta) if config.proj_size else None
    lengths = (torch.empty(batch, device="meta", dtype=torch.int64) if config.variable_lengths
               else None)
    output, _, _, workspace = forward_layer(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths,
                                            plan_layer(config, device), warm_on=device)
    if training:
        grad_c_n = torch.empty_like(c0) if c0 is not None else None
        backward_layer(cell, torch.empty_like(output), torch.empty_like(h0), grad_c_n, h0, c0,
                       w_hh, w_hr, lengths, output, workspace,
                       plan_layer(config, device, backward=True), warm_on=device)


class TritonBackend(Backend):
    """Persistent Triton kernels; step-wise launches only when no persistent plan fits."""

    name = "triton"
    needs_admission = True

    def __init__(self) -> None:
        self._prepared: set[tuple] = set()

    @staticmethod
    def _prepared_key(config: LayerConfig, training: bool, device: torch.device) -> tuple:
        return (dataclasses.replace(config, seq_len=0), training, device.index,
                torch.backends.cuda.matmul.allow_tf32)

    def prepared(self, config, training, device):
        if device.type != "cuda":  # the interpreter compiles nothing
            return True
        return self._prepared_key(config, training, device) in self._prepared

    def prepare(self, config, training, device):
        """Plan both passes (compiling the candidates whose resources are not known), then
        compile the kernels the plans launch; a failure of that last, best-effort step only
        leaves the compile to the first launch."""
        if device.type != "cuda":
            return
        with torch.cuda.device(device):
            plan_layer(config, device)
            if training:
                plan_layer(config, device, backward=True)
            try:
                _warm(config, training, device)
            except Exception as error:  # noqa: BLE001 - the launch compiles it then
                warnings.warn(f"fastrnn: compiling the triton kernels ahead of their first "
                              f"launch failed ({type(error).__name__}: {error}); they compile "
                              "at that launch instead", stacklevel=2)
        self._prepared.add(self._prepared_key(config, training, device))

    def plan_description(self, config, training, device):
        passes = ((False, True) if training else (False,))
        return "; ".join(f"{'bwd' if backward else 'fwd'} "
                         f"{describe(plan_layer(config, device, backward))}"
                         for backward in passes)

    def build_id(self) -> str:
        from . import triton_resources
        return f"triton {triton_resources.triton_version()} kernels {triton_resources.source_hash()[:12]}"

    def run_time_failure(self, config: LayerConfig) -> str:
        if any(_label(config, backward) in _barrier_watch.timed_out for backward in (False, True)):
            return "a persistent launch timed out at its grid barrier"
        return ""

    def available(self) -> tuple[bool, str]:
        error = _triton_import_error()
        return (not error), error

    def supports(self, config: LayerConfig) -> tuple[bool, str]:
        """CUDA tensors (CPU tensors under TRITON_INTERPRET=1) of float32/float16/bfloat16.

        Any H runs: the plan (triton_plan.py) is persistent whenever a compiled candidate fits
        the device with all programs co-resident, else the step-wise launches run.
        """
        if config.dtype not in _DTYPES:
            return False, f"dtype {config.dtype} is not float32, float16 or bfloat16"
        if config.device_type != "cuda" and not (config.device_type == "cpu" and interpreting()):
            return False, "it needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        hidden, out_size = config.hidden_size, config.proj_size or config.hidden_size
        widest = max(config.cell.gates * hidden, config.cell.workspace_gates * hidden, out_size)
        if (2 * config.num_directions * config.batch_size * widest >= _INT32_LIMIT
                or config.num_directions * config.cell.gates * hidden * out_size >= _INT32_LIMIT):
            return False, "the per-step state or the weights exceed 2**31 elements"
        return True, ""

    def forward(self, cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, keep_workspace=True):
        config = LayerConfig.of(cell, x_gates, h0, w_hh, w_hr, lengths)
        plan = plan_layer(config, x_gates.device)
        return forward_layer(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, plan)

    def backward(self, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                 output, workspace):
        seq_len, batch, _ = output.shape
        config = LayerConfig.of(cell, output.new_empty(seq_len, batch, 0), h0, w_hh, w_hr, lengths)
        plan = plan_layer(config, output.device, backward=True)
        return backward_layer(cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                              output, workspace, plan)


BACKEND = TritonBackend()
