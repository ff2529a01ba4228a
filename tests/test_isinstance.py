"""What isinstance says about fastrnn modules, and why: the cells are instances of their torch.nn
twins; LSTM, GRU and RNN are instances of nn.RNNBase but not of nn.LSTM, nn.GRU, nn.RNN, which
torch.compile refuses to trace (any subclass too). User code that selects modules by class
names both, as the README says: isinstance(m, (nn.LSTM, fastrnn.LSTM))."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastrnn

CELLS = [(fastrnn.LSTMCell, nn.LSTMCell), (fastrnn.GRUCell, nn.GRUCell),
         (fastrnn.RNNCell, nn.RNNCell)]
RECURRENCES = [(fastrnn.LSTM, nn.LSTM), (fastrnn.GRU, nn.GRU), (fastrnn.RNN, nn.RNN)]


@pytest.mark.parametrize("fast_cls,torch_cls", CELLS, ids=lambda c: c.__name__)
def test_cells_are_instances_of_their_torch_nn_twins(fast_cls, torch_cls):
    cell = fast_cls(3, 4)
    assert isinstance(cell, torch_cls) and isinstance(cell, nn.RNNCellBase)
    assert type(cell).forward is not torch_cls.forward


@pytest.mark.parametrize("fast_cls,torch_cls", RECURRENCES, ids=lambda c: c.__name__)
def test_recurrences_are_rnnbase_but_not_their_twins(fast_cls, torch_cls):
    rnn = fast_cls(3, 4)
    assert isinstance(rnn, nn.RNNBase)
    assert not isinstance(rnn, (nn.LSTM, nn.GRU, nn.RNN))
    assert isinstance(rnn, (torch_cls, fast_cls))  # the README's one-line fix


def test_a_subclass_of_nn_lstm_is_refused_by_torch_compile():
    """Why fastrnn.LSTM is not an nn.LSTM: Dynamo refuses every instance of nn.LSTM, nn.GRU and
    nn.RNN ("Attempted to wrap RNN, GRU, or LSTM") unless the user sets its experimental
    allow_rnn. Should torch lift that, this fails, and the classes can subclass their twins."""

    class Subclass(nn.LSTM):
        def forward(self, x):
            return x @ self.weight_ih_l0.T

    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(Subclass(3, 4), fullgraph=True, backend="eager")(torch.randn(2, 3))


def test_rebinding_torch_nn_lstm_makes_torch_compile_refuse_fastrnn(monkeypatch):
    """As the README says: Dynamo refuses instances of whatever torch.nn.LSTM names."""
    monkeypatch.setattr(nn, "LSTM", fastrnn.LSTM)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(nn.LSTM(3, 4), fullgraph=True, backend="eager")(torch.randn(2, 1, 3))


def test_a_weight_init_loop_written_for_both_reaches_every_module():
    torch.manual_seed(0)
    model = nn.Sequential(fastrnn.LSTM(3, 4, num_layers=2), fastrnn.GRU(4, 4),
                          fastrnn.LSTMCell(4, 4))
    reached = []
    for module in model.modules():
        if isinstance(module, (nn.LSTM, fastrnn.LSTM, nn.GRU, fastrnn.GRU, nn.LSTMCell)):
            for name, param in module.named_parameters():
                if name.startswith("weight_hh"):
                    nn.init.orthogonal_(param)
            reached.append(type(module))
    assert reached == [fastrnn.LSTM, fastrnn.GRU, fastrnn.LSTMCell]
    weight = model[0].weight_hh_l1  # [16, 4], orthonormal columns
    torch.testing.assert_close(weight.T @ weight, torch.eye(4))


@pytest.mark.parametrize("fast_cls,torch_cls", RECURRENCES + CELLS, ids=lambda c: c.__name__)
def test_what_torch_nn_base_classes_bring_leaves_the_module_working(fast_cls, torch_cls):
    """nn.RNNBase keeps a cached weight list through __setattr__, _apply, pickling and
    DataParallel's replicas; fastrnn reads its weights from the parameters, so each of those
    leaves the module computing what its twin computes (and a replica is made)."""
    torch.manual_seed(0)
    ours = fast_cls(3, 4)
    theirs = torch_cls(3, 4)
    theirs.load_state_dict(ours.state_dict())
    new_weight = torch.randn_like(ours.weight_hh_l0 if hasattr(ours, "weight_hh_l0")
                                  else ours.weight_hh)
    name = "weight_hh_l0" if hasattr(ours, "weight_hh_l0") else "weight_hh"
    for module in (ours, theirs):
        setattr(module, name, nn.Parameter(new_weight.clone()))  # __setattr__ of a weight
    ours, theirs = copy.deepcopy(ours).double(), theirs.double()  # pickling, _apply
    assert type(ours._replicate_for_data_parallel()) is fast_cls
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    if fast_cls in (fastrnn.LSTMCell, fastrnn.GRUCell, fastrnn.RNNCell):
        x = x[0]
    for got, want in zip(torch.utils._pytree.tree_leaves(ours(x)),
                         torch.utils._pytree.tree_leaves(theirs(x)), strict=True):
        torch.testing.assert_close(got, want)
