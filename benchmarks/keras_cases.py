"""Keras benchmark configurations and workloads: Keras' own layers, fastrnn.keras's, and
fastrnn called directly (fastrnn.functional on the same weights, in torch.nn's layout) on one
problem.

Legend: B batch, T time steps, I input size, U units.
"""

from __future__ import annotations

import dataclasses
import math
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import torch  # noqa: E402

import fastrnn  # noqa: E402
import fastrnn.keras  # noqa: E402
from fastrnn.keras.weights import torch_weights  # noqa: E402

IMPLEMENTATIONS = ("keras", "fastrnn.keras", "fastrnn")
PASSES = ("fwd", "fwd+bwd")
# Largest normalised error (max |a - b| / max |b|) accepted before timing: float32, T up to 500
TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked Keras layer call."""

    layer: str  # "LSTM", "GRU", "SimpleRNN" or "BiLSTM" (Bidirectional(LSTM(U)))
    batch: int
    steps: int
    units: int
    input_size: int = 64
    masked: bool = False  # a right-padding mask, lengths uniform in [T/3, T]
    return_sequences: bool = False
    passes: tuple[str, ...] = PASSES

    @property
    def label(self) -> str:
        parts = ["keras", self.layer.lower(), f"B{self.batch}-T{self.steps}-I{self.input_size}"
                 f"-U{self.units}"]
        if self.masked:
            parts.append("mask")
        if self.return_sequences:
            parts.append("seq")
        return "-".join(parts)

    @property
    def kind(self) -> str:
        return {"LSTM": "lstm", "BiLSTM": "lstm", "GRU": "gru", "SimpleRNN": "rnn"}[self.layer]


def configs(quick: bool) -> list[Config]:
    """The course's layers (ANCHORS.md, Keras 3 on the torch backend), T 100 and 500."""
    chosen = [Config("LSTM", 32, 100, 128), Config("LSTM", 32, 100, 128, masked=True),
              Config("SimpleRNN", 32, 100, 128, passes=("fwd",)),
              Config("BiLSTM", 32, 100, 64)]
    if quick:
        return chosen
    return chosen + [Config("GRU", 32, 100, 256, return_sequences=True),
                     Config("LSTM", 64, 500, 128), Config("LSTM", 64, 500, 128, masked=True),
                     Config("GRU", 32, 500, 256, return_sequences=True, passes=("fwd+bwd",))]


def _keras_layer(config: Config, library: str):
    layers = fastrnn.keras if library == "fastrnn.keras" else keras.layers
    if config.layer == "BiLSTM":
        return layers.Bidirectional(layers.LSTM(config.units,
                                                return_sequences=config.return_sequences))
    return getattr(layers, config.layer)(config.units, return_sequences=config.return_sequences)


@dataclasses.dataclass
class Problem:
    """Input [B, T, I], mask [B, T] (or None), output gradient and Keras' weights."""

    x: torch.Tensor
    mask: torch.Tensor | None
    grad_output: torch.Tensor
    weights: list  # numpy arrays, Keras' order


def make_problem(config: Config, seed: int = 0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    keras.utils.set_random_seed(seed)
    layer = _keras_layer(config, "keras")
    layer.build((config.batch, config.steps, config.input_size))
    x = torch.randn(config.batch, config.steps, config.input_size, generator=generator)
    mask = None
    if config.masked:
        lengths = torch.randint(math.ceil(config.steps / 3), config.steps + 1, (config.batch,),
                                generator=generator)
        mask = torch.arange(config.steps) < lengths.unsqueeze(1)
    directions = 2 if config.layer == "BiLSTM" else 1
    shape = ((config.batch, config.steps) if config.return_sequences else (config.batch,))
    grad_output = torch.randn(*shape, directions * config.units, generator=generator)
    return Problem(x, mask, grad_output, layer.get_weights())


class Workload:
    """One implementation of one config, ready to run a pass."""

    def __init__(self, config: Config, problem: Problem, implementation: str):
        self.config, self.problem = config, problem
        if implementation == "fastrnn":
            self.call, self.weights = self._direct(config, problem)
        else:
            layer = _keras_layer(config, implementation)
            layer.build(tuple(problem.x.shape))
            layer.set_weights(problem.weights)
            self.weights = [weight.value for weight in layer.trainable_weights]
            mask = problem.mask

            def call(x):
                return layer(x, mask=mask, training=True)

            self.call = call

    @staticmethod
    def _direct(config: Config, problem: Problem):
        """fastrnn.functional on torch.nn-layout copies of the weights: (call, weights)."""
        tensors = [torch.tensor(weight) for weight in problem.weights]
        per_direction = len(tensors) // (2 if config.layer == "BiLSTM" else 1)
        weights = []
        for first in range(0, len(tensors), per_direction):
            group = tensors[first:first + per_direction]
            weights += torch_weights(config.kind, group[0], group[1],
                                     group[2] if len(group) > 2 else None)
        # Keras' LSTM and SimpleRNN have one bias: torch_weights' b_hh (every 4th) is zeros
        trainable = [weight.detach().contiguous().requires_grad_(
            config.kind == "gru" or index % 4 != 3) for index, weight in enumerate(weights)]
        lengths = None if problem.mask is None else problem.mask.sum(1)
        directions = 2 if config.layer == "BiLSTM" else 1
        function = {"lstm": fastrnn.functional.lstm, "gru": fastrnn.functional.gru,
                    "rnn": fastrnn.functional.rnn}[config.kind]

        def call(x):
            h0 = x.new_zeros(directions, config.batch, config.units)
            state = (h0, h0) if config.kind == "lstm" else h0
            output, h_n, *_ = function(x, state, trainable, bidirectional=directions == 2,
                                       batch_first=True, lengths=lengths)
            if config.return_sequences:
                return output
            return h_n[0] if directions == 1 else torch.cat([h_n[0], h_n[1]], 1)

        return call, [weight for weight in trainable if weight.requires_grad]

    def forward(self):
        with torch.no_grad():
            return self.call(self.problem.x)

    def forward_backward(self):
        x = self.problem.x.detach().requires_grad_()
        output = self.call(x)
        return torch.autograd.grad(output, [x, *self.weights], self.problem.grad_output,
                                   allow_unused=True)

    def runner(self, pass_name: str):
        return self.forward if pass_name == "fwd" else self.forward_backward


def mismatch(got, expected) -> str:
    """Why two passes' results differ beyond TOLERANCE ("" when they agree)."""
    got = got if isinstance(got, (tuple, list)) else [got]
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    for index, (value, want) in enumerate(zip(got, expected)):
        if value is None or want is None:
            continue
        value = value.reshape(want.shape) if value.numel() == want.numel() else value
        scale = want.abs().max().item() or 1.0
        error = (value.float() - want.float()).abs().max().item() / scale
        if not error <= TOLERANCE:
            return f"result {index} differs: normalised max error {error:.3g} > {TOLERANCE}"
    return ""
