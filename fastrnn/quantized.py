"""int8 inference on the CPU: LSTM, GRU and RNN (and their cells) with dynamically quantized
int8 products, on fastrnn's fused CPU kernels.

Each weight matrix is quantized once, when a float module is converted (`from_float`,
`quantize_int8`, torch's `quantize_dynamic` with fastrnn's classes in its spec, or torchao's
`quantize_` with `fastrnn.torchao.Int8DynamicRNNConfig`): int8 per output row, symmetric
(w ~ w_q * scale[row], w_q in [-127, 127]). At every step the kernels quantize the step's
activations (x_t, h_t, and an LSTM's o * tanh(c) before its projection) per batch row the same
way, sum the products exactly in int32 (AVX512_VNNI, AVX2 or plain loops), and run the cell in
float32. Inference only: no gradients.

The modules keep fastrnn's (and torch.nn's) constructor, inputs, outputs and errors; their
state_dict holds, per weight, the int8 matrix under the float name and its float32 scales as
`<name>_scale`; biases stay float32. Legend: B batch, T time, I input, H hidden, P proj_size or
H, L layers, D directions.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import rnn as torch_rnn

from . import cell_modules, functional, modules, onnx_export
from .backends import cpu
from .cells import CELLS, CELLS_BY_MODE, CellSpec

_SUM = "_sum"      # suffix of the int32 row sums the kernels take (recomputed, not saved)
_SCALE = "_scale"  # suffix of the float32 row scales
_PANELS = "_panels"  # suffix of the rows packed for the kernels (made again, not saved)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] -> (int8 [N, K], float32 scales [N]): symmetric per row, rounded to nearest
    even; a row of zeros gets scale 0."""
    weight = weight.detach().to("cpu", torch.float32)
    scale = weight.abs().amax(1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(weight / safe.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return quantized, scale


def panels(quantized: Tensor, gates: int) -> Tensor:
    """int8 weight [G*N, K] -> its rows as the kernels read them: per gate, panels of 16 rows,
    each [K4, 16, 4] (the 4 entries k of a row side by side; K4 = K / 4 rounded up), zero-padded
    past N and K: [G, ceil(N / 16), K4, 16, 4]."""
    rows, depth = quantized.shape
    n, k4 = rows // gates, -(-depth // 4)
    n16 = -(-n // 16) * 16
    padded = quantized.new_zeros(gates, n16, 4 * k4)
    padded[:, :n, :depth] = quantized.view(gates, n, depth)
    return padded.view(gates, n16 // 16, 16, k4, 4).permute(0, 1, 3, 2, 4).contiguous()


def _kernels_loaded() -> None:
    """Registers the CPU ops, or raises why they are not there."""
    if _LOADED:
        return
    available, why = cpu.BACKEND.available()
    if not available:
        raise RuntimeError(f"fastrnn int8 modules need the fused CPU kernels: {why}")
    direct = cpu.BACKEND.direct_calls()
    if direct is not None:
        _DIRECT.append(direct.layer_forward_int8_direct)
    _LOADED.append(True)


_LOADED: list[bool] = []  # [True] once the kernels are there
_DIRECT: list = []  # [the op without the dispatcher] once loaded, where it is built


def int8_kernels() -> str:
    """Which int8 kernels run here: "vnni" (AVX512_VNNI), "avx2" or "generic" (FASTRNN_CPU_ISA
    as for the float32 kernels)."""
    _kernels_loaded()
    return torch.ops.fastrnn_cpu.int8_kernels()


def layer_int8(cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor],
               has_biases: bool, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One int8 layer (the CPU op fastrnn_cpu::layer_forward_int8): x [T, B, I], h0 [D, B, P],
    c0 [D, B, H] (LSTM), weights as RNNBase._layer_weights gives them, lengths [B] or None ->
    (output [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or empty). In eager mode and under
    torch.jit.trace the op itself (its kernel called without the dispatcher where the call
    allows: csrc/cpu/direct_calls.cpp); under torch.compile and torch.export,
    `fastrnn::layer_int8`, which loads the kernels when it runs."""
    if torch.compiler.is_compiling():
        return _layer_int8_op(cell, x, h0, c0, weights, has_biases, lengths)
    _kernels_loaded()
    if _DIRECT and not torch._C._has_torch_function((x, h0, c0, lengths, *weights)):
        result = _DIRECT[0](cell, x, h0, c0, weights, has_biases, lengths)
        if result is not None:
            return result
    return torch.ops.fastrnn_cpu.layer_forward_int8(cell, x, h0, c0, weights, has_biases,
                                                    lengths)


@torch.library.custom_op("fastrnn::layer_int8", mutates_args=())
def _layer_int8_op(cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor],
                   has_biases: bool, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    _kernels_loaded()
    return tuple(torch.ops.fastrnn_cpu.layer_forward_int8(cell, x, h0, c0, weights, has_biases,
                                                          lengths))


@_layer_int8_op.register_fake
def _(cell, x, h0, c0, weights, has_biases, lengths):
    steps, batch, _ = x.shape
    directions, _, out = h0.shape
    hidden = c0.shape[2] if c0 is not None else out
    c_n = x.new_empty(directions, batch, hidden) if cell == "lstm" else x.new_empty(0)
    return x.new_empty(steps, batch, directions * out), x.new_empty(directions, batch, out), c_n


def _check_inference(module: nn.Module, *tensors: Tensor | None) -> None:
    """Raise where a call would need what int8 modules do not do: gradients, another device,
    ONNX export."""
    if onnx_export.exporting():
        raise RuntimeError(
            f"fastrnn's int8 {type(module).__name__} cannot be exported to ONNX (ONNX has no "
            "recurrence with int8 weights): export the float model and quantize the ONNX file "
            "(onnxruntime.quantization.quantize_dynamic)")
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type != "cpu":
            raise RuntimeError(f"fastrnn's int8 {type(module).__name__} runs on the CPU, got "
                               f"a tensor on {tensor.device}")
        if tensor.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"fastrnn's int8 {type(module).__name__} is for inference and has "
                               "no gradients: call it under torch.no_grad() or "
                               "torch.inference_mode(), or on tensors that do not require grad")


class _Int8Weights:
    """Turns a module's float weight parameters into int8 buffers: `<name>` int8 and
    `<name>_scale` float32, and what the kernels read, derived from them (not saved: made again
    on loading): `<name>_panels` (the rows packed) and `<name>_sum` (each row's sum, int32);
    biases into float32 buffers."""

    _weight_names: list[str]

    def _to_buffers(self) -> None:
        for name in self._weight_names:
            value = self._parameters.pop(name).detach()
            if name.startswith("weight"):
                quantized, scale = quantize_weight(value)
                self.register_buffer(name, quantized)
                self.register_buffer(name + _SCALE, scale)
            else:
                self.register_buffer(name, value.to("cpu", torch.float32))
        self._make_kernel_buffers()

    @classmethod
    def from_float(cls, module: nn.Module, use_precomputed_fake_quant: bool = False):
        """The int8 module of a float one of the same kind (fastrnn's or torch.nn's): its
        hyper-parameters and training mode, its weights quantized. (The second argument is
        torch's quantize_dynamic's, unused.)"""
        new = cls(**modules._constructor_kwargs(module))
        new._quantize_from(module)
        return new.train(module.training)

    @classmethod
    def from_torch(cls, module: nn.Module, *, backend: str | None = None):
        return cls.from_float(module)

    def to_torch(self) -> nn.Module:
        raise NotImplementedError(f"fastrnn's int8 {type(self).__name__} has no torch.nn twin: "
                                  "keep the float module to go back")

    def reset_parameters(self) -> None:
        if "_weight_names" in self.__dict__:
            raise NotImplementedError(f"fastrnn's int8 {type(self).__name__} is made from a float "
                                      "module (from_float): initialise that one")
        super().reset_parameters()  # the float constructor's, before the weights become int8

    def _quantize_from(self, float_module: nn.Module) -> None:
        """The weights of float_module (of the same shapes), quantized into this module."""
        for name in self._weight_names:
            value = getattr(float_module, name).detach()
            if name.startswith("weight"):
                quantized, scale = quantize_weight(value)
                getattr(self, name).copy_(quantized)
                getattr(self, name + _SCALE).copy_(scale)
            else:
                getattr(self, name).copy_(value)
        self._make_kernel_buffers()

    def _gates(self, name: str) -> int:
        """The gates of weight `name` (a projection has one)."""
        return 1 if name.startswith("weight_hr") else getattr(self, name).shape[0] // (
            self.hidden_size)

    def _make_kernel_buffers(self) -> None:
        """`<name>_sum` and `<name>_panels` (not saved) made from each int8 weight."""
        for name in self._weight_names:
            if name.startswith("weight"):
                quantized = getattr(self, name)
                self.register_buffer(name + _SUM, quantized.sum(1, dtype=torch.int32),
                                     persistent=False)
                self.register_buffer(name + _PANELS, panels(quantized, self._gates(name)),
                                     persistent=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._make_kernel_buffers()

    def _quantized(self, name: str) -> list[Tensor]:
        """[packed rows, scales, sums] of weight `name`, as the kernels take them."""
        return [getattr(self, name + _PANELS), getattr(self, name + _SCALE),
                getattr(self, name + _SUM)]

    def dequantized_weight(self, name: str) -> Tensor:
        """The float32 weight that weight `name`'s int8 rows and scales stand for."""
        return getattr(self, name).float() * getattr(self, name + _SCALE).unsqueeze(1)


class RNNBase(_Int8Weights, modules.RNNBase):
    """The common part of the int8 LSTM, GRU and RNN, each a subclass of its float fastrnn class
    (as the int8 cells are of theirs) whose weights are int8 buffers."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("dtype", None)
        kwargs.pop("backend", None)
        super().__init__(*args, dtype=torch.float32, **kwargs)  # the float class's, then int8
        self._weight_names = list(self._flat_weights_names)
        self._to_buffers()
        per = len(self._weight_names) // self.num_layers  # both directions of a layer
        self._layer_keys = [  # the buffers of _layer_weights
            [key for name in self._weight_names[layer * per:(layer + 1) * per]
             for key in ([name + _PANELS, name + _SCALE, name + _SUM]
                         if name.startswith("weight") else [name])]
            for layer in range(self.num_layers)]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._weight_names]

    def _weight_dtype(self) -> torch.dtype:
        return torch.float32  # the activations' (the weights are int8)

    def _one_step(self, input: Tensor, hx):
        """The common call, any T, with none of the general path's Python (~10 us): one layer
        and direction, a batched 3-D float32 input, hx None or of the expected shapes, no
        gradient asked for. None for any other call, valid or not: the general path then runs
        it, or raises torch.nn's error."""
        if (self.num_layers != 1 or self.bidirectional or input.dim() != 3
                or input.dtype != torch.float32 or input.shape[2] != self.input_size
                or input.shape[0] == 0 or input.shape[1] == 0 or input.device.type != "cpu"
                or (input.requires_grad and torch.is_grad_enabled())):
            return None
        batch = input.shape[0 if self.batch_first else 1]
        is_lstm = self.mode == "LSTM"
        shape = (1, batch, self.proj_size or self.hidden_size)
        if hx is None:
            h0, c0 = self._zero_state_of(input, batch)
        elif is_lstm:
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h0, c0 = hx
            if (type(h0) is not Tensor or type(c0) is not Tensor or h0.shape != shape
                    or c0.shape != (1, batch, self.hidden_size) or h0.dtype != torch.float32
                    or c0.dtype != torch.float32 or h0.requires_grad or c0.requires_grad):
                return None
        else:
            h0, c0 = hx, None
            if (type(h0) is not Tensor or h0.shape != shape or h0.dtype != torch.float32
                    or h0.requires_grad):
                return None
        if onnx_export.exporting():
            _check_inference(self)
        x = input.transpose(0, 1) if self.batch_first else input
        output, h_n, c_n = self._run_layers(x, h0, c0, None)
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if is_lstm else h_n)

    def _zero_state_of(self, input: Tensor, batch: int) -> tuple[Tensor, Tensor | None]:
        """Zero h0 [1, B, P] and c0 [1, B, H] (LSTM) for a one-layer call, kept for reuse in
        eager mode (the op only reads them; two fresh tensors cost ~3 us of a ~40 us call)."""
        def zeros():
            return (input.new_zeros(1, batch, self.proj_size or self.hidden_size),
                    input.new_zeros(1, batch, self.hidden_size) if self.mode == "LSTM" else None)

        if torch.compiler.is_compiling():
            return zeros()
        cache = self.__dict__.setdefault("_zero_states", {})
        if batch not in cache:
            if len(cache) >= 8:
                cache.clear()
            cache[batch] = zeros()
        return cache[batch]

    def _layer_weights(self, layer: int) -> list[Tensor]:
        """The op's weights of one layer: per direction w_ih (packed rows, scales, sums), w_hh,
        [b_ih, b_hh], [w_hr]."""
        buffers = self._buffers  # not getattr: a dozen nn.Module lookups cost microseconds
        return [buffers[key] for key in self._layer_keys[layer]]

    def _run_layers(self, x: Tensor, h0: Tensor, c0: Tensor | None, lengths: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The layers over x [T, B, I] from h0 [L*D, B, P], c0 [L*D, B, H] (LSTM), lengths [B]
        or None -> (output [T, B, D*P], h_n, c_n or None)."""
        cell = CELLS_BY_MODE[self.mode].name
        if self.num_layers == 1:
            output, h_n, c_n = layer_int8(cell, x, h0, c0, self._layer_weights(0), self.bias,
                                          lengths)
            return output, h_n, (c_n if c0 is not None else None)
        directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            states = slice(layer * directions, (layer + 1) * directions)
            x, h, c = layer_int8(cell, x, h0[states], None if c0 is None else c0[states],
                                 self._layer_weights(layer), self.bias, lengths)
            h_n.append(h)
            c_n.append(c)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, torch.cat(h_n), (torch.cat(c_n) if c0 is not None else None)

    def _recurrence(self, data: Tensor, h0: Tensor, c0: Tensor | None,
                    batch_sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        _check_inference(self, data, h0, c0)
        lengths = rows = None
        if batch_sizes is not None:
            x, lengths, rows, _ = functional.unpacked(data, batch_sizes, h0.shape[1])
        else:
            x = data.transpose(0, 1) if self.batch_first else data
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        output, h_n, c_n = self._run_layers(x, h0, c0, lengths)
        if rows is not None:
            output = output.flatten(0, 1).index_select(0, rows)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, h_n, c_n


class LSTM(RNNBase, modules.LSTM):
    """int8 LSTM: fastrnn.LSTM's arguments (float32, CPU); from_float(module) converts one."""


class GRU(RNNBase, modules.GRU):
    """int8 GRU: fastrnn.GRU's arguments (float32, CPU); from_float(module) converts one."""


class RNN(RNNBase, modules.RNN):
    """int8 Elman RNN: fastrnn.RNN's arguments (float32, CPU); from_float(module) converts
    one."""


class RNNCellBase(_Int8Weights, cell_modules.RNNCellBase):
    """The common part of the int8 cells: a fastrnn cell whose weights are int8 buffers."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("dtype", None)
        kwargs.pop("backend", None)
        super().__init__(*args, dtype=torch.float32, **kwargs)
        self._weight_names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias
                                                           else [])
        self._to_buffers()

    def _cell_step(self, cell: CellSpec, input: Tensor, h: Tensor, c: Tensor | None
                   ) -> tuple[Tensor, Tensor | None]:
        _check_inference(self, input, h, c)
        batch = input.shape[0]
        if input.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} "
                               f"expected {self.input_size}")
        for index, state in enumerate((h, c) if c is not None else (h,)):
            if state.shape != (batch, self.hidden_size):
                raise RuntimeError(f"hidden{index} must be [{batch}, {self.hidden_size}] for an "
                                   f"input of batch {batch}, got {list(state.shape)}")
        for tensor in (input, h, c):
            if tensor is not None and tensor.dtype != torch.float32:
                raise RuntimeError("mat1 and mat2 must have the same dtype, but got "
                                   f"{tensor.dtype} and float (fastrnn's int8 cells take float32)")
        weights = self._quantized("weight_ih") + self._quantized("weight_hh")
        if self.bias:
            weights += [self.bias_ih, self.bias_hh]
        _, h_n, c_n = layer_int8(cell.name, input.unsqueeze(0), h.unsqueeze(0),
                                 None if c is None else c.unsqueeze(0), weights, self.bias, None)
        return h_n[0], (c_n[0] if c is not None else None)


class LSTMCell(RNNCellBase, cell_modules.LSTMCell):
    """int8 LSTMCell: fastrnn.LSTMCell's arguments (float32, CPU)."""

    torch_class = torch_rnn.LSTMCell


class GRUCell(RNNCellBase, cell_modules.GRUCell):
    """int8 GRUCell: fastrnn.GRUCell's arguments (float32, CPU)."""

    torch_class = torch_rnn.GRUCell


class RNNCell(RNNCellBase, cell_modules.RNNCell):
    """int8 RNNCell: fastrnn.RNNCell's arguments (float32, CPU)."""

    torch_class = torch_rnn.RNNCell


# float class (fastrnn's and torch.nn's) -> its int8 class
INT8_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
for _float, _int8 in ((modules.LSTM, LSTM), (modules.GRU, GRU), (modules.RNN, RNN),
                      (cell_modules.LSTMCell, LSTMCell), (cell_modules.GRUCell, GRUCell),
                      (cell_modules.RNNCell, RNNCell)):
    INT8_CLASSES[_float] = INT8_CLASSES[_float.torch_class] = _int8


def int8_module(module: nn.Module) -> nn.Module:
    """The int8 module of one float recurrence or cell (fastrnn's or torch.nn's, float32 on the
    CPU; an int8 one is returned as it is)."""
    if isinstance(module, (RNNBase, RNNCellBase)):
        return module
    int8_class = INT8_CLASSES.get(type(module))
    if int8_class is None:
        raise TypeError(f"{type(module).__name__} has no fastrnn int8 module (LSTM, GRU, RNN and "
                        "their cells, fastrnn's or torch.nn's, have)")
    weight = next(module.parameters())
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"fastrnn int8 modules are made from float32 CPU modules, got "
                         f"{weight.dtype} on {weight.device}")
    return int8_class.from_float(module)


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """`model` with every LSTM, GRU and RNN (and cell), fastrnn's or torch.nn's, replaced by its
    int8 module (the model itself when it is one of them); other modules are kept as they are.
    The model is copied first unless inplace."""
    if type(model) in INT8_CLASSES:
        return int8_module(model)
    if not inplace:
        model = copy.deepcopy(model)
    for name, child in list(model.named_children()):
        if type(child) in INT8_CLASSES:
            setattr(model, name, int8_module(child))
        else:
            quantize_int8(child, inplace=True)
    return model


def output_error(float_model: nn.Module, int8_model: nn.Module, *inputs) -> dict[str, float]:
    """How far int8_model's outputs lie from float_model's on `inputs` (each output tensor, and
    the tensors of nested tuples, PackedSequences' data): the largest absolute difference, and
    the root-mean-square difference relative to the float outputs' root-mean-square."""
    with torch.no_grad():
        expected, got = _tensors(float_model(*inputs)), _tensors(int8_model(*inputs))
    difference = torch.cat([(g - e).flatten() for g, e in zip(got, expected)])
    reference = torch.cat([e.flatten() for e in expected])
    return {"max_abs": difference.abs().max().item(),
            "relative_rms": (difference.norm() / reference.norm().clamp(min=1e-30)).item()}


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value.float()]
    if isinstance(value, torch.nn.utils.rnn.PackedSequence):
        return [value.data.float()]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


torch.serialization.add_safe_globals([GRU, GRUCell, LSTM, LSTMCell, RNN, RNNCell])
