"""The one place where Keras' recurrent weights meet torch.nn's layout, both ways.

Keras keeps a cell's weights as kernel [I, G*U] (x @ kernel), recurrent_kernel [U, G*U] and bias;
torch.nn as w_ih [G*U, I] (W @ x), w_hh [G*U, U], b_ih [G*U] and b_hh [G*U]. Per cell:

    LSTM       Keras gates i, f, c, o = torch's i, f, g, o; one bias [4U] (torch: b_ih + b_hh)
    GRU        Keras gates z, r, h; torch's r, z, n. With reset_after=True (the only form torch
               has) a bias [2, 3U]: row 0 is b_ih, row 1 b_hh (inside r * (W_hn h + b_hn))
    SimpleRNN  one gate; one bias [U]

Legend: B batch, T time, I input size, U units, G gates.
"""

from __future__ import annotations

import torch
from torch import Tensor

# For each cell, the Keras gate that fills each of torch's gates, in torch's order.
KERAS_GATE_OF_TORCH_GATE = {"lstm": (0, 1, 2, 3), "gru": (1, 0, 2), "rnn": (0,)}


def _reorder(gates: Tensor, order: tuple[int, ...], dim: int) -> Tensor:
    """gates with its `dim` (G*U) split in len(order) blocks and put in `order`."""
    if order == tuple(range(len(order))):
        return gates
    blocks = gates.chunk(len(order), dim)
    return torch.cat([blocks[index] for index in order], dim)


def torch_weights(cell: str, kernel: Tensor, recurrent_kernel: Tensor, bias: Tensor | None
                  ) -> list[Tensor]:
    """One direction's weights in torch.nn's layout for fastrnn.functional: [w_ih [G*U, I],
    w_hh [G*U, U]] and, with a bias, [b_ih [G*U], b_hh [G*U]], from a Keras cell's kernel
    [I, G*U], recurrent_kernel [U, G*U] and bias ([G*U], or [2, G*U] for a GRU), for cell
    "lstm", "gru" or "rnn". Views and differentiable ops only: gradients reach the Keras
    variables."""
    order = KERAS_GATE_OF_TORCH_GATE[cell]
    weights = [_reorder(kernel, order, 1).t(), _reorder(recurrent_kernel, order, 1).t()]
    if bias is None:
        return weights
    if bias.dim() == 2:  # GRU reset_after=True: [input bias, recurrent bias]
        return weights + [_reorder(bias[0], order, 0), _reorder(bias[1], order, 0)]
    return weights + [_reorder(bias, order, 0), bias.new_zeros(bias.shape)]


def keras_weights(cell: str, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                  b_hh: Tensor | None = None) -> list[Tensor]:
    """The inverse of torch_weights: a Keras cell's [kernel, recurrent_kernel] and, with biases,
    its bias, from torch.nn's w_ih [G*U, I], w_hh [G*U, U], b_ih and b_hh [G*U] (one direction
    of a torch.nn or fastrnn layer), for cell "lstm", "gru" (Keras' reset_after=True) or "rnn".
    Keras' LSTM and SimpleRNN have one bias: it takes b_ih + b_hh."""
    order = KERAS_GATE_OF_TORCH_GATE[cell]
    inverse = tuple(order.index(gate) for gate in range(len(order)))
    weights = [_reorder(w_ih.t(), inverse, 1), _reorder(w_hh.t(), inverse, 1)]
    if b_ih is None:
        return weights
    if cell == "gru":
        return weights + [torch.stack([_reorder(b_ih, inverse, 0), _reorder(b_hh, inverse, 0)])]
    return weights + [_reorder(b_ih + b_hh, inverse, 0)]
