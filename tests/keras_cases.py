"""Keras test helpers: pairs of Keras' and fastrnn.keras's layers with the same weights, a
forward and backward pass that collects every output and gradient, and an oracle that runs
Keras' step semantics with torch.nn's cells (torch._VF) in any dtype.

Legend: B batch, T time, I input size, U units.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import _VF  # noqa: E402

import fastrnn.keras  # noqa: E402
from fastrnn.keras.weights import torch_weights  # noqa: E402

KERAS_CLASSES = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU,
                 "rnn": keras.layers.SimpleRNN}
FAST_CLASSES = {"lstm": fastrnn.keras.LSTM, "gru": fastrnn.keras.GRU,
                "rnn": fastrnn.keras.SimpleRNN}
STATE_COUNT = {"lstm": 2, "gru": 1, "rnn": 1}
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def mask_of(kind: str, batch: int, steps: int, generator: np.random.Generator):
    """A Keras mask [B, T] (bool) of a kind: none, right (right padding), left (left padding),
    holes (any pattern), empty (a fully masked sequence among right-padded ones)."""
    if kind == "none":
        return None
    lengths = generator.integers(1, steps + 1, batch)
    lengths[0] = steps
    columns = np.arange(steps)
    if kind == "right":
        return columns < lengths[:, None]
    if kind == "left":
        return columns >= steps - lengths[:, None]
    if kind == "holes":
        mask = generator.random((batch, steps)) < 0.6
        mask[0] = True
        return mask
    if kind == "empty":
        mask = columns < lengths[:, None]
        mask[-1] = False
        return mask
    raise ValueError(kind)


@dataclasses.dataclass
class Case:
    """One call of a recurrent layer: its class, options and inputs."""

    kind: str  # lstm | gru | rnn
    options: dict = dataclasses.field(default_factory=dict)  # layer constructor options
    mask: str = "none"
    initial_state: bool = False
    batch: int = 3
    steps: int = 6
    input_size: int = 4
    units: int = 5

    @property
    def id(self) -> str:
        parts = [self.kind, f"B{self.batch}-T{self.steps}-I{self.input_size}-U{self.units}"]
        parts += [f"{name}={value}" for name, value in self.options.items()]
        if self.mask != "none":
            parts.append(f"mask-{self.mask}")
        if self.initial_state:
            parts.append("state")
        return "-".join(parts)


def layer_pair(case: Case, dtype: str, seed: int = 0):
    """Keras' layer and fastrnn's, built, with the same random weights (biases included)."""
    generator = np.random.default_rng(seed)
    stock = KERAS_CLASSES[case.kind](case.units, dtype=dtype, **case.options)
    fast = FAST_CLASSES[case.kind](case.units, dtype=dtype, **case.options)
    for layer in (stock, fast):
        layer.build((case.batch, case.steps, case.input_size))
    for stock_weight, fast_weight in zip(stock.weights, fast.weights):
        value = generator.uniform(-0.6, 0.6, stock_weight.shape)
        stock_weight.assign(value)
        fast_weight.assign(value)
    return stock, fast


def inputs(case: Case, seed: int = 0):
    """(x [B, T, I], mask [B, T] or None, initial states [B, U] or None) as float64 numpy."""
    generator = np.random.default_rng(seed + 100)
    x = generator.standard_normal((case.batch, case.steps, case.input_size))
    mask = mask_of(case.mask, case.batch, case.steps, generator)
    states = None
    if case.initial_state:
        states = [generator.standard_normal((case.batch, case.units))
                  for _ in range(STATE_COUNT[case.kind])]
    return x, mask, states


def run_keras(layer, x, mask, states, dtype: str, training: bool = False, seed: int = 0):
    """Forward, then the gradients of a random-weighted sum of every output, of a Keras layer
    (Keras' or fastrnn's). Returns {name: float64 tensor}: outputs (out0, out1, ...) and
    gradients (grad_x, grad_state0, ..., grad_<weight name>)."""
    torch_dtype = TORCH_DTYPES[dtype]
    x = torch.tensor(x, dtype=torch_dtype, requires_grad=True)
    leaves = {"x": x}
    arguments = {}
    if states is not None:
        states = [torch.tensor(s, dtype=torch_dtype, requires_grad=True) for s in states]
        leaves.update({f"state{i}": s for i, s in enumerate(states)})
        arguments["initial_state"] = states
    if mask is not None:
        arguments["mask"] = torch.tensor(mask)
    outputs = keras.tree.flatten(layer(x, training=training, **arguments))
    results = {f"out{i}": out for i, out in enumerate(outputs)}
    generator = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=torch.float64)
                .to(out.dtype)).sum() for out in outputs)
    leaves.update({weight.path.split("/", 1)[1]: weight.value
                   for weight in layer.trainable_weights})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    results.update({f"grad_{name}": grad for name, grad in zip(leaves, grads)
                    if grad is not None})
    return {name: value.detach().double() for name, value in results.items()}


def _step(kind: str, relu: bool, x_t, states, weights):
    """One step of torch.nn's cell: new states [B, U] each."""
    w_ih, w_hh, *biases = weights
    b_ih, b_hh = biases if biases else (None, None)
    if kind == "lstm":
        return list(_VF.lstm_cell(x_t, tuple(states), w_ih, w_hh, b_ih, b_hh))
    step = {"gru": _VF.gru_cell, "rnn": _VF.rnn_relu_cell if relu else _VF.rnn_tanh_cell}[kind]
    return [step(x_t, states[0], w_ih, w_hh, b_ih, b_hh)]


def oracle(case: Case, layer, x, mask, states, dtype: str, seed: int = 0):
    """What Keras computes for the case (its generic loop's semantics: masked steps keep the
    state and repeat the previous output, or 0 with zero_output_for_mask), stepped with
    torch.nn's cells in `dtype` from the weights of `layer`. Same results dict as run_keras."""
    torch_dtype = TORCH_DTYPES[dtype]
    options = case.options
    x = torch.tensor(x, dtype=torch_dtype, requires_grad=True)
    leaves = {"x": x}
    if states is None:
        states = [x.new_zeros(case.batch, case.units) for _ in range(STATE_COUNT[case.kind])]
    else:
        states = [torch.tensor(s, dtype=torch_dtype, requires_grad=True) for s in states]
        leaves.update({f"state{i}": s for i, s in enumerate(states)})
    variables = {weight.path.split("/", 1)[1]: weight.value.detach().to(torch_dtype)
                 .requires_grad_() for weight in layer.trainable_weights}
    leaves.update(variables)
    values = list(variables.values())
    weights = torch_weights(case.kind, values[0], values[1], values[2] if len(values) > 2 else None)
    relu = options.get("activation") == "relu"
    steps = range(case.steps - 1, -1, -1) if options.get("go_backwards") else range(case.steps)
    zero_output = options.get("zero_output_for_mask", False)
    previous = x.new_zeros(case.batch, case.units)
    outputs = []
    for t in steps:
        new = _step(case.kind, relu, x[:, t], states, weights)
        if mask is None:
            states, output = new, new[0]
        else:
            keep = torch.tensor(mask[:, t]).unsqueeze(1)
            states = [torch.where(keep, n, s) for n, s in zip(new, states)]
            output = torch.where(keep, new[0], 0.0 if zero_output else previous)
        previous = output
        outputs.append(output)
    result = torch.stack(outputs, 1) if options.get("return_sequences") else outputs[-1]
    flat = [result] + (states if options.get("return_state") else [])
    results = {f"out{i}": out for i, out in enumerate(flat)}
    generator = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=torch.float64)
                .to(out.dtype)).sum() for out in flat)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    results.update({f"grad_{name}": grad for name, grad in zip(leaves, grads)
                    if grad is not None})
    return {name: value.detach().double() for name, value in results.items()}


def max_errors(got: dict, expected: dict) -> dict:
    """{name: max |got - expected| / max(1, max |expected|)} over the same names."""
    assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
    errors = {}
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        scale = max(1.0, value.abs().max().item())
        errors[name] = (got[name] - value).abs().max().item() / scale
    return errors
