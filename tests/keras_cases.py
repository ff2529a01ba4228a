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


def _weight_name(index: int, weight) -> str:
    """A trainable variable's name in the results: its place in the layer and its own name
    (the layer names in its path differ between two layers of one kind)."""
    return f"{index}-{weight.name}"


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
    leaves.update({_weight_name(index, weight): weight.value
                   for index, weight in enumerate(layer.trainable_weights)})
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


def keras_steps(kind: str, relu: bool, x, mask, states, weights, go_backwards: bool,
                zero_output: bool):
    """Keras' generic loop over one direction with torch.nn's cells: masked steps keep the
    state and repeat the previous output, or give 0 with zero_output. x [B, T, I], mask [B, T]
    (numpy bool) or None, states [B, U] each, weights in torch.nn's layout. Returns (outputs
    [B, U] each, in the order the steps are read, final states)."""
    steps = range(x.shape[1] - 1, -1, -1) if go_backwards else range(x.shape[1])
    previous = x.new_zeros(x.shape[0], weights[1].shape[1])
    outputs = []
    for t in steps:
        new = _step(kind, relu, x[:, t], states, weights)
        if mask is None:
            states, output = new, new[0]
        else:
            keep = torch.tensor(mask[:, t]).unsqueeze(1)
            states = [torch.where(keep, n, s) for n, s in zip(new, states)]
            output = torch.where(keep, new[0], 0.0 if zero_output else previous)
        previous = output
        outputs.append(output)
    return outputs, states


def _leaf_states(kind: str, batch: int, units: int, states, torch_dtype, leaves: dict,
                 first: int = 0):
    """Initial states as float leaves (named state<first>, ...) in `leaves`, or zeros."""
    if states is None:
        return [torch.zeros(batch, units, dtype=torch_dtype) for _ in range(STATE_COUNT[kind])]
    states = [torch.tensor(s, dtype=torch_dtype, requires_grad=True) for s in states]
    leaves.update({f"state{first + i}": s for i, s in enumerate(states)})
    return states


def _leaf_weights(layer, torch_dtype, leaves: dict) -> list[torch.Tensor]:
    """The layer's trainable variables as float leaves in `leaves`, named as run_keras names
    them; returned in the layer's order."""
    variables = {_weight_name(index, weight): weight.value.detach().to(torch_dtype)
                 .requires_grad_() for index, weight in enumerate(layer.trainable_weights)}
    leaves.update(variables)
    return list(variables.values())


def _results(flat: list, leaves: dict, seed: int) -> dict:
    """run_keras' results dict: the outputs and the gradients of the same weighted sum."""
    results = {f"out{i}": out for i, out in enumerate(flat)}
    generator = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=torch.float64)
                .to(out.dtype)).sum() for out in flat)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    results.update({f"grad_{name}": grad for name, grad in zip(leaves, grads)
                    if grad is not None})
    return {name: value.detach().double() for name, value in results.items()}


def _direction_weights(kind: str, values: list) -> list[torch.Tensor]:
    return torch_weights(kind, values[0], values[1], values[2] if len(values) > 2 else None)


def oracle(case: Case, layer, x, mask, states, dtype: str, seed: int = 0):
    """What Keras computes for the case (its generic loop's semantics, keras_steps), stepped
    with torch.nn's cells in `dtype` from the weights of `layer`. Same results dict as
    run_keras."""
    torch_dtype = TORCH_DTYPES[dtype]
    options = case.options
    x = torch.tensor(x, dtype=torch_dtype, requires_grad=True)
    leaves = {"x": x}
    states = _leaf_states(case.kind, case.batch, case.units, states, torch_dtype, leaves)
    weights = _direction_weights(case.kind, _leaf_weights(layer, torch_dtype, leaves))
    outputs, states = keras_steps(case.kind, options.get("activation") == "relu", x, mask,
                                  states, weights, options.get("go_backwards", False),
                                  layer.zero_output_for_mask)
    result = torch.stack(outputs, 1) if options.get("return_sequences") else outputs[-1]
    flat = [result] + (states if options.get("return_state") else [])
    return _results(flat, leaves, seed)


def bidirectional_oracle(case: Case, layer, x, mask, states, dtype: str, seed: int = 0):
    """What Keras' Bidirectional over the case's layer computes (forward layer, then the
    backward layer reading last to first, its sequence flipped back, merged by
    layer.merge_mode; states forward then backward), with torch.nn's cells in `dtype`. `states`:
    the forward layer's initial states then the backward layer's, or None."""
    torch_dtype = TORCH_DTYPES[dtype]
    x = torch.tensor(x, dtype=torch_dtype, requires_grad=True)
    leaves = {"x": x}
    count = STATE_COUNT[case.kind]
    given = (None, None) if states is None else (states[:count], states[count:])
    initial = [_leaf_states(case.kind, case.batch, case.units, part, torch_dtype, leaves,
                            first=index * count) for index, part in enumerate(given)]
    values = _leaf_weights(layer, torch_dtype, leaves)
    half = len(values) // 2
    relu = case.options.get("activation") == "relu"
    directions = []
    for index, sublayer in enumerate((layer.forward_layer, layer.backward_layer)):
        weights = _direction_weights(case.kind, values[index * half:(index + 1) * half])
        directions.append(keras_steps(case.kind, relu, x, mask, initial[index], weights,
                                      index == 1, sublayer.zero_output_for_mask))
    (outputs, states_forward), (outputs_reverse, states_backward) = directions
    if layer.return_sequences:
        y, y_reverse = torch.stack(outputs, 1), torch.stack(outputs_reverse, 1).flip(1)
    else:
        y, y_reverse = outputs[-1], outputs_reverse[-1]
    merged = {"concat": lambda: [torch.cat([y, y_reverse], -1)],
              "sum": lambda: [y + y_reverse], "ave": lambda: [(y + y_reverse) / 2],
              "mul": lambda: [y * y_reverse], None: lambda: [y, y_reverse]}[layer.merge_mode]()
    flat = merged + (states_forward + states_backward if layer.return_state else [])
    return _results(flat, leaves, seed)


def max_errors(got: dict, expected: dict) -> dict:
    """{name: max |got - expected| / max(1, max |expected|)} over the same names."""
    assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
    errors = {}
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        scale = max(1.0, value.abs().max().item())
        errors[name] = (got[name] - value).abs().max().item() / scale
    return errors
