"""Admission of fused plans (fastrnn.admission), device-agnostic: the triton backend under the
Triton interpreter stands for a fused GPU plan, on CPU tensors, against the torch backend, with
auto's order for CPU tensors set to (triton, torch). Every test gets its own verdict file.

The interpreter runs a layer far slower than torch's kernels, so the tests that want a plan
admitted replace the timer (`admission.time_ms`); the test of a slow plan uses the real one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

import fastrnn  # noqa: E402
from fastrnn import admission, backends  # noqa: E402
from fastrnn.backends import triton as triton_backend  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("admission is tested with the triton backend under the interpreter",
                allow_module_level=True)
_MAJOR_MINOR = tuple(int(part) for part in triton.__version__.split(".")[:2])
if _MAJOR_MINOR < (3, 7) and tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
    pytest.skip(f"Triton {triton.__version__}'s interpreter needs numpy < 2.4",
                allow_module_level=True)

TRITON = triton_backend.BACKEND


@pytest.fixture(autouse=True)
def fresh_admission(monkeypatch, tmp_path):
    """auto on CPU tensors: triton (admitted or not), else torch; an empty verdict file."""
    monkeypatch.setenv("FASTRNN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRNN_ADMISSION", raising=False)
    monkeypatch.delenv("FASTRNN_BACKEND", raising=False)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    monkeypatch.setattr(admission, "_frozen", {})
    monkeypatch.setattr(admission, "_warned", set())
    monkeypatch.setattr(admission, "PREPARER", admission._Preparer())
    admission.STORE.forget()
    yield tmp_path
    admission.STORE.forget()


@pytest.fixture
def fused_faster(monkeypatch):
    """The timer says the fused plan takes half torch's time."""
    monkeypatch.setattr(admission, "time_ms", lambda candidate, fallback, device: (1.0, 2.0))


class Spy:
    """Counts the calls of a backend method (and can change what it returns)."""

    def __init__(self, monkeypatch, backend, name, change=None):
        self.calls = 0
        original = getattr(backend, name)

        def spy(*args, **kwargs):
            self.calls += 1
            result = original(*args, **kwargs)
            return change(result) if change else result

        monkeypatch.setattr(backend, name, spy)


def _pair(training=False, seed=0):
    torch.manual_seed(seed)
    reference = nn.LSTM(3, 5)
    return reference, fastrnn.LSTM.from_torch(reference), torch.randn(4, 2, 3)


def _only_entry():
    (entry,) = admission.STORE.entries(seen_only=True)
    return entry


def test_a_correct_plan_is_admitted_and_serves(monkeypatch, fused_faster):
    reference, module, x = _pair()
    forwards = Spy(monkeypatch, TRITON, "forward")
    with torch.no_grad():
        first = module(x)
    entry = _only_entry()
    assert entry["admitted"] is True and entry["reason"] == ""
    assert entry["fields"]["backend"] == "triton" and entry["fields"]["passes"] == "inference"
    assert set(entry["errors"]) == {"output", "h_n", "c_n"}
    for mine, theirs, allowed in entry["errors"].values():
        assert mine <= allowed and theirs >= 0
    checked = forwards.calls
    with torch.no_grad():
        second = module(x)
    assert forwards.calls == checked + 1  # served by triton, no second check
    with torch.no_grad():
        expected = reference(x)
    for got in (first, second):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)


def test_a_wrong_plan_is_rejected_with_a_warning_and_torch_serves(monkeypatch, fused_faster):
    reference, module, x = _pair()

    def perturbed(result):
        output, *rest = result
        return (output + 1e-3, *rest)

    Spy(monkeypatch, TRITON, "forward", perturbed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = module(x)
            again = module(x)
    entry = _only_entry()
    assert entry["admitted"] is False and entry["reason"].startswith("wrong: output error")
    messages = [str(w.message) for w in caught if "not admitted" in str(w.message)]
    assert len(messages) == 1 and "gpu_report --device" in messages[0]
    with torch.no_grad():
        expected = reference(x)
    for result in (got, again):  # torch's own kernels: torch.nn's results exactly
        assert torch.equal(result[0], expected[0]) and torch.equal(result[1][1], expected[1][1])


def test_a_wrong_backward_is_rejected_by_the_training_check(monkeypatch, fused_faster):
    reference, module, x = _pair()

    def perturbed(result):
        grad_x_gates, *rest = result
        return (grad_x_gates * 1.01, *rest)

    Spy(monkeypatch, TRITON, "backward", perturbed)
    with pytest.warns(UserWarning, match="not admitted"):
        output, _ = module(x.requires_grad_())
    entry = _only_entry()
    assert entry["fields"]["passes"] == "training" and entry["admitted"] is False
    assert "grad x error" in entry["reason"] and "grad w_ih error" in entry["reason"]
    assert {"grad x", "grad w_hh", "grad h0", "grad c0"} <= set(entry["errors"])
    (grad,) = torch.autograd.grad(output.sum(), [x])
    (expected,) = torch.autograd.grad(reference(x)[0].sum(), [x])
    assert torch.equal(grad, expected)


def test_a_slow_plan_is_rejected_on_time(monkeypatch):
    _, module, x = _pair()
    original = TRITON.forward

    def slowed(*args, **kwargs):
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(TRITON, "forward", slowed)
    with pytest.warns(UserWarning, match="not admitted"), torch.no_grad():
        module(x)
    entry = _only_entry()
    assert entry["admitted"] is False and entry["reason"].startswith("slower:")
    fused_ms, torch_ms = entry["times_ms"]
    assert fused_ms >= 50 and fused_ms > torch_ms  # torch's time: a loaded machine stretches it
    assert all(mine <= allowed for mine, _, allowed in entry["errors"].values())  # correct


_CHILD = """
import sys, torch, fastrnn
from fastrnn import admission, backends
from fastrnn.backends import triton as triton_backend
backends.AUTO_ORDER["cpu"] = ("triton", "torch")
def no_check(*args, **kwargs):
    raise AssertionError("checked again")
admission.check = no_check
calls = []
original = triton_backend.BACKEND.forward
triton_backend.BACKEND.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
torch.manual_seed(0)
module = fastrnn.LSTM.from_torch(torch.nn.LSTM(3, 5))
with torch.no_grad():
    module(torch.randn(4, 2, 3))
print("served by triton" if calls else "not served by triton")
"""


def test_a_verdict_is_reused_by_a_new_process(fused_faster, fresh_admission):
    _, module, x = _pair()
    with torch.no_grad():
        module(x)
    assert _only_entry()["admitted"] is True
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                           env={**os.environ, "FASTRNN_CACHE_DIR": str(fresh_admission)},
                           timeout=300)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "served by triton"


def test_strict_mode_raises_instead_of_falling_back(monkeypatch, fused_faster):
    monkeypatch.setenv("FASTRNN_ADMISSION", "strict")
    _, module, x = _pair()
    Spy(monkeypatch, TRITON, "forward", lambda result: (result[0] * 2, *result[1:]))
    with pytest.raises(RuntimeError, match="was not admitted for lstm I3 H5 uni B2"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.no_grad():
            module(x)
    with pytest.raises(RuntimeError, match="was not admitted"), torch.no_grad():
        module(x)  # the recorded rejection raises too


def test_admission_off_trusts_the_plan_without_a_check(monkeypatch):
    monkeypatch.setenv("FASTRNN_ADMISSION", "off")
    monkeypatch.setattr(admission, "check", lambda *a, **k: pytest.fail("checked"))
    _, module, x = _pair()
    forwards = Spy(monkeypatch, TRITON, "forward")
    with torch.no_grad():
        module(x)
    assert forwards.calls == 1 and admission.STORE.entries(seen_only=True) == []


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("FASTRNN_ADMISSION", "maybe")
    _, module, x = _pair()
    with pytest.raises(ValueError, match="FASTRNN_ADMISSION='maybe' is not one of"):
        module(x)


def test_the_background_compile_never_blocks_the_call_that_started_it(monkeypatch,
                                                                       fused_faster):
    """A configuration whose kernels are not compiled is served by torch's kernels at once;
    the fused plan is checked and takes over at a call after its compile finished."""
    release, prepared = threading.Event(), set()

    def prepare(config, training, device):
        assert release.wait(60)
        prepared.add(training)

    monkeypatch.setattr(TRITON, "prepared", lambda config, training, device: training in prepared)
    monkeypatch.setattr(TRITON, "prepare", prepare)
    forwards = Spy(monkeypatch, TRITON, "forward")
    reference, module, x = _pair()
    with torch.no_grad():
        begin = time.perf_counter()
        first = module(x)
        took = time.perf_counter() - begin
        expected = reference(x)
    assert took < 5 and forwards.calls == 0 and not release.is_set()
    assert torch.equal(first[0], expected[0])
    assert admission.PREPARER.state(next(iter(admission.STORE.seen))) == "pending"
    release.set()
    admission.PREPARER.wait(60)
    assert _only_entry()["prepared"] is True and "admitted" not in _only_entry()
    with torch.no_grad():
        module(x)
    assert _only_entry()["admitted"] is True and forwards.calls > 0


def test_a_training_call_of_a_layer_op_keeps_its_first_backend(monkeypatch, fused_faster):
    """Under the layer ops (torch.compile, tracers) a training call's backend is fixed at its
    first call: a fused plan admitted later never meets a forward that torch's kernels ran."""
    prepared = set()
    monkeypatch.setattr(TRITON, "prepared", lambda config, training, device: training in prepared)
    monkeypatch.setattr(TRITON, "prepare", lambda config, training, device: prepared.add(training))
    cell = fastrnn.cells.CELLS["gru"]
    x, w_ih = torch.randn(4, 2, 3, requires_grad=True), torch.randn(15, 3, requires_grad=True)
    h0, w_hh = torch.randn(1, 2, 5, requires_grad=True), torch.randn(1, 15, 5, requires_grad=True)
    forwards = Spy(monkeypatch, TRITON, "forward")
    for _ in range(2):
        output, h_n, _, _ = torch.ops.fastrnn.gru_layer(x, w_ih, None, h0, None, w_hh, None, None,
                                                        None, "", True)
        admission.PREPARER.wait(60)
        torch.autograd.grad(output.sum() + h_n.sum(), [x, w_ih, h0, w_hh])
    assert forwards.calls == 0  # prepared by then, yet the op path stays on torch's kernels
    eager_module = fastrnn.GRU(3, 5)
    eager_module(x)  # the eager path checks and admits the same kind of layer
    assert any(entry.get("admitted") for entry in admission.STORE.entries(seen_only=True))
    del cell


def test_a_barrier_timeout_rejects_the_configuration(monkeypatch, fused_faster):
    _, module, x = _pair()
    with torch.no_grad():
        module(x)
    assert _only_entry()["admitted"] is True
    config = backends.LayerConfig(fastrnn.cells.CELLS["lstm"], "cpu", torch.float32, 2, 0, 5, 0,
                                  1, False)
    monkeypatch.setattr(triton_backend._barrier_watch, "timed_out", {(config, False)})
    with pytest.warns(UserWarning, match="failed on the device: a persistent launch timed out"):
        with torch.no_grad():
            module(x)
    assert _only_entry()["admitted"] is False


def test_the_check_leaves_the_users_random_stream_alone(fused_faster):
    _, module, x = _pair()
    state = torch.get_rng_state()
    module(x.requires_grad_())
    assert _only_entry()["admitted"] is True and torch.equal(torch.get_rng_state(), state)


def test_no_check_without_real_tensors():
    meta = torch.empty(3, 2, 4, device="meta")
    call = admission.LayerCall(fastrnn.cells.CELLS["rnn_tanh"], meta, meta, None, meta, None,
                               meta, None, None, None)
    assert not admission._can_check(call)


def test_the_report_lists_each_configuration(fused_faster):
    _, module, x = _pair()
    module(x.requires_grad_())
    with torch.no_grad():
        module(x)
    text = admission.report()
    assert text.count("lstm I3 H5 uni B2 float32") == 2
    assert "training" in text and "inference" in text and text.count("admitted") == 2
    assert "grad w_hh" in text
    assert admission.report(seen_only=False).count("admitted") == 2
    admission.STORE.forget()
    assert admission.report() == "no configuration has met admission in this process"
