"""The `torch` backend: torch's own recurrence kernels behind fastrnn's backend contract.

torch._VF.lstm / gru / rnn_tanh / rnn_relu, the calls torch.nn makes: cuDNN on CUDA, torch's
native or oneDNN kernels on the CPU. It runs every layer torch.nn runs, in every floating dtype
(float64 included), and is what `auto` serves on a GPU wherever no fused plan is admitted
(fastrnn.admission). Legend as in base.py. Three ways in:

- `layer`: one layer, differentiated by torch's own autograd (cuDNN's backward on CUDA); what the
  eager path runs.
- `stack`: a whole stack in one call, exactly as torch.nn makes it (inter-layer dropout inside
  torch's kernels: cuDNN's own masks on CUDA, like torch.nn's), where every layer of a call is
  served here.
- forward_from_input / backward_from_input, which the layer ops run (torch.compile, tracers): the
  forward without an autograd graph; the backward runs the forward again under autograd and
  differentiates it, since a layer op keeps no graph between its forward and backward.

Variable lengths run torch's packed kernels, which take the lengths on the host: read from the
device (a sync) unless the caller passes them. Autocast is off inside: a layer runs in its own
dtype (torch.nn's LSTM under autocast(bfloat16) on CUDA runs float16).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import _VF
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..cells import CellSpec
from .base import Backend, LayerConfig, workspace_dtype

# torch's kernels warn about how fastrnn hands them weights, which is by design here: cuDNN
# compacts weights that are not one flat buffer (as torch.nn's do after flatten_parameters) on
# every call, and oneDNN passes LSTMs with projections to torch's native kernel. Silenced only
# where this module makes the call.
for _message in ("RNN module weights are not part of single contiguous chunk of memory",
                 "LSTM with projections is not supported with oneDNN"):
    warnings.filterwarnings("ignore", message=_message, module=__name__)


def _layer_params(w_ih, b_ih, w_hh, b_hh, w_hr) -> tuple[list[torch.Tensor], bool]:
    """The weights of one layer as torch's kernels take them (per direction: w_ih, w_hh, [b_ih,
    b_hh], [w_hr]), and whether there are biases (a missing one of the two becomes zeros)."""
    num_directions = w_hh.shape[0]
    has_bias = b_ih is not None or b_hh is not None
    w_ihs = w_ih.chunk(num_directions)
    b_ihs = (b_ih if b_ih is not None else w_hh.new_zeros(w_ih.shape[0])).chunk(num_directions)
    params = []
    for d in range(num_directions):
        params += [w_ihs[d], w_hh[d]]
        if has_bias:
            params += [b_ihs[d], b_hh[d] if b_hh is not None else w_hh.new_zeros(w_hh.shape[1])]
        if w_hr is not None:
            params.append(w_hr[d])
    return params, has_bias


@contextlib.contextmanager
def _autograd_recording():
    """Grad mode with the autograd dispatch keys included again: a custom op's implementation
    (where the layer ops run this backend's backward) runs below them."""
    keys = torch._C.DispatchKey
    with torch.enable_grad(), torch._C._PreserveDispatchKeyGuard():
        for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor,
                    keys.ADInplaceOrView):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        yield


def _permute(hx, order: torch.Tensor):
    return tuple(state.index_select(1, order) for state in hx)


class TorchBackend(Backend):
    """torch's own recurrence kernels (cuDNN on CUDA, native / oneDNN on the CPU)."""

    name = "torch"

    def supports(self, config: LayerConfig) -> tuple[bool, str]:
        if not config.dtype.is_floating_point:
            return False, f"dtype {config.dtype} is not a floating-point type"
        return True, ""

    def layer(self, cell: CellSpec, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
              train: bool, host_lengths: torch.Tensor | None = None):
        """One layer (every direction) from its input x [T, B, I]: (output [T, B, D*P],
        h_n [D, B, P], c_n [D, B, H] or None), differentiable by torch's autograd. `train` asks
        the kernels for what their backward needs (cuDNN refuses a backward otherwise);
        host_lengths: `lengths` as a CPU tensor, where the caller has it."""
        params, has_bias = _layer_params(w_ih, b_ih, w_hh, b_hh, w_hr)
        bidirectional = w_hh.shape[0] == 2
        hx = (h0, c0) if cell.has_cell_state else (h0,)
        run = getattr(_VF, cell.name)
        with torch.autocast(x.device.type, enabled=False):
            if lengths is None:
                output, *states = run(x, hx if cell.has_cell_state else h0, params, has_bias, 1,
                                      0.0, train, bidirectional, False)
            else:
                if host_lengths is None:
                    host_lengths = lengths.cpu()
                packed = pack_padded_sequence(x, host_lengths, enforce_sorted=False)
                hx = _permute(hx, packed.sorted_indices)
                data, *states = run(packed.data, packed.batch_sizes,
                                    hx if cell.has_cell_state else hx[0], params, has_bias, 1,
                                    0.0, train, bidirectional)
                output, _ = pad_packed_sequence(
                    PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                   packed.unsorted_indices), total_length=x.shape[0])
                states = _permute(states, packed.unsorted_indices)
        return output, states[0], (states[1] if cell.has_cell_state else None)

    def stack(self, cell: CellSpec, input, batch_sizes, h0, c0, weights, *, num_layers: int,
              dropout: float, training: bool, train: bool, bidirectional: bool,
              batch_first: bool):
        """A whole stack in one call of torch's kernels, as torch.nn makes it: input [T, B, I]
        ([B, T, I] with batch_first, or packed data [N, I] with batch_sizes [T]), weights in
        module order. Dropout only in training; `train` (training, or a backward to come)
        asks the kernels for what their backward needs. Returns (output, h_n, c_n or None)."""
        hx = (h0, c0) if cell.has_cell_state else h0
        has_bias = len(weights) // (num_layers * (2 if bidirectional else 1)) >= 4
        run = getattr(_VF, cell.name)
        dropout = dropout if training else 0.0
        with torch.autocast(input.device.type, enabled=False):
            if batch_sizes is None:
                output, *states = run(input, hx, weights, has_bias, num_layers, dropout, train,
                                      bidirectional, batch_first)
            else:
                output, *states = run(input, batch_sizes, hx, weights, has_bias, num_layers,
                                      dropout, train, bidirectional)
        return output, states[0], (states[1] if cell.has_cell_state else None)

    def forward_from_input(self, cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                           keep_workspace=True):
        with torch.no_grad():
            output, h_n, c_n = self.layer(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr,
                                          lengths, train=False)
        seq_len, batch, _ = x.shape
        num_directions, gate_rows, _ = w_hh.shape
        hidden = gate_rows // cell.gates
        # the layer ops' workspace: unused here (the backward runs the forward again), zeros
        # so that every output of the op is deterministic
        workspace = x.new_zeros(seq_len if keep_workspace else 0, batch, num_directions,
                                cell.workspace_gates * hidden, dtype=workspace_dtype(x.dtype))
        return output, h_n, (c_n if c_n is not None else x.new_empty(0)), workspace

    def backward_from_input(self, cell, grad_output, grad_h_n, grad_c_n, x, w_ih, b_ih, h0, c0,
                            w_hh, b_hh, w_hr, lengths, output, workspace, wanted):
        inputs = (x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr)
        leaves = [None if t is None else t.detach().requires_grad_(want)
                  for t, want in zip(inputs, wanted)]
        with _autograd_recording():
            outputs = self.layer(cell, *leaves, lengths, train=True)
            pairs = [(out, grad) for out, grad in zip(outputs, (grad_output, grad_h_n, grad_c_n))
                     if out is not None and grad is not None]
            targets = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
            found = iter(torch.autograd.grad([out for out, _ in pairs], targets,
                                             [grad for _, grad in pairs], allow_unused=True)
                         if pairs and targets else [None] * len(targets))
        grads = []
        for leaf in leaves:
            if leaf is None or not leaf.requires_grad:
                grads.append(None)
            else:
                grad = next(found)
                grads.append(torch.zeros_like(leaf) if grad is None else grad)
        return tuple(grads)


BACKEND = TorchBackend()
