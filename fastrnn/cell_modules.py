"""Drop-in replacements for torch.nn.LSTMCell, GRUCell and RNNCell: one step of the recurrence.
In eager mode a step is one call (ops.direct_step); under compilers, tracers and torch.func it
runs through the same layer ops as the full modules (T = 1, D = 1). Legend: B batch, I input,
H hidden.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules import rnn as torch_rnn  # torch's classes, even if torch.nn's are rebound

from .backends import check_backend_name
from .cells import CELLS, CellSpec
from .modules import _converted, not_scriptable
from .functional import autocast_dtype, dtype_name, needs_backward
from .ops import direct_step, layer


def cell_step(cell: CellSpec, input: Tensor, h: Tensor, c: Tensor | None, weight_ih: Tensor,
              weight_hh: Tensor, bias_ih: Tensor | None, bias_hh: Tensor | None,
              backend: str | None = None) -> tuple[Tensor, Tensor | None]:
    """One step. input [B, I], h [B, H], c [B, H] (LSTM) -> (h' [B, H], c' [B, H] or None)."""
    if weight_ih is None or weight_hh is None:  # with the message of torch's _VF cell op
        argument, position = ("w_ih", 3) if weight_ih is None else ("w_hh", 4)
        raise TypeError(f"{cell.name}_cell(): argument '{argument}' (position {position}) "
                        "must be Tensor, not NoneType")
    batch, input_size = input.shape
    if input_size != weight_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input_size} "
                           f"expected {weight_ih.shape[1]}")
    hidden = weight_hh.shape[1]
    for index, state in enumerate((h, c) if c is not None else (h,)):
        # torch's checks and messages (sizes 0 and 1 of the state, whatever its dims), then one
        # of fastrnn's own where torch's pass a state of other dims (torch.nn crashes there)
        if batch != state.size(0):
            raise RuntimeError(f"Input batch size {batch} doesn't match hidden{index} "
                               f"batch size {state.size(0)}")
        if state.size(1) != hidden:
            raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got "
                               f"{state.size(1)}, expected {hidden}")
        if state.dim() != 2:
            raise RuntimeError(f"hidden{index} must have 2 dimensions [batch, hidden_size] for "
                               f"a batched input, got {state.dim()}")
    cast = autocast_dtype(input.device.type)
    if cast is None:  # dtypes must agree, checked in torch's order: input @ W_ih, h @ W_hh
        for operand, weight in ((input, weight_ih), (h, weight_hh), (c, weight_hh)):
            if operand is not None and operand.dtype != weight.dtype:
                raise RuntimeError("mat1 and mat2 must have the same dtype, but got "
                                   f"{dtype_name(operand.dtype)} and {dtype_name(weight.dtype)}")
    else:
        input, h = input.to(cast), h.to(cast)
        c = None if c is None else c.to(cast)
        weight_ih, weight_hh = weight_ih.to(cast), weight_hh.to(cast)
        bias_ih = None if bias_ih is None else bias_ih.to(cast)
        bias_hh = None if bias_hh is None else bias_hh.to(cast)
    step = direct_step(cell, backend, input, h, c, weight_ih, weight_hh, bias_ih, bias_hh)
    if step is not None:
        return step
    wants_grad = needs_backward(input, h, c, weight_ih, weight_hh, bias_ih, bias_hh)
    _, h_n, c_n = layer(
        cell, input.unsqueeze(0), weight_ih, bias_ih, h.unsqueeze(0),
        None if c is None else c.unsqueeze(0), weight_hh.unsqueeze(0),
        None if bias_hh is None else bias_hh.unsqueeze(0), None, None,
        check_backend_name(backend) or "", wants_grad)
    return h_n[0], (c_n[0] if c is not None else None)


_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class RNNCellBase(torch_rnn.RNNCellBase):
    """The common part of the cells: an nn.RNNCellBase that runs its own methods, none of
    torch's. Each cell also subclasses its torch.nn twin (isinstance(cell, nn.LSTMCell) holds),
    which torch.compile traces (it refuses only nn.LSTM, nn.GRU and nn.RNN instances)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int,
                 device=None, dtype=None, *, backend: str | None = None) -> None:
        nn.Module.__init__(self)  # not torch's __init__, which builds its own weights
        factory_kwargs = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = check_backend_name(backend)
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        if self.backend is not None:
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @classmethod
    def from_torch(cls, module: nn.Module, *, backend: str | None = None):
        """A fastrnn cell with the hyper-parameters, weights and training mode of `module`."""
        return _converted(cls, module, backend=backend)

    torch_class: type[nn.Module]  # the torch.nn class this one replaces

    def to_torch(self) -> nn.Module:
        """The equivalent torch.nn cell, with a copy of this cell's weights."""
        return _converted(self.torch_class, self)

    def __prepare_scriptable__(self):
        raise not_scriptable(self)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(weight_ih, weight_hh, bias_ih, bias_hh), read from _parameters (four attribute
        lookups through nn.Module.__getattr__ cost ~2 us, a tenth of a small step); as attributes
        where one is not registered there (a parametrization, weight_norm)."""
        parameters = self._parameters
        try:
            return (parameters["weight_ih"], parameters["weight_hh"], parameters["bias_ih"],
                    parameters["bias_hh"])
        except KeyError:
            return tuple(getattr(self, name) for name in _WEIGHT_NAMES)

    def _cell_step(self, cell: CellSpec, input: Tensor, h: Tensor, c: Tensor | None
                   ) -> tuple[Tensor, Tensor | None]:
        """One step of batched input [B, I], h [B, H], c [B, H] (LSTM) -> (h', c' or None)."""
        return cell_step(cell, input, h, c, *self._weights(), self.backend)

    def _step(self, cell: CellSpec, input: Tensor, hx, name: str):
        """Unbatched handling, zero state and the step itself; hx is h or (h, c)."""
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_lstm = cell.has_cell_state
        states = () if hx is None else (tuple(hx) if is_lstm else (hx,))
        for index, state in enumerate(states):
            if state.dim() not in (1, 2):
                which = f"hx[{index}]" if is_lstm else "hidden"
                raise ValueError(f"{name}: Expected {which} to be 1D or 2D, got {state.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
            if is_lstm and states:  # as torch: hx[0] and hx[1] of any tuple (IndexError if short)
                states = (states[0], states[1])
            states = tuple(state.unsqueeze(0) for state in states)
        if is_lstm and states and len(states) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        if not states:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            states = (zeros, zeros) if is_lstm else (zeros,)
        h, c = self._cell_step(cell, input, states[0], states[1] if is_lstm else None)
        if not is_batched:
            h, c = h.squeeze(0), (None if c is None else c.squeeze(0))
        return (h, c) if is_lstm else h


class LSTMCell(RNNCellBase, torch_rnn.LSTMCell):
    """Drop-in torch.nn.LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None)."""

    torch_class = torch_rnn.LSTMCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype,
                         backend=backend)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        return self._step(CELLS["lstm"], input, hx, "LSTMCell")


class GRUCell(RNNCellBase, torch_rnn.GRUCell):
    """Drop-in torch.nn.GRUCell(input_size, hidden_size, bias=True, device=None, dtype=None)."""

    torch_class = torch_rnn.GRUCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype,
                         backend=backend)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._step(CELLS["gru"], input, hx, "GRUCell")


class RNNCell(RNNCellBase, torch_rnn.RNNCell):
    """Drop-in torch.nn.RNNCell(input_size, hidden_size, bias=True, nonlinearity='tanh',
    device=None, dtype=None)."""

    torch_class = torch_rnn.RNNCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype,
                         backend=backend)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return self._step(CELLS[f"rnn_{self.nonlinearity}"], input, hx, "RNNCell")
