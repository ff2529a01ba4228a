"""The contract every backend implements: one recurrent layer (all directions) per call.

Legend: B batch, T time, I input size, H hidden size, P = proj_size or H, G gates (cells.py),
D directions (1, or 2 when bidirectional), W = cell.workspace_gates * H.

Forward, for one layer:
    x_gates  [T, B, D*G*H]  input projection x @ W_ih^T + b_ih for every direction, direction-major
                            in the last dim (columns d*G*H .. (d+1)*G*H are direction d, gate order
                            of torch.nn); may be non-contiguous
    h0       [D, B, P]      initial hidden state
    c0       [D, B, H]      initial cell state (LSTM) or None
    w_hh     [D, G*H, P]    recurrent weights
    b_hh     [D, G*H]       recurrent bias or None (GRU: b_hn sits inside r * (W_hn h + b_hn))
    w_hr     [D, P, H]      LSTM projection weights or None
    lengths  [B] int64      valid steps of each sequence (1 <= length <= T, any order), on the
                            device of x_gates, or None when every sequence has T steps
    keep_workspace          False when no backward will run (inference): a backend may then skip
                            saving the workspace; the op returns it with T = 0 either way
  returns
    output    [T, B, D*P]   h_t of every step; direction d in columns d*P .. (d+1)*P; 0 at t >= length
    h_n       [D, B, P]     h at each sequence's own last step (direction 1 runs t = length-1 .. 0)
    c_n       [D, B, H]     LSTM; for other cells an empty tensor
    workspace [T, B, D, W]  what the backward needs (cells.py lists it); 0 at t >= length;
                            dtype float32 for float16/bfloat16 inputs, else the input dtype

Backward, for one layer: the gradients of the forward's inputs, given the gradients of its outputs
(None where an output was unused) and what the forward returned:
  returns (grad_x_gates [T, B, D*G*H], grad_h0 [D, B, P], grad_c0 [D, B, H] or empty,
           grad_w_hh [D, G*H, P], grad_b_hh [D, G*H], grad_w_hr [D, P, H] or empty)
Gradients take the dtype of the forward inputs; accumulate in float32 for float16/bfloat16.

From the input, for one layer: what the layer ops run. x [T, B, I], w_ih [D*G*H, I] (directions
concatenated), b_ih [D*G*H] or None, the rest as above:
    forward_from_input   -> (output, h_n, c_n, workspace), the results of x_gates = x @ W_ih^T + b_ih
                            followed by forward; a backend may fuse the projection into its
                            recurrence
    backward_from_input  -> (grad_x, grad_w_ih, grad_b_ih, grad_h0, grad_c0, grad_w_hh, grad_b_hh,
                            grad_w_hr), None where an input is absent or not wanted
The base class builds both from forward / backward and input_projection (torch's own GEMMs, which
a backend may replace). A backend whose kernels take the input itself (the torch backend)
implements these two instead of forward / backward.

Backends whose plans have not been run on the user's GPU by anyone here (`needs_admission`) are
admitted per layer configuration by fastrnn.admission before `auto` lets them serve; `prepare`
compiles what a configuration needs (in the background), `prepared` says whether that is done.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..cells import CellSpec

_HALF_TYPES = (torch.float16, torch.bfloat16)


def workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved activations are kept in float32 for the half types, else in the input dtype."""
    return torch.float32 if dtype in _HALF_TYPES else dtype


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """What a backend may look at to decide whether it can run a layer."""

    cell: CellSpec
    device_type: str  # "cpu", "cuda", ...
    dtype: torch.dtype
    batch_size: int  # B
    seq_len: int  # T
    hidden_size: int  # H
    proj_size: int  # P if the LSTM projects, else 0
    num_directions: int  # D
    variable_lengths: bool  # lengths is not None

    @staticmethod
    def of(cell: CellSpec, x_gates: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor,
           w_hr: torch.Tensor | None, lengths: torch.Tensor | None) -> "LayerConfig":
        num_directions, gate_rows, _ = w_hh.shape
        return LayerConfig(
            cell=cell,
            device_type=x_gates.device.type,
            dtype=x_gates.dtype,
            batch_size=x_gates.shape[1],
            seq_len=x_gates.shape[0],
            hidden_size=gate_rows // cell.gates,
            proj_size=0 if w_hr is None else w_hr.shape[1],
            num_directions=num_directions,
            variable_lengths=lengths is not None,
        )


class Backend:
    """One way of running a recurrent layer. Subclasses fill in supports, forward and backward."""

    name: str = ""
    needs_admission: bool = False  # auto serves it only once admitted (fastrnn.admission)

    def available(self) -> tuple[bool, str]:
        """Whether this backend can run at all here (built, importable); reason when not."""
        return True, ""

    def supports(self, config: LayerConfig) -> tuple[bool, str]:
        """Whether this backend can run this layer; the reason when it cannot."""
        raise NotImplementedError

    def forward(self, cell: CellSpec, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths,
                keep_workspace: bool = True):
        """See the module docstring. Returns (output, h_n, c_n, workspace)."""
        raise NotImplementedError

    def backward(self, cell: CellSpec, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr,
                 lengths, output, workspace):
        """See the module docstring. Returns the six gradients."""
        raise NotImplementedError

    def forward_from_input(self, cell: CellSpec, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr,
                           lengths, keep_workspace: bool = True):
        """forward of one layer from its input x [T, B, I] rather than x_gates; a backend may
        fuse the projection into its recurrence. The same results as input_projection then
        forward. Returns (output, h_n, c_n, workspace)."""
        return self.forward(cell, self.input_projection(x, w_ih, b_ih), h0, c0, w_hh, b_hh, w_hr,
                            lengths, keep_workspace=keep_workspace)

    def backward_from_input(self, cell: CellSpec, grad_output, grad_h_n, grad_c_n, x, w_ih, b_ih,
                            h0, c0, w_hh, b_hh, w_hr, lengths, output, workspace,
                            wanted: list[bool]):
        """The gradients of forward_from_input's eight tensor inputs (x, w_ih, b_ih, h0, c0, w_hh,
        b_hh, w_hr) for those of its outputs (None where an output was unused), given what it
        returned; None where an input is absent or `wanted` (eight flags) says it is not needed."""
        grad_x_gates, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr = self.backward(
            cell, grad_output, grad_h_n, grad_c_n if cell.has_cell_state else None, h0, c0, w_hh,
            w_hr, lengths, output, workspace)
        wants_b_ih = b_ih is not None and wanted[2]
        shared = wants_b_ih and cell.biases_share_gradient  # grad b_ih = grad b_hh, summed once
        mask = [wanted[0], wanted[1], wants_b_ih and not shared]
        grad_x, grad_w_ih, grad_b_ih = self.input_projection_backward(grad_x_gates, x, w_ih, mask)
        if shared:  # [D*G*H], a copy: autograd may keep it as another parameter's .grad
            grad_b_ih = grad_b_hh.flatten().clone()

        def kept(grad, want, present=True):
            return grad if want and present else None

        return (kept(grad_x, mask[0]), kept(grad_w_ih, mask[1]), kept(grad_b_ih, wants_b_ih),
                kept(grad_h0, wanted[3]), kept(grad_c0, wanted[4], cell.has_cell_state),
                kept(grad_w_hh, wanted[5]), kept(grad_b_hh, wanted[6], b_hh is not None),
                kept(grad_w_hr, wanted[7], w_hr is not None))

    def prepared(self, config: LayerConfig, training: bool, device: torch.device) -> bool:
        """Whether everything a call of `config` on `device` runs is compiled (training: forward
        and backward), so that the call does not wait for a compiler."""
        return True

    def prepare(self, config: LayerConfig, training: bool, device: torch.device) -> None:
        """Compile what a call of `config` on `device` runs (may take minutes; run off the
        caller's thread by fastrnn.admission). Raises where it cannot be compiled."""

    def plan_description(self, config: LayerConfig, training: bool,
                         device: torch.device) -> str:
        """The plan a prepared call of `config` runs, as admission records it ("" if none)."""
        return ""

    def build_id(self) -> str:
        """What identifies this backend's kernels (compiler and source versions), so that a
        verdict on them is never reused for other kernels."""
        return ""

    def run_time_failure(self, config: LayerConfig) -> str:
        """Why a launch of `config` failed on the device after it was admitted (e.g. a grid
        barrier that timed out), or ""."""
        return ""

    def input_projection(self, x, w_ih, b_ih):
        """x [T, B, I] @ w_ih [D*G*H, I]^T + b_ih [D*G*H] (or None) -> [T, B, D*G*H]."""
        return F.linear(x, w_ih, b_ih)

    def input_projection_backward(self, grad, x, w_ih, output_mask: list[bool]):
        """The gradients of input_projection's x, w_ih and b_ih for grad [T, B, D*G*H]; an
        empty tensor ([0]) where output_mask says it is not needed."""
        rows_grad, rows_x = grad.flatten(0, -2), x.flatten(0, -2)  # [T*B, D*G*H], [T*B, I]
        grad_x = grad @ w_ih if output_mask[0] else grad.new_empty(0)
        grad_w = rows_grad.t() @ rows_x if output_mask[1] else grad.new_empty(0)
        grad_b = rows_grad.sum(0) if output_mask[2] else grad.new_empty(0)
        return grad_x, grad_w, grad_b
