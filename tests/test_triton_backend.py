"""The triton backend against the reference backend: on the GPU when there is one, else on CPU
tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 then, before triton
is first imported).

The interpreter runs the programs of a grid one after another, so a persistent launch with several
programs per direction would spin forever at its first grid barrier. Several programs are tested
(a) with one launch per phase (the barrier's arrival counts carry across launches) and (b) in one
persistent launch with every program in its own thread (`concurrent_programs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import fastrnn  # noqa: E402
from fastrnn.backends import triton as triton_backend  # noqa: E402
from fastrnn.backends.base import LayerConfig  # noqa: E402
from fastrnn.backends.reference import BACKEND as REFERENCE  # noqa: E402
from fastrnn.cells import CELLS  # noqa: E402
from triton_cases import CASES, GPU_SIZES, INTERPRETER_SIZES, MULTI_PROGRAM_CELLS  # noqa: E402


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"
if not INTERPRETING and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)


def _version(text: str) -> tuple[int, int]:
    return tuple(int(part) for part in text.split(".")[:2])


if INTERPRETING and _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
    pytest.skip(f"Triton {triton.__version__}'s interpreter needs numpy < 2.4 (it converts "
                "1-element arrays to Python ints)", allow_module_level=True)
interpreter_only = pytest.mark.skipif(not INTERPRETING, reason="tests the interpreter's thread harness")


pytestmark = pytest.mark.usefixtures("poisoned_empty")


@contextlib.contextmanager
def concurrent_programs(timeout_s: float = 120.0):
    """Run every program of an interpreted launch in its own thread, all at once."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    local = threading.local()
    original_class = type(builder)

    class ThreadLocalGridBuilder(original_class):
        grid_idx = property(lambda self: local.grid_idx,
                            lambda self, value: setattr(local, "grid_idx", value))

    def call(self, *args_dev, **kwargs):
        names = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in names.args or k in names.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        patch_scope = interpreter._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else interpreter._implicit_cvt(arg)
                    for name, arg in args.items()}
            grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
            builder.set_grid_dim(*grid)
            errors = []

            def program(index):
                try:
                    builder.grid_idx = index
                    self.fn(**args)
                except BaseException as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=program, args=((x, y, z),), daemon=True)
                       for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout_s)
            if any(thread.is_alive() for thread in threads):
                raise TimeoutError("programs still spinning: the grid barrier deadlocked")
            if errors:
                raise errors[0]
        finally:
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    builder.__class__ = ThreadLocalGridBuilder
    original_call = interpreter.GridExecutor.__call__
    interpreter.GridExecutor.__call__ = call
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = original_call
        builder.__class__ = original_class


def _layer_inputs(cell, seq_len, batch, hidden, proj, directions, bias, variable, dtype, seed=0):
    """Random layer inputs (requiring grad) and lengths [B] or None; NaN in x_gates past lengths."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype).requires_grad_()

    out_size = proj or hidden
    gate_rows = cell.gates * hidden
    lengths = None
    x_gates = torch.randn(seq_len, batch, directions * gate_rows, generator=generator)
    if variable:
        lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
        lengths[0] = seq_len
        padded = torch.arange(seq_len).unsqueeze(1) >= lengths.unsqueeze(0)
        x_gates[padded] = float("nan")
    x_gates = x_gates.to(DEVICE, dtype).requires_grad_()
    return dict(
        x_gates=x_gates,
        h0=rand(directions, batch, out_size),
        c0=rand(directions, batch, hidden) if cell.has_cell_state else None,
        w_hh=rand(directions, gate_rows, out_size, scale=0.5),
        b_hh=rand(directions, gate_rows) if bias else None,
        w_hr=rand(directions, proj, hidden, scale=0.5) if proj else None,
        lengths=None if lengths is None else lengths.to(DEVICE),
    )


def _run_op(cell, inputs, backend, grad_seed=1):
    """Forward and backward through torch.ops.fastrnn.<cell>_layer: (outputs, input grads).
    The op takes the layer's input and W_ih: x_gates goes in as the input, with an identity
    W_ih (a product that is exact in every dtype, NaN rows staying NaN rows)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    args = {k: leaves.get(k, v) for k, v in inputs.items()}
    op = getattr(torch.ops.fastrnn, f"{cell.name}_layer")
    x_gates = args["x_gates"]
    identity = torch.eye(x_gates.shape[-1], device=x_gates.device, dtype=x_gates.dtype)
    output, h_n, c_n, workspace = op(x_gates, identity, None, args["h0"], args["c0"],
                                     args["w_hh"], args["b_hh"], args["w_hr"], args["lengths"],
                                     backend)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_output = torch.randn(output.shape, generator=generator).to(DEVICE, output.dtype)
    if args["lengths"] is not None:  # the op ignores gradients past each sequence's end
        padded = torch.arange(output.shape[0], device=DEVICE).unsqueeze(1) >= args["lengths"].unsqueeze(0)
        grad_output[padded] = float("nan")
    loss = (output * grad_output).nan_to_num().sum()
    loss = loss + (h_n * torch.randn(h_n.shape, generator=generator).to(DEVICE, h_n.dtype)).sum()
    if cell.has_cell_state:
        loss = loss + (c_n * torch.randn(c_n.shape, generator=generator).to(DEVICE, c_n.dtype)).sum()
    loss.backward()
    outputs = {"output": output, "h_n": h_n, "c_n": c_n, "workspace": workspace}
    return outputs, {k: v.grad for k, v in leaves.items()}


def _assert_close(actual, expected, dtype, what):
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: NaN (an element was not written)"
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance,
                               msg=lambda m: f"{what}: {m}")


def _compare(cell, inputs, dtype, run=None):
    """The triton backend (or `run`, taking the same arguments) against the reference backend."""
    expected_outputs, expected_grads = _run_op(cell, inputs, "reference")
    actual_outputs, actual_grads = (run or _run_op)(cell, inputs, "triton")
    for name, expected in expected_outputs.items():
        _assert_close(actual_outputs[name], expected, dtype, name)
    for name, expected in expected_grads.items():
        _assert_close(actual_grads[name], expected, dtype, f"grad of {name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_layer_matches_reference(case):
    name, seq_len, batch, hidden, proj, directions, bias, variable, dtype = case
    cell = CELLS[name]
    inputs = _layer_inputs(cell, seq_len, batch, hidden, proj, directions, bias, variable, dtype)
    _compare(cell, inputs, dtype)


def _run_with_plan(plan):
    """A `run` for _compare that calls the backend's layer functions with a given plan."""

    def run(cell, inputs, backend):
        original = triton_backend.plan_layer
        triton_backend.plan_layer = lambda config, device, backward=False: plan
        try:
            return _run_op(cell, inputs, backend)
        finally:
            triton_backend.plan_layer = original

    return run


# Several programs per direction (3 of them, triton_cases.MultiProgram): tiny tiles under the
# interpreter, the smallest a GPU compiles on a GPU.
SIZES = INTERPRETER_SIZES if INTERPRETING else GPU_SIZES


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
@pytest.mark.parametrize("name,proj", MULTI_PROGRAM_CELLS)
def test_several_programs_one_launch_per_phase(name, proj, resident):
    """block_k < K: resident weights kept in several K chunks, streamed ones in several loads."""
    cell = CELLS[name]
    plan = SIZES.plan(proj, resident, persistent=False)
    assert plan.num_programs(SIZES.hidden) == 3 and plan.block_k < SIZES.hidden
    inputs = _layer_inputs(cell, 3, SIZES.batch, SIZES.hidden, SIZES.proj if proj else 0, 2, True,
                           True, torch.float32)
    _compare(cell, inputs, torch.float32, run=_run_with_plan(plan))


@pytest.mark.parametrize("name,proj", MULTI_PROGRAM_CELLS)
def test_batch_groups(name, proj):
    """The batch in 2 groups of rows, each with its own 3 programs per direction and its own
    barrier; variable lengths, bidirectional."""
    cell = CELLS[name]
    plan = SIZES.plan(proj, True, persistent=False, batch_groups=2)
    batch = SIZES.grouped_batch
    assert plan.group_rows(batch) == SIZES.group_rows < batch
    assert plan.total_programs(SIZES.hidden, batch, 2) == 12
    inputs = _layer_inputs(cell, 3, batch, SIZES.hidden, SIZES.proj if proj else 0, 2, True, True,
                           torch.float32)
    _compare(cell, inputs, torch.float32, run=_run_with_plan(plan))


@interpreter_only
@pytest.mark.parametrize("name,proj", MULTI_PROGRAM_CELLS)
def test_several_programs_persistent_concurrent(name, proj):
    """One launch for the whole sequence, 3 programs per direction and batch group (2 groups)
    spinning on their barriers."""
    cell = CELLS[name]
    plan = dataclasses.replace(INTERPRETER_SIZES.plan(proj, True, persistent=True, batch_groups=2),
                               block_k=triton_backend.Plan.block_k)
    inputs = _layer_inputs(cell, 3, 3, INTERPRETER_SIZES.hidden,
                           INTERPRETER_SIZES.proj if proj else 0, 2, True, True, torch.float32)
    with concurrent_programs():
        _compare(cell, inputs, torch.float32, run=_run_with_plan(plan))


@interpreter_only
def test_concurrent_harness_runs_programs_at_once():
    """Without the threads, the same persistent launch would deadlock: the harness is real."""
    cell = CELLS["rnn_tanh"]
    plan = triton_backend.Plan(block_h=4, block_r=4, block_b=2, resident=True, persistent=True)
    inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v
              for k, v in _layer_inputs(cell, 2, 2, 8, 0, 1, True, False, torch.float32).items()}
    seen = set()
    with concurrent_programs():
        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        original = type(builder).create_get_program_id

        def record(self, axis):
            seen.add((threading.get_ident(), self.grid_idx))
            return original(self, axis)

        type(builder).create_get_program_id = record
        try:
            triton_backend.forward_layer(cell, *inputs.values(), plan=plan)
        finally:
            type(builder).create_get_program_id = original
    assert len({ident for ident, _ in seen}) == 2  # two programs, each on its own thread


def test_modules_match_torch():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, device=DEVICE)
    module = fastrnn.LSTM.from_torch(reference, backend="triton")
    x = torch.randn(4, 2, 3, device=DEVICE)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 2]))
    expected, (expected_h, expected_c) = reference(packed)
    actual, (actual_h, actual_c) = module(packed)
    torch.testing.assert_close(actual.data, expected.data, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual_h, expected_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual_c, expected_c, atol=1e-5, rtol=1e-5)
    actual.data.sum().backward()
    expected.data.sum().backward()
    for (name, p), q in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)

    gru_reference = torch.nn.GRU(3, 4, batch_first=True, device=DEVICE)
    gru = fastrnn.GRU.from_torch(gru_reference, backend="triton")
    x = torch.randn(2, 3, 3, device=DEVICE)
    torch.testing.assert_close(gru(x)[0], gru_reference(x)[0], atol=1e-5, rtol=1e-5)


@interpreter_only
def test_barrier_timeout_raises_instead_of_hanging(monkeypatch):
    """A persistent launch whose programs are not all resident (the interpreter runs them one by
    one) times out at its first barrier and raises, rather than spinning forever."""
    monkeypatch.setattr(triton_backend, "_INTERPRETER_SPIN_LIMIT", 8)
    cell = CELLS["rnn_tanh"]
    plan = triton_backend.Plan(block_h=4, block_r=4, block_b=2, resident=True, persistent=True)
    inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v
              for k, v in _layer_inputs(cell, 2, 2, 8, 0, 1, True, False, torch.float32).items()}
    with pytest.raises(RuntimeError, match="timed out at its grid barrier"):
        triton_backend.forward_layer(cell, *inputs.values(), plan=plan)


@interpreter_only
@pytest.mark.parametrize("name,proj", [("lstm", 3), ("lstm", 0), ("gru", 0), ("rnn_tanh", 0)])
def test_a_timed_out_launch_hands_back_nan(monkeypatch, name, proj):
    """Once a barrier timed out, every program fills all it owns with NaN: nothing plausible
    comes back from the launch itself, even before the launcher reads the counter and raises."""
    cell = CELLS[name]
    plan = triton_backend.Plan(block_h=4, block_r=2 if proj else 4, block_b=2, resident=True,
                               persistent=True)
    inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v
              for k, v in _layer_inputs(cell, 3, 3, 8, proj, 2, True, True, torch.float32).items()}
    with concurrent_programs():  # a valid forward, to start the backward from
        output, h_n, c_n, workspace = triton_backend.forward_layer(cell, *inputs.values(),
                                                                   plan=plan)
    assert not output.isnan().any() and not h_n.isnan().any()
    monkeypatch.setattr(triton_backend, "_INTERPRETER_SPIN_LIMIT", 8)
    monkeypatch.setattr(triton_backend._BarrierWatch, "_raise_if_timed_out",
                        lambda self, counter, label: None)
    timed_out = triton_backend.forward_layer(cell, *inputs.values(), plan=plan)
    for name_, value in zip(("output", "h_n", "c_n"), timed_out[:3]):
        assert value.isnan().all(), name_
    grad_output = torch.randn_like(output)
    grads = triton_backend.backward_layer(
        cell, grad_output, torch.randn_like(h_n), torch.randn_like(c_n) if c_n.numel() else None,
        inputs["h0"], inputs["c0"], inputs["w_hh"], inputs["w_hr"], inputs["lengths"], output,
        workspace, plan)
    names = ("grad_x_gates", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh", "grad_w_hr")
    for name_, grad in zip(names, grads):
        assert grad.isnan().all(), name_


def _config(name, hidden, proj=0, dtype=torch.float32, directions=2, device_type="cuda"):
    return LayerConfig(cell=CELLS[name], device_type=device_type, dtype=dtype, batch_size=64,
                       seq_len=100, hidden_size=hidden, proj_size=proj,
                       num_directions=directions, variable_lengths=False)


def test_supports():
    backend = triton_backend.BACKEND
    assert backend.supports(_config("lstm", 8))[0]
    assert not backend.supports(_config("lstm", 8, dtype=torch.float64))[0]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        assert backend.supports(_config("lstm", 8, device_type="cpu"))[0]
        patch.delenv("TRITON_INTERPRET")
        ok, reason = backend.supports(_config("lstm", 8, device_type="cpu"))
        assert not ok and "CUDA" in reason
    assert backend.available() == (True, "")


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from fastrnn.backends import triton as t\n"
            "ok, reason = t.BACKEND.available(); assert not ok and 'triton' in reason, reason\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
