"""fastrnn.keras.install(): Keras' own LSTM, GRU, SimpleRNN and Bidirectional run on fastrnn.

Keras has no public way to replace how a recurrent layer runs, so this sets methods on Keras'
own classes in its private modules (keras.src.layers.rnn): `call` and `inner_loop` of LSTM, GRU
and SimpleRNN and `call` of Bidirectional become fastrnn's (recurrence.py), `__call__` of the
four skips Keras' generic per-call work where it has nothing to do (layer_call.py), and
`inner_loop` of RNN (keras.layers.RNN over any cell) still runs Keras' loop and says so, once per
cell class. Every instance, existing or new, and every reference to these classes
(keras.layers.LSTM, a model loaded from a file) then runs on fastrnn; classes, configs and saved
files stay Keras' own.
`uninstall()` puts Keras' methods back. Only a tested Keras version is patched: on any other,
install() raises and changes nothing.
"""

from __future__ import annotations

import inspect

import keras
from keras.src.layers.rnn.bidirectional import Bidirectional
from keras.src.layers.rnn.gru import GRU
from keras.src.layers.rnn.lstm import LSTM
from keras.src.layers.rnn.rnn import RNN
from keras.src.layers.rnn.simple_rnn import SimpleRNN

from . import recurrence
from .layer_call import layer_call
from .recurrence import TESTED_KERAS_VERSIONS

# (Keras class, method name, fastrnn's method, the parameters Keras' method has)
_INNER_LOOP_PARAMETERS = ("self", "sequences", "initial_state", "mask", "training")
_CALL_PARAMETERS = ("self", "sequences", "initial_state", "mask", "training")
_LAYER_CALL_PARAMETERS = ("self", "args", "kwargs")
_PATCHES = (
    (LSTM, "inner_loop", recurrence.inner_loop, _INNER_LOOP_PARAMETERS),
    (GRU, "inner_loop", recurrence.inner_loop, _INNER_LOOP_PARAMETERS),
    (SimpleRNN, "inner_loop", recurrence.inner_loop, _INNER_LOOP_PARAMETERS),
    (LSTM, "call", recurrence.call, _CALL_PARAMETERS),
    (GRU, "call", recurrence.call, _CALL_PARAMETERS),
    (SimpleRNN, "call", recurrence.call, _CALL_PARAMETERS),
    (RNN, "inner_loop", recurrence.rnn_inner_loop, _INNER_LOOP_PARAMETERS),
    (Bidirectional, "call", recurrence.bidirectional_call, _CALL_PARAMETERS),
    (LSTM, "__call__", layer_call, _LAYER_CALL_PARAMETERS),
    (GRU, "__call__", layer_call, _LAYER_CALL_PARAMETERS),
    (SimpleRNN, "__call__", layer_call, _LAYER_CALL_PARAMETERS),
    (Bidirectional, "__call__", layer_call, _LAYER_CALL_PARAMETERS),
)

# what each patched class had in its own __dict__ before install() (None: it inherited it)
_originals: dict[tuple[type, str], object] = {}


def _refusal(version: str) -> str:
    """Why install() will not patch this Keras ("" when it will)."""
    if version not in TESTED_KERAS_VERSIONS:
        return (f"fastrnn.keras.install() patches private Keras modules (keras.src.layers.rnn) "
                f"and is tested with Keras {', '.join(TESTED_KERAS_VERSIONS)}; this is Keras "
                f"{version}, so nothing was patched. Use fastrnn.keras.LSTM, GRU, SimpleRNN and "
                "Bidirectional in place of Keras' classes, or install a tested Keras version.")
    for keras_class, name, _, parameters in _PATCHES:
        method = getattr(keras_class, name, None)
        if method is None or tuple(inspect.signature(method).parameters) != parameters:
            return (f"fastrnn.keras.install(): Keras {version}'s {keras_class.__name__}.{name} "
                    "is not the method fastrnn was tested against; nothing was patched.")
    return ""


def install() -> None:
    """Run Keras' own LSTM, GRU, SimpleRNN and Bidirectional layers on fastrnn, in this process.
    Raises RuntimeError, patching nothing, on a Keras version it was not tested with."""
    if is_installed():
        return
    reason = _refusal(keras.__version__)
    if reason:
        raise RuntimeError(reason)
    for keras_class, name, method, _ in _PATCHES:
        _originals[keras_class, name] = keras_class.__dict__.get(name)
    for keras_class, name, method, _ in _PATCHES:
        setattr(keras_class, name, method)


def uninstall() -> None:
    """Give Keras' layers their own methods back (nothing happens if install() did not run)."""
    for (keras_class, name), original in _originals.items():
        if original is None:
            delattr(keras_class, name)
        else:
            setattr(keras_class, name, original)
    _originals.clear()


def is_installed() -> bool:
    """Whether install() is in effect."""
    return bool(_originals)
