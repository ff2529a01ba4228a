"""The host side of the cuda backend, with the compiled module replaced by a recorder (no GPU
needed): what the binding is handed (padded weights and vectors, the plan), what it reports back
(the path that ran), the warning when the device refuses the cooperative grid, and the lengths
check."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastrnn.backends import cuda as cuda_backend
from fastrnn.backends import cuda_plan
from fastrnn.backends.base import LayerConfig
from fastrnn.backends.triton_plan import TARGETS
from fastrnn.cells import CELLS

PATH_CODES = {path: code for code, path in enumerate(cuda_plan.PATHS)}


class Recorder:
    """Stands in for fastrnn._C_cuda: checks the padded layout, zero-fills outputs and answers
    with `ran` (a FastrnnPath code)."""

    def __init__(self, ran: int):
        self.ran = ran
        self.calls = []

    def forward(self, cell, x_gates, lengths, w_hh, b_hh, w_hr, output, workspace, h_state, c_state,
                u_state, plan):
        self.calls.append(("forward", w_hh, w_hr, h_state, u_state, plan))
        output.zero_()
        workspace.zero_()
        return self.ran

    def backward(self, cell, grad_output, lengths, w_hh_t, w_hr_t, output, workspace, h0, c0, carry,
                 grad_c, grad_hg, grad_step, grad_proj, grad_x, grad_h0, plan):
        self.calls.append(("backward", w_hh_t, w_hr_t, grad_hg, grad_step, plan))
        for tensor in (grad_x, grad_h0, grad_proj):
            tensor.zero_()
        return self.ran


def _layer(hidden=7, proj=5, batch=3, seq_len=4, directions=2):
    cell = CELLS["lstm"]
    out = proj or hidden
    x_gates = torch.randn(seq_len, batch, directions * 4 * hidden)
    h0 = torch.randn(directions, batch, out)
    c0 = torch.randn(directions, batch, hidden)
    w_hh = torch.randn(directions, 4 * hidden, out)
    b_hh = torch.randn(directions, 4 * hidden)
    w_hr = torch.randn(directions, proj, hidden) if proj else None
    return cell, x_gates, h0, c0, w_hh, b_hh, w_hr


@pytest.fixture
def recorder(monkeypatch):
    """The backend with a recorder module and plans for an H100 (the tensors stay on the CPU)."""
    backend = cuda_backend.CudaBackend()
    monkeypatch.setattr(cuda_backend, "_warned", set())
    monkeypatch.setattr(cuda_backend, "plan_pass", lambda config, device, backward: cuda_plan.choose(
        config, TARGETS["sm_90"], backward, cuda_backend._stepwise()))

    def use(ran):
        backend._module = Recorder(ran)
        return backend
    return use


def test_binding_gets_padded_rows_and_the_plan(recorder):
    backend = recorder(PATH_CODES["resident"])
    cell, x_gates, h0, c0, w_hh, b_hh, w_hr = _layer()
    output, h_n, c_n, workspace = backend.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, None)
    _, w_hh_arg, w_hr_arg, h_state, u_state, plan = backend._module.calls[-1]
    assert w_hh_arg.shape == (2, 28, 8) and w_hh_arg.is_contiguous()  # P 5 -> 8
    assert torch.equal(w_hh_arg[..., :5], w_hh) and not w_hh_arg[..., 5:].any()
    assert w_hr_arg.shape == (2, 5, 8) and torch.equal(w_hr_arg[..., :7], w_hr)  # H 7 -> 8
    assert h_state.shape == (2, 2, 3, 8) and torch.equal(h_state[0, ..., :5], h0)
    assert not h_state[..., 5:].any() and u_state.shape == (2, 3, 8) and not u_state.any()
    config = LayerConfig.of(cell, x_gates, h0, w_hh, w_hr, None)
    expected = cuda_plan.choose(config, TARGETS["sm_90"], False)
    assert plan == expected.as_list()
    assert backend.runs["forward"] == (expected, "resident")
    assert h_n.shape == h0.shape and c_n.shape == c0.shape

    backend.backward(cell, torch.randn_like(output), None, None, h0, c0, w_hh, w_hr, None, output, workspace)
    _, w_hh_t, w_hr_t, grad_hg, grad_step, plan = backend._module.calls[-1]
    assert w_hh_t.shape == (2, 5, 32) and torch.equal(w_hh_t[..., :28], w_hh.transpose(1, 2))  # 4H 28 -> 32
    assert w_hr_t.shape == (2, 7, 8) and torch.equal(w_hr_t[..., :5], w_hr.transpose(1, 2))
    assert grad_hg.shape == (2, 2, 3, 32) and not grad_hg.any() and grad_step.shape == (2, 3, 8)
    assert plan == cuda_plan.choose(config, TARGETS["sm_90"], True).as_list()


def test_a_refused_cooperative_launch_warns_once(recorder):
    backend = recorder(PATH_CODES["step-wise"])  # the launcher fell back
    cell, x_gates, h0, c0, w_hh, b_hh, w_hr = _layer(proj=0)
    with pytest.warns(UserWarning, match="refused the cooperative cuda forward grid"):
        backend.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, None)
    plan, ran = backend.runs["forward"]
    assert plan.path == "resident" and ran == "step-wise"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, None)  # once only


def test_stepwise_when_asked_for_does_not_warn(recorder, monkeypatch):
    monkeypatch.setenv("FASTRNN_CUDA_STEPWISE", "1")
    backend = recorder(PATH_CODES["step-wise"])
    cell, x_gates, h0, c0, w_hh, b_hh, w_hr = _layer(proj=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, None)
    assert backend.runs["forward"][0].path == backend.runs["forward"][1] == "step-wise"


@pytest.mark.parametrize("lengths", [[5, 2, 4], [0, 2, 4], [4, -1, 4]])
def test_lengths_outside_the_sequence_are_refused_before_any_launch(recorder, lengths):
    backend = recorder(PATH_CODES["resident"])
    cell, x_gates, h0, c0, w_hh, b_hh, w_hr = _layer(proj=0)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T\]"):
        backend.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, torch.tensor(lengths))
    output = torch.zeros(4, 3, 14)
    workspace = torch.zeros(4, 3, 2, 35)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T\]"):
        backend.backward(cell, output, None, None, h0, c0, w_hh, w_hr, torch.tensor(lengths), output,
                         workspace)
    assert backend._module.calls == []
