"""Dynamic quantization: `torch.ao.quantization.quantize_dynamic(model, {fastrnn.LSTM, ...})`
replaces fastrnn modules by torch's dynamically quantized ones (int8 weights, torch's kernels),
converted through `to_torch()`. torch has no quantized Elman RNN, so fastrnn.RNN stays float,
with a warning. Registered in torch's default dynamic mapping when fastrnn is imported.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import quantization_mappings

from .cell_modules import GRUCell, LSTMCell, RNNCell
from .modules import GRU, LSTM, RNN


def _converter(quantized: type[nn.Module]) -> type:
    """A mapping target whose from_float quantizes a fastrnn module as `quantized` quantizes
    its torch.nn twin."""

    class FromFastrnn:
        @staticmethod
        def from_float(module: nn.Module, use_precomputed_fake_quant: bool = False) -> nn.Module:
            twin = module.to_torch()
            twin.qconfig = module.qconfig
            return quantized.from_float(twin,
                                        use_precomputed_fake_quant=use_precomputed_fake_quant)

    FromFastrnn.__name__ = FromFastrnn.__qualname__ = f"{quantized.__name__}FromFastrnn"
    return FromFastrnn


class _KeepFloatRNN:
    """fastrnn.RNN asked for: torch has no dynamically quantized RNN, so it stays as it is."""

    @staticmethod
    def from_float(module: nn.Module, use_precomputed_fake_quant: bool = False) -> nn.Module:
        warnings.warn("fastrnn.RNN is left in floating point by quantize_dynamic: torch has no "
                      "dynamically quantized RNN (only LSTM, GRU and the cells)", stacklevel=2)
        return module


DYNAMIC_QUANT_MODULE_MAPPINGS: dict[type[nn.Module], type] = {
    LSTM: _converter(nnqd.LSTM), GRU: _converter(nnqd.GRU), RNN: _KeepFloatRNN,
    LSTMCell: _converter(nnqd.LSTMCell), GRUCell: _converter(nnqd.GRUCell),
    RNNCell: _converter(nnqd.RNNCell),
}

# torch's get_default_dynamic_quant_module_mappings() returns this very dict
quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS.update(DYNAMIC_QUANT_MODULE_MAPPINGS)
