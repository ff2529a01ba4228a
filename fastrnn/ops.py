"""One `torch.library` custom op per cell for a whole layer from its input, with a fake twin and
autograd.

    torch.ops.fastrnn.{cell}_layer(x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, backend,
                                   keep_workspace=True)
        -> (output, h_n, c_n, workspace)
    torch.ops.fastrnn.{cell}_layer_backward(grad_output, grad_h_n, grad_c_n, x, w_ih, b_ih, h0,
                                             c0, w_hh, b_hh, w_hr, lengths, output, workspace,
                                             backend, wanted)
        -> (grad_x, grad_w_ih, grad_b_ih, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr)

for cell in lstm, gru, rnn_tanh, rnn_relu. Shapes and meaning: backends/base.py (forward_from_input
and backward_from_input); `wanted` says which of the eight gradients to compute, and an empty
tensor ([0]) stands where one is not wanted or its input is absent. `backend` is a name from
backends.BACKEND_NAMES, or "" for FASTRNN_BACKEND / "auto"; it is resolved when the op runs
(fastrnn.admission under auto), so `torch.compile` sees each op as one opaque node. With
keep_workspace=False (nothing will be differentiated) the workspace comes back empty
([0, B, D, W]) and backends may skip saving it.

The fused backward kernels give first derivatives. A backward that must itself be differentiated
(create_graph=True) or batched (vmap over it) instead runs the layer again in the reference
recurrence's differentiable torch ops and differentiates those; under torch.func transforms and
forward-mode AD the layers run as those ops from the start. Every op has a per-sample vmap rule.

In eager mode a layer skips the ops (`run_layer`): the chosen backend runs with an autograd.Function
of its own, or, for the torch backend, with torch's own autograd; a cell step, or a layer call with
T = 1, is one call (`direct_step`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, _VF
from torch.autograd import forward_ad

from . import admission, backends, onnx_export
from .backends.base import LayerConfig, workspace_dtype
from .backends.native import TorchBackend
from .backends.reference import layer_forward as differentiable_layer
from .cells import CELLS, CellSpec

def _backend_for(cell: CellSpec, name: str, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                 training: bool, op_path: bool):
    """The backend that runs this layer call (fastrnn.admission for `auto`)."""
    config = LayerConfig.of(cell, x, h0, w_hh, w_hr, lengths)
    if config.batch_size == 0 or config.hidden_size == 0:
        # nothing to compute: the reference backend's plain ops give the empty results (the
        # kernels divide work by B and H); the requested name is still checked
        backends.requested_backend(name or None)
        return backends.reference_backend()
    return admission.serving_backend(
        name or None, config, input_size=x.shape[-1],
        has_bias=b_ih is not None or b_hh is not None, training=training, device=x.device,
        call=lambda: admission.LayerCall(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths),
        op_path=op_path)


def _gradients(cell: CellSpec, backward: Callable, saved: Sequence[Optional[Tensor]],
               grads: Sequence[Optional[Tensor]], needs_input_grad: Sequence[bool],
               compiled: bool) -> tuple:
    """The gradients of a layer's eight tensor inputs (None where absent or not needed), for the
    gradients of its outputs (None where unused): `backward(*grads, *inputs, lengths, output,
    workspace, wanted)` runs the backend's fused backward; a backward that must itself be
    differentiated or batched recomputes the layer in differentiable ops instead."""
    *inputs, lengths, output, workspace = saved
    grad_output, grad_h_n, grad_c_n = grads
    if not cell.has_cell_state:
        grad_c_n = None
    wanted = [bool(need) and t is not None for need, t in zip(needs_input_grad, inputs)]
    if grad_output is None and grad_h_n is None and output.shape[0] == 1:
        wanted[7] = False  # c_n of one step does not depend on the projection W_hr (None)
    if _backward_needs_graph(grad_output, grad_h_n, grad_c_n):
        if compiled:
            raise RuntimeError("fastrnn: double backward through a compiled layer is not "
                               "supported (torch.compile supports none); run it eagerly")

        def forward(x, w_ih, b_ih, *layer_inputs):
            return differentiable_layer(cell, F.linear(x, w_ih, b_ih), *layer_inputs, lengths,
                                        False)[:3]

        return tuple(_vjp_by_recompute(forward, inputs, wanted,
                                       (grad_output, grad_h_n, grad_c_n)))
    if workspace.shape[0] == 0 and output.shape[0] != 0:
        raise RuntimeError("fastrnn: this layer ran with keep_workspace=False, so it has no "
                           "saved activations to differentiate through")
    found = backward(grad_output, grad_h_n, grad_c_n, *inputs, lengths, output, workspace, wanted)
    return tuple(grad if want else None for grad, want in zip(found, wanted))


def _define(cell: CellSpec):
    """Register the forward and backward ops of one cell; return the forward op."""

    @torch.library.custom_op(f"fastrnn::{cell.name}_layer_backward", mutates_args=())
    def layer_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor],
                       grad_c_n: Optional[Tensor], x: Tensor, w_ih: Tensor,
                       b_ih: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
                       b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
                       output: Tensor, workspace: Tensor, backend: str, wanted: list[bool]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        impl = _backend_for(cell, backend, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                            training=True, op_path=True)
        grads = impl.backward_from_input(cell, grad_output, grad_h_n, grad_c_n, x, w_ih, b_ih,
                                         h0, c0, w_hh, b_hh, w_hr, lengths, output, workspace,
                                         wanted)
        return tuple(x.new_empty(0) if grad is None or not want else grad
                     for grad, want in zip(grads, wanted))

    @layer_backward.register_fake
    def _(grad_output, grad_h_n, grad_c_n, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
          output, workspace, backend, wanted):
        inputs = (x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr)
        return tuple(x.new_empty(t.shape if want and t is not None else (0,))
                     for t, want in zip(inputs, wanted))

    @torch.library.custom_op(f"fastrnn::{cell.name}_layer", mutates_args=())
    def layer(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
              w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor],
              lengths: Optional[Tensor], backend: str, keep_workspace: bool = True
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        impl = _backend_for(cell, backend, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                            training=keep_workspace, op_path=True)
        output, h_n, c_n, workspace = impl.forward_from_input(
            cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, keep_workspace=keep_workspace)
        if not keep_workspace and workspace.shape[0] != 0:
            workspace = workspace.new_empty((0, *workspace.shape[1:]))
        return output, h_n, c_n, workspace

    @layer.register_fake
    def _(x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, backend, keep_workspace=True):
        seq_len, batch, _ = x.shape
        num_directions, gate_rows, out_size = w_hh.shape
        hidden = gate_rows // cell.gates
        return (x.new_empty(seq_len, batch, num_directions * out_size),
                x.new_empty(num_directions, batch, out_size),
                x.new_empty(num_directions, batch, hidden) if cell.has_cell_state
                else x.new_empty(0),
                x.new_empty(seq_len if keep_workspace else 0, batch, num_directions,
                            cell.workspace_gates * hidden, dtype=workspace_dtype(x.dtype)))

    def setup_context(ctx, inputs, output):
        *tensors, lengths, backend, keep_workspace = inputs
        out, _, _, workspace = output
        ctx.save_for_backward(*tensors, lengths, out, workspace)
        ctx.backend = backend
        ctx.compiled = torch.compiler.is_compiling()
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)  # unused outputs get None, not zeros the size of them

    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
        def fused(*arguments):
            return layer_backward(*arguments[:-1], ctx.backend, arguments[-1])

        grads = _gradients(cell, fused, ctx.saved_tensors, (grad_output, grad_h_n, grad_c_n),
                           ctx.needs_input_grad[:8], ctx.compiled)
        return (*grads, None, None, None)

    layer.register_autograd(backward, setup_context=setup_context)
    return layer


LAYER_OPS = {name: _define(cell) for name, cell in CELLS.items()}


def run_layer(cell: CellSpec, x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], h0: Tensor,
              c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor],
              lengths: Optional[Tensor], backend: str, keep_workspace: bool,
              host_lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One layer from its input x [T, B, I]: (output, h_n, c_n); host_lengths: `lengths` on the
    CPU where the caller has them.

    In eager mode the backend the layer op would pick runs the layer as one call: the torch
    backend under torch's own autograd, any other with `_EagerLayer` for autograd (the same
    kernels and results as the op, without its dispatch; the cpu backend then computes the
    input projection step by step inside its time loop). A single step of one direction (T = 1,
    no projection or lengths) is one cell step (`direct_step`) where that can run. Under a
    compiler or torch.jit.trace, or for tensor subclasses, through the layer op (`layer`), which
    torch.compile sees as an opaque node; under ONNX export as ONNX's recurrence operator; under
    torch.func transforms and forward-mode AD as plain differentiable ops.
    """
    if x.shape[0] == 1 and w_hh.shape[0] == 1 and w_hr is None and lengths is None:
        # squeeze, not [0]: its backward is a view, where select's fills a copy of w_hh
        step = direct_step(cell, backend, x.squeeze(0), h0.squeeze(0),
                           None if c0 is None else c0.squeeze(0), w_ih, w_hh.squeeze(0), b_ih,
                           None if b_hh is None else b_hh.squeeze(0))
        if step is not None:  # output [1, B, H] and h_n [1, B, H] as separate tensors
            h_n = step[0].unsqueeze(0)
            return h_n.clone(), h_n, None if step[1] is None else step[1].unsqueeze(0)
    if onnx_export.exporting():
        return onnx_export.layer(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths)
    if (type(x) is not Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or needs_plain_ops(x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr)):
        return layer(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, backend,
                     keep_workspace)
    impl = _backend_for(cell, backend, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                        training=keep_workspace, op_path=False)
    if isinstance(impl, TorchBackend):
        return impl.layer(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                          train=keep_workspace, host_lengths=host_lengths)
    if keep_workspace:
        return _EagerLayer.apply(x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, cell,
                                 impl)[:3]
    return impl.forward_from_input(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                                   keep_workspace=False)[:3]


def layer(cell: CellSpec, x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], h0: Tensor,
          c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor],
          lengths: Optional[Tensor], backend: str, keep_workspace: bool
          ) -> tuple[Tensor, Tensor, Tensor]:
    """One layer from its input x [T, B, I]: (output, h_n, c_n), through the layer op, or under
    ONNX export (a cell's step: ONNX records its plain torch ops), torch.func transforms and
    forward-mode AD through plain differentiable torch ops."""
    if onnx_export.exporting():
        return differentiable_layer(cell, F.linear(x, w_ih, b_ih), h0, c0, w_hh, b_hh, w_hr,
                                    lengths, False)[:3]
    if needs_plain_ops(x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr):
        return _plain_layer(cell, F.linear(x, w_ih, b_ih), h0, c0, w_hh, b_hh, w_hr, lengths)
    output, h_n, c_n, _ = LAYER_OPS[cell.name](x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths,
                                               backend, keep_workspace)
    return output, h_n, c_n

def _plain_layer(cell: CellSpec, x_gates: Tensor, h0, c0, w_hh, b_hh, w_hr, lengths
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The layer in the reference recurrence's differentiable ops, with the one-time notice."""
    _warn_plain_ops_once()
    return differentiable_layer(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, False)[:3]


def _transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def needs_plain_ops(*tensors: Optional[Tensor]) -> bool:
    """Whether a layer must run as plain differentiable torch ops: under a torch.func transform,
    or with forward-mode AD tangents (torch.autograd.forward_ad) on any of `tensors`; the fused
    kernels have neither vmap nor jvp rules."""
    if _transforms_active():
        return True
    if forward_ad._current_level < 0:  # no dual level is open: no tangents anywhere
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


_warned_plain_ops = False


def _warn_plain_ops_once() -> None:
    global _warned_plain_ops
    if not _warned_plain_ops:
        _warned_plain_ops = True
        warnings.warn("fastrnn: under torch.func transforms and forward-mode AD the layers run as "
                      "plain torch ops (the reference recurrence), not on the fused kernels",
                      stacklevel=5)


def _backward_needs_graph(*grads: Optional[Tensor]) -> bool:
    """Whether a backward must itself be differentiable or batched: a graph is being built over
    it (create_graph=True), it runs under a torch.func transform, or its gradients are batched by
    torch's legacy vmap (gradcheck's check_batched_grad); the fused backward kernels are neither."""
    return (torch.is_grad_enabled() or _transforms_active()
            or any(grad is not None and _legacy_batched(grad) for grad in grads))


def _legacy_batched(tensor: Tensor) -> bool:
    """Whether `tensor` is a BatchedTensor of torch._vmap_internals (dispatch key "Batched")."""
    return torch._C._functorch.is_legacy_batchedtensor(tensor)


def _vjp_by_recompute(forward: Callable, inputs: Sequence[Optional[Tensor]],
                      wanted: Sequence[bool], grads: Sequence[Optional[Tensor]]
                      ) -> list[Optional[Tensor]]:
    """The gradients of forward(*inputs) with respect to the wanted inputs, for the gradients of
    its outputs (None where an output was unused), by running forward again in differentiable ops:
    the result carries a graph when create_graph is on, and batches under vmap. None where an
    input is not wanted."""
    with torch.enable_grad():
        outputs = forward(*inputs)
    pairs = [(output, grad) for output, grad in zip(outputs, grads) if grad is not None]
    targets = [tensor for tensor, want in zip(inputs, wanted) if want]
    if not pairs or not targets:
        return [None] * len(inputs)
    found = iter(torch.autograd.grad([output for output, _ in pairs], targets,
                                     [grad for _, grad in pairs],
                                     create_graph=torch.is_grad_enabled(), allow_unused=True))
    return [next(found) if want else None for want in wanted]


class _EagerFunction(torch.autograd.Function):
    """An autograd.Function of the eager paths, whose forward takes every argument by position."""

    @classmethod
    def apply(cls, *args):
        """Function.apply without its inspect.signature binding, which costs ~25 us per call and
        only fills in defaults: forward has none and every argument comes by position. Under
        torch.func transforms, Function.apply itself."""
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)


class _EagerLayer(_EagerFunction):
    """Input projection and layer as one autograd node, run by one backend in eager mode; the
    same gradients as the layer op's (`_gradients`)."""

    @staticmethod
    def forward(x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, cell, impl):
        return tuple(impl.forward_from_input(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr,
                                             lengths))

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, lengths, cell, impl = inputs
        out, _, _, workspace = output
        ctx.save_for_backward(*tensors, lengths, out, workspace)
        ctx.cell, ctx.impl = cell, impl
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)  # unused outputs get None, not zeros the size of them

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
        def fused(*arguments):
            return ctx.impl.backward_from_input(ctx.cell, *arguments)

        grads = _gradients(ctx.cell, fused, ctx.saved_tensors, (grad_output, grad_h_n, grad_c_n),
                           ctx.needs_input_grad[:8], compiled=False)
        return (*grads, None, None, None)


def direct_step(cell: CellSpec, backend: Optional[str], x: Tensor, h: Tensor,
                c: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                b_hh: Optional[Tensor]) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """One step of a cell in eager mode with the fewest calls: x [B, I], h [B, H], c [B, H]
    (LSTM) -> (h' [B, H], c' [B, H] or None).

    On the CPU one native call, the cpu backend's cell_step: projection, recurrent product and
    cell, differentiated by a native autograd node (its backward is cell_step_backward); a step
    that needs no gradient calls the kernel without torch's dispatcher where the call allows
    (csrc/cpu/direct_calls.cpp). On CUDA, where a step is bound by its kernel launches,
    torch.nn's own step (`torch._VF.*_cell`: two GEMMs and one fused cell kernel for LSTM and
    GRU), which the layer kernels cannot undercut at T = 1; so too where the torch backend is
    asked for, or auto finds no cpu kernels. None where the step must run through the layer
    ops instead: another backend asked for, another dtype or device, a compiler, tracer, ONNX
    export, torch.func transform or forward-mode AD, a tensor subclass, or an empty problem.
    """
    tensors = (x, h, c, w_ih, w_hh, b_ih, b_hh)
    if _CELL_STEP_DIRECT is not None and _may_call_directly(backend, tensors):
        step = _CELL_STEP_DIRECT(cell.name, *tensors)  # None where a gradient is wanted
        if step is not None:
            return step
    where = _direct_step_device(backend, tensors)
    if not where or 0 in (x.shape[0], x.shape[1], h.shape[1]):
        return None
    if where == "torch":
        return torch_step(cell, *tensors)
    h_new, c_new, _ = _CELL_STEP(cell.name, *tensors)
    return h_new, (c_new if cell.has_cell_state else None)


def inference_step(cell: CellSpec, backend: Optional[str], input: Tensor, h0: Optional[Tensor],
                   c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                   b_hh: Optional[Tensor], batch_first: bool
                   ) -> Optional[tuple[Tensor, Tensor, Optional[Tensor]]]:
    """A one-layer, one-direction call of one step that needs no gradient as one native call:
    input [1, B, I] ([B, 1, I] batch_first), h0 and c0 (LSTM) [1, B, H] or None (zeros) ->
    (output like input with H features, h_n [1, B, H], c_n [1, B, H] or None), as the layer
    path gives them. None where a gradient is wanted, autocast is on or the native step does
    not run it (see direct_step). Where the op would only run its CPU kernel, that kernel is
    called without torch's dispatcher (csrc/cpu/direct_calls.cpp, which checks the rest)."""
    tensors = (input, h0, c0, w_ih, w_hh, b_ih, b_hh)
    if _LAYER_STEP_DIRECT is not None and _may_call_directly(backend, tensors):
        result = _LAYER_STEP_DIRECT(cell.name, *tensors, batch_first)
        if result is not None:
            return result
    if torch.is_autocast_enabled(input.device.type) or torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors):
        return None
    if (_direct_step_device(backend, tensors) != "cpu" or 0 in input.shape
            or w_hh.shape[1] == 0):
        return None
    output, h_n, *c_n = _LAYER_STEP(cell.name, input, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_first)
    return output, h_n, (c_n[0] if c_n else None)


def _may_call_directly(backend: Optional[str], tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether a step may try the cpu kernels without the dispatcher (direct_calls.cpp checks
    the rest): the cpu backend asked for (or auto), no compiler and no __torch_function__."""
    return (backends.requested_backend(backend or None) in _CPU
            and not (torch.compiler.is_compiling() or torch._C._has_torch_function(tensors)))


def torch_step(cell: CellSpec, x: Tensor, h: Tensor, c: Optional[Tensor], w_ih: Tensor,
               w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]
               ) -> tuple[Tensor, Optional[Tensor]]:
    """The step of torch.nn's cells (torch._VF), differentiable: (h', c' or None)."""
    if cell.has_cell_state:
        return tuple(_VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh))
    step = {"gru": _VF.gru_cell, "rnn_tanh": _VF.rnn_tanh_cell,
            "rnn_relu": _VF.rnn_relu_cell}[cell.name]
    return step(x, h, w_ih, w_hh, b_ih, b_hh), None


def _direct_step_device(backend: Optional[str], tensors: Sequence[Optional[Tensor]]) -> str:
    """How `direct_step` may run these tensors for this backend name (None: the environment's):
    "cpu" (the native step op), "torch" (torch's own step), or "" where it may not. Cheap checks
    first."""
    name = backends.requested_backend(backend or None)
    x = tensors[0]
    if x.is_cpu and name in _CPU and (_CELL_STEP is not None or _load_step_op()):
        if x.dtype is not torch.float32 and x.dtype is not torch.bfloat16:
            return ""
        for tensor in tensors:
            if tensor is not None and (tensor.dtype is not x.dtype or not tensor.is_cpu):
                return ""
        where = "cpu"
    elif name == "torch" or name == "auto" and (x.is_cuda or x.is_cpu and not _load_step_op()):
        for tensor in tensors:
            if tensor is not None and (tensor.dtype is not x.dtype
                                       or tensor.device != x.device):
                return ""
        where = "torch"
    else:
        return ""
    # an ONNX export traces (torch.jit) or compiles (dynamo=True): both are excluded
    if (torch._C._has_torch_function(tensors) or torch.compiler.is_compiling()
            or torch.jit.is_tracing() or needs_plain_ops(*tensors)):
        return ""
    return where


_CELL_STEP = _LAYER_STEP = None  # the native step ops, once loaded
# layer_step and cell_step_forward without the dispatcher (once loaded, where they are built)
_LAYER_STEP_DIRECT = _CELL_STEP_DIRECT = None
_CPU = ("auto", "cpu")


def _load_step_op() -> bool:
    """Look the cpu backend's step op up once; False where its kernels are not available."""
    global _CELL_STEP, _LAYER_STEP, _LAYER_STEP_DIRECT, _CELL_STEP_DIRECT
    cpu = backends._load("cpu")
    if cpu is None or not cpu.available()[0]:
        return False
    _CELL_STEP = torch.ops.fastrnn_cpu.cell_step.default
    _LAYER_STEP = torch.ops.fastrnn_cpu.layer_step.default
    direct = cpu.direct_calls()
    if direct is not None:
        _LAYER_STEP_DIRECT, _CELL_STEP_DIRECT = direct.layer_step_direct, direct.cell_step_direct
    return True


def _register_per_sample_vmap(op) -> None:
    """Give `op` a vmap rule that runs it once per sample and stacks the results (the kernels
    take one problem per call; batching over stacked weights is a different problem anyway)."""

    def select(arg, dim, index):  # a list argument (of flags) has a list of in_dims
        if isinstance(dim, (list, tuple)):
            return [select(item, item_dim, index) for item, item_dim in zip(arg, dim)]
        return arg if dim is None else arg.select(dim, index)

    def rule(info, in_dims, *args, **kwargs):
        results = []
        for index in range(info.batch_size):
            sample = [select(arg, dim, index) for arg, dim in zip(args, in_dims)]
            results.append(op(*sample, **kwargs))
        if isinstance(results[0], Tensor):
            return torch.stack(results), 0
        return tuple(torch.stack(parts) for parts in zip(*results)), (0,) * len(results[0])

    torch.library.register_vmap(op, rule)


for _op in (*LAYER_OPS.values(),
            *(getattr(torch.ops.fastrnn, f"{name}_layer_backward").default for name in CELLS)):
    _register_per_sample_vmap(_op)
