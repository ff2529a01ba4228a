"""The per-layer custom ops: gradcheck in float64 and torch.library.opcheck, every cell."""

from __future__ import annotations

import pytest
import torch

import fastrnn  # noqa: F401  (registers the ops)
from fastrnn.cells import CELLS
from helpers import cpu_backends

pytestmark = pytest.mark.usefixtures("poisoned_empty")

# (cell, directions, projection, variable lengths, bias)
LAYOUTS = [
    ("lstm", 1, False, False, True),
    ("lstm", 2, True, True, True),
    ("lstm", 2, False, True, False),
    ("gru", 2, False, True, True),
    ("gru", 1, False, False, False),
    ("rnn_tanh", 2, False, True, True),
    ("rnn_relu", 1, False, True, True),
]


def layer_args(cell_name, directions, projection, variable, bias, dtype=torch.float64,
               seq=4, batch=3, hidden=3, proj=2, input_size=2, requires_grad=True):
    """Random arguments of fastrnn::{cell}_layer (without backend): x, w_ih, b_ih, h0, c0, w_hh,
    b_hh, w_hr, lengths."""
    cell = CELLS[cell_name]
    generator = torch.Generator().manual_seed(11)
    out = proj if projection else hidden

    def rand(*shape):
        # relu's kink at 0 would break finite differences; keep pre-activations away from it
        return (torch.randn(*shape, generator=generator, dtype=dtype) * 0.5).requires_grad_(requires_grad)

    x = rand(seq, batch, input_size)
    w_ih = rand(directions * cell.gates * hidden, input_size)
    b_ih = rand(directions * cell.gates * hidden) if bias else None
    h0 = rand(directions, batch, out)
    c0 = rand(directions, batch, hidden) if cell.has_cell_state else None
    w_hh = rand(directions, cell.gates * hidden, out)
    b_hh = rand(directions, cell.gates * hidden) if bias else None
    w_hr = rand(directions, out, hidden) if projection else None
    lengths = torch.tensor([seq, 1, seq - 1][:batch]) if variable else None
    return x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths


def layout_id(layout):
    cell, directions, projection, variable, bias = layout
    return f"{cell}-D{directions}" + ("-proj" if projection else "") + ("-lengths" if variable else "") + ("" if bias else "-nobias")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_gradcheck(layout, backend):
    args = layer_args(*layout)
    op = getattr(torch.ops.fastrnn, f"{layout[0]}_layer")
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*tensors):
        full = list(args)
        for index, tensor in zip(differentiable, tensors):
            full[index] = tensor
        output, h_n, c_n, _ = op(*full, backend)
        return (output, h_n, c_n) if CELLS[layout[0]].has_cell_state else (output, h_n)

    assert torch.autograd.gradcheck(f, [args[i] for i in differentiable], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_opcheck_forward_and_backward(layout, backend):
    args = layer_args(*layout)
    forward = getattr(torch.ops.fastrnn, f"{layout[0]}_layer")
    torch.library.opcheck(forward, (*args, backend))
    inputs = layer_args(*layout, requires_grad=False)
    output, h_n, c_n, workspace = forward(*inputs, backend)
    grad_c_n = torch.randn_like(c_n) if inputs[4] is not None else None
    backward = getattr(torch.ops.fastrnn, f"{layout[0]}_layer_backward")
    wanted = [t is not None for t in inputs[:8]]
    torch.library.opcheck(backward, (torch.randn_like(output), torch.randn_like(h_n), grad_c_n,
                                     *inputs, output, workspace, backend, wanted))
    wanted[1] = wanted[3] = False  # no w_ih, h0: empty in their place
    grads = backward(torch.randn_like(output), None, grad_c_n, *inputs, output, workspace, backend,
                     wanted)
    assert grads[1].shape == (0,) and grads[3].shape == (0,) and grads[0].shape == inputs[0].shape


@pytest.mark.parametrize("backend", cpu_backends())
def test_padded_steps_are_zero_and_state_is_taken_at_each_length(backend):
    args = layer_args("lstm", 2, False, True, True, requires_grad=False)
    output, h_n, c_n, workspace = torch.ops.fastrnn.lstm_layer(*args, backend)
    h0, lengths = args[3], args[8]
    hidden = h0.shape[2]
    for b, length in enumerate(lengths.tolist()):
        assert (output[length:, b] == 0).all()
        if backend != "torch":  # the torch backend keeps no workspace (its backward recomputes)
            assert (workspace[length:, b] == 0).all()
        torch.testing.assert_close(h_n[0, b], output[length - 1, b, :hidden])  # forward: last step
        torch.testing.assert_close(h_n[1, b], output[0, b, hidden:])  # reverse: ends at t = 0


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", LAYOUTS[:4], ids=layout_id)
def test_inference_keeps_no_workspace(layout, backend):
    args = layer_args(*layout, requires_grad=False)
    op = getattr(torch.ops.fastrnn, f"{layout[0]}_layer")
    kept = op(*args, backend, True)
    dropped = op(*args, backend, False)
    assert kept[3].shape[0] == args[0].shape[0] and dropped[3].shape == (0, *kept[3].shape[1:])
    for with_workspace, without in zip(kept[:3], dropped[:3]):
        assert torch.equal(with_workspace, without)


def test_modules_under_no_grad_skip_the_workspace_and_agree():
    model = fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        inference = model(x)
    training = model(x)
    for a, b in zip((inference[0], *inference[1]), (training[0], *training[1])):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
