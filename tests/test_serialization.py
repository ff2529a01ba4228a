"""torch.save / torch.load with torch.load's default (weights_only=True): a whole model holding a
fastrnn module loads where its torch.nn twin does, naming only the user's own class, and a
state_dict loads both ways; the loaded model computes what torch.nn's does."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fastrnn


class Model(nn.Module):
    """A user's model holding a recurrent module."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, *args):
        return self.rnn(*args)


MODULES = {  # name: (torch.nn class, fastrnn class, args, kwargs, inputs for the forward)
    "lstm-proj-bi-2layer": (nn.LSTM, fastrnn.LSTM, (3, 5), dict(num_layers=2, bidirectional=True,
                            proj_size=2, batch_first=True), lambda: (torch.randn(2, 4, 3),)),
    "lstm-nobias-hx": (nn.LSTM, fastrnn.LSTM, (3, 5), dict(bias=False),
                       lambda: (torch.randn(4, 2, 3), (torch.randn(1, 2, 5), torch.randn(1, 2, 5)))),
    "gru-bi": (nn.GRU, fastrnn.GRU, (3, 5), dict(bidirectional=True), lambda: (torch.randn(4, 2, 3),)),
    "rnn-relu-dropout": (nn.RNN, fastrnn.RNN, (3, 5, 2), dict(nonlinearity="relu", dropout=0.2),
                         lambda: (torch.randn(4, 2, 3),)),
    "lstmcell": (nn.LSTMCell, fastrnn.LSTMCell, (3, 5), {},
                 lambda: (torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 5)))),
    "grucell-nobias": (nn.GRUCell, fastrnn.GRUCell, (3, 5), dict(bias=False),
                       lambda: (torch.randn(2, 3),)),
    "rnncell-relu": (nn.RNNCell, fastrnn.RNNCell, (3, 5), dict(nonlinearity="relu"),
                     lambda: (torch.randn(2, 3), torch.randn(2, 5))),
}


def saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    """Every tensor of the model's output."""
    return torch.utils._pytree.tree_leaves(model(*inputs))


@pytest.mark.parametrize("name", MODULES)
def test_whole_model_loads_with_the_default_weights_only(name):
    torch_cls, fast_cls, args, kwargs, make_inputs = MODULES[name]
    torch.manual_seed(0)
    ours = Model(fast_cls(*args, **kwargs, backend="reference")).eval()
    theirs = Model(torch_cls(*args, **kwargs)).eval()
    theirs.load_state_dict(ours.state_dict())
    with torch.serialization.safe_globals([Model, torch_cls]):  # torch.nn: its class named
        theirs = torch.load(saved(theirs))
    with torch.serialization.safe_globals([Model]):  # fastrnn registered its own classes
        loaded = torch.load(saved(ours))
    assert type(loaded.rnn) is fast_cls
    assert loaded.rnn.backend == "reference"
    assert repr(loaded) == repr(ours)
    inputs = make_inputs()
    for got, want in zip(outputs(loaded, inputs), outputs(theirs, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a loaded module is a whole module: it converts, computes and saves again
    inputs = [t.double() for t in torch.utils._pytree.tree_leaves(inputs)]
    inputs = torch.utils._pytree.tree_unflatten(inputs, torch.utils._pytree.tree_structure(
        make_inputs()))
    loaded, theirs = loaded.double(), theirs.double()
    for got, want in zip(outputs(loaded, inputs), outputs(theirs, inputs), strict=True):
        torch.testing.assert_close(got, want)
    with torch.serialization.safe_globals([Model]):
        torch.load(saved(loaded))


@pytest.mark.parametrize("name", MODULES)
def test_a_module_saved_alone_loads_with_nothing_named(name):
    _, fast_cls, args, kwargs, make_inputs = MODULES[name]
    module = fast_cls(*args, **kwargs).eval()
    loaded = torch.load(saved(module))
    inputs = make_inputs()
    for got, want in zip(outputs(loaded, inputs), outputs(module, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODULES)
def test_state_dict_loads_both_ways_with_the_default_weights_only(name):
    torch_cls, fast_cls, args, kwargs, make_inputs = MODULES[name]
    torch.manual_seed(0)
    theirs = torch_cls(*args, **kwargs).eval()
    ours = fast_cls(*args, **kwargs).eval()
    ours.load_state_dict(torch.load(saved(theirs.state_dict())))
    back = torch_cls(*args, **kwargs).eval()
    back.load_state_dict(torch.load(saved(ours.state_dict())))
    inputs = make_inputs()
    for module in (ours, back):
        for got, want in zip(outputs(module, inputs), outputs(theirs, inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
