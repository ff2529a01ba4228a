"""The cpu backend (fused C++ kernel) against the reference backend, the oracle.

Every comparison is made against the reference computed in float64 on the same (rounded) inputs.
Uninitialised memory is poisoned: with deterministic algorithms on, torch fills every `empty`
tensor with NaN, so anything the kernel forgets to write shows. The extension must be built
(setup.py) or compile on first use; if neither works these tests fail.

Legend: B batch, T time, H hidden, P proj_size or H, G gates, D directions.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import backends
from fastrnn.backends import cpu, reference
from fastrnn.backends.base import LayerConfig
from fastrnn.cells import CELLS
from fastrnn.ops import LAYER_OPS

CPU = cpu.BACKEND
REFERENCE = reference.BACKEND
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
# Largest error allowed, relative to max(1, largest magnitude of the float64 reference).
TOLERANCE = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 3e-2}
MODULES = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU, "rnn_tanh": fastrnn.RNN, "rnn_relu": fastrnn.RNN}


@pytest.fixture(autouse=True, scope="module")
def kernels():
    """Load (or compile) the extension; every test fails when that is impossible."""
    ok, reason = CPU.available()
    assert ok, f"the cpu backend is not available: {reason}"


pytestmark = pytest.mark.usefixtures("poisoned_empty")


def test_extension_is_available():
    ok, reason = CPU.available()
    assert ok, f"the cpu backend is not available: {reason}"


def test_supports_and_auto_choice():
    cell = CELLS["lstm"]
    base = dict(cell=cell, device_type="cpu", dtype=torch.float32, batch_size=2, seq_len=3,
                hidden_size=4, proj_size=0, num_directions=1, variable_lengths=False)
    assert CPU.supports(LayerConfig(**base)) == (True, "")
    for dtype in (*DTYPES, torch.float16):
        assert CPU.supports(LayerConfig(**{**base, "dtype": dtype}))[0]
    assert not CPU.supports(LayerConfig(**{**base, "dtype": torch.int64}))[0]
    assert not CPU.supports(LayerConfig(**{**base, "device_type": "cuda"}))[0]
    assert backends.resolve("auto", LayerConfig(**base)) is CPU


def layer_inputs(cell_name, directions, proj, variable, bias, T=6, B=4, H=5, seed=0):
    """Random inputs of one layer in float64: x_gates, h0, c0, w_hh, b_hh, w_hr, lengths."""
    cell = CELLS[cell_name]
    generator = torch.Generator().manual_seed(seed)
    G, P = cell.gates, proj or H

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    x_gates = randn(T, B, directions * G * H)
    h0 = randn(directions, B, P, scale=0.5)
    c0 = randn(directions, B, H, scale=0.5) if cell.has_cell_state else None
    w_hh = randn(directions, G * H, P, scale=P ** -0.5)
    b_hh = randn(directions, G * H, scale=0.3) if bias else None
    w_hr = randn(directions, P, H, scale=H ** -0.5) if proj else None
    lengths = None
    if variable:  # unsorted, with a full-length and a length-1 sequence
        lengths = torch.randint(1, T + 1, (B,), generator=generator)
        lengths[0], lengths[-1] = 1, T
    return x_gates, h0, c0, w_hh, b_hh, w_hr, lengths


def output_grads(cell, forward, seed=1):
    """Random gradients for output, h_n and c_n (float64)."""
    generator = torch.Generator().manual_seed(seed)
    output, h_n, c_n, _ = forward

    def randn(t):
        return torch.randn(t.shape, generator=generator, dtype=torch.float64)

    return randn(output), randn(h_n), randn(c_n) if cell.has_cell_state else None


def relative_error(actual, expected):
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    return ((actual.double() - expected).abs().max() / scale).item()


def cast(tensors, dtype):
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def check_layer(cell_name, directions, proj, variable, bias, dtype, T=6, B=4, H=5,
                grads=("output", "h_n", "c_n")):
    """Forward and backward of the cpu backend in `dtype` against the float64 reference."""
    cell = CELLS[cell_name]
    inputs = cast(layer_inputs(cell_name, directions, proj, variable, bias, T, B, H), dtype)
    x_gates, h0, c0, w_hh, b_hh, w_hr, lengths = inputs
    exact_inputs = cast(inputs, torch.float64)  # the same rounded values, in float64

    ours = CPU.forward(cell, *inputs)
    exact = REFERENCE.forward(cell, *exact_inputs)
    names = ("output", "h_n", "c_n", "workspace")
    for name, got, want in zip(names, ours, exact):
        assert not got.isnan().any(), f"{name} has unwritten (NaN) entries"
        expected_dtype = torch.float32 if name == "workspace" and dtype == torch.bfloat16 else dtype
        assert got.dtype == expected_dtype, name
        error = relative_error(got, want)
        assert error <= TOLERANCE[dtype], f"{name}: error {error:.2e}"
    if lengths is not None:  # exact zeros past each sequence's end
        padded = torch.arange(T).unsqueeze(1) >= lengths  # [T, B]
        assert (ours[0][padded] == 0).all() and (ours[3][padded] == 0).all()

    grad_output, grad_h_n, grad_c_n = output_grads(cell, exact)
    grad_output = grad_output if "output" in grads else None
    grad_h_n = grad_h_n if "h_n" in grads else None
    grad_c_n = grad_c_n if "c_n" in grads else None
    ours_grads = CPU.backward(cell, *cast((grad_output, grad_h_n, grad_c_n), dtype), h0, c0, w_hh,
                              w_hr, lengths, ours[0], ours[3])
    exact_grads = REFERENCE.backward(cell, grad_output, grad_h_n, grad_c_n, *exact_inputs[1:4],
                                     exact_inputs[5], lengths, exact[0], exact[3])
    names = ("grad_x_gates", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh", "grad_w_hr")
    errors = {}
    for name, got, want in zip(names, ours_grads, exact_grads):
        assert not got.isnan().any(), f"{name} has unwritten (NaN) entries"
        assert got.dtype == dtype, name
        errors[name] = relative_error(got, want)
        assert errors[name] <= TOLERANCE[dtype], f"{name}: error {errors[name]:.2e}"
    return errors


LAYER_CASES = [
    (cell, directions, proj, variable, bias)
    for cell, directions, proj, variable, bias in itertools.product(
        CELLS, (1, 2), (0, 3), (False, True), (True, False))
    if cell == "lstm" or proj == 0
]


def case_id(case):
    cell, directions, proj, variable, bias = case
    return "-".join([cell, "bi" if directions == 2 else "uni", f"proj{proj}" if proj else "",
                     "varlen" if variable else "padded", "bias" if bias else "nobias"]).replace("--", "-")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_layer_matches_reference(case, dtype):
    check_layer(*case, dtype)


def torch_model(cell: str, input_size: int, hidden_size: int, **kwargs) -> torch.nn.Module:
    """The torch.nn recurrence of a cell name (rnn_tanh / rnn_relu: RNN with that nonlinearity)."""
    if cell.startswith("rnn"):
        return torch.nn.RNN(input_size, hidden_size, nonlinearity=cell[4:], **kwargs)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](input_size, hidden_size, **kwargs)


def output_and_gradients(model, x, grad_output) -> list:
    """[output, grad x, grad of every parameter] of a recurrence for grad_output."""
    x = x.detach().requires_grad_()
    output = model(x)[0]
    return [output, *torch.autograd.grad(output, [x, *model.parameters()], grad_output)]


@pytest.mark.parametrize("cell", list(CELLS))
def test_bfloat16_error_is_that_of_torch(cell):
    """bfloat16 through the kernel (products in bfloat16 where the CPU has them, h and grad_gates
    rounded to bfloat16 for them as oneDNN does) is no further from float64 than torch.nn in
    bfloat16: the output and the gradients of the input and of every weight (relu's gradients
    jump where a pre-activation crosses 0, so for rnn_relu the output only)."""
    for seed in range(4):
        torch.manual_seed(seed)
        model = torch_model(cell, 16, 16, bidirectional=True)
        x, grad_output = torch.randn(8, 5, 16), torch.randn(8, 5, 32)
        exact = output_and_gradients(model.double(), x.double(), grad_output.double())
        model = model.to(torch.bfloat16)
        theirs = output_and_gradients(model, x.bfloat16(), grad_output.bfloat16())
        ours = output_and_gradients(MODULES[cell].from_torch(model, backend="cpu"), x.bfloat16(),
                                    grad_output.bfloat16())
        compared = 1 if cell == "rnn_relu" else len(exact)
        for got, torch_result, want in zip(ours[:compared], theirs, exact):
            assert got.dtype == torch.bfloat16
            assert relative_error(got, want) <= 2 * relative_error(torch_result, want) + 1e-3


FLOAT16_CASES = [(cell, {}) for cell in CELLS] + [("lstm", {"proj_size": 5, "num_layers": 2})]


@pytest.mark.parametrize("cell, extra", FLOAT16_CASES, ids=[c + ("-proj" if e else "")
                                                            for c, e in FLOAT16_CASES])
def test_float16_runs_on_the_kernel_within_twice_torchs_error(cell, extra):
    """float16 layers run on the cpu backend (in float32 inside, rounded on output; no warning, no
    fallback), no further from float64 than twice torch.nn's own float16 error: the output and
    the gradients of the input and of every weight (for rnn_relu the output only, as above)."""
    out_size = 2 * extra.get("proj_size", 24)
    for seed in range(3):
        torch.manual_seed(seed)
        model = torch_model(cell, 16, 24, bidirectional=True, **extra)
        x, grad_output = torch.randn(30, 4, 16), torch.randn(30, 4, out_size)
        exact = output_and_gradients(model.double(), x.double(), grad_output.double())
        model = model.half()
        theirs = output_and_gradients(model, x.half(), grad_output.half())
        ours_model = MODULES[cell].from_torch(model, backend="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither a fallback nor its warning
            ours = output_and_gradients(ours_model, x.half(), grad_output.half())
        compared = 1 if cell == "rnn_relu" else len(exact)
        for got, torch_result, want in zip(ours[:compared], theirs, exact):
            assert got.dtype == torch.float16
            assert relative_error(got, want) <= 2 * relative_error(torch_result, want)


@pytest.mark.parametrize("T, B, H", [(1, 1, 1), (1, 3, 7), (4, 1, 7), (3, 2, 1), (2, 3, 33)])
@pytest.mark.parametrize("cell", list(CELLS))
def test_odd_sizes(cell, T, B, H):
    for directions, variable in ((1, False), (2, True)):
        check_layer(cell, directions, 0, variable, True, torch.float64, T=T, B=B, H=H)
    if cell == "lstm" and H > 1:
        check_layer(cell, 2, 1, True, True, torch.float64, T=T, B=B, H=H)


@pytest.mark.parametrize("grads", [("output",), ("h_n",), ("c_n",), ()], ids=str)
@pytest.mark.parametrize("cell", list(CELLS))
def test_unused_outputs(cell, grads):
    if grads == ("c_n",) and cell != "lstm":
        return
    check_layer(cell, 2, 3 if cell == "lstm" else 0, True, True, torch.float64, grads=grads)


@contextlib.contextmanager
def torch_threads(threads: int):
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(was)


@pytest.mark.parametrize("threads", [1, 3])
def test_blocks_of_units_over_threads(threads, monkeypatch):
    """Each thread runs its own block of hidden units (uneven blocks: H=300 over 3 threads)."""
    monkeypatch.setenv("FASTRNN_CPU_SPLIT", "units")
    with torch_threads(threads):
        for cell in CELLS:
            check_layer(cell, 2, 0, True, True, torch.float32, T=3, B=40, H=300)
        check_layer("lstm", 2, 70, True, True, torch.float32, T=3, B=9, H=150)
        for cell in ("lstm", "gru"):  # bfloat16 products, h rounded per block
            check_layer(cell, 2, 0, True, True, torch.bfloat16, T=3, B=9, H=300)
        check_layer("lstm", 2, 71, True, True, torch.bfloat16, T=3, B=5, H=150)


@pytest.mark.parametrize("threads", [2, 3])
def test_groups_of_rows_over_threads(threads, monkeypatch):
    """Each thread runs its own rows of the batch through every step, forward and backward
    (uneven groups: B=17 over 2 or 3 threads; B=3 over 3: one row each)."""
    monkeypatch.setenv("FASTRNN_CPU_SPLIT", "rows")
    with torch_threads(threads):
        for cell in CELLS:
            check_layer(cell, 2, 0, True, True, torch.float32, T=5, B=17, H=40)
        check_layer("lstm", 1, 0, True, False, torch.float32, T=4, B=3, H=7)
        check_layer("gru", 2, 0, False, True, torch.float64, T=4, B=17, H=33)
        for cell in ("lstm", "gru"):  # bfloat16 products, h rounded per group of rows
            check_layer(cell, 2, 0, True, True, torch.bfloat16, T=3, B=17, H=40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", list(CELLS))
def test_row_and_unit_splits_agree_to_the_bit(cell, dtype, monkeypatch):
    """Rows of the batch or blocks of hidden units (two of 80) per thread: each output entry is
    the same sum in the same order, so the whole module (input projection inside the recurrence,
    packed sequences, both directions) gives the same bits, forward and backward; the default
    split too (rows at this batch when the machine has 2 or more threads)."""
    torch.manual_seed(0)
    model = MODULES[cell](24, 160, bidirectional=True, dtype=dtype, backend="cpu",
                          **({"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}))
    x = torch.randn(7, 24, 24, dtype=dtype)
    lengths = torch.randint(1, 8, (24,))
    lengths[0] = 7

    def run():
        inputs = x.detach().requires_grad_()
        packed = pack_padded_sequence(inputs, lengths, enforce_sorted=False)
        output = pad_packed_sequence(model(packed)[0])[0]
        return [output, *torch.autograd.grad(output.float().square().sum(),
                                             [inputs, *model.parameters()])]

    results = {}
    with torch_threads(2):
        for split in ("units", "rows", None):
            if split is None:
                monkeypatch.delenv("FASTRNN_CPU_SPLIT", raising=False)
            else:
                monkeypatch.setenv("FASTRNN_CPU_SPLIT", split)
            results[split] = run()
    for by_rows, by_units, default in zip(results["rows"], results["units"], results[None]):
        assert torch.equal(by_rows, by_units)
        assert torch.equal(default, by_units)


def test_noncontiguous_x_gates():
    cell = CELLS["gru"]
    x_gates, h0, c0, w_hh, b_hh, w_hr, lengths = layer_inputs("gru", 2, 0, True, True)
    strided = torch.stack([x_gates, x_gates], dim=3)[..., 0]  # last-dim stride 2
    wide = torch.cat([x_gates, torch.zeros_like(x_gates)], dim=2)[:, :, :x_gates.shape[2]]
    expected = CPU.forward(cell, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths)
    for variant in (strided, wide):
        got = CPU.forward(cell, variant, h0, c0, w_hh, b_hh, w_hr, lengths)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("variable", [False, True], ids=["padded", "varlen"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_opcheck(cell, variable):
    x_gates, h0, c0, w_hh, b_hh, w_hr, lengths = cast(
        layer_inputs(cell, 2, 2 if cell == "lstm" else 0, variable, True, T=3, B=3, H=4),
        torch.float32)
    x = torch.randn(x_gates.shape[0], x_gates.shape[1], 5)  # the op projects x [T, B, I]
    w_ih = torch.randn(x_gates.shape[2], 5)
    b_ih = torch.randn(x_gates.shape[2])
    args = [t.requires_grad_() if t is not None and t.is_floating_point() else t
            for t in (x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr)]
    torch.library.opcheck(LAYER_OPS[cell], (*args, lengths, "cpu"))


MODULE_CASES = [
    # cell, layers, bidirectional, proj_size, bias, batch_first, packed
    ("lstm", 2, True, 0, True, False, True),
    ("lstm", 2, True, 3, True, True, False),
    ("lstm", 1, False, 2, False, False, True),
    ("gru", 2, True, 0, True, True, True),
    ("gru", 1, False, 0, False, False, False),
    ("rnn_tanh", 2, True, 0, True, False, True),
    ("rnn_relu", 2, False, 0, False, True, True),
]


@pytest.mark.parametrize("case, dtype", [
    *((case, torch.float64) for case in MODULE_CASES),
    *((case, dtype) for case in MODULE_CASES[1::2] for dtype in (torch.float32, torch.bfloat16)),
], ids=lambda value: "-".join(map(str, value)) if isinstance(value, tuple) else str(value))
def test_module_matches_reference(case, dtype):
    cell, layers, bidirectional, proj_size, bias, batch_first, packed = case
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, bias=bias,
                  batch_first=batch_first, dtype=torch.float64)
    if proj_size:
        kwargs["proj_size"] = proj_size
    if cell.startswith("rnn"):
        kwargs["nonlinearity"] = cell[4:]
    torch.manual_seed(0)
    exact = MODULES[cell](4, 6, backend="reference", **kwargs)
    ours = MODULES[cell](4, 6, backend="cpu", **{**kwargs, "dtype": dtype})
    rounded = MODULES[cell](4, 6, backend="reference", **{**kwargs, "dtype": dtype})
    ours.load_state_dict(exact.state_dict())
    rounded.load_state_dict(exact.state_dict())
    T, B = 7, 5
    x = torch.randn(B, T, 4) if batch_first else torch.randn(T, B, 4)
    x = x.to(dtype).double()  # the same rounded values for all
    lengths = torch.tensor([7, 2, 5, 1, 7])

    def run(module):
        inputs = x.detach().to(next(module.parameters()).dtype).requires_grad_()
        if packed:
            output, state = module(pack_padded_sequence(inputs, lengths, batch_first=batch_first,
                                                        enforce_sorted=False))
            output = pad_packed_sequence(output, batch_first=batch_first)[0]
        else:
            output, state = module(inputs)
        states = state if isinstance(state, tuple) else (state,)
        weights = torch.linspace(-1, 1, output.numel(), dtype=torch.float64).view(output.shape)
        loss = (output.double() * weights).sum() + sum((s.double() ** 2).sum() for s in states)
        loss.backward()
        return [output, *states, inputs.grad] + [p.grad for p in module.parameters()]

    # The input projections around the kernel also run in `dtype`: allow what the reference
    # backend in `dtype` shows too (ReLU kinks make bfloat16 gradients jumpy).
    for got, baseline, want in zip(run(ours), run(rounded), run(exact)):
        assert not got.isnan().any()
        error = relative_error(got, want)
        allowed = max(10 * TOLERANCE[dtype], 2 * relative_error(baseline, want))
        assert error <= allowed, f"error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_a_step_from_no_state_equals_a_step_from_zeros(mode, dtype, poisoned_empty):
    """Without hx a T = 1 call multiplies W_hh by one zero row for all batch rows: bit for bit
    what zeros given as hx give, at every batch size (dot products, ATen, packed GEMMs), an inf
    and a NaN in W_hh turning the same rows to NaN."""
    torch.manual_seed(13)
    for batch in (1, 2, 3, 4, 5, 12, 17):
        layer = getattr(fastrnn, mode)(9, 20).to(dtype)
        with torch.no_grad():
            layer.weight_hh_l0[3, 5] = float("nan")
            layer.weight_hh_l0[-1, 0] = float("inf")
        x = torch.randn(1, batch, 9, dtype=dtype)
        zeros = torch.zeros(1, batch, 20, dtype=dtype)
        with torch.no_grad():
            got = layer(x)
            want = layer(x, (zeros, zeros) if mode == "LSTM" else zeros)
        leaves = torch.utils._pytree.tree_leaves
        for g, w in zip(leaves(got), leaves(want)):
            assert g.isnan().any(), "the NaN reached nothing"
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layers_large_enough_for_the_onednn_gemms(cell):
    """Per-step GEMMs of B64 x H256 x G*H (over 2^23 multiply-adds) take the oneDNN path where
    torch exports it; results must not change."""
    check_layer(cell, 2, 0, True, True, torch.float32, T=3, B=64, H=256)


def test_concurrent_calls_from_python_threads():
    """Layers called from several Python threads at once (each call runs its own team of threads
    meeting at spin barriers) give what they give one at a time."""
    torch.manual_seed(0)
    model = MODULES["lstm"](64, 200, bidirectional=True)
    inputs = [torch.randn(20, 8, 64) for _ in range(4)]
    expected = [model(x)[0].detach() for x in inputs]
    results = {}

    def run(i):
        for _ in range(3):
            output = model(inputs[i])[0]
            torch.autograd.grad(output.sum(), list(model.parameters()))
        results[i] = output.detach()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, output in enumerate(expected):
        torch.testing.assert_close(results[i], output, rtol=0, atol=0)


def test_buffers_are_reused_across_calls_and_freed_on_request():
    """Big buffers (outputs, saved gates, gradients, packed weights) go back to the kernels'
    cache when freed and are handed out again; results do not depend on what a reused block
    held, and cpu.empty_cache() frees the cached blocks."""
    torch.manual_seed(0)
    model = MODULES["lstm"](64, 128)
    x = torch.randn(40, 16, 64, requires_grad=True)  # output 320 KiB, saved gates 1.6 MiB

    def run():
        output = model(x)[0]
        return [output.detach(), *torch.autograd.grad(output.sum(), [x, *model.parameters()])]

    cpu.empty_cache()
    torch.utils.deterministic.fill_uninitialized_memory = False  # reused blocks keep their NaNs
    try:
        first = run()
        expected = [t.clone() for t in first]
        for t in first:
            t.fill_(float("nan"))
        del first
        assert cpu.cached_bytes() > 0
        again = run()
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = True
    for got, want in zip(again, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    again[0].resize_(2 * again[0].numel())  # storages from the cache stay resizable
    del again
    assert cpu.empty_cache() > 0 and cpu.cached_bytes() == 0


@pytest.mark.parametrize("limit_mb", ["0", ""])
def test_buffer_cache_can_be_turned_off(limit_mb):
    """FASTRNN_CPU_CACHE_MB=0 keeps no freed block; unset, the default limit keeps them."""
    code = ("import torch, fastrnn; from fastrnn.backends import cpu; "
            "fastrnn.LSTM(64, 128)(torch.randn(40, 16, 64)); print(cpu.cached_bytes())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTRNN_CPU_CACHE_MB": limit_mb}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (int(run.stdout) == 0) == (limit_mb == "0")


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_bias_gradients_are_separate_tensors(cell):
    """b_ih and b_hh get equal gradients (computed once), in tensors of their own."""
    torch.manual_seed(0)
    model = MODULES[cell](8, 16, bidirectional=True)
    model(torch.randn(5, 3, 8))[0].sum().backward()
    for suffix in ("l0", "l0_reverse"):
        b_ih, b_hh = getattr(model, f"bias_ih_{suffix}"), getattr(model, f"bias_hh_{suffix}")
        torch.testing.assert_close(b_ih.grad, b_hh.grad, rtol=0, atol=0)
        assert b_ih.grad.data_ptr() != b_hh.grad.data_ptr()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_layers_run_in_a_forked_child():
    """A child forked after the parent ran layers (as DataLoader workers are) runs them too, on
    one thread (torch's own ops hang in a child whose parent used OpenMP threads)."""
    torch.manual_seed(0)
    model = MODULES["lstm"](64, 128)
    x = torch.randn(40, 16, 64)
    with torch.no_grad():
        expected = model(x)[0]
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            try:
                torch.set_num_threads(1)
                os._exit(0 if torch.equal(model(x)[0], expected) else 1)
            finally:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_portable_paths_without_avx512(isa):
    """FASTRNN_CPU_ISA runs the kernels as on a CPU without AVX-512: "avx2" (packed GEMMs on
    6x16 AVX2/FMA tiles, weights packed by 8x8 transposes), "generic" (per-step GEMMs on oneDNN
    or MKL with a thread fork per step); both with the compiler-vectorised cells and bfloat16
    layers in float32. This file's, the projection's and the NaN tests pass there too."""
    if isa == "avx2" and cpu.kernel_isa() == "generic":
        pytest.skip("this CPU has no AVX2/FMA")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "FASTRNN_CPU_ISA": isa}
    code = "from fastrnn.backends import cpu; print(cpu.kernel_isa())"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=300)
    assert found.stdout.strip() == isa, found.stdout + found.stderr
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_cpu_backend.py", "tests/test_cpu_input_projection.py",
         "tests/test_nan_propagation.py",
         "-k", "not portable_paths and not forked_child and not buffer_cache"
         " and (cpu or not nan_reaches)"],
        cwd=root, capture_output=True, text=True, env=env, timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
