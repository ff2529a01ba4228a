"""The one place that decides which backend can run a layer.

`backend="auto"|"triton"|"cuda"|"cpu"|"torch"|"reference"`, per module (constructor keyword) or
through the environment variable FASTRNN_BACKEND. "auto" takes the first backend of `AUTO_ORDER`
for the tensors' device that is available and supports the layer, and warns once (with the reason)
when it had to pass over a better one; fastrnn.admission then lets a fused GPU plan serve only once
it is admitted on the user's device (else the torch backend serves). An explicitly requested
backend that cannot run the layer raises. `reference` (the oracle of the tests) runs only when
asked for, and for empty problems.
"""

from __future__ import annotations

import importlib
import os
import warnings

from . import native  # noqa: F401  (its warning filters belong to import time, see there)
from .base import Backend, LayerConfig

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "torch", "reference")

# Best first, per device type; torch's own kernels run every layer torch.nn runs, on any device.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

# Modules that define `BACKEND`; a backend whose module is absent is not part of this build.
_BACKEND_MODULES = {
    "reference": "fastrnn.backends.reference",
    "torch": "fastrnn.backends.native",
    "cpu": "fastrnn.backends.cpu",
    "triton": "fastrnn.backends.triton",
    "cuda": "fastrnn.backends.cuda",
}

_registry: dict[str, Backend] = {}
_warned: set[tuple[str, str]] = set()


def _load(name: str) -> Backend | None:
    if name not in _registry:
        try:
            module = importlib.import_module(_BACKEND_MODULES[name])
        except ModuleNotFoundError as error:
            if error.name != _BACKEND_MODULES[name]:
                raise
            return None
        _registry[name] = module.BACKEND
    return _registry[name]


def check_backend_name(name: str | None) -> str | None:
    """Validate a backend name given to a module or function (None means: FASTRNN_BACKEND)."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"Unknown fastrnn backend {name!r}. Select from {', '.join(map(repr, BACKEND_NAMES))}.")
    return name


def requested_backend(name: str | None) -> str:
    """The backend asked for: the name given, else FASTRNN_BACKEND, else "auto"."""
    if name is None:
        name = os.environ.get("FASTRNN_BACKEND", "auto") or "auto"
        if name not in BACKEND_NAMES:
            raise ValueError(
                f"FASTRNN_BACKEND={name!r} is not a fastrnn backend. Select from {', '.join(map(repr, BACKEND_NAMES))}."
            )
    return check_backend_name(name)


def why_not(name: str, config: LayerConfig) -> str:
    """The reason backend `name` cannot run this layer, or "" when it can."""
    backend = _load(name)
    if backend is None:
        return "it is not part of this build of fastrnn"
    ok, reason = backend.available()
    if ok:
        ok, reason = backend.supports(config)
    return "" if ok else reason


def resolve(name: str | None, config: LayerConfig) -> Backend:
    """The backend that runs this layer, for a requested name (see `requested_backend`)."""
    name = requested_backend(name)
    if name != "auto":
        reason = why_not(name, config)
        if reason:
            raise RuntimeError(f"fastrnn backend {name!r} cannot run this {config.cell.mode} layer: {reason}")
        return _registry[name]
    skipped = []
    for candidate in AUTO_ORDER.get(config.device_type, ("torch",)):
        reason = why_not(candidate, config)
        if not reason:
            if skipped:
                _warn_fallback(candidate, skipped)
            return _registry[candidate]
        if _load(candidate) is not None:
            skipped.append(f"{candidate!r}: {reason}")
    raise RuntimeError(f"no fastrnn backend can run this {config.cell.mode} layer on {config.device_type}")


def reference_backend() -> Backend:
    """The reference backend, which every build has."""
    return _load("reference")


def torch_backend() -> Backend:
    """The torch backend (torch's own kernels), which every build has."""
    return _load("torch")


def _warn_fallback(chosen: str, skipped: list[str]) -> None:
    key = (chosen, "; ".join(skipped))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastrnn: using backend {chosen!r} because {'; '.join(skipped)}", stacklevel=3)


def available_backends() -> dict[str, str]:
    """Each backend of this build with "" if it is available here, else the reason it is not."""
    result = {}
    for name in _BACKEND_MODULES:
        backend = _load(name)
        if backend is not None:
            ok, reason = backend.available()
            result[name] = "" if ok else reason
    return result


__all__ = ["AUTO_ORDER", "BACKEND_NAMES", "Backend", "LayerConfig", "available_backends",
           "check_backend_name", "reference_backend", "requested_backend", "resolve",
           "torch_backend", "why_not"]
