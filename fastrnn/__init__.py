"""fastrnn: drop-in torch.nn.LSTM / GRU / RNN (and cells) running on fused kernels."""

from . import backends, functional, quantization  # quantization: quantize_dynamic mappings
from .backends import available_backends
from .cell_modules import GRUCell, LSTMCell, RNNCell
from .modules import GRU, LSTM, RNN

__version__ = "0.1.0"

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "available_backends",
           "backends", "functional"]
