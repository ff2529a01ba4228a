"""fastrnn.functional with `lengths`: a padded input whose sequences stop at their own lengths
(0 to T) gives torch.nn's results on the same sequences packed (outputs, final states and every
gradient), 0 past each length, and a sequence of length 0 keeps its initial state; bad lengths
raise naming the fault."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from helpers import TORCH_CLASSES, cpu_backends

FUNCTIONS = {"lstm": fastrnn.functional.lstm, "gru": fastrnn.functional.gru,
             "rnn_tanh": fastrnn.functional.rnn, "rnn_relu": fastrnn.functional.rnn}
CASES = [(cell, layers, bidirectional, batch_first)
         for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu")
         for layers, bidirectional, batch_first in ((1, False, True), (2, True, False))]


def _module(cell: str, layers: int, bidirectional: bool, batch_first: bool, dtype,
            input_size: int = 3, hidden: int = 5) -> nn.Module:
    extra = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    return TORCH_CLASSES[cell](input_size, hidden, layers, bidirectional=bidirectional,
                               batch_first=batch_first, dtype=dtype, **extra)


def _inputs(module, lengths, steps: int, dtype, seed: int = 0):
    """x (padded, batch_first as the module), h0 (and c0), all float64 leaves in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    shape = (batch, steps, module.input_size) if module.batch_first else (steps, batch,
                                                                          module.input_size)
    states = module.num_layers * (2 if module.bidirectional else 1)

    def leaf(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(dtype) \
            .requires_grad_()

    hx = [leaf(states, batch, module.hidden_size)]
    if isinstance(module, nn.LSTM):
        hx.append(leaf(states, batch, module.hidden_size))
    return leaf(*shape), hx


def _fastrnn(cell, module, x, hx, lengths, backend):
    """fastrnn.functional on the padded input: (output, h_n[, c_n])."""
    options = dict(num_layers=module.num_layers, bidirectional=module.bidirectional,
                   batch_first=module.batch_first, lengths=lengths, backend=backend)
    if cell.startswith("rnn"):
        options["nonlinearity"] = cell[4:]
    state = tuple(hx) if cell == "lstm" else hx[0]
    return FUNCTIONS[cell](x, state, module._flat_weights, **options)


def _torch_nn(module, x, hx, lengths):
    """torch.nn on the sequences of length > 0, packed; length 0: output 0, the initial state."""
    steps = x.shape[1 if module.batch_first else 0]
    kept = (lengths > 0).nonzero().flatten()
    rows = x.index_select(0 if module.batch_first else 1, kept)
    packed = pack_padded_sequence(rows, lengths[kept], batch_first=module.batch_first,
                                  enforce_sorted=False)
    state = [h.index_select(1, kept) for h in hx]
    output, final = module(packed, tuple(state) if len(state) == 2 else state[0])
    output = pad_packed_sequence(output, batch_first=module.batch_first, total_length=steps)[0]
    final = final if isinstance(final, tuple) else (final,)
    full = torch.zeros(*x.shape[:2], output.shape[2], dtype=x.dtype)
    full = full.index_copy(0 if module.batch_first else 1, kept, output)
    return (full, *(h.index_copy(1, kept, f) for h, f in zip(hx, final)))


def _results(outputs, leaves, seed: int = 1):
    """The outputs and the gradients of a random-weighted sum of them."""
    generator = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=torch.float64)
                .to(out.dtype)).sum() for out in outputs)
    return [out.detach() for out in outputs] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell, layers, bidirectional, batch_first", CASES,
                         ids=[f"{c}-L{n}-{'bi' if b else 'uni'}{'-bf' if f else ''}"
                              for c, n, b, f in CASES])
def test_matches_torch_nn_packed(cell, layers, bidirectional, batch_first, backend):
    torch.manual_seed(0)
    module = _module(cell, layers, bidirectional, batch_first, torch.float64)
    lengths = torch.tensor([4, 0, 7, 1, 3])  # one empty sequence, one full, one of one step
    x, hx = _inputs(module, lengths, 7, torch.float64)
    leaves = [x, *hx, *module.parameters()]
    ours = _results(_fastrnn(cell, module, x, hx, lengths, backend), leaves)
    theirs = _results(_torch_nn(module, x, hx, lengths), leaves)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_float32_within_torch_error(cell):
    torch.manual_seed(1)
    module = _module(cell, 1, True, True, torch.float64, input_size=7, hidden=16)
    module32 = _module(cell, 1, True, True, torch.float32, input_size=7, hidden=16)
    module32.load_state_dict(module.state_dict())
    lengths = torch.tensor([9, 2, 0, 13, 13, 5])
    x, hx = _inputs(module, lengths, 13, torch.float64, seed=2)
    x32, hx32 = x.detach().float().requires_grad_(), [h.detach().float().requires_grad_()
                                                      for h in hx]
    oracle = _results(_torch_nn(module, x, hx, lengths), [x, *hx, *module.parameters()])
    leaves32 = [x32, *hx32, *module32.parameters()]
    ours = _results(_fastrnn(cell, module32, x32, hx32, lengths, None), leaves32)
    theirs = _results(_torch_nn(module32, x32, hx32, lengths), leaves32)
    eps = torch.finfo(torch.float32).eps
    for got, own, expected in zip(ours, theirs, oracle):
        scale = expected.abs().max().item() or 1.0
        error = (got.double() - expected).abs().max().item()
        assert error <= 2 * (own.double() - expected).abs().max().item() + 8 * eps * scale


def test_full_lengths_equal_no_lengths_and_lengths_may_be_a_list():
    module = _module("gru", 2, True, False, torch.float64)
    x, hx = _inputs(module, [5, 5, 5], 5, torch.float64)
    plain = _fastrnn("gru", module, x, hx, None, None)
    for lengths in (torch.tensor([5, 5, 5]), [5, 5, 5]):
        for got, expected in zip(_fastrnn("gru", module, x, hx, lengths, None), plain):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    by_list = _fastrnn("gru", module, x, hx, [2, 0, 5], None)
    for got, expected in zip(by_list, _fastrnn("gru", module, x, hx, torch.tensor([2, 0, 5]),
                                               None)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_inputs_are_not_modified():
    module = _module("lstm", 1, False, True, torch.float64)
    lengths = torch.tensor([0, 3])
    x, hx = _inputs(module, lengths, 4, torch.float64)
    before = [t.detach().clone() for t in (x, *hx, lengths)]
    _fastrnn("lstm", module, x, hx, lengths, None)
    for tensor, copy in zip((x, *hx, lengths), before):
        assert torch.equal(tensor, copy)


BAD = {  # name: (lengths, exception, message)
    "too-few": (torch.tensor([1, 2]), ValueError,
                r"one entry per sequence: expected shape \(3,\), got \(2,\)"),
    "2-d": (torch.ones(3, 1, dtype=torch.int64), ValueError, r"expected shape \(3,\), got \(3, 1\)"),
    "float": (torch.tensor([1.0, 2.0, 3.0]), TypeError, "must hold integers, got dtype torch.float32"),
    "bool": (torch.tensor([True, True, False]), TypeError, "must hold integers"),
    "too-long": (torch.tensor([1, 6, 2]), ValueError, r"lie in \[0, 5\].*got \[1, 6, 2\]"),
    "negative": (torch.tensor([1, -1, 2]), ValueError, r"lie in \[0, 5\]"),
    "not-numbers": ("abc", TypeError, "1-D integer tensor or a sequence of ints, got str"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_lengths_raise(name):
    lengths, error, message = BAD[name]
    module = _module("lstm", 1, False, True, torch.float32)
    x, hx = _inputs(module, [1, 1, 1], 5, torch.float32)
    with pytest.raises(error, match=message):
        _fastrnn("lstm", module, x, hx, lengths, None)


def test_lengths_and_a_packed_sequence_raise():
    module = _module("lstm", 1, False, False, torch.float32)
    h0 = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="lengths is for padded input"):
        fastrnn.functional.lstm(torch.randn(6, 3), (h0, h0), module._flat_weights,
                                batch_sizes=torch.tensor([3, 2, 1]), lengths=[3, 2, 1])


def test_compiles_fullgraph():
    module = _module("lstm", 1, True, True, torch.float32)
    lengths = torch.tensor([3, 0, 5])
    x, hx = _inputs(module, lengths, 5, torch.float32)

    weights = [weight.detach() for weight in module._flat_weights]

    def run(x, h0, c0, lengths, weights):
        return fastrnn.functional.lstm(x, (h0, c0), weights, bidirectional=True,
                                       batch_first=True, lengths=lengths)

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x, *hx, lengths, weights), run(x, *hx, lengths, weights)):
        torch.testing.assert_close(got, expected)
