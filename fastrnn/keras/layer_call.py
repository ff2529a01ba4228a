"""`__call__` of the served layers: Keras' `Layer.__call__`, without its generic work where a
call needs none of it.

Keras' `Layer.__call__` converts and checks every argument, binds them to `call`'s signature,
builds, resolves `training` and the mask, and sets up name and autocast scopes: about 0.15 ms
a call on this project's CPU, which is 8% of a 2 ms SimpleRNN call. For an eager call that
fastrnn runs as one call (recurrence.serves_at_once, recurrence.fuses) and that Keras would only
pass through (a built layer, one torch tensor in its input dtype, `mask` and `training` the only
keywords; no autocast, distribution, activity regularizer, remat, quantization or torch module
hooks), `layer_call` does what Keras' method does for it, in the same order, and nothing else:
the input check, the mask taken from the input, `training` resolved and passed on to the call
context, the call, and the output mask. Any other call runs Keras' own method. The steps copied
are Keras 3.15's, so only the tested Keras versions take this path.
"""

from __future__ import annotations

import keras
import torch
import torch.nn.modules.module as _torch_module
from keras.src.backend.common import global_state
from keras.src.backend.common.masking import get_keras_mask
from keras.src.backend.common.variables import get_autocast_scope
from keras.src.distribution.distribution_lib import distribution

from . import recurrence

KERAS_LAYER_CALL = keras.layers.Layer.__call__
_TAKES_THIS_PATH = keras.__version__ in recurrence.TESTED_KERAS_VERSIONS
_KEYWORDS = frozenset(("mask", "training"))


def layer_call(self, *args, **kwargs):
    """Keras' `Layer.__call__` of an LSTM, GRU, SimpleRNN or Bidirectional layer."""
    if _passes_through(self, args, kwargs):
        return _call(self, args[0], kwargs)
    return KERAS_LAYER_CALL(self, *args, **kwargs)


def _passes_through(layer, args, kwargs) -> bool:
    """Whether Keras' `Layer.__call__` (and the torch module call and `Operation.__call__` it
    goes through) would only pass this call through to a `call` that runs fastrnn at once."""
    if not (_TAKES_THIS_PATH and layer.built and len(args) == 1 and kwargs.keys() <= _KEYWORDS):
        return False
    x, mask = args[0], kwargs.get("mask")
    if not (isinstance(x, torch.Tensor) and kwargs.get("training") in (None, True, False)
            and (mask is None or isinstance(mask, torch.Tensor) and mask.dtype == torch.bool)):
        return False
    if (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
            or layer._backward_pre_hooks or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks or _torch_module._global_backward_hooks
            or _torch_module._global_backward_pre_hooks):
        return False
    if (layer._remat_mode or getattr(layer, "quantization_mode", None) is not None
            or layer.activity_regularizer is not None or not layer.supports_masking
            or layer._call_context_args != {"training"}):
        return False
    if (str(x.dtype) != f"torch.{layer.input_dtype}" or layer.compute_dtype != layer.variable_dtype
            or get_autocast_scope() is not None or distribution() is not None):
        return False
    if mask is None:
        mask = get_keras_mask(x)
    if recurrence.cell_kind(layer) is not None:
        return recurrence.serves_at_once(layer, x, None, mask)
    return recurrence.fuses(layer, x, None, mask)


def _call(layer, x, kwargs):
    """Keras' `Layer.__call__` steps for a call that _passes_through, then the call itself."""
    if not layer._called:
        layer._called = True
    layer._assert_input_compatibility(x)
    mask = kwargs.get("mask")
    if mask is None:
        mask = get_keras_mask(x)
    context = global_state.get_global_attribute("current_call_ctx")
    if "training" in kwargs:  # as given, else from an outer layer's call, else call's default
        training = kwargs["training"]
    elif context is not None and context.get_value("training") is not None:
        training = context.get_value("training")
    else:
        training = layer._call_signature.parameters["training"].default
    if context is None:  # a call from outside any layer starts with no losses
        layer._clear_losses()
    else:
        context.set_value("training", training)
    if recurrence.cell_kind(layer) is not None:
        outputs = recurrence.call_at_once(layer, x, mask, training)
    else:
        outputs = recurrence.call_fused(layer, x, None, mask)
    layer._set_mask_metadata(x, outputs, mask)
    return outputs
