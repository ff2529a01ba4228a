"""Keras' LSTM, GRU and SimpleRNN layers (and Bidirectional over them) run on fastrnn.

`inner_loop` takes the place of a Keras recurrent layer's own `inner_loop` (the method Keras'
`RNN.call` runs the recurrence with, after its checks, initial states and dropout masks), `call`
of its `call` (straight to fastrnn where that preparation has nothing to do), and
`bidirectional_call` of `Bidirectional.call`: the fastrnn.keras layers have them as methods, and
`fastrnn.keras.install()` sets them on Keras' own classes (and `rnn_inner_loop` on
`keras.layers.RNN`, which only says when Keras' own loop runs a cell). Each call runs as one
fastrnn call (fastrnn.functional, with per-sequence lengths for a mask, see masks.py) where
fastrnn's kernels compute what Keras computes, and otherwise runs Keras' own method, unchanged,
saying why once.

Legend: B batch, T time, I input size, U units, D directions.
"""

from __future__ import annotations

import collections
import warnings
import weakref

import torch
from keras.src.activations import activations
from keras.src.backend import convert_to_tensor
from keras.src.layers.rnn.bidirectional import Bidirectional as KerasBidirectional
from keras.src.layers.rnn.gru import GRU as KerasGRU, GRUCell
from keras.src.layers.rnn.lstm import LSTM as KerasLSTM, LSTMCell
from keras.src.layers.rnn.rnn import RNN as KerasRNN
from keras.src.layers.rnn.simple_rnn import SimpleRNN as KerasSimpleRNN, SimpleRNNCell
from keras.src.ops import cast, nn as ops_nn, numpy as ops_numpy

from .. import functional
from .masks import MaskedSteps
from .weights import torch_weights

# the Keras versions whose methods these replace were tested against
TESTED_KERAS_VERSIONS = ("3.15.0", "3.15.1")
# Keras' own methods, as the installed Keras defines them (before any install())
KERAS_INNER_LOOP = {"lstm": KerasLSTM.inner_loop, "gru": KerasGRU.inner_loop,
                    "rnn": KerasRNN.inner_loop}
KERAS_CALL = {"lstm": KerasLSTM.call, "gru": KerasGRU.call, "rnn": KerasSimpleRNN.call}
KERAS_BIDIRECTIONAL_CALL = KerasBidirectional.call

_LAYERS = (("lstm", KerasLSTM, LSTMCell), ("gru", KerasGRU, GRUCell),
           ("rnn", KerasSimpleRNN, SimpleRNNCell))
_TANH = (activations.tanh, ops_numpy.tanh, torch.tanh)
_SIGMOID = (activations.sigmoid, ops_nn.sigmoid, torch.sigmoid)
_RELU = (activations.relu, ops_nn.relu, torch.relu)

# calls of each layer class by what ran them: ("LSTM", "fastrnn"), or ("LSTM", "keras: <why>")
calls: collections.Counter = collections.Counter()
_warned: set[tuple[str, str]] = set()
# per cell, for calls without gradients: (its variables' tensors, their versions, its weights in
# torch.nn's layout, contiguous)
_inference_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cell_kind(layer) -> str | None:
    """"lstm", "gru" or "rnn" for a Keras LSTM, GRU or SimpleRNN layer (or subclass), else None."""
    for kind, layer_class, _ in _LAYERS:
        if isinstance(layer, layer_class):
            return kind
    return None


def _activation_name(function) -> str:
    return getattr(function, "__name__", type(function).__name__)


def unsupported(layer, sequences, mask, training: bool) -> str:
    """Why fastrnn's kernels cannot compute this call of a Keras LSTM, GRU or SimpleRNN layer as
    Keras does; "" when they can. sequences [B, T, I], mask [B, T] or None."""
    kind = cell_kind(layer)
    cell = layer.cell
    cell_class = next(cell_class for name, _, cell_class in _LAYERS if name == kind)
    if type(cell) is not cell_class:
        return f"has a cell of class {type(cell).__name__}, not Keras' {cell_class.__name__}"
    if getattr(layer, "use_cudnn", "auto") is False:
        return "has use_cudnn=False, which asks for Keras' own loop"
    if kind == "rnn":
        if cell.activation not in _TANH + _RELU:
            return (f"has activation {_activation_name(cell.activation)} (fastrnn's SimpleRNN "
                    "has tanh and relu)")
    elif cell.activation not in _TANH or cell.recurrent_activation not in _SIGMOID:
        return (f"has activation {_activation_name(cell.activation)} and recurrent_activation "
                f"{_activation_name(cell.recurrent_activation)} (fastrnn's kernels have tanh "
                "and sigmoid)")
    if kind == "gru" and not cell.reset_after:
        return "has reset_after=False (fastrnn's GRU, as torch's, applies the reset gate after " \
               "the recurrent product)"
    if training and cell.recurrent_dropout > 0:
        return "has recurrent_dropout > 0 in training (fastrnn's kernels have no recurrent dropout)"
    if training and cell.dropout >= 1:
        return "has dropout=1"
    if training and cell.dropout > 0 and getattr(cell, "dropout_mask_count", None):
        return "has implementation=1 with dropout, which draws an input mask per gate"
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 3 or sequences.shape[1] == 0:
        return "was given input that is not [batch, steps, features] with steps > 0"
    if mask is not None and tuple(mask.shape) not in (tuple(sequences.shape[:2]),
                                                      (*sequences.shape[:2], 1)):
        return f"was given a mask of shape {tuple(mask.shape)} (fastrnn takes [batch, steps])"
    return ""


def _fall_back(layer, reason: str) -> None:
    """Count a call run by Keras' own code, saying why once per layer class and reason."""
    name = type(layer).__name__
    calls[name, f"keras: {reason}"] += 1
    if (name, reason) not in _warned:
        _warned.add((name, reason))
        warnings.warn(f"fastrnn.keras: this {name} {reason}: Keras' own code runs it",
                      stacklevel=4)


def _symbolic(sequences) -> bool:
    """Whether Keras is only inferring shapes (it calls layers on the meta device)."""
    return isinstance(sequences, torch.Tensor) and sequences.device.type == "meta"


def _as_mask(mask, device) -> torch.Tensor | None:
    """A Keras mask as a [B, T] tensor (it may come as a list, an array or [B, T, 1])."""
    if isinstance(mask, (list, tuple)):
        mask = mask[0]
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    return mask.flatten(1) if mask.dim() == 3 else mask


def inner_loop(self, sequences, initial_state, mask, training=False):
    """Keras' `RNN.inner_loop` for an LSTM, GRU or SimpleRNN layer: (last_output [B, U],
    outputs [B, T, U] (or [B, 1, U] without return_sequences), new states [B, U] each), the
    recurrence on fastrnn's kernels where they can compute it, else Keras' own method."""
    kind = cell_kind(self)
    if isinstance(mask, (list, tuple)):
        mask = mask[0]
    if _symbolic(sequences):
        return KERAS_INNER_LOOP[kind](self, sequences, initial_state, mask, training=training)
    if mask is not None:
        mask = torch.as_tensor(mask, device=sequences.device)
    reason = unsupported(self, sequences, mask, training)
    if reason:
        _fall_back(self, reason)
        return KERAS_INNER_LOOP[kind](self, sequences, initial_state, mask, training=training)
    calls[type(self).__name__, "fastrnn"] += 1
    return _run(self, kind, sequences, initial_state, mask, training)


def call(self, sequences, initial_state=None, mask=None, training=False):
    """Keras' `call` of an LSTM, GRU or SimpleRNN layer. A call with no initial state, no
    dropout and no stored state goes to fastrnn at once (Keras' `RNN.call` would make zero
    states, dropout masks and casts first, which take as long as a short recurrence); any
    other runs Keras' own method, which runs the recurrence through inner_loop."""
    if serves_at_once(self, sequences, initial_state, mask):
        return call_at_once(self, sequences, mask, training)
    return KERAS_CALL[cell_kind(self)](self, sequences, initial_state=initial_state, mask=mask,
                                       training=training)


def call_at_once(layer, sequences, mask, training):
    """`call`'s results for a call that serves_at_once, computed by fastrnn."""
    calls[type(layer).__name__, "fastrnn"] += 1
    last, outputs, states = _run(layer, cell_kind(layer), sequences, None,
                                 _as_mask(mask, sequences.device), training)
    output = _in_dtype(outputs if layer.return_sequences else last, layer.compute_dtype)
    if layer.return_state:
        return output, *(_in_dtype(state, layer.compute_dtype) for state in states)
    return output


def serves_at_once(layer, sequences, initial_state, mask) -> bool:
    """Whether `call` takes this call of an LSTM, GRU or SimpleRNN layer straight to fastrnn: no
    initial state, dropout or stored state, and a call fastrnn's kernels compute (whatever
    `training` is, since nothing here depends on it)."""
    cell = layer.cell
    return (initial_state is None and not layer.stateful and not cell.dropout
            and not cell.recurrent_dropout and isinstance(sequences, torch.Tensor)
            and not _symbolic(sequences)
            and not unsupported(layer, sequences, _as_mask(mask, sequences.device), False))


def _in_dtype(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """x in a Keras dtype (a name), as `keras.ops.cast` gives it."""
    return x if str(x.dtype) == f"torch.{dtype}" else cast(x, dtype)


def rnn_inner_loop(self, sequences, initial_state, mask, training=False):
    """Keras' `RNN.inner_loop` under install(): `keras.layers.RNN` over any cell (a custom
    cell, stacked cells, or Keras' own cells outside their layers) runs Keras' own loop,
    unchanged, saying so once per cell class. (An LSTM, GRU or SimpleRNN layer that falls back
    reaches this through Keras' own method and is not counted twice.)"""
    if cell_kind(self) is None and not _symbolic(sequences):
        _fall_back(self, f"runs a cell of class {type(self.cell).__name__} (fastrnn runs Keras' "
                         "LSTM, GRU and SimpleRNN layers, not keras.layers.RNN)")
    return KERAS_INNER_LOOP["rnn"](self, sequences, initial_state, mask, training=training)


def _initial_states(layer, kind: str, initial_state, x: torch.Tensor) -> list[torch.Tensor]:
    """A layer's initial states as tensors [B, U] of x's dtype and device: the given ones (a
    list, or one tensor), else zeros. Copies where the layer is stateful: Keras assigns its state
    variables in place after the call."""
    count = 2 if kind == "lstm" else 1
    if initial_state is None:
        return [x.new_zeros(x.shape[0], layer.cell.units) for _ in range(count)]
    if not isinstance(initial_state, (list, tuple)):
        initial_state = [initial_state]
    states = [state if isinstance(state, torch.Tensor) else convert_to_tensor(state)
              for state in initial_state[:count]]
    states = [state.to(x.device, x.dtype) for state in states]
    return [state.clone() for state in states] if layer.stateful else states


def _cell_weights(layer, kind: str) -> list[torch.Tensor]:
    """The layer's weights in torch.nn's layout (weights.py), read through Keras' variables (in
    the layer's compute dtype under mixed precision) so that gradients reach them. Where no
    gradient is wanted, contiguous copies kept while the variables stay as they are (the
    kernels would copy the transposed views on every call)."""
    cell = layer.cell
    values = (cell.kernel.value, cell.recurrent_kernel.value,
              None if cell.bias is None else cell.bias.value)
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in values):
        return torch_weights(kind, *values)
    versions = tuple(None if v is None else v._version for v in values)
    kept = _inference_weights.get(cell)
    if (kept is None or kept[1] != versions
            or any(value is not old for value, old in zip(values, kept[0]))):
        weights = [weight.contiguous() for weight in torch_weights(kind, *values)]
        _inference_weights[cell] = kept = (values, versions, weights)
    return kept[2]


def _input(layer, sequences, dtype, training: bool) -> torch.Tensor:
    """The sequences [B, T, I] in `dtype`, with the cell's input dropout mask [B, I] applied to
    every step in training, as Keras applies it."""
    x = sequences.to(dtype)
    if training and layer.cell.dropout > 0:
        x = x * layer.cell.get_dropout_mask(x[:, 0, :]).unsqueeze(1)
    return x


def _recurrence(kind: str, layer, x, h0, c0, weights, lengths):
    """One fastrnn call of one or two directions: x [B, T, I], h0 and c0 [D, B, U] (c0 None but
    for LSTM), weights of each direction in turn. Returns (output [B, T, D*U], h_n [D, B, U],
    c_n [D, B, U] or None)."""
    options = dict(bidirectional=h0.shape[0] == 2, batch_first=True, lengths=lengths)
    if kind == "lstm":
        return functional.lstm(x, (h0, c0), weights, **options)
    if kind == "gru":
        return (*functional.gru(x, h0, weights, **options), None)
    nonlinearity = "relu" if layer.cell.activation in _RELU else "tanh"
    return (*functional.rnn(x, h0, weights, nonlinearity=nonlinearity, **options), None)


def _run(layer, kind: str, sequences, initial_state, mask, training: bool):
    """inner_loop's results for one layer, computed by fastrnn."""
    weights = _cell_weights(layer, kind)
    x = _input(layer, sequences, weights[0].dtype, training)  # Keras' compute dtype
    states = _initial_states(layer, kind, initial_state, x)
    mask = _as_mask(mask, x.device)
    if layer.go_backwards:  # Keras reads the steps (and the mask) last to first
        x = x.flip(1)
        mask = None if mask is None else mask.flip(1)
    steps = None if mask is None else MaskedSteps.of(mask)
    output, h_n, c_n = _recurrence(
        kind, layer, x if steps is None else steps.packed(x), states[0].unsqueeze(0),
        states[1].unsqueeze(0) if kind == "lstm" else None, weights,
        None if steps is None else steps.lengths)
    new_states = [h_n[0]] if c_n is None else [h_n[0], c_n[0]]
    if steps is None:
        last = h_n[0]
        return last, output if layer.return_sequences else last.unsqueeze(1), new_states
    zero_output = layer.zero_output_for_mask
    if steps.order is None and not zero_output and initial_state is None:
        last = h_n[0]  # right padding from zero states: each sequence's last output (or 0)
    else:
        last = steps.outputs(output, zero_output, step=x.shape[1] - 1)
    outputs = steps.outputs(output, zero_output) if layer.return_sequences else last.unsqueeze(1)
    return last, outputs, new_states


# ---- Bidirectional ----------------------------------------------------------------------------
def can_fuse(bidirectional, sequences, initial_state, mask) -> bool:
    """Whether the two layers of a Keras Bidirectional can run as one two-direction fastrnn
    call: one kind of fastrnn-served layer with the same settings, the first reading forward
    and the second backward, with no dropout (whose masks each layer draws), state or
    regularizer of their own; the cases Keras' fused cuDNN path takes, and masks."""
    forward, backward = bidirectional.forward_layer, bidirectional.backward_layer
    kind = cell_kind(forward)
    if kind is None or type(forward) is not type(backward) or bidirectional.stateful:
        return False
    if not (forward.built and backward.built) or forward.go_backwards or not backward.go_backwards:
        return False
    for layer in (forward, backward):
        if (unsupported(layer, sequences, mask, training=False) or layer.cell.dropout
                or layer.cell.recurrent_dropout or layer.activity_regularizer):
            return False
    same = ("units", "activation", "recurrent_activation", "use_bias", "reset_after")
    if any(getattr(forward.cell, name, None) != getattr(backward.cell, name, None)
           for name in same) or forward.zero_output_for_mask != backward.zero_output_for_mask:
        return False
    return initial_state is None or len(initial_state) == 2 * len(forward.state_size)


def fuses(bidirectional, sequences, initial_state, mask) -> bool:
    """Whether `bidirectional_call` runs this call as one fastrnn call (can_fuse, on a tensor)."""
    return (isinstance(sequences, torch.Tensor) and not _symbolic(sequences)
            and cell_kind(bidirectional.forward_layer) is not None
            and can_fuse(bidirectional, sequences, initial_state,
                         _as_mask(mask, sequences.device)))


def bidirectional_call(self, sequences, initial_state=None, mask=None, training=None):
    """Keras' `Bidirectional.call`, with both directions in one fastrnn call where its layers
    allow (can_fuse), else Keras' own method (whose layers may each run on fastrnn)."""
    if fuses(self, sequences, initial_state, mask):
        return call_fused(self, sequences, initial_state, mask)
    return KERAS_BIDIRECTIONAL_CALL(self, sequences, initial_state=initial_state, mask=mask,
                                    training=training)


def call_fused(bidirectional, sequences, initial_state, mask):
    """`bidirectional_call`'s results for a call that `fuses`, computed by one fastrnn call."""
    calls[type(bidirectional).__name__, "fastrnn"] += 1
    return _run_bidirectional(bidirectional, sequences, initial_state,
                              _as_mask(mask, sequences.device))


def _run_bidirectional(bidirectional, sequences, initial_state, mask):
    """Bidirectional.call's results, both directions computed by one fastrnn call."""
    forward, backward = bidirectional.forward_layer, bidirectional.backward_layer
    kind = cell_kind(forward)
    weights = _cell_weights(forward, kind) + _cell_weights(backward, kind)
    x = sequences.to(weights[0].dtype)
    if initial_state is None:
        given = (None, None)
    else:  # the forward layer's states, then the backward layer's
        half = len(initial_state) // 2
        given = (initial_state[:half], initial_state[half:])
    states = [_initial_states(layer, kind, part, x) for layer, part in zip((forward, backward),
                                                                           given)]
    steps = None if mask is None else MaskedSteps.of(mask)
    output, h_n, c_n = _recurrence(
        kind, forward, x if steps is None else steps.packed(x),
        torch.stack([states[0][0], states[1][0]]),
        torch.stack([states[0][1], states[1][1]]) if kind == "lstm" else None, weights,
        None if steps is None else steps.lengths)
    units = forward.cell.units
    output_forward, output_backward = output[..., :units], output[..., units:]
    zero_output = forward.zero_output_for_mask
    if bidirectional.return_sequences:
        y = output_forward if steps is None else steps.outputs(output_forward, zero_output)
        y_reverse = (output_backward if steps is None
                     else steps.outputs(output_backward, zero_output, reverse=True))
    elif steps is None:
        y, y_reverse = h_n[0], h_n[1]
    else:
        y = steps.outputs(output_forward, zero_output, step=x.shape[1] - 1)
        y_reverse = steps.outputs(output_backward, zero_output, reverse=True, step=0)
    output = _merged(bidirectional, cast(y, bidirectional.compute_dtype),
                     cast(y_reverse, bidirectional.compute_dtype))
    if not bidirectional.return_state:
        return output
    states = tuple(h_n.unbind(0)) if c_n is None else (h_n[0], c_n[0], h_n[1], c_n[1])
    return (output + states) if bidirectional.merge_mode is None else (output, *states)


def _merged(bidirectional, y, y_reverse):
    """The two directions' outputs merged as Bidirectional's merge_mode says."""
    mode = bidirectional.merge_mode
    if mode == "concat":
        return torch.cat([y, y_reverse], dim=-1)
    if mode == "sum":
        return y + y_reverse
    if mode == "ave":
        return (y + y_reverse) / 2
    if mode == "mul":
        return y * y_reverse
    return (y, y_reverse)
