"""The input projection of a layer on the CPU: the packed AVX-512 GEMM of csrc/cpu/linear_cpu.cpp
(`torch.ops.fastrnn_cpu.linear` and `linear_backward`) and the projection inside the layer ops and
the eager path, against float64 oracles.

Errors are judged against torch's own float32 error on the same inputs. Uninitialised memory is
poisoned (NaN) so that anything the kernel forgets to write shows.

Legend: T time, B batch, K input size (I), N output columns (D*G*H).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastrnn import ops
from fastrnn.backends import cpu, reference
from fastrnn.cells import CELLS

CPU = cpu.BACKEND

pytestmark = pytest.mark.usefixtures("poisoned_empty")

# (T, B, K, N): single elements, sizes that are not multiples of the 8-row tiles, the 32-column
# panels or the 128-deep chunks of the kernel, and a layer-sized one.
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 9, 257, 100), (7, 3, 130, 33), (10, 16, 256, 1024)]


@pytest.fixture(autouse=True, scope="module")
def kernels():
    ok, reason = CPU.available()
    assert ok, f"the cpu backend is not available: {reason}"


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected).abs().max().item()


def _assert_as_accurate_as_torch(got, torch_result, expected):
    """got's error against the float64 expectation is at most 2x torch's own + a small floor."""
    assert not got.isnan().any()
    assert _error(got, expected) <= 2 * _error(torch_result, expected) + 1e-6 * max(
        1.0, expected.abs().max().item())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-K{}-N{}".format(*s))
def test_linear_matches_float64(shape, bias):
    T, B, K, N = shape
    x, w = torch.randn(T, B, K), torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if bias else None
    got = torch.ops.fastrnn_cpu.linear(x, w, b)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (T, B, N)
    _assert_as_accurate_as_torch(got, F.linear(x, w, b), expected)


@pytest.mark.parametrize("mask", [(True, True, True), (False, True, False), (True, False, False)],
                         ids=["all", "weight", "input"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-K{}-N{}".format(*s))
def test_linear_backward_matches_float64(shape, mask):
    T, B, K, N = shape
    x, w, grad = torch.randn(T, B, K), torch.randn(N, K), torch.randn(T, B, N)
    got = torch.ops.fastrnn_cpu.linear_backward(grad, x, w, list(mask))
    rows_grad, rows_x = grad.flatten(0, 1), x.flatten(0, 1)
    expected = (grad.double() @ w.double(), rows_grad.double().t() @ rows_x.double(),
                rows_grad.double().sum(0))
    from_torch = (grad @ w, rows_grad.t() @ rows_x, rows_grad.sum(0))
    for needed, g, e, t in zip(mask, got, expected, from_torch):
        if needed:
            assert g.shape == e.shape
            _assert_as_accurate_as_torch(g, t, e)
        else:
            assert g.numel() == 0


def test_linear_takes_strided_input_and_leaves_it_unchanged():
    x = torch.randn(6, 4, 40).transpose(0, 1)  # [4, 6, 40], batch_first viewed as time-major
    w, b = torch.randn(70, 40), torch.randn(70)
    before = x.clone()
    got = torch.ops.fastrnn_cpu.linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before)


def test_other_dtypes_fall_back_to_torch():
    x, w = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.fastrnn_cpu.linear(x, w, None), F.linear(x, w),
                               rtol=0, atol=0)


def test_projection_gradients_through_the_layer_op():
    """float32 through the C++ linear backward, only the gradient autograd asks for (w_ih),
    against float64."""
    T, B, I, H = 4, 3, 9, 5
    x = torch.randn(T, B, I, dtype=torch.float64)
    w_ih = torch.randn(4 * H, I, dtype=torch.float64)
    h0, c0 = torch.zeros(1, B, H, dtype=torch.float64), torch.zeros(1, B, H, dtype=torch.float64)
    w_hh = torch.randn(1, 4 * H, H, dtype=torch.float64)
    grads = []
    for dtype in (torch.float64, torch.float32):
        weight = w_ih.to(dtype).requires_grad_()
        output = ops.LAYER_OPS["lstm"](x.to(dtype), weight, None, h0.to(dtype), c0.to(dtype),
                                       w_hh.to(dtype), None, None, None, "cpu", True)[0]
        (grad,) = torch.autograd.grad(output.sum(), [weight])
        grads.append(grad.double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


FUSED_CASES = [
    # cell, T, B, I, H, D, proj_size, variable lengths
    ("lstm", 5, 3, 7, 9, 2, 0, True),
    ("lstm", 4, 9, 130, 200, 2, 0, True),
    ("lstm", 3, 2, 5, 6, 2, 4, False),
    ("gru", 5, 3, 7, 9, 2, 0, True),
    ("gru", 6, 17, 33, 70, 1, 0, False),
    ("rnn_tanh", 4, 9, 130, 200, 2, 0, True),
    ("rnn_relu", 5, 1, 1, 1, 1, 0, False),
    ("lstm", 3, 5, 500, 300, 1, 0, True),  # W_ih over 2 MiB: one GEMM before the recurrence
]


@pytest.mark.parametrize("keep_workspace", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("case", FUSED_CASES,
                         ids=lambda c: "{}-T{}-B{}-I{}-H{}-D{}-P{}-{}".format(
                             *c[:7], "varlen" if c[7] else "padded"))
def test_fused_forward_is_bitwise_the_two_op_path(case, keep_workspace):
    """layer_forward_from_input (projection inside the time loop) gives exactly what linear and
    then layer_forward give, workspace included, so eager and compiled runs agree to the bit."""
    cell, T, B, I, H, D, proj, variable = case
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    P = proj or H
    x = torch.randn(B, T, I).transpose(0, 1)  # strided, as with batch_first
    w_ih, b_ih = torch.randn(D * G * H, I) / I ** 0.5, torch.randn(D * G * H)
    h0 = torch.randn(D, B, P)
    c0 = torch.randn(D, B, H) if cell == "lstm" else None
    w_hh, b_hh = torch.randn(D, G * H, P) / P ** 0.5, torch.randn(D, G * H)
    w_hr = torch.randn(D, P, H) / H ** 0.5 if proj else None
    lengths = torch.randint(1, T + 1, (B,)) if variable else None
    fused = torch.ops.fastrnn_cpu.layer_forward_from_input(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh,
                                                           w_hr, lengths, keep_workspace)
    x_gates = torch.ops.fastrnn_cpu.linear(x, w_ih, b_ih)
    separate = torch.ops.fastrnn_cpu.layer_forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr,
                                                   lengths, keep_workspace)
    assert fused[3].shape[0] == (T if keep_workspace else 0)
    for got, expected in zip(fused, separate):
        assert not got.isnan().any()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", FUSED_CASES,
                         ids=lambda c: "{}-T{}-B{}-I{}-H{}-D{}-P{}-{}".format(
                             *c[:7], "varlen" if c[7] else "padded"))
def test_inference_saves_no_gates_and_computes_what_training_does(case, dtype):
    """Without a backward to come (keep_workspace False) the cell passes skip saving the gates;
    output, h_n and c_n are still those of a training forward, to the bit."""
    cell, T, B, I, H, D, proj, variable = case
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    P = proj or H
    x = torch.randn(T, B, I, dtype=dtype)
    w_ih = torch.randn(D * G * H, I, dtype=dtype) / I ** 0.5
    b_ih = torch.randn(D * G * H, dtype=dtype)
    h0 = torch.randn(D, B, P, dtype=dtype)
    c0 = torch.randn(D, B, H, dtype=dtype) if cell == "lstm" else None
    w_hh = torch.randn(D, G * H, P, dtype=dtype) / P ** 0.5
    b_hh = torch.randn(D, G * H, dtype=dtype)
    w_hr = torch.randn(D, P, H, dtype=dtype) / H ** 0.5 if proj else None
    lengths = torch.randint(1, T + 1, (B,)) if variable else None
    ops = torch.ops.fastrnn_cpu
    x_gates = F.linear(x, w_ih, b_ih)
    for run in (lambda keep: ops.layer_forward_from_input(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh,
                                                          w_hr, lengths, keep),
                lambda keep: ops.layer_forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths,
                                               keep)):
        inference, training = run(False), run(True)
        assert inference[3].shape[0] == 0
        for got, expected in zip(inference[:3], training[:3]):
            assert not got.isnan().any()
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fused_forward_of_float64_is_the_two_op_path():
    T, B, I, H = 4, 3, 5, 6
    x, w_ih, b_ih = (torch.randn(T, B, I, dtype=torch.float64),
                     torch.randn(4 * H, I, dtype=torch.float64),
                     torch.randn(4 * H, dtype=torch.float64))
    h0, c0 = torch.randn(1, B, H, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64)
    w_hh = torch.randn(1, 4 * H, H, dtype=torch.float64)
    b_hh = torch.randn(1, 4 * H, dtype=torch.float64)
    fused = torch.ops.fastrnn_cpu.layer_forward_from_input("lstm", x, w_ih, b_ih, h0, c0, w_hh,
                                                           b_hh, None, None, True)
    separate = torch.ops.fastrnn_cpu.layer_forward("lstm", F.linear(x, w_ih, b_ih), h0, c0, w_hh,
                                                   b_hh, None, None, True)
    for got, expected in zip(fused, separate):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("cell,I,H", [("lstm", 7, 9), ("lstm", 130, 200), ("gru", 64, 150),
                                      ("rnn_tanh", 33, 70)])
def test_fused_bfloat16_forward_against_float64(cell, I, H):
    """bfloat16 layers project step by step in the time loop on CPUs with bfloat16 dot products
    (odd I padded), keeping x_gates in float32: no less accurate than linear() in bfloat16 then
    the layer, and training runs compute what inference does."""
    spec = CELLS[cell]
    T, B, D, G = 6, 5, 2, spec.gates
    bf16 = torch.bfloat16
    x = torch.randn(T, B, I).to(bf16)
    w_ih, b_ih = (torch.randn(D * G * H, I) / I ** 0.5).to(bf16), torch.randn(D * G * H).to(bf16)
    h0 = torch.randn(D, B, H).to(bf16)
    c0 = torch.randn(D, B, H).to(bf16) if spec.has_cell_state else None
    w_hh, b_hh = (torch.randn(D, G * H, H) / H ** 0.5).to(bf16), torch.randn(D, G * H).to(bf16)
    lengths = torch.randint(1, T + 1, (B,))
    args = (h0, c0, w_hh, b_hh, None, lengths)
    double = lambda t: None if t is None else t.double()  # noqa: E731
    expected = reference.BACKEND.forward(
        spec, F.linear(x.double(), w_ih.double(), b_ih.double()),
        *[double(t) for t in args[:4]], None, lengths, keep_workspace=False)
    fused = torch.ops.fastrnn_cpu.layer_forward_from_input(cell, x, w_ih, b_ih, *args, False)
    training = torch.ops.fastrnn_cpu.layer_forward_from_input(cell, x, w_ih, b_ih, *args, True)
    separate = torch.ops.fastrnn_cpu.layer_forward(cell, F.linear(x, w_ih, b_ih), *args, False)
    for got, two_op, want, kept in zip(fused[:3], separate[:3], expected[:3], training[:3]):
        assert got.dtype == bf16 and not got.isnan().any()
        torch.testing.assert_close(kept, got, rtol=0, atol=0)
        if got.numel() == 0:  # c_n of a cell without one
            continue
        error = (got.double() - want).abs().max().item()
        two_op_error = (two_op.double() - want).abs().max().item()
        assert error <= 1.5 * two_op_error + 1e-3, (error, two_op_error)
    assert training[3].shape[0] == T and fused[3].shape[0] == 0


@pytest.mark.parametrize("module", ["LSTM", "GRU", "RNN"])
def test_modules_agree_to_the_bit_in_inference_and_training(module):
    import fastrnn

    model = getattr(fastrnn, module)(7, 33, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(4, 6, 7)
    with torch.no_grad():
        inference = model(x)
    training = model(x)
    flatten = lambda out: [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]  # noqa: E731
    for a, b in zip(flatten(inference), flatten(training)):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)



@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_eager_gradients_are_bitwise_those_of_the_ops(cell):
    """A module's eager forward and backward (projection and layer as one autograd node) give
    exactly the outputs and gradients of the custom ops that torch.compile runs."""
    spec = CELLS[cell]
    T, B, I, H, D = 6, 5, 7, 33, 2
    G = spec.gates
    x = torch.randn(T, B, I, requires_grad=True)
    w_ih = (torch.randn(D * G * H, I) / I ** 0.5).requires_grad_()
    b_ih = torch.randn(D * G * H, requires_grad=True)
    h0 = torch.randn(D, B, H, requires_grad=True)
    c0 = torch.randn(D, B, H, requires_grad=True) if spec.has_cell_state else None
    w_hh = (torch.randn(D, G * H, H) / H ** 0.5).requires_grad_()
    b_hh = torch.randn(D, G * H, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))
    inputs = [t for t in (x, w_ih, b_ih, h0, c0, w_hh, b_hh) if t is not None]
    grad_output = torch.randn(T, B, D * H)

    def gradients(outputs):
        output, h_n, c_n = outputs
        loss = (output * grad_output).sum() + h_n.square().sum()
        if c0 is not None:
            loss = loss + c_n.square().sum()
        return [*outputs[:2], *torch.autograd.grad(loss, inputs)]

    eager = gradients(ops.run_layer(spec, x, w_ih, b_ih, h0, c0, w_hh, b_hh, None, lengths,
                                    "cpu", True))
    through_ops = gradients(ops.LAYER_OPS[cell](x, w_ih, b_ih, h0, c0, w_hh, b_hh, None, lengths,
                                                "cpu", True)[:3])
    for got, expected in zip(eager, through_ops):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
