"""Gradients beyond the first: double backward (create_graph), gradgradcheck, batched gradients
(gradcheck's check_batched_grad), torch.func.vmap over torch.func.grad, and forward-mode AD (dual
tensors, torch.func.jvp), all side by side with torch.nn, on every cell and layer module, in
float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from helpers import FAST_CLASSES, TORCH_CLASSES, cpu_backends

torch.backends.cudnn.enabled = False  # torch.nn's double backward needs the native kernels

I, H, T, B = 2, 3, 3, 2
CELL_CLASSES = {"lstm": (nn.LSTMCell, fastrnn.LSTMCell), "gru": (nn.GRUCell, fastrnn.GRUCell),
                "rnn_tanh": (nn.RNNCell, fastrnn.RNNCell),
                "rnn_relu": (nn.RNNCell, fastrnn.RNNCell)}
LAYOUTS = {"L1-uni": dict(num_layers=1), "L2-bi": dict(num_layers=2, bidirectional=True),
           "L1-bi-packed": dict(bidirectional=True), "L1-proj": dict(proj_size=2)}
LAYER_CASES = [(cell, layout) for cell in FAST_CLASSES for layout in LAYOUTS
               if cell == "lstm" or layout != "L1-proj"]


def _kwargs(cell: str) -> dict:
    return {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}


def layer_pair(cell: str, layout: str, backend: str):
    """(torch.nn module, fastrnn module with the same weights) in float64."""
    torch.manual_seed(0)
    theirs = TORCH_CLASSES[cell](I, H, dtype=torch.float64, **LAYOUTS[layout], **_kwargs(cell))
    return theirs, FAST_CLASSES[cell].from_torch(theirs, backend=backend)


def cell_pair(cell: str, backend: str):
    torch.manual_seed(0)
    torch_cls, fast_cls = CELL_CLASSES[cell]
    theirs = torch_cls(I, H, dtype=torch.float64, **_kwargs(cell))
    return theirs, fast_cls.from_torch(theirs, backend=backend)


def as_function(module: nn.Module, layout: str | None, cell: str):
    """(f, inputs): f(x, h0, [c0], *parameters) -> the module's outputs (padded for packed input),
    so that gradcheck differentiates the input, the states and every parameter."""
    names = [name for name, _ in module.named_parameters()]
    is_cell = layout is None
    generator = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    if is_cell:
        x, states = rand(B, I), [rand(B, H) for _ in range(2 if cell == "lstm" else 1)]
    else:
        directions = 2 if module.bidirectional else 1
        out = module.proj_size or H
        x = rand(T, B, I)
        states = [rand(module.num_layers * directions, B, out)]
        if cell == "lstm":
            states.append(rand(module.num_layers * directions, B, H))
    lengths = torch.tensor([T, T - 1]) if layout == "L1-bi-packed" else None
    count = len(states)

    def f(x, *tensors):
        states, params = tensors[:count], tensors[count:]
        hx = tuple(states) if cell == "lstm" else states[0]
        data = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        result = functional_call(module, dict(zip(names, params)), (data, hx))
        if is_cell:
            return result
        output, hidden = result
        if lengths is not None:
            output = pad_packed_sequence(output)[0]
        return (output, *(hidden if isinstance(hidden, tuple) else (hidden,)))

    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    return f, (x, *states, *params)


def second_derivatives(f, inputs):
    """d/d inputs of <v, d<w, f(inputs)>/d inputs> for fixed random w, v: one Hessian-vector
    product per input."""
    outputs = f(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(2)

    def weighted(tensors):  # <random weights, tensors>
        return sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
                   for t in tensors)

    firsts = torch.autograd.grad(weighted(outputs), inputs, create_graph=True)
    inner = weighted(firsts)
    return torch.autograd.grad(inner, inputs, allow_unused=True)


def assert_same_second_derivatives(theirs, ours, layout, cell):
    f_theirs, inputs = as_function(theirs, layout, cell)
    f_ours, _ = as_function(ours, layout, cell)
    expected = second_derivatives(f_theirs, inputs)
    got = second_derivatives(f_ours, inputs)
    assert any(e is not None and e.abs().max() > 0 for e in expected), "torch's are all zero"
    for index, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None or not g.any(), index
        else:
            assert g is not None, f"input {index}: no second derivative"
            torch.testing.assert_close(g, e, msg=f"input {index}")
    return f_ours, inputs


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell,layout", LAYER_CASES, ids=[f"{c}-{lay}" for c, lay in LAYER_CASES])
def test_layer_double_backward_matches_torch(cell, layout, backend):
    theirs, ours = layer_pair(cell, layout, backend)
    f, inputs = assert_same_second_derivatives(theirs, ours, layout, cell)
    assert gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", list(CELL_CLASSES))
def test_cell_double_backward_matches_torch(cell, backend):
    theirs, ours = cell_pair(cell, backend)
    f, inputs = assert_same_second_derivatives(theirs, ours, None, cell)
    assert gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell,layout", LAYER_CASES, ids=[f"{c}-{lay}" for c, lay in LAYER_CASES])
def test_layer_batched_gradients(cell, layout, backend):
    _, ours = layer_pair(cell, layout, backend)
    f, inputs = as_function(ours, layout, cell)
    assert gradcheck(f, inputs, check_batched_grad=True, fast_mode=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", list(CELL_CLASSES))
def test_cell_batched_gradients(cell, backend):
    _, ours = cell_pair(cell, backend)
    f, inputs = as_function(ours, None, cell)
    assert gradcheck(f, inputs, check_batched_grad=True, fast_mode=True)


def _stacked_gradients(models, x):
    """torch.func.vmap(torch.func.grad(loss)) over the stacked parameters of `models`."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(params, x):
        output = functional_call(base, (params, buffers), (x,))
        return (output[0] if isinstance(output, tuple) else output).square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the plain-ops notice under transforms
        return vmap(grad(loss), in_dims=(0, None))(params, x)


VMAP_CASES = [("lstm", dict(num_layers=2, bidirectional=True)), ("gru", {}),
              ("rnn_relu", dict(bidirectional=True)), ("lstm", dict(proj_size=2))]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell,kwargs", VMAP_CASES, ids=[f"{c}-{k}" for c, k in VMAP_CASES])
def test_vmap_of_grad_over_stacked_models_matches_per_model_torch(cell, kwargs, backend):
    torch.manual_seed(0)
    theirs = [TORCH_CLASSES[cell](I, H, dtype=torch.float64, **kwargs, **_kwargs(cell))
              for _ in range(3)]
    ours = [FAST_CLASSES[cell].from_torch(m, backend=backend) for m in theirs]
    x = torch.randn(T, B, I, dtype=torch.float64)
    got = _stacked_gradients(ours, x)
    for index, model in enumerate(theirs):
        model.zero_grad()
        model(x)[0].square().sum().backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[name][index], param.grad, msg=f"model {index} {name}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_vmap_of_grad_over_stacked_cells(backend):
    torch.manual_seed(0)
    theirs = [nn.GRUCell(I, H, dtype=torch.float64) for _ in range(3)]
    ours = [fastrnn.GRUCell.from_torch(m, backend=backend) for m in theirs]
    x = torch.randn(B, I, dtype=torch.float64)
    got = _stacked_gradients(ours, x)
    for index, model in enumerate(theirs):
        model.zero_grad()
        model(x).square().sum().backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[name][index], param.grad, msg=f"model {index} {name}")


def test_per_sample_gradients_match_torch():
    """vmap over the batch (one sequence per sample), the per-sample-gradient idiom."""
    torch.manual_seed(0)
    theirs = nn.LSTM(I, H, dtype=torch.float64)
    ours = fastrnn.LSTM.from_torch(theirs)
    params = {name: p.detach() for name, p in ours.named_parameters()}
    xs = torch.randn(4, T, 1, I, dtype=torch.float64)

    def loss(params, x):
        return functional_call(ours, params, (x,))[0].square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for index in range(xs.shape[0]):
        theirs.zero_grad()
        theirs(xs[index])[0].square().sum().backward()
        for name, param in theirs.named_parameters():
            torch.testing.assert_close(got[name][index], param.grad, msg=f"sample {index} {name}")


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_layer_ops_vmap_per_sample(name):
    """torch.vmap straight over the layer op and its backward op: one call per sample."""
    torch.manual_seed(0)
    gates, directions = (4 if name == "lstm" else 3), 2
    x = torch.randn(5, T, B, I)  # vmapped over dim 0
    w_ih, b_ih = torch.randn(directions * gates * H, I), torch.randn(directions * gates * H)
    h0 = torch.randn(directions, B, H)
    c0 = torch.randn(directions, B, H) if name == "lstm" else None
    w_hh, b_hh = torch.randn(directions, gates * H, H), torch.randn(directions, gates * H)
    op = getattr(torch.ops.fastrnn, f"{name}_layer")
    weights = (w_ih, b_ih, h0, c0, w_hh, b_hh, None, None)
    got = vmap(lambda sample: op(sample, *weights, "", True))(x)
    for index in range(x.shape[0]):
        expected = op(x[index], *weights, "", True)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g[index], e)
    output, workspace = got[0], got[3]
    grad_output = torch.randn_like(output)
    backward = getattr(torch.ops.fastrnn, f"{name}_layer_backward")
    wanted = [True, True, True, True, name == "lstm", True, True, False]
    grads = vmap(lambda go, sample, out, ws: backward(go, None, None, sample, *weights, out, ws,
                                                      "", wanted))(grad_output, x, output,
                                                                   workspace)
    for index in range(x.shape[0]):
        expected = backward(grad_output[index], None, None, x[index], *weights, output[index],
                            workspace[index], "", wanted)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g[index], e)


def _forward_derivatives(f, inputs):
    """The forward-mode derivative of f along fixed random tangents of all inputs (dual tensors
    of torch.autograd.forward_ad), and torch.func.jvp's."""
    generator = torch.Generator().manual_seed(3)
    tangents = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in inputs]
    primals = [t.detach() for t in inputs]
    with fwAD.dual_level():
        outputs = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        duals = [fwAD.unpack_dual(o).tangent for o in outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, jvps = torch.func.jvp(f, tuple(primals), tuple(tangents))
    return duals, list(jvps)


# not packed: torch's pack_padded_sequence has no forward-mode derivative
FORWARD_CASES = ([(cell, layout) for cell, layout in LAYER_CASES if "packed" not in layout]
                 + [(cell, None) for cell in CELL_CLASSES])


@pytest.mark.parametrize("cell,layout", FORWARD_CASES, ids=[f"{c}-{lay or 'cell'}"
                                                            for c, lay in FORWARD_CASES])
def test_forward_mode_ad_matches_torch(cell, layout):
    theirs, ours = layer_pair(cell, layout, None) if layout else cell_pair(cell, None)
    f_theirs, inputs = as_function(theirs, layout, cell)
    f_ours, _ = as_function(ours, layout, cell)

    def as_tuple(f):
        return lambda *a: (lambda out: out if isinstance(out, tuple) else (out,))(f(*a))

    expected_duals, expected_jvps = _forward_derivatives(as_tuple(f_theirs), inputs)
    got_duals, got_jvps = _forward_derivatives(as_tuple(f_ours), inputs)
    for got, expected in zip(got_duals + got_jvps, expected_duals + expected_jvps):
        torch.testing.assert_close(got, expected)
    assert gradcheck(f_ours, inputs, check_forward_ad=True, check_backward_ad=False,
                     check_undefined_grad=False, fast_mode=True)
