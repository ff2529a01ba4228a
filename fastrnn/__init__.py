"""fastrnn: drop-in torch.nn.LSTM / GRU / RNN (and cells) running on fused kernels."""

import torch

from . import backends, functional, quantization, quantized  # quantization: quantize_dynamic
from .backends import available_backends
from .cell_modules import GRUCell, LSTMCell, RNNCell
from .modules import GRU, LSTM, RNN
from .quantized import quantize_int8

__version__ = "0.1.0"

# torch.load's default (weights_only=True) unpickles only the classes it is told of; these modules
# hold nothing but parameters and plain attributes, so they are declared safe here: a saved model
# holding them loads with only the user's own classes named in torch.serialization.safe_globals
torch.serialization.add_safe_globals([GRU, GRUCell, LSTM, LSTMCell, RNN, RNNCell])

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "available_backends",
           "backends", "functional", "quantize_int8", "quantized"]
