"""Plans for the `triton` backend, chosen from what the compiler reports for each kernel.

Legend as in base.py. A plan fixes the tiling (hidden units and output columns per program, batch
rows per chunk, K chunk), whether the weight slices stay on-chip (resident) or are streamed from
L2 each step, and whether one launch runs the whole sequence (persistent) or one launch runs each
phase (step-wise). A persistent launch spins at a grid barrier, so all of its programs must be
resident at once: a persistent plan is taken only when the compiled kernel (registers, spills,
shared memory of the cubin Triton builds for the target: triton_resources.py) fits the device
with every program co-resident. Nothing here is a guessed budget: candidates are compiled cheapest
first by a stated cost model (estimate_us_per_step) and the first that fits is taken; step-wise
only when none does.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from . import triton_resources
from .base import LayerConfig, workspace_dtype
from .triton_resources import Resources

MIN_BLOCK = 16  # tl.dot tile side every supported Triton accepts
MIN_COLUMNS = 8  # narrowest weight tile tried (Triton pads M and N of a dot up to the MMA's)
STREAM_BLOCK_K = 64
RESIDENT_BLOCK_K = 128  # K chunk of a resident weight tile (one staged operand chunk at a time)


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a layer is tiled and launched.

    block_h: hidden units per program; block_r: output columns (of P) per program, equal to
    block_h without projection; block_b: batch rows per chunk; resident: weight slices loaded
    once and kept on-chip (as tiles of block_k rows of K, so that a matmul stages its other
    operand one chunk at a time), else streamed in block_k chunks every phase; persistent: one
    launch runs every phase (all programs co-resident), else one launch per phase; num_warps per
    program; batch_groups: the batch split into that many groups of rows, each with its own
    programs (each holding its own copy of the weight slices) and barrier, so that a program
    reads only its group's rows of the exchanged state.
    """

    block_h: int
    block_r: int
    block_b: int
    resident: bool
    persistent: bool
    block_k: int = STREAM_BLOCK_K
    num_warps: int = 4
    batch_groups: int = 1

    def num_programs(self, hidden: int) -> int:
        """Programs per direction and batch group."""
        return cdiv(hidden, self.block_h)

    def group_rows(self, batch: int) -> int:
        """Batch rows per group: all of them, or a multiple of block_b."""
        if self.batch_groups == 1:
            return batch
        return max(1, cdiv(cdiv(batch, self.batch_groups), self.block_b)) * self.block_b

    def num_groups(self, batch: int) -> int:
        """Batch groups actually launched (at most batch_groups)."""
        return cdiv(batch, self.group_rows(batch)) if batch else 1

    def total_programs(self, hidden: int, batch: int, num_directions: int) -> int:
        return self.num_programs(hidden) * self.num_groups(batch) * num_directions

    @property
    def kind(self) -> str:
        if not self.persistent:
            return "step-wise"
        return "persistent" if self.resident else "streamed"


@dataclasses.dataclass(frozen=True)
class Device:
    """What a GPU allows one kernel launch (per SM unless stated)."""

    name: str
    arch: int  # compute capability as 90 for sm_90
    sm_count: int
    registers: int = 65536
    shared_bytes: int = 233472  # per SM
    shared_bytes_per_program: int = 232448  # opt-in maximum for one block
    max_threads: int = 2048
    max_programs: int = 32
    warp_size: int = 32


# Offline targets: the device each --target of gpu_report stands for.
TARGETS = {"sm_90": Device("H100/H200 (sm_90)", 90, 132)}


@functools.cache
def cuda_device(index: int) -> Device:
    """The limits of CUDA device `index`, from the driver."""
    props = torch.cuda.get_device_properties(index)
    return Device(
        name=props.name, arch=props.major * 10 + props.minor,
        sm_count=props.multi_processor_count,
        registers=getattr(props, "regs_per_multiprocessor", 65536),
        shared_bytes=getattr(props, "shared_memory_per_multiprocessor", 233472),
        shared_bytes_per_program=getattr(props, "shared_memory_per_block_optin", 232448),
        max_threads=getattr(props, "max_threads_per_multi_processor", 2048),
        warp_size=getattr(props, "warp_size", 32),
    )


def _pointer_type(dtype: torch.dtype) -> str:
    return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  torch.int32: "i32", torch.int64: "i64"}[dtype]


# --- the kernels' launch contract: constexprs and pointer dtypes of each pass -------------------

_CELL_IDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
_RUNTIME_INTS = ("B", "T", "H", "P", "phase_begin", "phase_end", "num_programs", "group_rows",
                 "spin_limit")


def block_k(plan: Plan, size: int) -> int:
    """K chunk of a matmul over `size`: plan.block_k, or all of `size` (as a power of two >= 16)
    where that is less."""
    return min(max(MIN_BLOCK, pow2(size)), plan.block_k)


def whole_k(plan: Plan, size: int) -> int:
    """K chunk of the projection's matmuls: all of `size` when resident, else plan.block_k."""
    return max(MIN_BLOCK, pow2(size)) if plan.resident else plan.block_k


def num_k(plan: Plan, size: int) -> int:
    """Chunks a resident weight tile over `size` is kept in (1 when streamed: unused)."""
    return cdiv(size, block_k(plan, size)) if plan.resident else 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_options(dtype: torch.dtype) -> dict:
    """float32 dots (tf32 only where torch allows it); bfloat16 in float32 under the interpreter,
    whose bfloat16 dot is wrong."""
    dot_fp32 = dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_FP32": dot_fp32, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype h is exchanged in between programs: the layer's own for 16-bit layers (their
    dots round h to it anyway), else float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def exchanges_grad_x(config: LayerConfig) -> bool:
    """Whether the backward's hidden phase reads the 16-bit grad_x in place of the float32
    grad_hg: for 16-bit LSTM and RNN layers, where the two are equal."""
    return config.cell.name != "gru" and config.dtype in (torch.float16, torch.bfloat16)


def forward_constexprs(config: LayerConfig, plan: Plan, has_bias: bool = True) -> dict:
    cell, out_size = config.cell, config.proj_size or config.hidden_size
    return dict(CELL=_CELL_IDS[cell.name], G=cell.gates, GP=pow2(cell.gates),
                WS=cell.workspace_gates, HAS_BIAS=has_bias, HAS_PROJ=config.proj_size > 0,
                HAS_LENGTHS=config.variable_lengths, RESIDENT=plan.resident,
                BLOCK_B=plan.block_b, BLOCK_H=plan.block_h, BLOCK_R=plan.block_r,
                BLOCK_K=block_k(plan, out_size), NUM_K=num_k(plan, out_size),
                BLOCK_KH=whole_k(plan, config.hidden_size),
                **dot_options(config.dtype))


def backward_constexprs(config: LayerConfig, plan: Plan, has_grad_output: bool = True) -> dict:
    cell, out_size = config.cell, config.proj_size or config.hidden_size
    return dict(CELL=_CELL_IDS[cell.name], G=cell.gates, WS=cell.workspace_gates,
                HAS_GRAD_OUTPUT=has_grad_output,
                GRAD_X_IS_GRAD_HG=exchanges_grad_x(config), HAS_PROJ=config.proj_size > 0,
                HAS_LENGTHS=config.variable_lengths, RESIDENT=plan.resident,
                BLOCK_B=plan.block_b, BLOCK_H=plan.block_h, BLOCK_R=plan.block_r,
                BLOCK_K=block_k(plan, cell.gates * config.hidden_size),
                NUM_K=num_k(plan, cell.gates * config.hidden_size),
                BLOCK_KP=whole_k(plan, out_size), **dot_options(config.dtype))


def _forward_signature(config: LayerConfig) -> dict:
    """The forward kernel's pointer and stride arguments, in its order, as Triton types."""
    dtype, f32, state = config.dtype, torch.float32, state_dtype(config.dtype)
    pointers = dict(x_ptr=dtype, stride_xt=None, stride_xb=None, h0_ptr=dtype, w_hh_ptr=dtype,
                    b_hh_ptr=dtype, w_hr_ptr=dtype,
                    lengths_ptr=torch.int64 if config.variable_lengths else torch.int32,
                    output_ptr=dtype, workspace_ptr=workspace_dtype(dtype), h_state_ptr=state,
                    # placeholders (h_state) where the layer has no projection or cell state
                    m_state_ptr=f32 if config.proj_size else state,
                    c_state_ptr=f32 if config.cell.has_cell_state else state,
                    counter_ptr=torch.int32)
    return {name: "i32" if t is None else _pointer_type(t) for name, t in pointers.items()}


def _backward_signature(config: LayerConfig) -> dict:
    dtype, f32 = config.dtype, torch.float32
    pointers = dict(grad_output_ptr=dtype, h0_ptr=dtype, c0_ptr=dtype, w_hh_ptr=dtype,
                    w_hr_ptr=dtype,
                    lengths_ptr=torch.int64 if config.variable_lengths else torch.int32,
                    output_ptr=dtype, workspace_ptr=workspace_dtype(dtype), grad_x_ptr=dtype,
                    grad_hg_ptr=f32, grad_proj_ptr=f32, grad_h_state_ptr=f32,
                    grad_c_state_ptr=f32, counter_ptr=torch.int32)
    return {name: _pointer_type(t) for name, t in pointers.items()}


def kernel_variant(config: LayerConfig, plan: Plan, backward: bool,
                   arch: int) -> triton_resources.Variant:
    """The forward or backward kernel variant that runs `config` under `plan` on sm_`arch`."""
    if backward:
        name, signature = "_recurrence_bwd_kernel", _backward_signature(config)
        constexprs = backward_constexprs(config, plan)
    else:
        name, signature = "_recurrence_fwd_kernel", _forward_signature(config)
        constexprs = forward_constexprs(config, plan)
    signature.update({runtime: "i32" for runtime in _RUNTIME_INTS})
    signature.update({key: "constexpr" for key in constexprs})
    return name, tuple(signature.items()), tuple(constexprs.items()), plan.num_warps, arch


def kernel_resources(config: LayerConfig, plan: Plan, backward: bool, arch: int) -> Resources:
    """The compiled resources of the forward or backward kernel of `config` under `plan`."""
    return triton_resources.compiled_resources(kernel_variant(config, plan, backward, arch))


# --- choosing a plan ----------------------------------------------------------------------------

def _block_r(config: LayerConfig, block_h: int) -> int:
    hidden = config.hidden_size
    if not config.proj_size:
        return block_h
    return max(MIN_BLOCK, pow2(cdiv(config.proj_size, cdiv(hidden, block_h))))


def _block_b(config: LayerConfig) -> int:
    return MIN_BLOCK if config.batch_size <= MIN_BLOCK else 2 * MIN_BLOCK


def resident_bytes(config: LayerConfig, plan: Plan, backward: bool) -> int:
    """A lower bound of the shared memory a resident plan needs: its weight slices plus one
    staged matmul operand (a batch chunk of h, or of the gate gradients, over one K chunk).
    Candidates above the device's limit are not compiled; the rest are judged by the compiler."""
    cell, hidden = config.cell, config.hidden_size
    out_size = config.proj_size or hidden
    projects = config.proj_size > 0
    if backward:
        weights = (pow2(cell.gates * hidden) * plan.block_r
                   + (pow2(out_size) * plan.block_h if projects else 0))
        staged = plan.block_b * block_k(plan, cell.gates * hidden)
    else:
        weights = (pow2(cell.gates) * plan.block_h * pow2(out_size)
                   + (pow2(hidden) * plan.block_r if projects else 0))
        staged = plan.block_b * block_k(plan, out_size)
    return (weights + staged) * torch.finfo(config.dtype).bits // 8


def _block_h_choices(config: LayerConfig, device: Device, backward: bool,
                     groups: int) -> list[int]:
    """Hidden units per program to try, best first: the fewest that give at most one program
    per SM (over all directions and batch groups) and matmul tiles of at least MIN_COLUMNS
    columns (the forward's merged gate tile has pow2(G) * block_h, the backward's column tile
    block_h), then MIN_BLOCK, the smallest tile side every Triton version accepts."""
    columns = 1 if backward else pow2(config.cell.gates)
    block_h = max(1, MIN_COLUMNS // columns)
    while (cdiv(config.hidden_size, block_h) * config.num_directions * groups
           > device.sm_count):
        block_h *= 2
    choices = [block_h]
    if block_h * columns < MIN_BLOCK:
        choices.append(MIN_BLOCK // columns)
    return choices


def _group_choices(config: LayerConfig) -> list[int]:
    """Batch groups worth trying: 1, and 2 or 4 where each group keeps >= 16 rows."""
    return [groups for groups in (1, 2, 4) if config.batch_size >= groups * MIN_BLOCK
            or groups == 1]


def candidates(config: LayerConfig, device: Device, backward: bool) -> list[Plan]:
    """Persistent plans of one pass worth compiling, best first by the cost model
    (estimate_us_per_step; resident before streamed where equal): weights resident where their
    bytes fit a program's shared memory, in every batch grouping, batch chunk, warp count and
    narrower K chunks; then the ungrouped tiling with the weights streamed from L2."""
    plans = []
    for groups in _group_choices(config):
        rows = cdiv(config.batch_size, groups)
        block_bs = sorted({min(_block_b(config), max(MIN_BLOCK, pow2(rows))), MIN_BLOCK})
        for block_h in _block_h_choices(config, device, backward, groups):
            block_r = _block_r(config, block_h)
            tilings = [(block_b, num_warps, RESIDENT_BLOCK_K) for block_b in reversed(block_bs)
                       for num_warps in (8, 4)]
            tilings += [(MIN_BLOCK, 8, RESIDENT_BLOCK_K // 2),  # stage less at a time
                        (MIN_BLOCK, 8, RESIDENT_BLOCK_K // 4)]
            for block_b, num_warps, chunk in tilings:
                plan = Plan(block_h, block_r, block_b, resident=True, persistent=True,
                            block_k=chunk, num_warps=num_warps, batch_groups=groups)
                if resident_bytes(config, plan, backward) <= device.shared_bytes_per_program:
                    plans.append(plan)
    for block_h in _block_h_choices(config, device, backward, 1):
        for num_warps in (4, 8):
            plans.append(Plan(block_h, _block_r(config, block_h), MIN_BLOCK, resident=False,
                              persistent=True, block_k=32, num_warps=num_warps))
    return sorted(plans, key=lambda plan: (round(estimate_us_per_step(config, plan, backward), 1),
                                           not plan.resident))


def stepwise_plan(config: LayerConfig) -> Plan:
    block_h = 2 * MIN_BLOCK
    return Plan(block_h, _block_r(config, block_h), _block_b(config), resident=False,
                persistent=False, num_warps=4)


def interpreter_plan(config: LayerConfig) -> Plan:
    """The interpreter runs programs one after another: one program holds the whole layer."""
    block_h = max(MIN_BLOCK, pow2(config.hidden_size))
    whole = pow2(max(config.cell.gates * config.hidden_size, config.proj_size, MIN_BLOCK))
    return Plan(block_h, _block_r(config, block_h), _block_b(config), resident=True,
                persistent=True, block_k=whole, num_warps=4)


def describe(plan: Plan) -> str:
    return (f"{plan.kind} block_h={plan.block_h} block_b={plan.block_b} block_k={plan.block_k} "
            f"num_warps={plan.num_warps} batch_groups={plan.batch_groups}")


@dataclasses.dataclass(frozen=True)
class Choice:
    """A plan for one pass, the compiled resources behind it and why better plans were passed."""

    plan: Plan
    resources: Resources | None
    rejected: tuple[str, ...]


def choose(config: LayerConfig, device: Device, backward: bool) -> Choice:
    """The first candidate whose compiled kernel fits `device` with all programs co-resident,
    else the step-wise plan (with the reasons every candidate was rejected). Candidates not in
    the resource caches are compiled several at a time (triton_resources.compile_in_order)."""
    rejected = []
    plans = candidates(config, device, backward)
    compiled = triton_resources.compile_in_order(
        plans, lambda plan: triton_resources.is_known(
            kernel_variant(config, plan, backward, device.arch)),
        lambda plan: kernel_resources(config, plan, backward, device.arch))
    for plan, resources in compiled:
        if isinstance(resources, Exception):  # a candidate this Triton cannot compile
            rejected.append(f"{describe(plan)}: does not compile ({type(resources).__name__}: "
                            f"{str(resources).splitlines()[0][:120]})")
            continue
        programs = plan.total_programs(config.hidden_size, config.batch_size,
                                       config.num_directions)
        reason = resources.why_not(device, programs)
        if not reason:
            compiled.close()
            return Choice(plan, resources, tuple(rejected))
        rejected.append(f"{describe(plan)}: {reason}")
    plan = stepwise_plan(config)
    try:  # only reported: a step-wise launch needs no co-residency
        resources = kernel_resources(config, plan, backward, device.arch)
    except Exception:  # noqa: BLE001 - e.g. no ptxas to read resources with
        resources = None
    return Choice(plan, resources, tuple(rejected))


# --- the cost model of gpu_report ---------------------------------------------------------------

# From ../shared/ANCHORS.md (H100): a Triton atomics-and-spin grid barrier over 128 programs costs
# 0.9 us; exchanging a B x H fp16 state through global memory adds 1.9 us when each program's share
# of reads grows by 64 KB (B64 H512 -> B64 H1024), i.e. ~34 bytes per ns per SM from L2.
BARRIER_US = 0.9
L2_BYTES_PER_US_PER_SM = 34_000


def estimate_us_per_step(config: LayerConfig, plan: Plan, backward: bool) -> float:
    """Modelled time of one step of one program (all directions run at once): a barrier per
    phase plus what the program reads from L2 in that step, at one SM's share of L2 bandwidth.
    Step-wise plans add one kernel launch from Python per phase (4.3 us, ANCHORS.md)."""
    hidden, batch = config.hidden_size, plan.group_rows(config.batch_size)  # rows of a program
    out_size = config.proj_size or hidden
    gates = config.cell.gates
    weight_bytes = torch.finfo(config.dtype).bits // 8
    state_bytes = torch.finfo(state_dtype(config.dtype)).bits // 8
    chunks = cdiv(batch, plan.block_b)
    streamed = 0 if plan.resident else 1
    if backward:
        phases = 2
        # cell phase: workspace and incoming gradient rows of own units; hidden phase: all of
        # the gate gradients [B, G*H] and, streamed, the weight columns of own outputs.
        grad_bytes = weight_bytes if exchanges_grad_x(config) else 4
        read = (batch * plan.block_h * (config.cell.workspace_gates + 2) * 4
                + batch * gates * hidden * grad_bytes
                + streamed * chunks * gates * hidden * plan.block_r * weight_bytes)
    else:
        phases = 2 if config.proj_size else 1
        # every program reads all of h [B, P], and its weight rows when streamed.
        read = (batch * out_size * state_bytes
                + streamed * chunks * pow2(gates) * plan.block_h * out_size * weight_bytes)
        if config.proj_size:
            read += batch * hidden * 4 + streamed * chunks * hidden * plan.block_r * weight_bytes
    launch = 0.0 if plan.persistent else 4.3 * phases
    return phases * BARRIER_US + launch + read / L2_BYTES_PER_US_PER_SM
