"""ONNX export: while `torch.onnx.export(..., dynamo=True)` traces a model, each fastrnn layer is
recorded as ONNX's own LSTM, GRU or RNN operator (`torch.onnx.ops.symbolic_multi_out`), with
torch's gate order and bias layout converted, dynamic batch and time axes, and the sequence
lengths of packed input as `sequence_lens`.

Legend: B batch, T time, I input, H hidden, G gates, D directions.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from .cells import CellSpec

# torch's gate blocks in the order ONNX wants them: LSTM i f g o -> i o f c; GRU r z n -> z r h
_ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}
_ONNX_OP = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


def exporting() -> bool:
    """Whether torch.onnx.export is tracing the model, by either exporter (torch.onnx is not
    imported here: an export has always imported it)."""
    onnx = sys.modules.get("torch.onnx")
    if onnx is None:
        return False
    if not torch.compiler.is_compiling():
        return onnx.is_in_onnx_export()
    return _dynamo_exporting()  # torch.compile reads is_in_onnx_export() as False


def _dynamo_exporting() -> bool:
    """Whether torch.onnx.export(dynamo=True) is running, from the flag it sets."""
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return flags is not None and flags._is_onnx_exporting


def _gates_in_onnx_order(cell: CellSpec, weight: Tensor) -> Tensor:
    """weight [D, G*H, ...] with its gate blocks reordered from torch's order to ONNX's."""
    size = weight.shape[1] // cell.gates
    return torch.cat([weight.narrow(1, g * size, size) for g in _ONNX_GATE_ORDER[cell.name]], 1)


def layer(cell: CellSpec, x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], h0: Tensor,
          c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor],
          lengths: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer as an ONNX recurrence node: x [T, B, I], w_ih [D*G*H, I], b_ih [D*G*H],
    h0 [D, B, H], c0 [D, B, H] (LSTM), w_hh [D, G*H, H], b_hh [D, G*H], lengths [B] or None
    -> (output [T, B, D*H], h_n [D, B, H], c_n [D, B, H] or None)."""
    if w_hr is not None:
        raise RuntimeError("fastrnn: ONNX's LSTM operator has no projection, so an LSTM with "
                           "proj_size > 0 cannot be exported to ONNX")
    if not _dynamo_exporting():
        return _torchscript_layer(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, lengths)
    seq_len, batch, _ = x.shape
    num_directions, gate_rows, hidden = w_hh.shape
    weight = _gates_in_onnx_order(cell, w_ih.unflatten(0, (num_directions, gate_rows)))
    recurrent = _gates_in_onnx_order(cell, w_hh)
    bias = None
    if b_ih is not None:
        bias = torch.cat([_gates_in_onnx_order(cell, b_ih.view(num_directions, gate_rows, 1)),
                          _gates_in_onnx_order(cell, b_hh.unsqueeze(2))], dim=1).squeeze(2)
    sequence_lens = None if lengths is None else lengths.to(torch.int32)
    attrs = {"hidden_size": hidden,
             "direction": "bidirectional" if num_directions == 2 else "forward"}
    if cell.name == "gru":
        attrs["linear_before_reset"] = 1  # torch's GRU: r * (W_hn h + b_hn)
    if cell.name == "rnn_relu":
        attrs["activations"] = ["Relu"] * num_directions
    inputs = [x, weight, recurrent, bias, sequence_lens, h0]
    state_shape = [num_directions, batch, hidden]
    shapes = [[seq_len, num_directions, batch, hidden], state_shape]
    if cell.has_cell_state:
        inputs += [c0]
        shapes.append(state_shape)
    outputs = torch.onnx.ops.symbolic_multi_out(
        f"::{_ONNX_OP[cell.name]}", inputs, attrs, dtypes=[x.dtype] * len(shapes), shapes=shapes)
    output = outputs[0].permute(0, 2, 1, 3).reshape(seq_len, batch, num_directions * hidden)
    return output, outputs[1], outputs[2] if cell.has_cell_state else None


def _torchscript_layer(cell: CellSpec, x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor],
                       h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
                       lengths: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The layer for the TorchScript-based exporter (dynamo=False): as torch's own recurrence op,
    which that exporter translates to ONNX's."""
    if lengths is not None:
        raise RuntimeError("fastrnn: packed sequences export to ONNX with "
                           "torch.onnx.export(..., dynamo=True)")
    num_directions = int(w_hh.shape[0])  # a traced size otherwise
    b_ih_per_direction = None if b_ih is None else b_ih.chunk(num_directions)
    weights = []
    for d, w_ih_d in enumerate(w_ih.chunk(num_directions)):
        weights += [w_ih_d, w_hh[d]]
        if b_ih is not None:
            weights += [b_ih_per_direction[d], b_hh[d]]
    run = getattr(torch._VF, cell.name)
    hx = (h0, c0) if cell.has_cell_state else h0
    output, *states = run(x, hx, weights, b_ih is not None, 1, 0.0, False, num_directions == 2,
                          False)
    return output, states[0], states[1] if cell.has_cell_state else None
