"""The layers and plans the triton backend tests launch, in one place: tests/test_triton_backend.py
runs them (on a GPU, or under the Triton interpreter), and tests/test_triton_gpu_compile.py
compiles every one a GPU would launch for sm_90, offline, so that a plan only the interpreter
accepts (a tl.dot with K < 16, say) never reaches a GPU run.

Plans forced by a test come in two sizes: tiny ones for the interpreter, which runs every program
in Python, and the smallest a GPU compiles (tiles of at least 16 rows of K, 16 batch rows).
"""

from __future__ import annotations

import dataclasses

import torch

from fastrnn.backends.base import LayerConfig
from fastrnn.backends.triton_plan import Plan
from fastrnn.cells import CELLS

# cell, T, B, H, proj, D, bias, variable lengths, dtype: each planned as on the device it runs on
CASES = [
    ("lstm", 4, 3, 5, 0, 2, True, True, torch.float32),
    ("lstm", 3, 2, 6, 3, 2, True, True, torch.float32),
    ("lstm", 3, 2, 4, 2, 1, False, False, torch.float32),
    ("gru", 4, 3, 5, 0, 2, True, True, torch.float32),
    ("gru", 3, 2, 4, 0, 1, False, False, torch.float32),
    ("rnn_tanh", 4, 3, 7, 0, 2, True, True, torch.float32),
    ("rnn_relu", 3, 2, 5, 0, 1, True, False, torch.float32),
    ("lstm", 1, 1, 1, 0, 2, True, False, torch.float32),  # T = B = H = 1
    ("gru", 2, 1, 1, 0, 2, True, True, torch.float32),
    ("rnn_relu", 1, 3, 7, 0, 2, False, True, torch.float32),
    ("lstm", 3, 2, 5, 3, 2, True, True, torch.float16),
    ("gru", 3, 2, 5, 0, 2, True, True, torch.float16),
    ("rnn_tanh", 3, 2, 5, 0, 1, True, False, torch.float16),
    ("lstm", 3, 2, 5, 0, 2, True, True, torch.bfloat16),
    ("gru", 3, 2, 4, 0, 1, True, False, torch.bfloat16),
]


@dataclasses.dataclass(frozen=True)
class MultiProgram:
    """Sizes of the several-programs tests: `hidden` in blocks of `block_h` is 3 programs per
    direction (the projection's `proj` columns in blocks of `block_r`); `batch` rows for the
    one-group tests, `grouped_batch` rows in 2 groups (`group_rows` and the rest)."""

    hidden: int
    proj: int
    block_h: int
    block_r: int
    block_b: int
    block_k: int
    batch: int
    grouped_batch: int
    group_rows: int

    def plan(self, proj: bool, resident: bool, persistent: bool, batch_groups: int = 1) -> Plan:
        return Plan(block_h=self.block_h, block_r=self.block_r if proj else self.block_h,
                    block_b=self.block_b, resident=resident, persistent=persistent,
                    block_k=self.block_k, batch_groups=batch_groups)


INTERPRETER_SIZES = MultiProgram(hidden=9, proj=5, block_h=4, block_r=2, block_b=2, block_k=4,
                                 batch=3, grouped_batch=5, group_rows=4)
GPU_SIZES = MultiProgram(hidden=40, proj=20, block_h=16, block_r=8, block_b=16, block_k=16,
                         batch=3, grouped_batch=20, group_rows=16)
MULTI_PROGRAM_CELLS = [("lstm", True), ("lstm", False), ("gru", False), ("rnn_relu", False)]


def multi_program_launches(sizes: MultiProgram):
    """(test, cell name, uses proj, plan, batch) of every several-programs launch on a device."""
    for name, proj in MULTI_PROGRAM_CELLS:
        for resident in (True, False):
            yield ("one_launch_per_phase", name, proj,
                   sizes.plan(proj, resident, persistent=False), sizes.batch)
        yield ("batch_groups", name, proj,
               sizes.plan(proj, True, persistent=False, batch_groups=2), sizes.grouped_batch)


def layer_config(name: str, batch: int, hidden: int, proj: int, directions: int, variable: bool,
                 dtype: torch.dtype, device_type: str = "cuda") -> LayerConfig:
    return LayerConfig(cell=CELLS[name], device_type=device_type, dtype=dtype, batch_size=batch,
                       seq_len=0, hidden_size=hidden, proj_size=proj,
                       num_directions=directions, variable_lengths=variable)


# The layers test_modules_match_torch runs through the modules (planned on the device):
# an LSTM 3 -> 5, 2 layers, bidirectional, proj 2, packed (batch 2); a GRU 3 -> 4 (batch 2).
MODULE_LAYERS = [
    ("lstm", 2, 5, 2, 2, True, torch.float32),
    ("gru", 2, 4, 0, 1, False, torch.float32),
]


def planned_layers():
    """LayerConfigs of every layer a GPU test runs with the planner's own plans."""
    for name, _, batch, hidden, proj, directions, _, variable, dtype in CASES:
        yield layer_config(name, batch, hidden, proj, directions, variable, dtype)
    for name, batch, hidden, proj, directions, variable, dtype in MODULE_LAYERS:
        yield layer_config(name, batch, hidden, proj, directions, variable, dtype)
