"""The reference backend: the recurrence in plain torch ops, one layer per call, with a hand-written
backward (BPTT over the saved gates). Slow but simple: the oracle for every other backend.

Legend as in base.py. Half-precision inputs are computed in float32 and rounded on output.
"""

from __future__ import annotations

import torch

from ..cells import CellSpec
from .base import Backend, LayerConfig, workspace_dtype


def _step_order(seq_len: int, reverse: bool) -> range:
    return range(seq_len - 1, -1, -1) if reverse else range(seq_len)


def _valid(lengths: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """[B, 1] bool: which sequences have a step t, or None when all have."""
    return None if lengths is None else (lengths > t).unsqueeze(1)


def _previous(states: torch.Tensor, initial: torch.Tensor, t: int, reverse: bool,
              lengths: torch.Tensor | None) -> torch.Tensor:
    """The state a sequence held before processing step t.

    states:  [T, B, F] state after each step (0 or anything where t >= length)
    initial: [B, F]    state before the first step
    """
    neighbour = t + 1 if reverse else t - 1
    if neighbour < 0 or neighbour >= states.shape[0]:
        return initial
    if reverse and lengths is not None:  # a reverse sequence starts at its own last step
        return torch.where(_valid(lengths, neighbour), states[neighbour], initial)
    return states[neighbour]


def _cell_forward(cell: CellSpec, x_gates, h_gates, h, c):
    """One step of one direction.

    x_gates: [B, G*H] input projection (with b_ih); h_gates: [B, G*H] W_hh h + b_hh;
    h: [B, P] previous hidden state; c: [B, H] previous cell state (LSTM).
    Returns (h_new [B, H] before any projection, c_new or None, saved [B, W]).
    """
    if cell.name == "lstm":
        i, f, g, o = (x_gates + h_gates).chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c + i * g
        return o * c_new.tanh(), c_new, torch.cat([i, f, g, o, c_new], dim=1)
    if cell.name == "gru":
        x_r, x_z, x_n = x_gates.chunk(3, dim=1)
        h_r, h_z, h_n = h_gates.chunk(3, dim=1)
        r = (x_r + h_r).sigmoid()
        z = (x_z + h_z).sigmoid()
        n = (x_n + r * h_n).tanh()
        return n + z * (h - n), None, torch.cat([r, z, n, h_n], dim=1)
    pre = x_gates + h_gates
    h_new = pre.tanh() if cell.name == "rnn_tanh" else pre.relu()
    return h_new, None, pre[:, :0]


def _cell_backward(cell: CellSpec, grad_h, grad_c, saved, h_prev, c_prev, h_new):
    """Gradients through one step, given those of the step's h (before projection) and c.

    Returns (grad_x_gates [B, G*H], grad_h_gates [B, G*H] (= grad of W_hh h + b_hh),
             grad_h_prev_direct [B, H] or None (GRU's z * dh), grad_c_prev or None).
    """
    if cell.name == "lstm":
        i, f, g, o, c = saved.chunk(5, dim=1)
        tanh_c = c.tanh()
        grad_c = grad_c + grad_h * o * (1 - tanh_c * tanh_c)
        grad_gates = torch.cat([
            grad_c * g * i * (1 - i),
            grad_c * c_prev * f * (1 - f),
            grad_c * i * (1 - g * g),
            grad_h * tanh_c * o * (1 - o),
        ], dim=1)
        return grad_gates, grad_gates, None, grad_c * f
    if cell.name == "gru":
        r, z, n, h_n = saved.chunk(4, dim=1)
        grad_n_pre = grad_h * (1 - z) * (1 - n * n)
        grad_r_pre = grad_n_pre * h_n * r * (1 - r)
        grad_z_pre = grad_h * (h_prev - n) * z * (1 - z)
        grad_x = torch.cat([grad_r_pre, grad_z_pre, grad_n_pre], dim=1)
        grad_hg = torch.cat([grad_r_pre, grad_z_pre, grad_n_pre * r], dim=1)
        return grad_x, grad_hg, grad_h * z, None
    if cell.name == "rnn_tanh":
        grad_pre = grad_h * (1 - h_new * h_new)
    else:
        grad_pre = torch.where(h_new <= 0, 0, grad_h)  # torch's threshold_backward
    return grad_pre, grad_pre, None, None


def layer_forward(cell: CellSpec, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths,
                  keep_workspace: bool = True):
    """The forward of base.py in plain, out-of-place torch ops: (output, h_n, c_n, workspace).

    Differentiable to any order and free of in-place writes, so that autograd (create_graph),
    torch.func.grad and torch.func.vmap all run through it; with keep_workspace=False the
    workspace is an empty [0, B, D, W] tensor.
    """
    seq_len, batch, _ = x_gates.shape
    num_directions, gate_rows, out_size = w_hh.shape
    hidden = gate_rows // cell.gates
    dtype = x_gates.dtype
    compute = workspace_dtype(dtype)
    x_gates = x_gates.to(compute).unflatten(2, (num_directions, gate_rows))
    outputs, saves, h_last, c_last = [], [], [], []
    for d in range(num_directions):
        weight = w_hh[d].to(compute)
        bias = None if b_hh is None else b_hh[d].to(compute)
        projection = None if w_hr is None else w_hr[d].to(compute)
        h = h0[d].to(compute)
        c = c0[d].to(compute) if cell.has_cell_state else None
        steps = _step_order(seq_len, reverse=d == 1)
        output, saved_steps = [None] * seq_len, [None] * seq_len  # per step [B, P], [B, W]
        for t in steps:
            h_gates = torch.nn.functional.linear(h, weight, bias)
            h_new, c_new, saved = _cell_forward(cell, x_gates[t, :, d], h_gates, h, c)
            if projection is not None:
                h_new = h_new @ projection.T
            valid = _valid(lengths, t)
            if valid is not None:
                h_new = torch.where(valid, h_new, h)
                c_new = None if c_new is None else torch.where(valid, c_new, c)
                output[t] = torch.where(valid, h_new, 0)
                saved = torch.where(valid, saved, 0)
            else:
                output[t] = h_new
            saved_steps[t] = saved
            h, c = h_new, c_new
        outputs.append(torch.stack(output))
        if keep_workspace:
            saves.append(torch.stack(saved_steps))
        h_last.append(h)
        c_last.append(c)
    output = torch.stack(outputs, dim=2)  # [T, B, D, P]
    if keep_workspace:
        workspace = torch.stack(saves, dim=2)  # [T, B, D, W]
    else:
        workspace = x_gates.new_zeros(0, batch, num_directions, cell.workspace_gates * hidden)
    if cell.has_cell_state:
        c_n = torch.stack(c_last).to(dtype)
    else:
        c_n = x_gates.new_empty(0, dtype=dtype)
    return output.flatten(2).to(dtype), torch.stack(h_last).to(dtype), c_n, workspace


class ReferenceBackend(Backend):
    name = "reference"

    def supports(self, config: LayerConfig) -> tuple[bool, str]:
        if not config.dtype.is_floating_point:
            return False, f"dtype {config.dtype} is not a floating-point type"
        return True, ""

    def forward(self, cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, keep_workspace=True):
        return layer_forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, keep_workspace)

    def backward(self, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                 output, workspace):
        seq_len, batch, _ = output.shape
        num_directions, gate_rows, out_size = w_hh.shape
        hidden = gate_rows // cell.gates
        dtype = output.dtype
        compute = workspace.dtype
        output = output.to(compute).unflatten(2, (num_directions, out_size))
        if grad_output is not None:
            grad_output = grad_output.to(compute).unflatten(2, (num_directions, out_size))
        grad_x_gates = output.new_zeros(seq_len, batch, num_directions, gate_rows)
        grad_h0 = output.new_empty(num_directions, batch, out_size)
        grad_c0 = output.new_empty(num_directions, batch, hidden) if cell.has_cell_state else None
        grad_w_hh = output.new_empty(num_directions, gate_rows, out_size)
        grad_b_hh = output.new_empty(num_directions, gate_rows)
        grad_w_hr = None if w_hr is None else output.new_empty(num_directions, out_size, hidden)
        for d in range(num_directions):
            reverse = d == 1
            weight = w_hh[d].to(compute)
            projection = None if w_hr is None else w_hr[d].to(compute)
            saved_all = workspace[:, :, d]
            h_all = output[:, :, d]
            c_all = saved_all[:, :, 4 * hidden:] if cell.has_cell_state else None
            h_init = h0[d].to(compute)
            c_init = c0[d].to(compute) if cell.has_cell_state else None
            grad_h = grad_h_n[d].to(compute) if grad_h_n is not None else h_init.new_zeros(batch, out_size)
            grad_c = None
            if cell.has_cell_state:
                grad_c = grad_c_n[d].to(compute) if grad_c_n is not None else c_init.new_zeros(batch, hidden)
            grad_h_gates = output.new_zeros(seq_len, batch, gate_rows)
            h_prev_all = output.new_zeros(seq_len, batch, out_size)
            grad_projected = output.new_zeros(seq_len, batch, out_size) if projection is not None else None
            for t in reversed(_step_order(seq_len, reverse)):
                valid = _valid(lengths, t)
                grad_step = grad_h
                if grad_output is not None:
                    incoming = grad_output[:, :, d][t]
                    grad_step = grad_h + (incoming if valid is None else torch.where(valid, incoming, 0))
                h_prev = _previous(h_all, h_init, t, reverse, lengths)
                c_prev = None if c_all is None else _previous(c_all, c_init, t, reverse, lengths)
                grad_unprojected = grad_step
                if projection is not None:
                    grad_projected[t] = grad_step if valid is None else torch.where(valid, grad_step, 0)
                    grad_unprojected = grad_step @ projection
                grad_x, grad_hg, grad_h_direct, grad_c_prev = _cell_backward(
                    cell, grad_unprojected, grad_c, saved_all[t], h_prev, c_prev, h_all[t])
                grad_h_prev = grad_hg @ weight
                if grad_h_direct is not None:
                    grad_h_prev = grad_h_prev + grad_h_direct
                if valid is not None:
                    grad_x = torch.where(valid, grad_x, 0)
                    grad_hg = torch.where(valid, grad_hg, 0)
                    grad_h_prev = torch.where(valid, grad_h_prev, grad_step)
                    if grad_c is not None:
                        grad_c_prev = torch.where(valid, grad_c_prev, grad_c)
                grad_x_gates[t, :, d] = grad_x
                grad_h_gates[t] = grad_hg
                h_prev_all[t] = h_prev
                grad_h, grad_c = grad_h_prev, grad_c_prev
            grad_h0[d] = grad_h
            if grad_c0 is not None:
                grad_c0[d] = grad_c
            grad_w_hh[d] = grad_h_gates.flatten(0, 1).T @ h_prev_all.flatten(0, 1)
            grad_b_hh[d] = grad_h_gates.sum(dim=(0, 1))
            if projection is not None:
                i, f, g, o, c = saved_all.chunk(5, dim=2)
                grad_w_hr[d] = grad_projected.flatten(0, 1).T @ (o * c.tanh()).flatten(0, 1)
        def finish(grad):  # distinct empty tensors where a gradient does not exist
            return output.new_empty(0, dtype=dtype) if grad is None else grad.to(dtype)

        return (finish(grad_x_gates.flatten(2)), finish(grad_h0), finish(grad_c0),
                finish(grad_w_hh), finish(grad_b_hh), finish(grad_w_hr))


BACKEND = ReferenceBackend()
