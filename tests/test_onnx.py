"""ONNX export: fastrnn layers become ONNX's LSTM / GRU / RNN operators (torch.onnx.export with
dynamo=True, and the TorchScript-based exporter), with dynamic batch and time axes and the
lengths of packed input as sequence_lens; onnxruntime runs the exported models like torch.nn."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn

pytestmark = pytest.mark.filterwarnings("ignore")


class Model(nn.Module):
    """A recurrence (or cell) taking x and, optionally, its initial state; returns every output."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h0=None, c0=None):
        output = self.rnn(x, h0 if c0 is None else (h0, c0))
        if isinstance(output, Tensor):
            return output
        return tuple(_flatten(output))


class PackedModel(nn.Module):
    """A recurrence over a PackedSequence given as its four tensors."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, data, batch_sizes, sorted_indices, unsorted_indices):
        output, state = self.rnn(PackedSequence(data, batch_sizes, sorted_indices,
                                                unsorted_indices))
        return (output.data, *_flatten([state]))



def _flatten(values):
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from _flatten(value)
        else:
            yield value


# name: (maker over a module library, ONNX operator, input shapes [T, B, I] to export and rerun,
#        state shapes or None)
CASES = {
    "lstm-2layer-bi": (lambda lib: lib.LSTM(3, 5, num_layers=2, bidirectional=True), "LSTM",
                       ((5, 2, 3), (9, 4, 3)), None),
    "lstm-with-state": (lambda lib: lib.LSTM(3, 5), "LSTM", ((5, 2, 3), (7, 3, 3)),
                        ((1, 5), (1, 5))),
    "gru-batch-first": (lambda lib: lib.GRU(3, 7, batch_first=True), "GRU",
                        ((2, 5, 3), (4, 9, 3)), None),
    "gru-bi-state": (lambda lib: lib.GRU(3, 4, bidirectional=True), "GRU", ((5, 2, 3), (8, 1, 3)),
                     ((2, 4),)),
    "rnn-relu-bi": (lambda lib: lib.RNN(3, 4, nonlinearity="relu", bidirectional=True), "RNN",
                    ((5, 2, 3), (6, 5, 3)), None),
    "rnn-tanh-no-bias-2layer": (lambda lib: lib.RNN(3, 4, num_layers=2, bias=False), "RNN",
                                ((5, 2, 3), (3, 6, 3)), None),
}


def pair(make):
    torch.manual_seed(0)
    theirs = Model(make(nn)).eval()
    ours = Model(make(fastrnn)).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def inputs_for(shape, states, batch_first=False):
    x = torch.randn(shape)
    batch = shape[0] if batch_first else shape[1]
    if states is None:
        return (x,)
    return (x, *(torch.randn(layers, batch, size) for layers, size in states))


def run_onnx(program_or_path, inputs):
    model = program_or_path
    if not isinstance(model, str):
        model = model.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(model)
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})


def assert_matches(got, want, atol=1e-5):
    want = [want] if isinstance(want, Tensor) else list(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.detach().numpy(), atol=atol, rtol=1e-4)


def dynamic_shapes(inputs, batch_first=False):
    x_dims = {0: "batch", 1: "time"} if batch_first else {0: "time", 1: "batch"}
    return (x_dims, *({1: "batch"} for _ in inputs[1:]))


@pytest.mark.parametrize("name", CASES)
def test_dynamo_export_runs_in_onnxruntime_like_torch(name):
    make, operator, shapes, states = CASES[name]
    theirs, ours = pair(make)
    batch_first = ours.rnn.batch_first
    first = inputs_for(shapes[0], states, batch_first)
    program = torch.onnx.export(ours, first, dynamo=True, verbose=False,
                                dynamic_shapes=dynamic_shapes(first, batch_first))
    ops = [node.op_type for node in program.model_proto.graph.node]
    assert ops.count(operator) == ours.rnn.num_layers, ops
    for inputs in (first, inputs_for(shapes[1], states, batch_first)):  # other T and B
        got = run_onnx(program, inputs)
        assert_matches(got, theirs(*inputs))
        assert_matches(got, ours(*inputs))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_packed_input_exports_with_sequence_lens(kind):
    make = {"lstm": lambda lib: lib.LSTM(3, 5, num_layers=2, bidirectional=True),
            "gru": lambda lib: lib.GRU(3, 4, bidirectional=True)}[kind]
    torch.manual_seed(0)
    theirs, ours = PackedModel(make(nn)).eval(), PackedModel(make(fastrnn)).eval()
    ours.load_state_dict(theirs.state_dict())

    def packed(batch, steps):
        lengths = torch.randint(1, steps + 1, (batch,))
        lengths[0] = steps
        return tuple(pack_padded_sequence(torch.randn(steps, batch, 3), lengths,
                                          enforce_sorted=False))

    first = packed(3, 5)
    program = torch.onnx.export(ours, first, dynamo=True, verbose=False,
                                dynamic_shapes=({0: "rows"}, {0: "time"}, {0: "batch"},
                                                {0: "batch"}))
    nodes = [n for n in program.model_proto.graph.node if n.op_type == kind.upper()]
    assert nodes and all(len(n.input) > 4 and n.input[4] for n in nodes)  # sequence_lens
    for inputs in (first, packed(6, 8), packed(1, 3)):
        got = run_onnx(program, inputs)
        assert_matches(got, theirs(*inputs))


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_exports_like_torch(kind):
    torch.manual_seed(0)
    theirs = Model(getattr(nn, kind)(3, 4)).eval()
    ours = Model(getattr(fastrnn, kind)(3, 4)).eval()
    ours.load_state_dict(theirs.state_dict())
    first = (torch.randn(2, 3),)
    program = torch.onnx.export(ours, first, dynamo=True, verbose=False,
                                dynamic_shapes=({0: "batch"},))
    for inputs in (first, (torch.randn(5, 3),)):
        assert_matches(run_onnx(program, inputs), theirs(*inputs))


def test_unbatched_input_exports():
    theirs, ours = pair(lambda lib: lib.LSTM(3, 4, bidirectional=True))
    x = torch.randn(6, 3)
    program = torch.onnx.export(ours, (x,), dynamo=True, verbose=False,
                                dynamic_shapes=({0: "time"},))
    for inputs in ((x,), (torch.randn(9, 3),)):
        assert_matches(run_onnx(program, inputs), theirs(*inputs))


def test_projection_is_refused_with_a_clear_error():
    ours = Model(fastrnn.LSTM(3, 4, proj_size=2)).eval()
    for dynamo in (True, False):
        with pytest.raises(Exception, match="proj_size > 0 cannot be exported to ONNX"):
            torch.onnx.export(ours, (torch.randn(5, 2, 3),), dynamo=dynamo, verbose=False)


@pytest.mark.parametrize("name", ["lstm-2layer-bi", "gru-batch-first", "rnn-relu-bi"])
def test_torchscript_exporter_runs_in_onnxruntime_like_torch(name, tmp_path):
    make, operator, shapes, states = CASES[name]
    theirs, ours = pair(make)
    batch_first = ours.rnn.batch_first
    first = inputs_for(shapes[0], states, batch_first)
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ours, first, path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "a", 1: "b"}})
    for inputs in (first, inputs_for(shapes[1], states, batch_first)):
        assert_matches(run_onnx(path, inputs), theirs(*inputs))


def test_torchscript_exporter_refuses_packed_input_naming_dynamo(tmp_path):
    ours = PackedModel(fastrnn.LSTM(3, 4)).eval()
    inputs = tuple(pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3])))
    with pytest.raises(Exception, match=r"packed sequences export to ONNX with "
                                        r"torch.onnx.export\(..., dynamo=True\)"):
        torch.onnx.export(ours, inputs, str(tmp_path / "m.onnx"), dynamo=False)
