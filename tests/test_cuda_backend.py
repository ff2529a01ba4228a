"""Parity of the CUDA backend with the reference backend (needs a CUDA device).

Legend as in fastrnn/backends/base.py. Forward: outputs, states and workspace. Backward: all six
gradients, fed with the reference forward's output and workspace so that each direction is
checked on its own, plus end-to-end autograd through the modules. Both kernel paths run: the
persistent cooperative kernel (resident or streamed, as planned) and the step-wise one
(FASTRNN_CUDA_STEPWISE=1); every call checks that the path the binding ran is the planned one.
"""

from __future__ import annotations

import pytest
import torch

import fastrnn
from fastrnn.backends import cuda as cuda_backend
from fastrnn.backends import reference
from fastrnn.backends.base import LayerConfig
from fastrnn.cells import CELLS

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

CUDA = cuda_backend.BACKEND
REF = reference.BACKEND
# (atol, rtol) relative to the largest reference magnitude
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = list(TOLERANCE)
CELL_NAMES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


@pytest.fixture(autouse=True)
def backend_available():
    ok, reason = CUDA.available()
    assert ok, reason


@pytest.fixture(params=["persistent", "stepwise"])
def path(request, monkeypatch):
    monkeypatch.setenv("FASTRNN_CUDA_STEPWISE", "1" if request.param == "stepwise" else "0")
    return request.param


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device.type == "cuda", f"{what}: on {actual.device}"
    if expected.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    atol, rtol = TOLERANCE[dtype]
    scale = max(1.0, expected.double().abs().max().item())
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= (atol + rtol) * scale, f"{what}: max error {error:.3g} at scale {scale:.3g}"


def make_layer(name, num_directions, dtype, seq_len=6, batch=3, hidden=7, proj=0, lengths=None, seed=0):
    """Random inputs of one layer on the GPU; x_gates non-contiguous; padding of x_gates is NaN."""
    cell = CELLS[name]
    out_size = proj or hidden
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to("cuda", dtype)

    rows = cell.gates * hidden
    full = rand(seq_len, num_directions * rows + 5, batch).transpose(1, 2)  # [T, B, 5 + D*G*H]
    if lengths is not None:
        lengths = torch.tensor(lengths, dtype=torch.int64)
        full[(torch.arange(seq_len).unsqueeze(1) >= lengths.unsqueeze(0)).to("cuda")] = float("nan")
        lengths = lengths.to("cuda")
    x_gates = full[:, :, 5:]
    h0 = rand(num_directions, batch, out_size, scale=0.5)
    c0 = rand(num_directions, batch, hidden, scale=0.5) if cell.has_cell_state else None
    w_scale = 1.0 / max(1, out_size) ** 0.5
    w_hh = rand(num_directions, rows, out_size, scale=w_scale)
    b_hh = rand(num_directions, rows, scale=0.1)
    w_hr = rand(num_directions, proj, hidden, scale=1.0 / hidden ** 0.5) if proj else None
    return cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths


def poison_allocator():
    """Fill freed cached blocks with NaN so unwritten outputs show up."""
    torch.empty(64 << 20, dtype=torch.float32, device="cuda").fill_(float("nan"))


def assert_ran_as_planned(pass_name):
    """The binding ran the planned path: step-wise where asked for, else a cooperative one."""
    plan, ran = CUDA.runs.pop(pass_name)
    assert ran == plan.path, f"{pass_name}: planned {plan.path}, ran {ran}"
    expected = ("step-wise",) if cuda_backend._stepwise() else ("resident", "streamed")
    assert plan.path in expected, f"{pass_name}: {plan.path}"


def check_layer(name, num_directions, dtype, **kwargs):
    cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths = make_layer(name, num_directions, dtype, **kwargs)
    config = LayerConfig.of(cell, x_gates, h0, w_hh, w_hr, lengths)
    assert CUDA.supports(config) == (True, "")
    expected = REF.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths)
    poison_allocator()
    actual = CUDA.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths)
    assert_ran_as_planned("forward")
    for what, a, e in zip(("output", "h_n", "c_n", "workspace"), actual, expected):
        assert_close(a, e, dtype, f"forward {what}")

    output, _, _, workspace = expected
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(output.shape, generator=generator).to("cuda", dtype)
    if lengths is not None:  # the backward must ignore whatever sits at padded steps
        padded = torch.arange(output.shape[0]).unsqueeze(1) >= lengths.cpu().unsqueeze(0)
        grad_output[padded.to("cuda")] = float("nan")
    grad_h_n = torch.randn(h0.shape, generator=generator).to("cuda", dtype)
    grad_c_n = torch.randn(c0.shape, generator=generator).to("cuda", dtype) if c0 is not None else None
    for grads in ((grad_output, grad_h_n, grad_c_n), (grad_output, None, None), (None, grad_h_n, grad_c_n)):
        expected_grads = REF.backward(cell, *grads, h0, c0, w_hh, w_hr, lengths, output, workspace)
        poison_allocator()
        actual_grads = CUDA.backward(cell, *grads, h0, c0, w_hh, w_hr, lengths, output, workspace)
        assert_ran_as_planned("backward")
        names = ("grad_x_gates", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh", "grad_w_hr")
        for what, a, e in zip(names, actual_grads, expected_grads):
            assert_close(a, e, dtype, f"backward {what} (given {[g is not None for g in grads]})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variable", [False, True], ids=["full", "varlen"])
@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("name", CELL_NAMES)
def test_layer_parity(path, name, num_directions, variable, dtype):
    check_layer(name, num_directions, dtype, lengths=[6, 2, 4] if variable else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variable", [False, True], ids=["full", "varlen"])
@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("proj", [1, 5, 11])
def test_lstm_projection_parity(path, proj, num_directions, variable, dtype):
    check_layer("lstm", num_directions, dtype, proj=proj, lengths=[1, 6, 3] if variable else None)


@pytest.mark.parametrize("name", CELL_NAMES)
@pytest.mark.parametrize("hidden,batch,seq_len", [(1, 1, 1), (7, 1, 5), (100, 4, 3), (1, 5, 4), (100, 1, 1)])
def test_odd_sizes(path, name, hidden, batch, seq_len):
    lengths = [max(1, seq_len - b) for b in range(batch)] if batch > 1 else None
    check_layer(name, 2, torch.float32, seq_len=seq_len, batch=batch, hidden=hidden, lengths=lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_blocks_and_batch_tiles(path, dtype):
    """Wide layers: several blocks per direction, several batch tiles, a projection wider than H."""
    check_layer("lstm", 2, dtype, seq_len=5, batch=37, hidden=300, lengths=[5 - b % 5 for b in range(37)])
    check_layer("gru", 2, dtype, seq_len=4, batch=70, hidden=520)
    check_layer("lstm", 1, dtype, seq_len=3, batch=9, hidden=96, proj=130)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("hidden", [768, 1024])
def test_wide_long_layers_on_a_side_stream_are_deterministic(path, hidden, num_directions, dtype):
    """H 768/1024, T 256 (bi H1024 fp32 streams its weights): run twice on a non-default stream,
    bitwise equal, and close to the reference."""
    cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths = make_layer(
        "lstm", num_directions, dtype, seq_len=256, batch=4, hidden=hidden, lengths=[256, 100, 1, 255])
    generator = torch.Generator().manual_seed(2)
    grad_output = torch.randn(256, 4, num_directions * hidden, generator=generator).to("cuda", dtype)
    grad_h_n = torch.randn(h0.shape, generator=generator).to("cuda", dtype)
    grad_c_n = torch.randn(c0.shape, generator=generator).to("cuda", dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    runs = []
    with torch.cuda.stream(stream):
        for _ in range(2):
            poison_allocator()
            forward = CUDA.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths)
            assert_ran_as_planned("forward")
            backward = CUDA.backward(cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                                     forward[0], forward[3])
            assert_ran_as_planned("backward")
            runs.append((*forward, *backward))
    stream.synchronize()
    for i, (first, second) in enumerate(zip(*runs)):
        assert torch.equal(first, second), f"tensor {i} differs between two runs"
    expected = REF.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths)
    atol, rtol = TOLERANCE[dtype]
    for what, a, e in zip(("output", "h_n", "c_n"), runs[0][:3], expected[:3]):
        scale = max(1.0, e.double().abs().max().item())
        error = (a.double() - e.double()).abs().max().item()
        assert error <= 10 * (atol + rtol) * scale, f"{what}: max error {error:.3g}"


def test_lengths_outside_the_sequence_are_a_clear_error():
    cell, x_gates, h0, c0, w_hh, b_hh, w_hr, _ = make_layer("lstm", 2, torch.float32)
    for bad in ([7, 2, 4], [0, 2, 4]):
        lengths = torch.tensor(bad, device="cuda")
        with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T\]"):
            CUDA.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths)


def test_kernel_attributes_match_one_block_per_sm():
    """What the driver reports for each compiled kernel allows one 256-thread block per SM."""
    module = CUDA._module
    for cell in range(4):
        for dtype in DTYPES:
            for backward in (False, True):
                registers, local_bytes, _ = module.attributes(cell, dtype, backward)
                assert registers * 256 <= 65536 and local_bytes == 0, (cell, dtype, backward)


def test_supports():
    base = dict(cell=CELLS["lstm"], device_type="cuda", dtype=torch.float32, batch_size=2, seq_len=3,
                hidden_size=16, proj_size=0, num_directions=2, variable_lengths=False)
    assert CUDA.supports(LayerConfig(**base)) == (True, "")
    assert not CUDA.supports(LayerConfig(**{**base, "device_type": "cpu"}))[0]
    assert not CUDA.supports(LayerConfig(**{**base, "dtype": torch.float64}))[0]
    assert not CUDA.supports(LayerConfig(**{**base, "hidden_size": cuda_backend.MAX_SIZE + 1}))[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_modules_against_torch(path, mode, dtype):
    """Two bidirectional layers with packed variable lengths through the modules, vs the reference."""
    torch.manual_seed(0)
    kwargs = dict(input_size=5, hidden_size=12, num_layers=2, bidirectional=True)
    if mode == "LSTM":
        torch_module = torch.nn.LSTM(**kwargs, proj_size=4)
    elif mode == "GRU":
        torch_module = torch.nn.GRU(**kwargs)
    else:
        torch_module = torch.nn.RNN(**kwargs, nonlinearity="tanh" if mode == "RNN_TANH" else "relu")
    torch_module = torch_module.to("cuda", dtype)
    twin = getattr(fastrnn, type(torch_module).__name__)
    reference_module = twin.from_torch(torch_module, backend="reference")
    module = twin.from_torch(torch_module, backend="cuda")
    x = torch.randn(7, 4, 5, device="cuda", dtype=dtype)
    lengths = torch.tensor([7, 5, 3, 1])
    results = []
    for net in (reference_module, module):
        inputs = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(inputs, lengths, enforce_sorted=False)
        out, state = net(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
        states = state if isinstance(state, tuple) else (state,)
        loss = out.float().square().sum() + sum(s.float().sum() for s in states)
        grads = torch.autograd.grad(loss, [inputs, *net.parameters()])
        results.append((out, *states, *grads))
    for i, (a, e) in enumerate(zip(results[1], results[0])):
        atol, rtol = TOLERANCE[dtype]
        scale = max(1.0, e.double().abs().max().item())
        assert (a.double() - e.double()).abs().max().item() <= 4 * (atol + rtol) * scale, f"tensor {i}"
