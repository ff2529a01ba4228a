"""torch's dynamic quantization: `torch.ao.quantization.quantize_dynamic(model, {fastrnn.LSTM,
...})` replaces fastrnn modules by fastrnn's int8 modules (quantized.py: int8 weights on
fastrnn's kernels) for dtype=torch.qint8, and by torch's dynamically quantized float16 modules
(converted through `to_torch()`) for dtype=torch.float16. torch has no float16 Elman RNN, so
there fastrnn.RNN stays float, with a warning. Registered in torch's default dynamic mapping
when fastrnn is imported.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import quantization_mappings

from . import quantized
from .cell_modules import GRUCell, LSTMCell, RNNCell
from .modules import GRU, LSTM, RNN


def _converter(torch_quantized: type[nn.Module] | None) -> type:
    """A mapping target whose from_float gives fastrnn's int8 module for a qint8 qconfig, and
    for a float16 one torch's dynamically quantized module (`torch_quantized`) of the module's
    torch.nn twin (None: the module stays float, with a warning)."""

    class FromFastrnn:
        @staticmethod
        def from_float(module: nn.Module, use_precomputed_fake_quant: bool = False) -> nn.Module:
            weight_dtype = module.qconfig.weight().dtype
            if weight_dtype == torch.qint8:
                return quantized.int8_module(module)
            if weight_dtype != torch.float16:
                raise RuntimeError(f"fastrnn's {type(module).__name__} quantizes to qint8 or "
                                   f"float16, not {weight_dtype}")
            if torch_quantized is None:
                warnings.warn(f"fastrnn.{type(module).__name__} is left in float32 by "
                              "quantize_dynamic(dtype=torch.float16): torch has no float16 "
                              "Elman RNN", stacklevel=2)
                return module
            twin = module.to_torch()
            twin.qconfig = module.qconfig
            return torch_quantized.from_float(
                twin, use_precomputed_fake_quant=use_precomputed_fake_quant)

    FromFastrnn.__name__ = FromFastrnn.__qualname__ = (
        f"{getattr(torch_quantized, '__name__', 'RNN')}FromFastrnn")
    return FromFastrnn


DYNAMIC_QUANT_MODULE_MAPPINGS: dict[type[nn.Module], type] = {
    LSTM: _converter(nnqd.LSTM), GRU: _converter(nnqd.GRU), RNN: _converter(None),
    LSTMCell: _converter(nnqd.LSTMCell), GRUCell: _converter(nnqd.GRUCell),
    RNNCell: _converter(nnqd.RNNCell),
}

# torch's get_default_dynamic_quant_module_mappings() returns this very dict
quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS.update(DYNAMIC_QUANT_MODULE_MAPPINGS)
