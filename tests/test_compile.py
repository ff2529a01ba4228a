"""torch.compile(fullgraph=True) traces models holding fastrnn modules with no graph break."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastrnn


class Classifier(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(2 * rnn.hidden_size if rnn.bidirectional else rnn.hidden_size, 3)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.head(output[:, -1])


MODELS = {
    "lstm-2layer-bi": lambda: fastrnn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True),
    "gru": lambda: fastrnn.GRU(4, 6, batch_first=True),
    "rnn-relu": lambda: fastrnn.RNN(4, 6, nonlinearity="relu", batch_first=True),
}


# every model through AOT autograd; one through inductor (a C++ build per model is slow on CI)
COMPILATIONS = [(name, "aot_eager") for name in MODELS] + [("lstm-2layer-bi", "inductor")]


@pytest.mark.parametrize("name,compiler", COMPILATIONS, ids=[f"{n}-{c}" for n, c in COMPILATIONS])
def test_fullgraph_compile_matches_eager(name, compiler):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Classifier(MODELS[name]())
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(3, 5, 4)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    for grad, want in zip((p.grad for p in model.parameters()), expected_grads):
        torch.testing.assert_close(grad, want)


def test_cell_compiles_fullgraph():
    torch._dynamo.reset()
    cell = fastrnn.LSTMCell(4, 5)
    x, h, c = torch.randn(2, 4), torch.randn(2, 5), torch.randn(2, 5)
    compiled = torch.compile(cell, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, (h, c)), cell(x, (h, c))):
        torch.testing.assert_close(got, want)


PACKED_CASES = {  # name: (enforce_sorted, with hx)
    "unsorted": (False, False),
    "unsorted-with-hx": (False, True),
    "sorted": (True, False),
    "sorted-with-hx": (True, True),
}


@pytest.mark.parametrize("name", PACKED_CASES)
def test_fullgraph_compile_of_a_packed_sequence_argument_needs_no_recompile_per_shape(name):
    """One function taking a PackedSequence, compiled fullgraph: matches torch.nn eager for
    every batch size and length pattern, forward and gradients, with at most the one recompile
    that makes its sizes dynamic."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.nn.utils.rnn import pack_padded_sequence

    enforce_sorted, with_hx = PACKED_CASES[name]
    torch.manual_seed(0)
    torch._dynamo.reset()
    ours = fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True)
    theirs = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())

    def run(rnn, packed, hx):
        output, (h_n, c_n) = rnn(packed, hx)
        return output.data, h_n, c_n

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda packed, hx: run(ours, packed, hx), fullgraph=True,
                             backend=counter)
    # (B = 1 would recompile once more: torch.compile specialises every size of 0 or 1)
    for batch, steps in [(3, 5), (4, 7), (6, 4), (2, 6), (5, 9)]:
        lengths = torch.randint(1, steps + 1, (batch,))
        lengths[0] = steps
        if enforce_sorted:
            lengths = lengths.sort(descending=True).values
        x = torch.randn(steps, batch, 3)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        hx = (torch.randn(4, batch, 4), torch.randn(4, batch, 4)) if with_hx else None
        got = compiled(pack_padded_sequence(x_ours, lengths, enforce_sorted=enforce_sorted), hx)
        want = run(theirs, pack_padded_sequence(x_theirs, lengths, enforce_sorted=enforce_sorted),
                   hx)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        grads = torch.autograd.grad(sum(t.square().sum() for t in got),
                                    (*ours.parameters(), x_ours))
        want_grads = torch.autograd.grad(sum(t.square().sum() for t in want),
                                         (*theirs.parameters(), x_theirs))
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w)
    assert counter.frame_count <= 2, counter.frame_count
