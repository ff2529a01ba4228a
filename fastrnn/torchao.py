"""torchao's entry point for fastrnn's int8 modules (torchao is an optional extra; nothing else in
fastrnn imports this module):

    from torchao.quantization import quantize_
    from fastrnn.torchao import Int8DynamicRNNConfig, is_recurrent
    quantize_(model, Int8DynamicRNNConfig(), filter_fn=is_recurrent)

replaces, in place, every LSTM, GRU and RNN (and cell), fastrnn's or torch.nn's, inside `model`
by its int8 module (fastrnn.quantized), as fastrnn.quantize_int8 does. torchao's default filter
selects nn.Linear only, so the filter must be named; a config per layer type combines with
torchao's own configs for the linear layers through two calls of quantize_.
"""

from __future__ import annotations

import dataclasses

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .quantized import INT8_CLASSES, int8_module


@dataclasses.dataclass
class Int8DynamicRNNConfig(AOBaseConfig):
    """int8 weights per output row, activations quantized per row at every step, on fastrnn's
    CPU kernels (fastrnn.quantized)."""


def is_recurrent(module: nn.Module, name: str = "") -> bool:
    """torchao filter_fn: the float LSTM, GRU and RNN modules and cells that have an int8 module."""
    return type(module) in INT8_CLASSES


@register_quantize_module_handler(Int8DynamicRNNConfig)
def _int8(module: nn.Module, config: Int8DynamicRNNConfig) -> nn.Module:
    return int8_module(module)
