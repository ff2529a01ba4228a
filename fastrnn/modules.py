"""Drop-in replacements for torch.nn.LSTM, GRU and RNN.

Same constructor, attributes, parameter names, shapes, registration order, initialisation,
state_dict, inputs, outputs and error messages as torch.nn. They subclass nn.RNNBase but not
nn.LSTM, nn.GRU or nn.RNN: torch.compile refuses to trace any instance of those three (Dynamo's
"Attempted to wrap RNN, GRU, or LSTM"), not of nn.RNNBase. Extra keyword: `backend` (see
backends).
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules import rnn as torch_rnn  # torch's classes, even if torch.nn's are rebound
from torch.nn.utils.rnn import PackedSequence

from . import functional
from .backends import check_backend_name
from .cells import CELLS_BY_MODE
from .ops import direct_step, inference_step

class RNNBase(torch_rnn.RNNBase):
    """The common part of LSTM, GRU and RNN: an nn.RNNBase (for isinstance) that runs its own
    methods, none of torch's."""

    # torch's RNNBase keeps a list of the weights (_flat_weights) in step with the parameters
    # through these; here _flat_weights is read from the parameters each time, so that
    # nn.Module's own versions serve (and a pickled module loads through nn.Module's)
    __setattr__ = nn.Module.__setattr__
    __getstate__ = nn.Module.__getstate__
    __setstate__ = nn.Module.__setstate__
    _apply = nn.Module._apply
    _replicate_for_data_parallel = nn.Module._replicate_for_data_parallel

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        nn.Module.__init__(self)  # not torch's RNNBase.__init__, which builds its own weights
        factory_kwargs = {"device": device, "dtype": dtype}
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = check_backend_name(backend)
        num_directions = 2 if bidirectional else 1

        if (not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1
                or isinstance(dropout, bool)):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode not in CELLS_BY_MODE:
            raise ValueError("Unrecognized RNN mode: " + mode)
        gate_size = CELLS_BY_MODE[mode].gates * hidden_size
        real_hidden_size = proj_size if proj_size > 0 else hidden_size

        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                suffix = "_reverse" if direction == 1 else ""
                shapes = {"weight_ih_l{}{}": (gate_size, layer_input_size),
                          "weight_hh_l{}{}": (gate_size, real_hidden_size)}
                if bias:
                    shapes["bias_ih_l{}{}"] = (gate_size,)
                    shapes["bias_hh_l{}{}"] = (gate_size,)
                if proj_size > 0:
                    shapes["weight_hr_l{}{}"] = (proj_size, hidden_size)
                names = []
                for pattern, shape in shapes.items():
                    name = pattern.format(layer, suffix)
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """Kept for drop-in compatibility; fastrnn needs no flat weight buffer."""

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.backend is not None:
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    # ---- input checks, with torch.nn's messages ---------------------------------------------
    def _weight_dtype(self) -> torch.dtype:
        """The dtype inputs must have (outside autocast)."""
        return self.weight_ih_l0.dtype

    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        weight_dtype = self._weight_dtype()
        if input.dtype != weight_dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})")
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError("input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {input.size(-1)}")

    def get_expected_hidden_size(self, input: Tensor, batch_sizes: Tensor | None
                                 ) -> tuple[int, int, int]:
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        return self._expected_hidden_size(mini_batch)

    def _expected_hidden_size(self, mini_batch: int) -> tuple[int, int, int]:
        num_directions = 2 if self.bidirectional else 1
        size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (self.num_layers * num_directions, mini_batch, size)

    def get_expected_cell_size(self, input: Tensor, batch_sizes: Tensor | None
                               ) -> tuple[int, int, int]:
        layers, mini_batch, _ = self.get_expected_hidden_size(input, batch_sizes)
        return (layers, mini_batch, self.hidden_size)

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Tensor | None) -> None:
        self.check_input(input, batch_sizes)
        self._check_hidden(hidden, self.get_expected_hidden_size(input, batch_sizes))

    def _check_hidden(self, hidden, expected: tuple[int, int, int]) -> None:
        """hidden against the expected [L*D, B, P] (and [L*D, B, H] for c)."""
        if self.mode == "LSTM":
            self.check_hidden_size(hidden[0], expected, "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(hidden[1], (*expected[:2], self.hidden_size),
                                   "Expected hidden[1] size {}, got {}")
        else:
            self.check_hidden_size(hidden, expected)

    def _packed_batch_size(self, batch_sizes: Tensor, sorted_indices: Tensor | None, hx) -> int:
        """The batch size B of a PackedSequence: batch_sizes[0], like torch.nn. Under
        torch.compile, a size instead where one holds B (sorted_indices [B], hx [L*D, B, P]), so
        that one graph serves every batch size; functional.check_batch_sizes then checks
        batch_sizes[0] against it when the graph runs."""
        if not torch.compiler.is_compiling():
            return int(batch_sizes[0])
        if sorted_indices is not None:
            return sorted_indices.shape[0]
        if hx is not None:
            return (hx[0] if self.mode == "LSTM" else hx).shape[1]
        first = batch_sizes[0].item()
        torch._check(first >= 0)
        return first

    def permute_hidden(self, hx, permutation: Tensor | None):
        if permutation is None:
            return hx
        if self.mode == "LSTM":
            return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)
        return hx.index_select(1, permutation)

    # ---- forward ----------------------------------------------------------------------------
    def _zero_state(self, input: Tensor, batch: int):
        num_directions = 2 if self.bidirectional else 1
        layers = self.num_layers * num_directions
        size = self.proj_size if self.proj_size > 0 else self.hidden_size
        h0 = torch.zeros(layers, batch, size, dtype=input.dtype, device=input.device)
        if self.mode != "LSTM":
            return h0
        return h0, torch.zeros(layers, batch, self.hidden_size, dtype=input.dtype,
                               device=input.device)

    def _check_state_dims(self, hx, is_batched: bool) -> None:
        want = 3 if is_batched else 2
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        if self.mode == "LSTM":
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        elif hx.dim() != want:
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                               f"{hx.dim()}-D tensor")

    def _one_step(self, input: Tensor, hx):
        """A call that is one step of one cell (one layer and direction, no projection, a batched
        3-D input with T = 1, hx None or of the expected shapes and dtypes, no autocast) as one
        native step (without gradients: one op that gives the layer's outputs as they are):
        (output, hidden) as the general path gives them, with none of its per-layer work (~30 us
        of Python at B1). None for any other call, valid or not: the general path then runs it,
        or raises torch.nn's error."""
        if self.num_layers != 1 or self.bidirectional or self.proj_size or input.dim() != 3:
            return None
        time_dim = 1 if self.batch_first else 0
        batch = input.shape[1 - time_dim]
        if input.shape[time_dim] != 1 or input.shape[2] != self.input_size:
            return None
        parameters = self._parameters
        try:  # a parametrized weight is not there: the general path reads it as an attribute
            weights = [parameters[name] for name in self._flat_weights_names]
        except KeyError:
            return None
        if len(weights) == 4:
            w_ih, w_hh, b_ih, b_hh = weights
        elif len(weights) == 2:
            (w_ih, w_hh), b_ih, b_hh = weights, None, None
        else:
            return None
        if w_ih is None or w_hh is None or input.dtype is not w_ih.dtype:
            return None
        is_lstm = self.mode == "LSTM"
        state_shape = (1, batch, self.hidden_size)
        h = c = None  # [1, B, H]
        if hx is not None and is_lstm:
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h, c = hx
            if (type(h) is not Tensor or type(c) is not Tensor or h.shape != state_shape
                    or c.shape != state_shape):
                return None
        elif hx is not None:
            if type(hx) is not Tensor or hx.shape != state_shape:
                return None
            h = hx
        cell = CELLS_BY_MODE[self.mode]
        result = inference_step(cell, self.backend, input, h, c, w_ih, w_hh, b_ih, b_hh,
                                self.batch_first)  # runs nothing under autocast
        if result is not None:
            output, h_n, c_n = result
            return output, ((h_n, c_n) if is_lstm else h_n)
        if torch.is_autocast_enabled(input.device.type):
            return None
        if h is None:
            h = c = input.new_zeros(batch, self.hidden_size)
        else:
            h, c = h.squeeze(0), (c.squeeze(0) if is_lstm else None)
        step = direct_step(cell, self.backend, input.squeeze(time_dim), h,
                           c if is_lstm else None, w_ih, w_hh, b_ih, b_hh)
        if step is None:
            return None
        h_new, c_new = step  # [B, H]; the output is a tensor of its own, as torch.nn's
        h_n = h_new.unsqueeze(0)
        output = h_new.unsqueeze(1).clone() if self.batch_first else h_n.clone()
        return output, ((h_n, c_new.unsqueeze(0)) if is_lstm else h_n)

    def forward(self, input, hx=None):
        if type(input) is Tensor:
            one_step = self._one_step(input, hx)
            if one_step is not None:
                return one_step
        is_packed = isinstance(input, PackedSequence)
        is_lstm = self.mode == "LSTM"
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = self._packed_batch_size(batch_sizes, sorted_indices, hx)
            self.check_input(data, batch_sizes)
            if hx is None:
                hx = self._zero_state(data, batch)
            else:
                self._check_hidden(hx, self._expected_hidden_size(batch))
                hx = self.permute_hidden(hx, sorted_indices)
            is_batched = True
        else:
            data, batch_sizes, unsorted_indices = input, None, None
            if data.dim() not in (2, 3):
                noun = " tensor" if self.mode.startswith("RNN") else ""
                name = "RNN" if self.mode.startswith("RNN") else self.mode
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {data.dim()}D{noun} instead")
            is_batched = data.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                data = data.unsqueeze(batch_dim)
            if hx is None:
                hx = self._zero_state(data, data.size(batch_dim))
            else:
                self._check_state_dims(hx, is_batched)
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if is_lstm else hx.unsqueeze(1)
            self.check_forward_args(data, hx, batch_sizes)

        if is_lstm and len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        output, h_n, c_n = self._recurrence(data, hx[0] if is_lstm else hx,
                                            hx[1] if is_lstm else None, batch_sizes)
        hidden = (h_n, c_n) if is_lstm else h_n

        if is_packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        elif not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _recurrence(self, data: Tensor, h0: Tensor, c0: Tensor | None,
                    batch_sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The layers over checked input: data [T, B, I] ([B, T, I] batch_first, or packed
        [N, I] with batch_sizes), h0 [L*D, B, P], c0 [L*D, B, H] (LSTM) -> (output like data,
        h_n, c_n or None)."""
        weights = self._flat_weights
        for index, weight in enumerate(weights):  # a parameter set to None, as torch's _VF says
            if weight is None:
                raise TypeError(f"expected Tensor as element {index} in argument "
                                f"{2 if batch_sizes is None else 3}, but got NoneType")
        return functional.recurrence(
            CELLS_BY_MODE[self.mode], data, h0, c0, weights, num_layers=self.num_layers,
            dropout=self.dropout, training=self.training, bidirectional=self.bidirectional,
            batch_first=self.batch_first, batch_sizes=batch_sizes, backend=self.backend)

    # ---- conversion to and from torch.nn ----------------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.Module, *, backend: str | None = None):
        """A fastrnn module with the hyper-parameters, weights and training mode of `module`."""
        return _converted(cls, module, backend=backend)

    torch_class: type[nn.Module]  # the torch.nn class this one replaces

    def to_torch(self) -> nn.Module:
        """The equivalent torch.nn module, with a copy of this module's weights."""
        return _converted(self.torch_class, self)

    def __prepare_scriptable__(self):
        raise not_scriptable(self)


def not_scriptable(module: nn.Module) -> RuntimeError:
    """The error torch.jit.script gets for a fastrnn module (it calls __prepare_scriptable__)."""
    name = type(module).__name__
    return RuntimeError(
        f"fastrnn.{name} cannot be compiled by torch.jit.script (its layers are custom ops run "
        "from Python): use torch.jit.trace, torch.export or torch.compile on it, or "
        f"module.to_torch() for a torch.nn.{name} with the same weights")


def _converted(cls, module: nn.Module, **extra) -> nn.Module:
    """A `cls` module with the constructor arguments, weights and training mode of `module`."""
    weight = next(module.parameters())
    with warnings.catch_warnings():  # the one-layer dropout warning was given to the original
        warnings.simplefilter("ignore", UserWarning)
        new = cls(**_constructor_kwargs(module), device=weight.device, dtype=weight.dtype, **extra)
    new.load_state_dict(module.state_dict())
    return new.train(module.training)


def _constructor_kwargs(module: nn.Module) -> dict:
    """The constructor arguments of a torch.nn or fastrnn recurrence or cell."""
    names = ["input_size", "hidden_size", "bias"]
    if hasattr(module, "num_layers"):  # a whole recurrence, not a cell
        names += ["num_layers", "batch_first", "dropout", "bidirectional"]
        if module.mode == "LSTM":
            names.append("proj_size")
    if hasattr(module, "nonlinearity"):
        names.append("nonlinearity")
    return {name: getattr(module, name) for name in names}


class LSTM(RNNBase):
    """Drop-in torch.nn.LSTM: LSTM(input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
    *, backend=None)."""

    torch_class = torch_rnn.LSTM

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)


class GRU(RNNBase):
    """Drop-in torch.nn.GRU (same arguments as LSTM without proj_size)."""

    torch_class = torch_rnn.GRU

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class RNN(RNNBase):
    """Drop-in torch.nn.RNN: RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh',
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
    *, backend=None)."""

    torch_class = torch_rnn.RNN

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)
