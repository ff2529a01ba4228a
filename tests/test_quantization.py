"""torch's quantize_dynamic on fastrnn modules: dtype=torch.qint8 gives fastrnn's int8 modules
(tests/test_int8.py checks them); dtype=torch.float16 gives torch's dynamically quantized float16
modules exactly as for the torch.nn twins; fastrnn.RNN, which torch cannot quantize to float16,
stays float with a warning instead of silently."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import quantize_dynamic

import fastrnn
from fastrnn import quantized

pytestmark = pytest.mark.filterwarnings("ignore:.*torchao.*", "ignore:.*torch.ao.quantization.*")


class Model(nn.Module):
    def __init__(self, rnn: nn.Module, features: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        output = self.rnn(x)
        return self.head(output[0] if isinstance(output, tuple) else output)


CASES = {  # name: (class name, constructor kwargs, head features, input shape, float16 class)
    "lstm-2layer-bi": ("LSTM", dict(num_layers=2, bidirectional=True), 32, (7, 3, 8), nnqd.LSTM),
    "gru-batch-first": ("GRU", dict(batch_first=True), 16, (3, 7, 8), nnqd.GRU),
    "lstm-cell": ("LSTMCell", {}, 16, (3, 8), nnqd.LSTMCell),
    "gru-cell": ("GRUCell", {}, 16, (3, 8), nnqd.GRUCell),
    "rnn-cell": ("RNNCell", {}, 16, (3, 8), nnqd.RNNCell),
}


@pytest.mark.parametrize("name", CASES)
def test_float16_quantizes_fastrnn_modules_as_torch_nn_ones(name):
    kind, kwargs, features, shape, float16_class = CASES[name]
    torch.manual_seed(0)
    theirs = Model(getattr(nn, kind)(8, 16, **kwargs), features)
    ours = Model(getattr(fastrnn, kind)(8, 16, **kwargs), features)
    ours.load_state_dict(theirs.state_dict())
    q_theirs = quantize_dynamic(theirs, {getattr(nn, kind), nn.Linear}, dtype=torch.float16)
    q_ours = quantize_dynamic(ours, {getattr(fastrnn, kind), nn.Linear}, dtype=torch.float16)
    assert type(q_ours.rnn) is float16_class and type(q_ours.head) is nnqd.Linear
    assert type(ours.rnn) is getattr(fastrnn, kind)  # the float model is left as it was
    x = torch.randn(shape)
    torch.testing.assert_close(q_ours(x), q_theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_qint8_gives_fastrnn_int8_modules(name):
    kind, kwargs, features, shape, _ = CASES[name]
    torch.manual_seed(0)
    model = Model(getattr(fastrnn, kind)(8, 16, **kwargs), features)
    result = quantize_dynamic(model, {getattr(fastrnn, kind), nn.Linear}, dtype=torch.qint8)
    assert type(result.rnn) is getattr(quantized, kind) and type(result.head) is nnqd.Linear
    x = torch.randn(shape)
    with torch.no_grad():
        float_out = model(x)
        error = (result(x) - float_out).abs().max()
    assert 0 < error < 0.05 * float_out.abs().max()  # int8 weights: close, but not the float


def test_rnn_stays_float_in_float16_with_a_warning():
    torch.manual_seed(0)
    model = Model(fastrnn.RNN(8, 16), 16)
    with pytest.warns(UserWarning, match="fastrnn.RNN is left in float32"):
        result = quantize_dynamic(model, {fastrnn.RNN, nn.Linear}, dtype=torch.float16)
    assert type(result.rnn) is fastrnn.RNN and type(result.head) is nnqd.Linear
    x = torch.randn(5, 2, 8)
    torch.testing.assert_close(result.rnn(x)[0], model.rnn(x)[0])
