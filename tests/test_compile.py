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
