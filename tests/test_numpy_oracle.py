"""fastrnn's forward against an independent NumPy float64 loop over time (textbook equations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastrnn
from helpers import cpu_backends


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_layer(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr=None, reverse=False):
    """x [T, B, I] -> outputs [T, B, P], h [B, P], c [B, H] for one direction of one layer."""
    steps = range(len(x) - 1, -1, -1) if reverse else range(len(x))
    outputs = [None] * len(x)
    for t in steps:
        gi = x[t] @ w_ih.T + b_ih
        gh = h @ w_hh.T + b_hh
        if mode == "LSTM":
            i, f, g, o = np.split(gi + gh, 4, axis=1)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            if w_hr is not None:
                h = h @ w_hr.T
        elif mode == "GRU":
            i_r, i_z, i_n = np.split(gi, 3, axis=1)
            h_r, h_z, h_n = np.split(gh, 3, axis=1)
            r, z = sigmoid(i_r + h_r), sigmoid(i_z + h_z)
            n = np.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        else:
            pre = gi + gh
            h = np.tanh(pre) if mode == "RNN_TANH" else np.maximum(pre, 0)
        outputs[t] = h
    return np.stack(outputs), h, c


def numpy_stack(module, x, h0, c0):
    """The whole multi-layer, bidirectional module in NumPy, from its parameters."""
    params = {name: p.detach().double().numpy() for name, p in module.named_parameters()}
    directions = 2 if module.bidirectional else 1
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(directions):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            hidden = module.hidden_size * (4 if module.mode == "LSTM" else 3 if module.mode == "GRU" else 1)
            zeros = np.zeros(hidden)
            out, h, c = numpy_layer(
                module.mode, x, h0[layer * directions + d],
                None if c0 is None else c0[layer * directions + d],
                params[f"weight_ih_{sfx}"], params[f"weight_hh_{sfx}"],
                params.get(f"bias_ih_{sfx}", zeros), params.get(f"bias_hh_{sfx}", zeros),
                params.get(f"weight_hr_{sfx}"), reverse=d == 1)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = np.concatenate(outs, axis=2)
    return x, np.stack(h_n), None if c0 is None else np.stack(c_n)


MODULES = [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(proj_size=3, bias=False)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(bias=False)),
    ("RNN", dict(nonlinearity="tanh", bidirectional=True)),
    ("RNN", dict(nonlinearity="relu", num_layers=3)),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name,kwargs", MODULES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in MODULES])
def test_forward_matches_numpy_loop(name, kwargs, backend):
    torch.manual_seed(3)
    module = getattr(fastrnn, name)(4, 6, dtype=torch.float64, backend=backend, **kwargs)
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size or module.hidden_size
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    h0 = torch.randn(module.num_layers * directions, 3, out_size, dtype=torch.float64)
    c0 = torch.randn(module.num_layers * directions, 3, 6, dtype=torch.float64)
    hx = (h0, c0) if name == "LSTM" else h0
    output, hidden = module(x, hx)
    expected_out, expected_h, expected_c = numpy_stack(
        module, x.numpy(), h0.numpy(), c0.numpy() if name == "LSTM" else None)
    np.testing.assert_allclose(output.detach().numpy(), expected_out, rtol=1e-12, atol=1e-12)
    h_n = hidden[0] if name == "LSTM" else hidden
    np.testing.assert_allclose(h_n.detach().numpy(), expected_h, rtol=1e-12, atol=1e-12)
    if name == "LSTM":
        np.testing.assert_allclose(hidden[1].detach().numpy(), expected_c, rtol=1e-12, atol=1e-12)
