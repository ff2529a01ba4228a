"""The backend registry: names, FASTRNN_BACKEND, explicit requests that cannot run, auto."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastrnn
from fastrnn import admission, backends
from fastrnn.backends.base import Backend, LayerConfig
from fastrnn.cells import CELLS


def test_unknown_backend_name_is_refused_at_construction():
    with pytest.raises(ValueError, match="Unknown fastrnn backend 'tritn'"):
        fastrnn.LSTM(3, 4, backend="tritn")


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "reference")
    assert backends.requested_backend(None) == "reference"
    monkeypatch.setenv("FASTRNN_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND='nope' is not a fastrnn backend"):
        fastrnn.GRU(3, 4)(torch.randn(2, 1, 3))


def _config(device_type="cpu", dtype=torch.float32):
    return LayerConfig(CELLS["lstm"], device_type, dtype, batch_size=2, seq_len=3, hidden_size=4,
                       proj_size=0, num_directions=1, variable_lengths=False)


class UnbuiltCpu(Backend):
    name = "cpu"

    def available(self):
        return False, "the extension was not built"


def test_explicit_backend_that_cannot_run_raises_with_reason(monkeypatch):
    monkeypatch.setitem(backends._registry, "cpu", UnbuiltCpu())
    with pytest.raises(RuntimeError, match="fastrnn backend 'cpu' cannot run this LSTM layer: the extension was not built"):
        fastrnn.LSTM(3, 4, backend="cpu")(torch.randn(2, 1, 3))


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(backends._registry, "cpu", UnbuiltCpu())
    monkeypatch.setattr(backends, "_warned", set())
    model = fastrnn.LSTM(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(2, 1, 3))
        model(torch.randn(2, 1, 3))
    messages = [str(w.message) for w in caught if "fastrnn" in str(w.message)]
    assert messages == ["fastrnn: using backend 'torch' because 'cpu': the extension was not built"]


def test_backend_not_in_this_build_is_named(monkeypatch):
    monkeypatch.setitem(backends._BACKEND_MODULES, "cuda", "fastrnn.backends.not_a_module")
    monkeypatch.delitem(backends._registry, "cuda", raising=False)
    assert backends.why_not("cuda", _config("cuda")) == "it is not part of this build of fastrnn"


def test_reference_is_always_available():
    assert fastrnn.available_backends()["reference"] == ""
    assert backends.resolve("reference", _config()).name == "reference"
    assert backends.why_not("reference", _config(dtype=torch.int32)) != ""


def test_auto_takes_torch_kernels_for_float64_on_a_gpu():
    """No fused backend runs float64: auto on CUDA takes torch's kernels (the check needs no
    GPU: the fused backends refuse the dtype before anything touches a device)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the pass-over warning
        chosen = admission.serving_backend(None, _config("cuda", torch.float64), input_size=3,
                                           has_bias=True, training=True,
                                           device=torch.device("cuda"))
    assert chosen.name == "torch"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_auto_never_picks_the_reference_backend_on_a_gpu(dtype):
    assert "reference" not in backends.AUTO_ORDER["cuda"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert backends.resolve("auto", _config("cuda", dtype)).name != "reference"


def test_auto_on_float64_cuda_names_why_the_fused_backends_pass(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("auto", _config("cuda", torch.float64)).name == "torch"
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("fastrnn: using backend 'torch' because 'triton': dtype "
                              "torch.float64 is not float32, float16 or bfloat16")


def test_the_torch_backend_runs_every_floating_dtype_anywhere():
    for device_type in ("cpu", "cuda", "mps"):
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            assert backends.why_not("torch", _config(device_type, dtype)) == ""
    assert backends.why_not("torch", _config(dtype=torch.int64)) != ""
