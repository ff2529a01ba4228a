"""keras.layers.LSTM, GRU, SimpleRNN and Bidirectional, running on fastrnn's kernels.

Each is Keras' own class with the method that runs the recurrence replaced (recurrence.py), and
`__call__` passing straight through where Keras' has nothing to do (layer_call.py):
the same constructor, weights (names, shapes, layout, initialisation), get_config, masks,
states, dropout and mixed precision. They are registered with Keras' serialization as
"fastrnn>LSTM" (and so on): a saved model loads back into them, and Bidirectional(LSTM(...))
keeps them. Weights load both ways with Keras' own layers (`load_weights`); see the README.
"""

from __future__ import annotations

import keras

from . import recurrence
from .layer_call import layer_call


@keras.saving.register_keras_serializable(package="fastrnn")
class LSTM(keras.layers.LSTM):
    """keras.layers.LSTM (same arguments) running on fastrnn."""

    __call__ = layer_call
    inner_loop = recurrence.inner_loop
    call = recurrence.call


@keras.saving.register_keras_serializable(package="fastrnn")
class GRU(keras.layers.GRU):
    """keras.layers.GRU (same arguments) running on fastrnn (reset_after=True, the default)."""

    __call__ = layer_call
    inner_loop = recurrence.inner_loop
    call = recurrence.call


@keras.saving.register_keras_serializable(package="fastrnn")
class SimpleRNN(keras.layers.SimpleRNN):
    """keras.layers.SimpleRNN (same arguments) running on fastrnn (tanh or relu)."""

    __call__ = layer_call
    inner_loop = recurrence.inner_loop
    call = recurrence.call


@keras.saving.register_keras_serializable(package="fastrnn")
class Bidirectional(keras.layers.Bidirectional):
    """keras.layers.Bidirectional (same arguments) running both directions of an LSTM, GRU or
    SimpleRNN as one fastrnn call."""

    __call__ = layer_call
    call = recurrence.bidirectional_call
