"""Keras 3 recurrent layers (torch backend) on fastrnn's kernels.

    from fastrnn.keras import LSTM, GRU, SimpleRNN, Bidirectional   # in place of keras.layers'
    fastrnn.keras.install()   # or: Keras' own classes run on fastrnn (patches private modules)

Needs Keras 3 on the torch backend (`pip install "fastrnn[keras]"`, `KERAS_BACKEND=torch`).
Nothing else in fastrnn imports this package.
"""

import warnings

try:
    import keras
except ModuleNotFoundError as error:
    if error.name != "keras":
        raise
    raise ImportError("fastrnn.keras needs Keras 3: pip install \"fastrnn[keras]\"") from error

if not keras.__version__.startswith("3."):
    raise ImportError(f"fastrnn.keras needs Keras 3; this is Keras {keras.__version__}")
if keras.backend.backend() != "torch":
    raise ImportError(f"fastrnn.keras runs Keras on its torch backend, but Keras uses "
                      f"{keras.backend.backend()!r}: set KERAS_BACKEND=torch before Keras is "
                      "imported")

from .install import TESTED_KERAS_VERSIONS, install, is_installed, uninstall  # noqa: E402
from .layers import GRU, LSTM, Bidirectional, SimpleRNN  # noqa: E402
from .recurrence import calls  # noqa: E402
from .weights import keras_weights, torch_weights  # noqa: E402

if keras.__version__ not in TESTED_KERAS_VERSIONS:
    warnings.warn(f"fastrnn.keras is tested with Keras {', '.join(TESTED_KERAS_VERSIONS)}; "
                  f"Keras {keras.__version__} may differ in the methods its layers replace",
                  stacklevel=2)

__all__ = ["GRU", "LSTM", "SimpleRNN", "Bidirectional", "TESTED_KERAS_VERSIONS", "calls",
           "install", "is_installed", "keras_weights", "torch_weights", "uninstall"]
