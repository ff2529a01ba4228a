"""Zero-size dimensions (B = 0, H = 0 for the cells, I = 0 for the cells, and proj_size with B = 0)
give torch.nn's empty results and gradients on every backend. Each backend runs in a child
process, so that a crash (a division by zero in a kernel, say) fails the test, not the run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import every_backend_here

CHILD = r"""
import sys, warnings
import torch
from torch import nn
import fastrnn

warnings.simplefilter("ignore")
backend = sys.argv[1]
torch.manual_seed(0)


def compare(theirs, ours, inputs):
    # forward and the gradients of every input and parameter, fastrnn against torch.nn
    results = []
    for module in (theirs, ours):
        leaves = [t.clone().requires_grad_() for t in inputs]
        hx = None
        if len(leaves) > 1:
            hx = tuple(leaves[1:]) if len(leaves) == 3 else leaves[1]
        out = module(leaves[0], hx)
        flat = [o for item in (out if isinstance(out, tuple) else (out,))
                for o in (item if isinstance(item, tuple) else (item,))]
        loss = sum(o.sum() for o in flat)
        wrt = leaves + list(module.parameters())
        grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else ()
        results.append((flat, grads))
    for got, want in zip(results[1][0] + list(results[1][1]), results[0][0] + list(results[0][1])):
        if want is None:
            assert got is None or not got.any()
            continue
        assert got.shape == want.shape, (got.shape, want.shape)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


count = 0
cells = [(nn.RNNCell, fastrnn.RNNCell, {}), (nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "relu"}),
         (nn.GRUCell, fastrnn.GRUCell, {}), (nn.LSTMCell, fastrnn.LSTMCell, {})]
for torch_cls, fast_cls, kwargs in cells:
    lstm = torch_cls is nn.LSTMCell
    for input_size, hidden, batch in ((10, 0, 3), (10, 5, 0), (0, 5, 3), (10, 0, 0)):
        theirs = torch_cls(input_size, hidden, **kwargs)
        ours = fast_cls.from_torch(theirs, backend=backend)
        x = torch.randn(batch, input_size)
        states = [torch.randn(batch, hidden) for _ in range(2 if lstm else 1)]
        compare(theirs, ours, [x])
        compare(theirs, ours, [x, *states])
        count += 2
for torch_cls, fast_cls in ((nn.RNN, fastrnn.RNN), (nn.GRU, fastrnn.GRU), (nn.LSTM, fastrnn.LSTM)):
    for kwargs in ({}, {"bidirectional": True, "num_layers": 2}, {"batch_first": True}):
        theirs = torch_cls(4, 5, **kwargs)
        ours = fast_cls.from_torch(theirs, backend=backend)
        shape = (0, 7, 4) if kwargs.get("batch_first") else (7, 0, 4)
        compare(theirs, ours, [torch.randn(shape)])
        count += 1
theirs = nn.LSTM(4, 5, proj_size=2, bidirectional=True)
compare(theirs, fastrnn.LSTM.from_torch(theirs, backend=backend), [torch.randn(7, 0, 4)])
print("compared", count + 1)
"""


@pytest.mark.parametrize("backend", every_backend_here())
def test_zero_size_shapes_match_torch_in_a_child_process(backend):
    child = subprocess.run([sys.executable, "-c", CHILD, backend], capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stdout}\n{child.stderr[-3000:]}"
    assert "compared 42" in child.stdout, child.stdout
