"""A malformed PackedSequence raises, in eager mode with a message naming what is wrong and under
torch.compile(fullgraph=True) through torch._check; a well-formed one still runs."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import fastrnn

MALFORMED = {  # name: (batch_sizes, rows of data, batch of hx or None, eager message)
    "increasing": ([1, 2, 3], 6, None, r"positive and non-increasing.*got \[1, 2, 3\]"),
    "zero-last": ([3, 0], 3, None, r"positive and non-increasing.*got \[3, 0\]"),
    "zero-inside": ([3, 0, 2], 5, None, r"positive and non-increasing"),
    "negative": ([3, -1], 2, None, r"positive and non-increasing"),
    "sum-too-small": ([3, 2, 1], 5, None, r"batch_sizes sum to 6, but its data has 5 rows"),
    "sum-too-large": ([3, 2, 1], 7, None, r"batch_sizes sum to 6, but its data has 7 rows"),
    "first-larger-than-hx": ([3, 2, 1], 6, 2, r"Expected hidden\[0\] size \(1, 3, 5\), got \[1, 2, 5\]"),
    "first-smaller-than-hx": ([3, 2, 1], 6, 4, r"Expected hidden\[0\] size \(1, 3, 5\), got \[1, 4, 5\]"),
}


def packed_call(rnn, name):
    """The arguments of rnn for the malformed case `name`: (PackedSequence, hx)."""
    batch_sizes, rows, hx_batch, _ = MALFORMED[name]
    packed = PackedSequence(torch.randn(rows, 4), torch.tensor(batch_sizes))
    hx = None
    if hx_batch is not None:
        hx = (torch.randn(1, hx_batch, 5), torch.randn(1, hx_batch, 5))
    return packed, hx


@pytest.mark.parametrize("name", MALFORMED)
def test_eager_raises_naming_the_fault(name):
    rnn = fastrnn.LSTM(4, 5)
    with pytest.raises(RuntimeError, match=MALFORMED[name][3]):
        rnn(*packed_call(rnn, name))


@pytest.mark.parametrize("cls", [fastrnn.GRU, fastrnn.RNN])
def test_eager_raises_for_every_cell(cls):
    with pytest.raises(RuntimeError, match="positive and non-increasing"):
        cls(4, 5)(PackedSequence(torch.randn(6, 4), torch.tensor([1, 2, 3])))


def test_functional_checks_the_batch_of_its_hidden_state():
    rnn = fastrnn.LSTM(4, 5)
    h0 = torch.zeros(1, 4, 5)
    with pytest.raises(RuntimeError, match=r"batch_sizes\[0\] is 3, but the hidden state holds "
                                           "a batch of 4"):
        fastrnn.functional.lstm(torch.randn(6, 4), (h0, h0), rnn._flat_weights,
                                batch_sizes=torch.tensor([3, 2, 1]))


@pytest.fixture(scope="module", params=[None, True], ids=["static-first", "dynamic"])
def compiled_lstm(request):
    """One LSTM compiled fullgraph serving every case: sizes static at first (torch.compile's
    default, dynamic after the first recompile), or dynamic from the start."""
    torch._dynamo.reset()
    rnn = fastrnn.LSTM(4, 5)
    return rnn, torch.compile(rnn, fullgraph=True, dynamic=request.param, backend="aot_eager")


@pytest.mark.parametrize("name", MALFORMED)
def test_compiled_raises(name, compiled_lstm):
    rnn, compiled = compiled_lstm
    lengths = torch.tensor([4, 2, 2])  # a well-formed call runs first, and matches eager
    good = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(4, 3, 4), lengths)
    torch.testing.assert_close(compiled(good)[0].data, rnn(good)[0].data)
    with pytest.raises(RuntimeError, match="Runtime assertion failed|Expected"):
        compiled(*packed_call(rnn, name))


class PackedModel(torch.nn.Module):
    """A recurrence over a PackedSequence given as its four tensors, as torch.export takes it."""

    def __init__(self):
        super().__init__()
        self.rnn = fastrnn.GRU(4, 5)

    def forward(self, data, batch_sizes, sorted_indices, unsorted_indices):
        output, _ = self.rnn(PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices))
        return output.data


def test_exported_program_raises():
    model = PackedModel()
    good = tuple(torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor(
        [5, 2, 4]), enforce_sorted=False))
    auto = {0: torch.export.Dim.AUTO}
    program = torch.export.export(model, good, dynamic_shapes=(auto,) * 4).module()
    torch.testing.assert_close(program(*good), model(*good))
    for batch_sizes, rows, batch, _ in MALFORMED.values():  # batch: that of sorted_indices
        order = torch.arange(batch or 3)
        with pytest.raises(RuntimeError, match="Runtime assertion failed"):
            program(torch.randn(rows, 4), torch.tensor(batch_sizes), order, order)
