"""Multi-layer, bidirectional recurrences over the per-layer ops: `lstm`, `gru`, `rnn`.

They mirror torch's `_VF.lstm/gru/rnn_*`: `weights` is the flat list of a module's parameters in
registration order (per layer and direction: w_ih, w_hh, [b_ih, b_hh], [w_hr]); `input` is
[T, B, I] ([B, T, I] with batch_first), or the data [N, I] of a PackedSequence with its
`batch_sizes`. Padded input of variable lengths takes `lengths` [B]: each sequence stops at its
own length (0 to T), as if packed, without packing. Legend: B batch, T time, I input, H hidden,
P proj_size or H, L layers, D directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import admission, backends, onnx_export
from .backends import check_backend_name
from .backends.base import LayerConfig
from .backends.native import TorchBackend
from .cells import CELLS, CellSpec
from .ops import needs_plain_ops, run_layer


def check_batch_sizes(batch_sizes: Tensor, batch: int, total: int) -> None:
    """Raise unless PackedSequence batch_sizes [T] (CPU int64) describe `batch` sequences packed
    into `total` rows: positive, non-increasing, batch_sizes[0] == batch and sum == total.

    In eager mode one pass over a Python list (about 2 us at T = 100), with a message naming the
    fault; under torch.compile and torch.export a torch._check that the graph keeps as a runtime
    assertion (its message names only the expression)."""
    if torch.compiler.is_compiling():
        # one count of faults (Dynamo keeps the assertion on it, not on a bool), from tensors
        # of T elements: a slice of T - 1 would specialise the graph on T - 1 > 1
        step = torch.arange(batch_sizes.shape[0])
        previous = batch_sizes[(step - 1).clamp(min=0)]  # [T] batch_sizes[t - 1], [0] at t = 0
        faults = ((batch_sizes > previous).sum() + (batch_sizes < 1).sum()
                  + (batch_sizes[0] != batch) + (batch_sizes.sum() != total))
        torch._check(faults.item() == 0, lambda: "malformed PackedSequence batch_sizes")
        return
    sizes = batch_sizes.tolist()
    if not sizes:
        return  # no steps: the recurrence raises torch's error for an empty sequence
    if sizes[-1] < 1 or sorted(sizes, reverse=True) != sizes:
        raise RuntimeError("PackedSequence batch_sizes must be positive and non-increasing (as "
                           f"pack_padded_sequence and pack_sequence make them), got {sizes}")
    if sum(sizes) != total:
        raise RuntimeError(f"PackedSequence batch_sizes sum to {sum(sizes)}, but its data has "
                           f"{total} rows")
    if sizes[0] != batch:
        raise RuntimeError(f"PackedSequence batch_sizes[0] is {sizes[0]}, but the hidden state "
                           f"holds a batch of {batch}")


def check_lengths(lengths, batch: int, steps: int) -> Tensor:
    """The per-sequence lengths of a padded input of `batch` sequences and `steps` steps as a CPU
    int64 tensor [B], checked: one integer per sequence, each from 0 to T. Raises TypeError or
    ValueError naming the fault. `lengths` may be a tensor on any device, or a sequence of ints.
    Under torch.compile and torch.export a torch._check that the graph keeps instead."""
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"lengths must be a 1-D integer tensor or a sequence of ints, got "
                            f"{type(lengths).__name__}") from error
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have one entry per sequence: expected shape ({batch},), "
                         f"got {tuple(lengths.shape)}")
    if torch.compiler.is_compiling():
        lengths = lengths.to(torch.int64)
        torch._check(((lengths < 0).sum() + (lengths > steps).sum()).item() == 0,
                     lambda: "lengths must lie in [0, T]")
        return lengths
    lengths = lengths.to("cpu", torch.int64)
    if batch and (lengths.min() < 0 or lengths.max() > steps):
        raise ValueError(f"lengths must lie in [0, {steps}] (the padded input has {steps} "
                         f"steps), got {lengths.tolist()}")
    return lengths


def unpacked(data: Tensor, batch_sizes: Tensor, batch: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PackedSequence data [N, I] of `batch` sequences, batch_sizes checked, as a padded
    x [T, B, I] (zeros past each sequence's end), with packed_layout's lengths [B] (on the CPU),
    rows [N] and slots [T, B] (rows and slots on data's device)."""
    check_batch_sizes(batch_sizes, batch, data.shape[0])
    lengths, rows, slots = packed_layout(batch_sizes, batch, data.shape[0])
    rows, slots = rows.to(data.device), slots.to(data.device)
    padded = torch.cat([data, data.new_zeros(1, data.shape[1])])  # row N: padding
    return padded[slots], lengths, rows, slots


def packed_layout(batch_sizes: Tensor, batch: int, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """For PackedSequence batch_sizes [T] (CPU int64) of `batch` sequences and `total` packed
    rows (N, the sum of batch_sizes): the sequence lengths [B];
    for each packed row, its flat index t * B + b in the padded [T, B] layout (rows [N]); and
    for each padded slot, the packed row it holds, or N where it is padding (slots [T, B]).

    Computed from sizes only, without reading a value of batch_sizes into Python, so that
    torch.compile and torch.export keep one graph for every batch size and length pattern."""
    columns = torch.arange(batch)
    valid = columns < batch_sizes.unsqueeze(1)  # [T, B]
    starts = batch_sizes.cumsum(0) - batch_sizes  # [T] first packed row of each step
    slots = torch.where(valid, starts.unsqueeze(1) + columns, total)
    # rows inverts slots; every padding slot writes to the extra entry N, which is dropped
    rows = slots.new_zeros(total + 1).scatter(0, slots.flatten(), torch.arange(slots.numel()))
    return valid.sum(0), rows[:total], slots


def _layer_weights(weights: Sequence[Tensor], layer: int, num_layers: int, num_directions: int):
    """The weights of one layer with every direction's stacked, as the layer ops take them."""
    per = len(weights) // (num_layers * num_directions)
    first = layer * num_directions * per
    groups = [weights[first + d * per:first + (d + 1) * per] for d in range(num_directions)]
    has_bias = per >= 4
    has_projection = per in (3, 5)

    def cat(index):  # [D * rows, cols]
        return groups[0][index] if num_directions == 1 else torch.cat([g[index] for g in groups])

    def stack(index):  # [D, rows, cols]
        return groups[0][index].unsqueeze(0) if num_directions == 1 else torch.stack([g[index] for g in groups])

    w_ih = cat(0)  # [D*G*H, I]
    b_ih = cat(2) if has_bias else None  # [D*G*H]
    w_hh = stack(1)  # [D, G*H, P]
    b_hh = stack(3) if has_bias else None  # [D, G*H]
    w_hr = stack(per - 1) if has_projection else None  # [D, P, H]
    return w_ih, b_ih, w_hh, b_hh, w_hr


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as torch's C++ errors name it ("Float", "Double", ...)."""
    return {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype))


def check_dtypes(input: Tensor, h0: Tensor, c0: Tensor | None, weights: Sequence[Tensor]
                 ) -> None:
    """Raise where a weight or state has another dtype than the input, with torch's messages
    (its GEMMs' on the CPU). A cell state of another dtype gets an error of fastrnn's own: torch.nn
    promotes it in some dtypes and fails inside oneDNN in others."""
    for weight in weights:
        if weight.dtype != input.dtype:
            raise RuntimeError(f"self and mat2 must have the same dtype, but got "
                               f"{dtype_name(input.dtype)} and {dtype_name(weight.dtype)}")
    if h0.dtype != input.dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got "
                           f"{dtype_name(h0.dtype)} and {dtype_name(input.dtype)}")
    if c0 is not None and c0.dtype != input.dtype:
        raise RuntimeError(f"Expected cx dtype {input.dtype} to match the input dtype, got "
                           f"{c0.dtype}")


def needs_backward(*tensors: Tensor | None) -> bool:
    """Whether autograd will differentiate through a layer taking these tensors. While
    torch.jit.trace records, grad mode is left out: its check traces again under no_grad, and the
    graph it records is one for training and inference alike."""
    if not (torch.is_grad_enabled() or torch.jit.is_tracing()):
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast runs ops in on this device type, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def recurrence(cell: CellSpec, input: Tensor, h0: Tensor, c0: Tensor | None,
               weights: Sequence[Tensor], *, num_layers: int, dropout: float, training: bool,
               bidirectional: bool, batch_first: bool, batch_sizes: Tensor | None = None,
               lengths=None, backend: str | None = None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run a stack of recurrent layers.

    input: [T, B, I] (or [B, T, I] with batch_first, or packed data [N, I] with batch_sizes [T]);
    h0: [L*D, B, P]; c0: [L*D, B, H] for LSTM, else None; lengths: [B] valid steps of each
    sequence of a padded input (0 to T; see check_lengths), or None.
    Returns (output like input with P*D features, h_n [L*D, B, P], c_n [L*D, B, H] or None).
    With lengths, output is 0 at t >= length and h_n, c_n are each sequence's state at its own
    last step (direction 1 runs t = length-1 .. 0); a sequence of length 0 has output 0 and its
    initial state as h_n, c_n.
    """
    backend = check_backend_name(backend) or ""
    num_directions = 2 if bidirectional else 1
    cast = autocast_dtype(input.device.type)
    if cast is not None:  # like the torch ops under autocast, run in the autocast dtype
        input, h0 = input.to(cast), h0.to(cast)
        c0 = None if c0 is None else c0.to(cast)
        weights = [w.to(cast) for w in weights]
    check_dtypes(input, h0, c0, weights)

    rows = host_lengths = empty = None
    if batch_sizes is not None:
        if lengths is not None:
            raise ValueError("lengths is for padded input: a PackedSequence (batch_sizes) "
                             "carries its own lengths")
        x, host_lengths, rows, slots = unpacked(input, batch_sizes, h0.shape[1])
        lengths = host_lengths.to(input.device)
    else:
        x = input.transpose(0, 1) if batch_first else input
    if x.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    if batch_sizes is None and lengths is not None:
        lengths, host_lengths, empty = _padded_lengths(lengths, x, h0.shape[1])

    keep_workspace = needs_backward(input, h0, c0, *weights)
    # the whole stack as one call of torch's kernels takes packed input, not padded lengths
    if (batch_sizes is not None or lengths is None) and _served_whole_by_torch(
            cell, x, h0, weights, num_layers, num_directions, lengths, backend, keep_workspace):
        return backends.torch_backend().stack(
            cell, input, batch_sizes, h0, c0, weights, num_layers=num_layers, dropout=dropout,
            training=training, train=training or keep_workspace, bidirectional=bidirectional,
            batch_first=batch_first)
    h_n, c_n = [], []
    for layer in range(num_layers):
        w_ih, b_ih, w_hh, b_hh, w_hr = _layer_weights(weights, layer, num_layers, num_directions)
        states = slice(layer * num_directions, (layer + 1) * num_directions)
        x, h_last, c_last = run_layer(cell, x, w_ih, b_ih, h0[states],
                                      None if c0 is None else c0[states], w_hh, b_hh, w_hr,
                                      lengths, backend, keep_workspace, host_lengths)
        if empty is not None:  # sequences of length 0, run for one step: output 0, state h0
            x = x.masked_fill(empty, 0)
            h_last = torch.where(empty, h0[states], h_last)
            if c0 is not None:
                c_last = torch.where(empty, c0[states], c_last)
        h_n.append(h_last)
        c_n.append(c_last)
        if dropout > 0 and training and layer < num_layers - 1:
            if rows is None:
                x = F.dropout(x, dropout, training=True)
            else:  # on the packed rows [N, D*P], as torch.nn: the same random mask
                kept = F.dropout(x.flatten(0, 1).index_select(0, rows), dropout, training=True)
                x = torch.cat([kept, kept.new_zeros(1, kept.shape[1])])[slots]  # [T, B, D*P]

    if batch_sizes is not None:
        output = x.flatten(0, 1).index_select(0, rows)
    else:
        output = x.transpose(0, 1) if batch_first else x

    def join(states):  # [L*D, B, F]
        return states[0] if num_layers == 1 else torch.cat(states)

    return output, join(h_n), join(c_n) if c0 is not None else None


def _padded_lengths(lengths, x: Tensor, batch: int
                    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The public `lengths` of a padded input x [T, B, I] as the layers take them: (lengths [B]
    on x's device, the same on the CPU, and a [B, 1] bool of the sequences of length 0, which
    run for one step and are then reset), with None for all three where every sequence has T
    steps, and None for the third where none is empty."""
    steps = x.shape[0]
    host_lengths = check_lengths(lengths, batch, steps)
    if torch.compiler.is_compiling():  # no value read: every sequence is treated as possibly empty
        device_lengths = host_lengths.to(x.device)
        return device_lengths.clamp(min=1), None, (device_lengths == 0).unsqueeze(1)
    if batch == 0 or bool((host_lengths == steps).all()):
        return None, None, None
    empty = None
    if bool((host_lengths == 0).any()):
        empty = (host_lengths == 0).unsqueeze(1).to(x.device)
        host_lengths = host_lengths.clamp(min=1)
    return host_lengths.to(x.device), host_lengths, empty


def _served_whole_by_torch(cell: CellSpec, x: Tensor, h0: Tensor, weights: Sequence[Tensor],
                           num_layers: int, num_directions: int, lengths: Tensor | None,
                           backend: str, training: bool) -> bool:
    """Whether, in eager mode, the torch backend is settled to serve every layer of this call
    (asked for, or chosen by auto without a check to run), so that the whole stack is one call
    of torch's kernels, as torch.nn makes it. x [T, B, I] (padded), h0 [L*D, B, P]."""
    seq_len, batch, input_size = x.shape
    if seq_len == 1 and num_layers == num_directions == 1 and lengths is None:
        return False  # a step: ops.direct_step runs torch's own step where torch serves
    if (type(x) is not Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or onnx_export.exporting() or needs_plain_ops(x, h0, *weights)):
        return False
    per = len(weights) // (num_layers * num_directions)
    gate_rows, out_size = weights[1].shape
    hidden = gate_rows // cell.gates
    if batch == 0 or hidden == 0:
        return False
    config = LayerConfig(cell, x.device.type, x.dtype, batch, seq_len, hidden,
                         out_size if per in (3, 5) else 0, num_directions, lengths is not None)
    for layer in range(num_layers):
        chosen = admission.serving_backend(
            backend or None, config, input_size=input_size if layer == 0 else weights[
                layer * num_directions * per].shape[1], has_bias=per >= 4, training=training,
            device=x.device)
        if not isinstance(chosen, TorchBackend):
            return False
    return True


def lstm(input: Tensor, hx: tuple[Tensor, Tensor], weights: Sequence[Tensor], *,
         num_layers: int = 1, dropout: float = 0.0, training: bool = False,
         bidirectional: bool = False, batch_first: bool = False,
         batch_sizes: Tensor | None = None, lengths=None, backend: str | None = None
         ) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM stack. hx = (h0 [L*D, B, P], c0 [L*D, B, H]); lengths [B] for a padded input of
    variable lengths (see recurrence). Returns (output, h_n, c_n)."""
    return recurrence(CELLS["lstm"], input, hx[0], hx[1], weights, num_layers=num_layers,
                      dropout=dropout, training=training, bidirectional=bidirectional,
                      batch_first=batch_first, batch_sizes=batch_sizes, lengths=lengths,
                      backend=backend)


def gru(input: Tensor, hx: Tensor, weights: Sequence[Tensor], *, num_layers: int = 1,
        dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
        batch_first: bool = False, batch_sizes: Tensor | None = None, lengths=None,
        backend: str | None = None) -> tuple[Tensor, Tensor]:
    """GRU stack. hx: [L*D, B, H]; lengths [B] as for lstm. Returns (output, h_n)."""
    output, h_n, _ = recurrence(CELLS["gru"], input, hx, None, weights, num_layers=num_layers,
                                dropout=dropout, training=training, bidirectional=bidirectional,
                                batch_first=batch_first, batch_sizes=batch_sizes,
                                lengths=lengths, backend=backend)
    return output, h_n


def rnn(input: Tensor, hx: Tensor, weights: Sequence[Tensor], *, nonlinearity: str = "tanh",
        num_layers: int = 1, dropout: float = 0.0, training: bool = False,
        bidirectional: bool = False, batch_first: bool = False,
        batch_sizes: Tensor | None = None, lengths=None, backend: str | None = None
        ) -> tuple[Tensor, Tensor]:
    """Elman RNN stack (nonlinearity "tanh" or "relu"). hx: [L*D, B, H]; lengths [B] as for
    lstm. Returns (output, h_n)."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    output, h_n, _ = recurrence(CELLS[f"rnn_{nonlinearity}"], input, hx, None, weights,
                                num_layers=num_layers, dropout=dropout, training=training,
                                bidirectional=bidirectional, batch_first=batch_first,
                                batch_sizes=batch_sizes, lengths=lengths, backend=backend)
    return output, h_n
