"""Drop-in API: constructor, attributes, parameters, init, repr, state_dict, conversion, cells,
dropout, pack_sequence, inputs left unmodified, autocast."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from helpers import cpu_backends

CONFIGS = [
    (nn.LSTM, fastrnn.LSTM, (5, 7), dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True, dropout=0.1)),
    (nn.LSTM, fastrnn.LSTM, (5, 7, 3, False), {}),
    (nn.GRU, fastrnn.GRU, (5, 7, 2), dict(bidirectional=True)),
    (nn.RNN, fastrnn.RNN, (5, 7, 2, "relu"), dict(bias=False)),
    (nn.RNN, fastrnn.RNN, (5, 7), dict(nonlinearity="tanh")),
]
CONFIG_IDS = ["lstm-full", "lstm-positional", "gru-bi", "rnn-relu-positional", "rnn-tanh"]

ATTRIBUTES = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
              "bidirectional", "proj_size", "_flat_weights_names", "_all_weights"]


@pytest.mark.parametrize("torch_cls,fast_cls,args,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_same_attributes_parameters_and_repr(torch_cls, fast_cls, args, kwargs):
    theirs, ours = torch_cls(*args, **kwargs), fast_cls(*args, **kwargs)
    for name in ATTRIBUTES:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert repr(ours) == repr(theirs)
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [[p.shape for p in ws] for ws in theirs.all_weights]
    if torch_cls is nn.RNN:
        assert ours.nonlinearity == theirs.nonlinearity


def test_repr_names_an_explicit_backend():
    assert repr(fastrnn.GRU(3, 4, backend="reference")) == "GRU(3, 4, backend='reference')"
    assert repr(fastrnn.LSTMCell(3, 4, backend="reference")) == "LSTMCell(3, 4, backend='reference')"


def test_initialisation_matches_torch_distribution():
    torch.manual_seed(5)
    theirs = nn.LSTM(8, 16, num_layers=2, proj_size=4)
    torch.manual_seed(5)
    ours = fastrnn.LSTM(8, 16, num_layers=2, proj_size=4)
    for (name, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)  # same order, same draws, same bounds


@pytest.mark.parametrize("torch_cls,fast_cls,args,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_round_trips_strictly(torch_cls, fast_cls, args, kwargs):
    theirs, ours = torch_cls(*args, **kwargs), fast_cls(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = torch_cls(*args, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    for (name, a), (_, b) in zip(theirs.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    again = fast_cls(*args, **kwargs)
    again.load_state_dict(torch.load(buffer), strict=True)


@pytest.mark.parametrize("torch_cls,fast_cls,args,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_from_torch_and_to_torch(torch_cls, fast_cls, args, kwargs):
    theirs = torch_cls(*args, **kwargs).double().eval()
    ours = fast_cls.from_torch(theirs)
    assert isinstance(ours, fast_cls) and not ours.training
    assert next(ours.parameters()).dtype == torch.float64
    back = ours.to_torch()
    assert type(back) is torch_cls and repr(back) == repr(theirs)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    for a, b in zip(_flat(theirs(x)), _flat(ours(x))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,args", [("LSTM", (3, 4)), ("GRU", (3, 4)), ("RNN", (3, 4)),
                                       ("LSTMCell", (3, 4)), ("GRUCell", (3, 4)),
                                       ("RNNCell", (3, 4))])
def test_to_torch_while_torch_nn_names_are_rebound(name, args, monkeypatch):
    """A test suite that swaps implementations by rebinding torch.nn.LSTM still gets torch's
    class back from to_torch()."""
    torch_cls = getattr(nn, name)
    monkeypatch.setattr(nn, name, getattr(fastrnn, name))
    back = getattr(fastrnn, name)(*args).to_torch()
    assert type(back) is torch_cls


def _flat(result):
    output, hidden = result
    return (output, *hidden) if isinstance(hidden, tuple) else (output, hidden)


@pytest.mark.parametrize("backend", cpu_backends())
def test_pack_sequence_and_permuted_hidden_state(backend):
    torch.manual_seed(1)
    theirs = nn.LSTM(3, 4, bidirectional=True).double()
    ours = fastrnn.LSTM.from_torch(theirs, backend=backend)
    sequences = [torch.randn(n, 3, dtype=torch.float64) for n in (2, 5, 3)]
    hx = (torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64))
    for packed in (pack_sequence(sequences, enforce_sorted=False),
                   pack_sequence(sorted(sequences, key=len, reverse=True))):
        (out_t, (h_t, c_t)), (out_f, (h_f, c_f)) = theirs(packed, hx), ours(packed, hx)
        assert torch.equal(out_f.batch_sizes, out_t.batch_sizes)
        assert out_f.sorted_indices is out_t.sorted_indices or torch.equal(out_f.sorted_indices, out_t.sorted_indices)
        for a, b in ((out_t.data, out_f.data), (h_t, h_f), (c_t, c_f)):
            torch.testing.assert_close(b, a)


CELLS = [
    (nn.LSTMCell, fastrnn.LSTMCell, {}),
    (nn.GRUCell, fastrnn.GRUCell, {}),
    (nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "relu"}),
    (nn.RNNCell, fastrnn.RNNCell, {"bias": False}),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("torch_cls,fast_cls,kwargs", CELLS, ids=["lstm", "gru", "rnn-relu", "rnn-nobias"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
def test_cells_match_torch(torch_cls, fast_cls, kwargs, batched, with_hx, backend):
    torch.manual_seed(2)
    theirs = torch_cls(5, 7, dtype=torch.float64, **kwargs)
    ours = fast_cls.from_torch(theirs, backend=backend)
    assert repr(fast_cls.from_torch(theirs)) == repr(theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    shape = (3,) if batched else ()
    x = torch.randn(*shape, 5, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_hx:
        states = [torch.randn(*shape, 7, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        hx = tuple(states) if torch_cls is nn.LSTMCell else states[0]
    expected, got = theirs(x, hx), ours(x, hx)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    leaves = [x, *(hx if isinstance(hx, tuple) else [hx] if hx is not None else [])]
    for module, outputs in ((theirs, expected), (ours, got)):
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)
        loss.backward()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    for (name, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    del leaves


def test_cell_round_trip_and_state_dict():
    theirs = nn.GRUCell(3, 4, bias=False)
    ours = fastrnn.GRUCell.from_torch(theirs)
    back = ours.to_torch()
    assert type(back) is nn.GRUCell and back.bias is False
    back.load_state_dict(ours.state_dict(), strict=True)


def test_dropout_only_between_layers_and_only_in_training():
    torch.manual_seed(0)
    model = fastrnn.LSTM(4, 8, num_layers=2, dropout=0.5, backend="reference")
    x = torch.randn(5, 2, 4)
    model.eval()
    first, second = model(x)[0], model(x)[0]
    assert torch.equal(first, second)
    model.train()
    a, b = model(x)[0], model(x)[0]
    assert not torch.equal(a, b)  # a fresh dropout mask each call
    no_dropout = copy.deepcopy(model)
    no_dropout.dropout = 0.0
    assert not torch.equal(a, no_dropout(x)[0])
    single = fastrnn.LSTM(4, 8, num_layers=1, backend="reference")
    single.train()
    assert torch.equal(single(x)[0], single(x)[0])  # no dropout after the last layer


@pytest.mark.parametrize("backend", cpu_backends())
def test_inputs_are_not_modified(backend):
    model = fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend)
    x = torch.randn(5, 2, 3)
    hx = (torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    copies = [t.clone() for t in (x, *hx)]
    output, (h, c) = model(x, hx)
    (output.sum() + h.sum() + c.sum()).backward()
    for original, kept in zip((x, *hx), copies):
        assert torch.equal(original, kept)


def test_bfloat16_autocast_runs_bfloat16():
    model = fastrnn.LSTM(4, 6)
    x = torch.randn(3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, (h, c) = model(x)
    assert output.dtype == h.dtype == c.dtype == torch.bfloat16
    reference = model(x)[0]
    assert (output.float() - reference).abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float64(dtype):
    torch.manual_seed(4)
    theirs = nn.GRU(4, 8, bidirectional=True).double()
    ours = fastrnn.GRU.from_torch(theirs.to(dtype)).to(dtype)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    expected = theirs.double()(x)[0]
    got = ours(x.to(dtype))[0]
    assert got.dtype == dtype
    assert (got.double() - expected).abs().max() < (0.05 if dtype == torch.bfloat16 else 0.01)


def test_functional_call_uses_the_given_weights():
    model = fastrnn.GRU(3, 4)
    params = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    output, _ = torch.func.functional_call(model, params, (torch.randn(2, 1, 3),))
    assert torch.equal(output, torch.zeros_like(output))


@pytest.mark.parametrize("module", ["LSTM", "GRU"])
def test_torch_func_grad_matches_torch_nn(module):
    """torch.func.grad runs through the layers and gives torch.nn's gradients."""
    theirs = getattr(torch.nn, module)(3, 5, num_layers=2, bidirectional=True).double()
    ours = getattr(fastrnn, module).from_torch(theirs)
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def loss(model, params, x):
        return torch.func.functional_call(model, params, (x,))[0].square().sum()

    params = {name: p.detach() for name, p in ours.named_parameters()}
    got_params, got_x = torch.func.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
    x_leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(theirs(x_leaf)[0].square().sum(),
                                   [x_leaf, *theirs.parameters()])
    torch.testing.assert_close(got_x, expected[0])
    for (name, _), grad in zip(theirs.named_parameters(), expected[1:]):
        torch.testing.assert_close(got_params[name], grad)


def test_batch_of_zero_sequences_gives_empty_outputs():
    output, (h, c) = fastrnn.LSTM(3, 4)(torch.randn(5, 0, 3))
    assert output.shape == (5, 0, 4) and h.shape == c.shape == (1, 0, 4)
