"""A NaN anywhere (input, h0, c0, a weight, a bias) reaches the same outputs and gradients as in
torch.nn, on every backend that runs CPU tensors here and for every cell: no activation, clamp or
mask may turn it into a number (relu's max(x, 0), or min/max clamps that drop a NaN operand)."""

from __future__ import annotations

import pytest
import torch

from helpers import FAST_CLASSES, TORCH_CLASSES, every_backend_here

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
PLACES = ("x", "h0", "c0", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def run(module, x, states):
    """Outputs and gradients of a random-weighted sum of every output: {name: tensor}.
    states: [h0] or [h0, c0] (LSTM), leaves like x."""
    output, hidden = module(x, tuple(states) if len(states) == 2 else states[0])
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    results = {"output": output, **{f"state{i}": s for i, s in enumerate(states)}}
    generator = torch.Generator().manual_seed(1)
    loss = sum((value * torch.randn(value.shape, generator=generator)).sum()
               for value in results.values())
    leaves = {"x": x, **{f"hx{i}": h for i, h in enumerate(states)},
              **dict(module.named_parameters())}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results.update({f"grad_{name}": grad for name, grad in zip(leaves, grads)})
    return {name: value.detach() for name, value in results.items()}


@pytest.mark.parametrize("backend", every_backend_here())
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("cell", CELLS)
def test_nan_reaches_what_it_reaches_in_torch(cell, place, backend):
    if place == "c0" and cell != "lstm":
        pytest.skip("only the LSTM has a cell state")
    torch.manual_seed(0)
    kwargs = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    theirs = TORCH_CLASSES[cell](5, 20, **kwargs)  # H = 20: a vector body and a masked tail
    ours = FAST_CLASSES[cell].from_torch(theirs, backend=backend)
    seq, batch = 6, 3
    x = torch.randn(seq, batch, 5)
    hx = [torch.randn(1, batch, 20) for _ in range(2 if cell == "lstm" else 1)]
    if place == "x":
        x[2, 1, 3] = float("nan")  # one sequence from step 2 on
    elif place in ("h0", "c0"):
        hx[PLACES.index(place) - 1][0, 1, 7] = float("nan")
    else:
        for module in (theirs, ours):
            with torch.no_grad():
                getattr(module, place).view(-1)[11] = float("nan")
    results = {}
    for name, module in (("torch", theirs), ("fastrnn", ours)):
        leaves = [t.clone().requires_grad_() for t in (x, *hx)]
        results[name] = run(module, leaves[0], leaves[1:])
    assert results["fastrnn"].keys() == results["torch"].keys()
    for name, expected in results["torch"].items():
        got = results["fastrnn"][name]
        assert expected.isnan().any() or name.startswith("grad_"), "the NaN reached nothing"
        assert torch.equal(got.isnan(), expected.isnan()), f"{name}: NaN added or lost"
        torch.testing.assert_close(got.nan_to_num(), expected.nan_to_num(), atol=2e-5, rtol=1e-4,
                                   msg=name)
