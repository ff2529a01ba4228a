"""TorchScript: torch.jit.trace records fastrnn layers as their custom ops and passes its own check;
the trace runs other shapes, and trains, like torch.nn; torch.jit.script refuses with a message
naming what works instead (torch 2.13 cannot script its own torch.nn.LSTM either)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fastrnn

# the modules' shape checks read sizes as Python numbers, as torch.nn's do
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


class Model(nn.Module):
    """A recurrence (or cell) and a linear head over its output."""

    def __init__(self, rnn: nn.Module, features: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(features, 2)

    def forward(self, x):
        output = self.rnn(x)
        output = output[0] if isinstance(output, tuple) else output
        return self.head(output)


MODELS = {  # name: (torch.nn model maker, features into the head, input shapes to trace and rerun)
    "lstm-2layer-bi": (lambda lib: lib.LSTM(3, 4, num_layers=2, bidirectional=True), 8,
                       ((5, 2, 3), (9, 4, 3))),
    "gru-batch-first": (lambda lib: lib.GRU(3, 4, batch_first=True), 4, ((2, 5, 3), (3, 8, 3))),
    "rnn-relu": (lambda lib: lib.RNN(3, 4, nonlinearity="relu"), 4, ((5, 2, 3), (2, 6, 3))),
    "lstm-proj": (lambda lib: lib.LSTM(3, 4, proj_size=2), 2, ((5, 2, 3), (7, 1, 3))),
    "lstm-cell": (lambda lib: lib.LSTMCell(3, 4), 4, ((2, 3), (5, 3))),
}


def pair(name):
    """(torch.nn model, fastrnn model with the same weights)."""
    make, features, _ = MODELS[name]
    torch.manual_seed(0)
    theirs = Model(make(nn), features)
    ours = Model(make(fastrnn), features)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("name", MODELS)
def test_trace_passes_its_check_and_runs_other_shapes_like_torch(name):
    theirs, ours = pair(name)
    first, second = (torch.randn(shape) for shape in MODELS[name][2])
    traced = torch.jit.trace(ours, (first,))  # check_trace: traces again and compares graphs
    assert any("fastrnn::" in node.kind() for node in traced.inlined_graph.nodes())
    for x in (first, second):
        torch.testing.assert_close(traced(x), theirs(x))


@pytest.mark.parametrize("name", ["lstm-2layer-bi", "gru-batch-first", "lstm-cell"])
def test_traced_model_trains_like_torch(name):
    theirs, ours = pair(name)
    first, second = (torch.randn(shape) for shape in MODELS[name][2])
    traced = torch.jit.trace(ours, (first,))
    traced(second).square().sum().backward()
    theirs(second).square().sum().backward()
    for (key, got), want in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(got.grad, want.grad, msg=key)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_script_refuses_with_a_clear_message(name):
    text = (f"fastrnn.{name} cannot be compiled by torch.jit.script (its layers are custom ops "
            "run from Python): use torch.jit.trace, torch.export or torch.compile on it, or "
            f"module.to_torch() for a torch.nn.{name} with the same weights")
    for module in (getattr(fastrnn, name)(3, 4), Model(getattr(fastrnn, name)(3, 4), 4)):
        with pytest.raises(RuntimeError, match=re.escape(text)):
            torch.jit.script(module)
