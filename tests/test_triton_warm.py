"""The triton backend's ahead-of-launch compile (`prepare`, run on admission's background thread)
compiles, offline, exactly the kernels a launch then looks up: in a child process without the
interpreter, with Triton's driver replaced by one that answers for an sm_90 device, `_warm`
compiles each pass once from meta tensors, and binding real tensors of other T and B (as a launch
does) finds them compiled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_CHILD = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class Sm90:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


driver.set_active(Sm90())
from fastrnn.backends import triton as triton_backend, triton_plan
from fastrnn.backends.base import LayerConfig
from fastrnn.cells import CELLS

triton_backend.cuda_device = lambda index: triton_plan.TARGETS["sm_90"]
kernels = triton_backend._kernels()
device = torch.device("cuda", 0)


def compiled():
    return [len(kernel.device_caches[0][0]) if kernel.device_caches else 0
            for kernel in (kernels._recurrence_fwd_kernel, kernels._recurrence_bwd_kernel)]


cases = [("lstm", torch.float32, 40, 0, 1, False), ("lstm", torch.bfloat16, 24, 16, 2, True),
         ("gru", torch.float16, 33, 0, 2, True)]
for name, dtype, hidden, proj, directions, lengths in cases:
    cell = CELLS[name]
    config = LayerConfig(cell, "cuda", dtype, 5, 0, hidden, proj, directions, lengths)
    before = compiled()
    triton_backend._warm(config, True, device)
    warmed = compiled()
    assert [w - b for w, b in zip(warmed, before)] == [1, 1], (name, before, warmed)
    # a launch binds real tensors (here of T 7 instead of 1): the same compiled kernels
    out = proj or hidden
    real = dict(dtype=dtype)
    x_gates = torch.randn(7, 5, directions * cell.gates * hidden).to(**real)
    h0 = torch.randn(directions, 5, out).to(**real)
    c0 = torch.randn(directions, 5, hidden).to(**real) if cell.has_cell_state else None
    w_hh = torch.randn(directions, cell.gates * hidden, out).to(**real)
    b_hh = torch.randn(directions, cell.gates * hidden).to(**real)
    w_hr = torch.randn(directions, out, hidden).to(**real) if proj else None
    lens = torch.tensor([7, 3, 1, 7, 2]) if lengths else None
    plan = triton_backend.plan_layer(config, device)
    output, _, _, workspace = triton_backend.forward_layer(cell, x_gates, h0, c0, w_hh, b_hh,
                                                           w_hr, lens, plan, warm_on=device)
    triton_backend.backward_layer(cell, torch.randn(output.shape).to(**real),
                                  torch.randn(h0.shape).to(**real),
                                  None if c0 is None else torch.randn(c0.shape).to(**real), h0, c0,
                                  w_hh, w_hr, lens, output, workspace,
                                  triton_backend.plan_layer(config, device, backward=True),
                                  warm_on=device)
    assert compiled() == warmed, (name, warmed, compiled())
    print(f"{name} {dtype} H{hidden} P{proj} D{directions} lengths={lengths}: warmed {warmed}")
print("warm: ok")
"""


def test_prepare_compiles_the_kernels_a_launch_looks_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTRNN_CACHE_DIR=str(tmp_path), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    result = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.splitlines()[-1] == "warm: ok", result.stdout
