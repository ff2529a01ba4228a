"""Small batches (B = 1, 3, 8), where a step is bound by reading its weights: every cell, float32
and bfloat16, layers of T 1 and 7 and cells, on every path of the cpu kernels (FASTRNN_CPU_ISA x
FASTRNN_CPU_SPLIT x 1 or 2 threads, one child process each), judged against torch.nn in float64
by the fidelity rule (README, "Tests": at most 2x torch.nn's own error in the dtype plus 8 ulp of
the tensor's scale)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

import fastrnn

pytestmark = pytest.mark.skipif(fastrnn.available_backends().get("cpu") != "",
                                reason="needs the cpu kernels")

_CHILD = r"""
import sys, torch, fastrnn
from torch import nn
torch.set_num_threads(int(sys.argv[1]))
checked = 0
for dtype in (torch.float32, torch.bfloat16):
    eps = torch.finfo(dtype).eps
    for name in ("LSTM", "GRU", "RNN"):
        for batch in (1, 3, 8):
            for seq in (1, 7):
                torch.manual_seed(batch * 10 + seq)
                oracle = getattr(nn, name)(19, 24, num_layers=2, dtype=torch.float64)
                theirs = getattr(nn, name)(19, 24, num_layers=2, dtype=dtype)
                theirs.load_state_dict(oracle.state_dict())
                ours = getattr(fastrnn, name).from_torch(theirs, backend="cpu")
                x = torch.randn(seq, batch, 19, dtype=torch.float64)
                results = []
                for module, precision in ((oracle, torch.float64), (theirs, dtype), (ours, dtype)):
                    leaf = x.to(precision).requires_grad_()
                    output, _ = module(leaf)
                    grads = torch.autograd.grad(output.double().sum(), [leaf, *module.parameters()])
                    with torch.no_grad():
                        inference, _ = module(x.to(precision))
                    results.append([output.double(), inference.double(), *(g.double() for g in grads)])
                for index, (exact, mine, their) in enumerate(zip(*[results[0], results[2], results[1]])):
                    allowed = 2 * (their - exact).abs().max() + 8 * eps * exact.abs().max()
                    assert (mine - exact).abs().max() <= allowed, (name, dtype, batch, seq, index)
                checked += 1
            cell = getattr(nn, name + "Cell")(19, 24, dtype=dtype)
            ours_cell = getattr(fastrnn, name + "Cell").from_torch(cell)
            step = torch.randn(batch, 19).to(dtype)
            with torch.no_grad():
                got, want = ours_cell(step), cell(step)
            got, want = (got[0], want[0]) if name == "LSTM" else (got, want)
            assert (got.double() - want.double()).abs().max() <= 8 * eps * 4, (name, dtype, batch)
print("checked", checked)
"""

SETTINGS = list(itertools.product(["", "avx2", "generic"], ["rows", "units"], [1, 2]))


@pytest.mark.parametrize("isa,split,threads", SETTINGS,
                         ids=[f"{isa or 'native'}-{split}-{threads}t" for isa, split, threads
                              in SETTINGS])
def test_small_batches_on_every_path(isa, split, threads):
    env = {**os.environ, "FASTRNN_CPU_SPLIT": split}
    if isa:
        env["FASTRNN_CPU_ISA"] = isa
    child = subprocess.run([sys.executable, "-c", _CHILD, str(threads)], capture_output=True,
                           text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip() == "checked 36"
