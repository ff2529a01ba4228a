"""Plans for the `cuda` backend (csrc/cuda): work split, batch tiles and shared-memory layout.

Legend as in base.py; K+ is a row length padded to PAD elements, NG the gates of one row dot.
A plan splits the batch into `groups` groups and gives each direction and group `blocks` blocks of
256 threads, at most one block per SM (so a cooperative grid of D * groups * blocks is co-resident
whenever the GPU is free), each owning `units` hidden units (all their gates) and `outputs`
projection outputs for its group's batch rows: more groups mean fewer rows of h for each block to
copy per step, but more weight rows per block. A block keeps its weight rows in shared memory
(resident) or re-reads them from L2 every step (streamed, where they do not fit); either way one
cooperative launch runs the sequence. Step-wise (one launch per step and phase) is taken only when
asked for or when the device cannot launch cooperatively. Each phase runs over batch tiles of
`tile_rows` rows (all of B where it fits), and splits its row dots' K into `k_split` parts.

Every candidate is scored by a stated cost model (estimate_us_per_step: a grid barrier per phase,
the tile copy from L2, the row dots at the SM's FMA, shared-memory and shuffle rates) and the
cheapest one that fits the device is taken. The layout computed here (tile_offset, pre_offset,
shared_bytes) is the one the kernels use: they read it from the plan.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .base import LayerConfig
from .triton_plan import Device

THREADS = 256  # kThreads
WARPS = THREADS // 32
PAD = 8  # kFastrnnPad
PAIRS_PER_THREAD = 4  # kPairsPerThread: epilogue pairs of one thread per batch tile
BATCH_PER_ITEM = 8  # kBatchPerItem: BB


def dot_rows(gates: int) -> int:
    """UB: rows of one warp item of a row dot over `gates` gates (DotRows in recurrence.cuh)."""
    return 4 if gates == 1 else 2


PATHS = ("resident", "streamed", "step-wise")  # FastrnnPath codes 0, 1, 2

# Cost model constants (H100/H200 SXM; ../shared/ANCHORS.md where measured, else data sheet).
CLOCK_GHZ = 1.75
FMA_PER_CLOCK = 128  # fp32 lanes per SM
SHARED_BYTES_PER_CLOCK = 128  # per SM
SHUFFLES_PER_CLOCK = 1  # warp shuffles per SM
BARRIER_US = 1.2  # cooperative-groups grid sync over 132 blocks (measured)
L2_BYTES_PER_US_PER_SM = 34_000  # one SM's share of L2 reads (measured, see triton_plan)
TILE_LATENCY_US = 0.7  # a tile copy's first bytes plus the epilogue's stores (modelled)
LAUNCH_US = 4.3  # one kernel launched from Python (measured)


def padded(k: int) -> int:
    return -(-k // PAD) * PAD


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align16(n: int) -> int:
    return cdiv(n, 16) * 16


@dataclasses.dataclass(frozen=True)
class Phase:
    """One row-dot phase of a step: `gates` x `rows` weight rows of length K (unpadded)."""

    gates: int
    rows: int
    length: int


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str  # one of PATHS
    groups: int  # batch groups
    blocks: int  # per direction and group
    units: int
    outputs: int
    tile_rows: int
    k_split: tuple[int, int]  # per phase
    tile_offset: int  # bytes into shared memory
    pre_offset: int
    shared_bytes: int
    us_per_step: float  # estimate_us_per_step of this plan (modelled, not measured)
    reason: str = ""  # why the layer does not run resident, or ""

    def as_list(self) -> list[int]:
        """The FastrnnPlan the binding takes (csrc/cuda/binding.cpp make_plan)."""
        return [PATHS.index(self.path), self.groups, self.blocks, self.units, self.outputs,
                self.tile_rows, *self.k_split, self.tile_offset, self.pre_offset, self.shared_bytes]

    def grid(self, num_directions: int) -> int:
        return num_directions * self.groups * self.blocks

    def group_rows(self, batch: int) -> int:
        return cdiv(batch, self.groups)

    def blocks_per_sm(self, num_directions: int, device: Device) -> int:
        return cdiv(self.grid(num_directions), device.sm_count)

    def describe(self, num_directions: int, device: Device) -> str:
        return (f"{self.path}: {self.grid(num_directions)} blocks "
                f"({self.blocks_per_sm(num_directions, device)}/SM, {self.groups} batch groups), {self.units} units"
                f"{f' + {self.outputs} outputs' if self.outputs else ''}/block, tile "
                f"{self.tile_rows} rows, k split {self.k_split[0]}/{self.k_split[1]}, "
                f"{self.shared_bytes} B shared")


def phases(config: LayerConfig, units: int, outputs: int, backward: bool) -> list[Phase]:
    """The row-dot phases of one step, in the order of the kernel's k_split."""
    hidden, gates = config.hidden_size, config.cell.gates
    out_size = config.proj_size or hidden
    if not backward:
        result = [Phase(gates, units, out_size)]
        if config.proj_size:
            result.append(Phase(1, outputs, hidden))
        return result
    if config.proj_size:  # reduce over W_hh^T rows of own outputs, then W_hr^T rows of own units
        return [Phase(1, outputs, gates * hidden), Phase(1, units, out_size)]
    return [Phase(1, units, gates * hidden)]


def resident_elements(config: LayerConfig, units: int, outputs: int, backward: bool) -> int:
    """Weight elements a block stages (layout of stage_rows in forward.cu / backward.cu)."""
    hidden, gates = config.hidden_size, config.cell.gates
    out_size = config.proj_size or hidden
    if not backward:
        return gates * units * padded(out_size) + (outputs * padded(hidden) if config.proj_size else 0)
    if config.proj_size:
        return outputs * padded(gates * hidden) + units * padded(out_size)
    return units * padded(gates * hidden)


@functools.cache
def _scatter_shuffles(n: int) -> int:
    """Warp shuffles of reduce_scatter over n values per lane (recurrence.cuh)."""
    total, offset = 0, 16
    while offset:
        if n % 2 == 0:
            n //= 2
        total += n
        offset //= 2
    return total


def dot_cycles(phase: Phase, tile_rows: int, k_split: int, element_bytes: int,
               streamed: bool) -> float:
    """Modelled SM cycles of one phase's row dots over one batch tile: rounds of 8 warp items,
    each a run of 4-element chunks per lane (bound by FMA, shared-memory or, streamed, L2 bytes)
    and a reduce-scatter."""
    rows_per_item, batch = dot_rows(phase.gates), BATCH_PER_ITEM
    values = phase.gates * rows_per_item * batch
    items = cdiv(phase.rows, rows_per_item) * cdiv(tile_rows, batch) * k_split
    chunks = cdiv(cdiv(padded(phase.length) // 4, k_split), 32)
    weight_bytes = phase.gates * rows_per_item * 32 * 4 * element_bytes  # per warp and chunk
    fma = WARPS * values * 4 * 32 / FMA_PER_CLOCK
    shared = WARPS * (batch * 32 * 16 + (0 if streamed else weight_bytes)) / SHARED_BYTES_PER_CLOCK
    l2 = WARPS * weight_bytes / (L2_BYTES_PER_US_PER_SM / (CLOCK_GHZ * 1000)) if streamed else 0.0
    rounds = cdiv(items, WARPS)
    return rounds * (chunks * max(fma, shared, l2) + WARPS * _scatter_shuffles(values) / SHUFFLES_PER_CLOCK)


def best_k_split(phase: Phase, tile_rows: int, element_bytes: int, streamed: bool) -> int:
    """The K split (1..8) with the fewest modelled cycles; the smaller on a tie."""
    if phase.rows == 0:
        return 1
    return min(range(1, 9), key=lambda ks: (dot_cycles(phase, tile_rows, ks, element_bytes, streamed), ks))


def estimate_us_per_step(config: LayerConfig, path: str, group_rows: int, tile_rows: int,
                         step_phases: list[Phase], k_split: tuple[int, int]) -> float:
    """Modelled time of one step of one block (all run at once): per phase a grid barrier (or a
    launch, step-wise), then per batch tile of its group its copy from L2, a fixed latency and the
    row dots."""
    element_bytes = torch.finfo(config.dtype).bits // 8
    streamed = path != "resident"
    tiles = cdiv(group_rows, tile_rows)
    total = 0.0
    for phase, ks in zip(step_phases, k_split):
        copy = group_rows * padded(phase.length) * 4 / L2_BYTES_PER_US_PER_SM
        cycles = tiles * dot_cycles(phase, tile_rows, ks, element_bytes, streamed)
        total += (LAUNCH_US if path == "step-wise" else BARRIER_US) + tiles * TILE_LATENCY_US + copy
        total += cycles / (CLOCK_GHZ * 1000)
    return total


def _layout(config: LayerConfig, path: str, groups: int, blocks: int, tile_rows: int,
            backward: bool) -> Plan | None:
    """The plan for this split and tile, or None when it does not fit one block's shared memory
    or the epilogue's registers."""
    hidden = config.hidden_size
    units, outputs = cdiv(hidden, blocks), cdiv(config.proj_size, blocks) if config.proj_size else 0
    step_phases = phases(config, units, outputs, backward)
    if tile_rows * max(p.rows for p in step_phases) > PAIRS_PER_THREAD * THREADS:
        return None
    element_bytes = torch.finfo(config.dtype).bits // 8
    streamed = path != "resident"
    k_split = [best_k_split(p, tile_rows, element_bytes, streamed) for p in step_phases]
    weights = 0 if streamed else resident_elements(config, units, outputs, backward) * element_bytes
    tile_offset = align16(weights)
    pre_offset = tile_offset + align16(tile_rows * max(padded(p.length) for p in step_phases) * 4)
    pre_bytes = max(ks * tile_rows * p.gates * p.rows * 4 for p, ks in zip(step_phases, k_split))
    k_split += [1] * (2 - len(k_split))
    estimate = estimate_us_per_step(config, path, cdiv(config.batch_size, groups), tile_rows,
                                    step_phases, tuple(k_split))
    return Plan(path, groups, blocks, units, outputs, tile_rows, tuple(k_split), tile_offset,
                pre_offset, pre_offset + align16(pre_bytes), estimate)


def _fits(plan: Plan, device: Device) -> bool:
    """One block of the plan fits an SM: its shared memory within the opt-in limit and, with the
    1 KB the driver reserves per block, within the SM's."""
    return (plan.shared_bytes <= device.shared_bytes_per_program
            and plan.shared_bytes + 1024 <= device.shared_bytes)


def _tile_choices(batch: int) -> list[int]:
    """Tile row counts, whole batch first: ceil(B / n) for n = 1, 2, ... (distinct)."""
    return sorted({cdiv(batch, n) for n in range(1, batch + 1)}, reverse=True)


def _group_choices(batch: int) -> list[int]:
    """Batch groups 1, 2, 4, 8 where each group has rows (the last one too)."""
    return [g for g in (1, 2, 4, 8) if g <= batch and (g - 1) * cdiv(batch, g) < batch]


def _block_choices(hidden: int, limit: int) -> list[int]:
    """Blocks per direction up to `limit`: each distinct ceil(H / units)."""
    return sorted({cdiv(hidden, cdiv(hidden, n)) for n in range(1, min(hidden, limit) + 1)})


def choose(config: LayerConfig, device: Device, backward: bool, stepwise: bool = False) -> Plan:
    """The cheapest plan that fits `device`, at most one block per SM. stepwise: the device
    cannot launch cooperatively, or step-wise launches were asked for."""
    best: dict[str, Plan] = {}
    for path in (("step-wise",) if stepwise else ("resident", "streamed")):
        for groups in _group_choices(config.batch_size):
            limit = device.sm_count // (config.num_directions * groups)
            for blocks in _block_choices(config.hidden_size, limit):
                for tile_rows in _tile_choices(cdiv(config.batch_size, groups)):
                    plan = _layout(config, path, groups, blocks, tile_rows, backward)
                    if plan is None or not _fits(plan, device):
                        continue
                    if path not in best or plan.us_per_step < best[path].us_per_step:
                        best[path] = plan
                    break  # fewer tile rows only cost more
    if not best:
        raise ValueError(f"no cuda plan fits one block of {device.name} for {config}")
    if stepwise:
        return dataclasses.replace(best["step-wise"], reason="step-wise launches")
    chosen = min(best.values(), key=lambda plan: plan.us_per_step)
    if chosen.path == "resident":
        return chosen
    if "resident" in best:
        why = (f"the resident plan models slower ({best['resident'].us_per_step:.1f} us/step: "
               f"its weights leave too little shared memory for the batch tile)")
    else:
        why = (f"the weight rows of even {device.sm_count // config.num_directions} blocks per "
               f"direction exceed the {device.shared_bytes_per_program} bytes of shared memory of a block")
    return dataclasses.replace(chosen, reason=why)
