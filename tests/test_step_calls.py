"""Step-by-step calls: cells and T = 1 layer calls in eager mode run as one native step
(ops.direct_step: the cpu backend's cell_step, whose native autograd node runs
cell_step_forward and cell_step_backward). Results against
torch.nn in float64, weights updated in place between calls, the paths that must keep the layer
ops, and on a GPU, CUDA-graph capture and the kernel count of a step."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import ops
from fastrnn.backends import cpu as cpu_backend
from helpers import IN_FRONT_OF_THE_KERNEL, in_front_of_the_kernel

pytestmark = pytest.mark.skipif(fastrnn.available_backends().get("cpu") != "",
                                reason="the cpu backend is not built here")

CELLS = {"lstm": (nn.LSTMCell, fastrnn.LSTMCell), "gru": (nn.GRUCell, fastrnn.GRUCell),
         "rnn_tanh": (nn.RNNCell, fastrnn.RNNCell), "rnn_relu": (nn.RNNCell, fastrnn.RNNCell)}
# (B, I, H): B <= 4 multiplies by dot products, B >= 12 by packed_gemm, between by ATen; odd
# sizes, H = 1
SIZES = [(1, 1, 1), (1, 32, 32), (1, 7, 100), (2, 19, 23), (3, 5, 7), (4, 33, 17), (5, 16, 7),
         (12, 3, 5),
         (17, 9, 40), (33, 64, 20)]


def make_cell(name: str, input_size: int, hidden: int, bias: bool = True):
    """A float64 torch.nn cell and a float32 fastrnn copy of it."""
    torch_class, fast_class = CELLS[name]
    kwargs = {"nonlinearity": name[4:]} if name.startswith("rnn") else {}
    reference = torch_class(input_size, hidden, bias=bias, dtype=torch.float64, **kwargs)
    return reference, fast_class.from_torch(reference).float()


def run_cell(module, x, state):
    """(outputs of one step as a tuple, the state for the next)."""
    out = module(x, state)
    return (out if isinstance(out, tuple) else (out,)), out


def random(generator, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


class StepCounter:
    """Counts the native step ops run through ops.direct_step (the forward and backward inside
    the cpu backend's cell_step) and ops.inference_step (layer_step, a forward), as the profiler
    records them."""

    NAMES = {"fastrnn_cpu::cell_step_forward": "forward",
             "fastrnn_cpu::layer_step": "forward",
             "fastrnn_cpu::cell_step_backward": "backward"}

    def __init__(self):
        assert ops._CELL_STEP is not None or ops._load_step_op()
        self.counts = {"forward": 0, "backward": 0}
        self._start()

    def _start(self):
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profile.__enter__()

    def stop(self):
        self._profile.__exit__(None, None, None)
        for event in self._profile.events():
            if event.name in self.NAMES:
                self.counts[self.NAMES[event.name]] += 1

    def _count(self, which: str) -> int:
        self.stop()
        self._start()
        return self.counts[which]

    @property
    def forward(self) -> int:
        return self._count("forward")

    @property
    def backward(self) -> int:
        return self._count("backward")


@pytest.fixture
def steps():
    counter = StepCounter()
    yield counter
    counter.stop()


def _stepped(name, module, dtype, xs, h0, c0):
    """Steps of `module` over xs [T, B, I] from (h0, c0) in `dtype`, then the gradients of
    every input, state and parameter for fixed random output weightings: outputs + gradients."""
    x, h, c = (t.detach().to(dtype).requires_grad_() for t in (xs, h0, c0))
    state = (h, c) if name == "lstm" else h
    outputs = []
    for step in range(xs.shape[0]):
        out, state = run_cell(module, x[step], state)
        outputs += out
    grads = [random(torch.Generator().manual_seed(index), *o.shape, dtype=dtype)
             for index, o in enumerate(outputs)]
    inputs = [x, h] + ([c] if name == "lstm" else []) + list(module.parameters())
    return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, inputs, grads))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("name", CELLS)
def test_cell_step_matches_torch_in_float64(name, size, steps, poisoned_empty):
    """A loop of 3 steps with backward at the end: outputs and every gradient within 2x torch's
    own float32 error against float64, plus a few float32 ulps of the O(1) inputs (a result
    whose values cancel down to 1e-3 has float32 errors of 1e-7 either way)."""
    batch, input_size, hidden = size
    generator = torch.Generator().manual_seed(SIZES.index(size) + 100 * list(CELLS).index(name))
    torch.manual_seed(SIZES.index(size) + 100 * list(CELLS).index(name))  # the weights
    reference, fast = make_cell(name, input_size, hidden)
    torch32 = copy.deepcopy(reference).float()
    xs = random(generator, 3, batch, input_size).requires_grad_()
    h0 = random(generator, batch, hidden).requires_grad_()
    c0 = random(generator, batch, hidden).requires_grad_()

    want = _stepped(name, reference, torch.float64, xs, h0, c0)
    theirs = _stepped(name, torch32, torch.float32, xs, h0, c0)
    ours = _stepped(name, fast, torch.float32, xs, h0, c0)
    assert steps.forward == 3 and steps.backward == 3
    for index, (w, t, o) in enumerate(zip(want, theirs, ours)):
        scale = max(w.abs().max().item(), 1.0)
        torch_error = (t.double() - w).abs().max().item() / scale
        error = (o.double() - w).abs().max().item() / scale
        assert error <= 2 * torch_error + 2e-6, f"result {index}: {error:.3g} vs torch {torch_error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CELLS)
def test_rows_of_a_small_batch_step_are_one_row_steps(name, dtype):
    """At B <= 4 a step multiplies up to 3 rows at once by each weight it reads: each row's
    sums are still those of a step of that row alone, bit for bit."""
    if dtype == torch.bfloat16 and cpu_backend.kernel_isa() == "generic":
        pytest.skip("bfloat16 steps run the layer kernel without AVX2")
    torch.manual_seed(list(CELLS).index(name))
    _, cell = make_cell(name, 37, 45)  # 45 * gates rows: blocks of 8 and a shorter one
    cell = cell.to(dtype)
    with torch.no_grad():
        for batch in (2, 3, 4):
            x, h, c = (torch.randn(batch, size, dtype=dtype) for size in (37, 45, 45))
            state = (h, c) if name == "lstm" else h
            together = cell(x, state)
            for row in range(batch):
                alone = cell(x[row:row + 1], (h[row:row + 1], c[row:row + 1])
                             if name == "lstm" else h[row:row + 1])
                for got, want in zip(together if name == "lstm" else [together],
                                     alone if name == "lstm" else [alone]):
                    assert torch.equal(got[row:row + 1], want), (name, dtype, batch, row)


@pytest.mark.parametrize("size", [(1, 7, 100), (2, 19, 23), (3, 33, 17), (4, 64, 64),
                                  (8, 9, 40)],
                         ids=lambda s: "B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("name", CELLS)
def test_bfloat16_cell_step_matches_torch(name, size, steps):
    """bfloat16 steps run the native step op too (B <= 4: bfloat16 dot products where the CPU
    has them): 3 steps with backward, outputs and gradients within 2x torch.nn's own bfloat16
    error against float64, plus 8 bfloat16 ulps of the result's scale."""
    batch, input_size, hidden = size
    generator = torch.Generator().manual_seed(batch * 1000 + hidden + list(CELLS).index(name))
    torch.manual_seed(batch * 1000 + hidden + list(CELLS).index(name))  # the weights
    reference, _ = make_cell(name, input_size, hidden)
    torch16 = copy.deepcopy(reference).bfloat16()
    fast = CELLS[name][1].from_torch(copy.deepcopy(reference)).bfloat16()
    xs = random(generator, 3, batch, input_size)
    h0 = random(generator, batch, hidden)
    c0 = random(generator, batch, hidden)

    want = _stepped(name, reference, torch.float64, xs, h0, c0)
    theirs = _stepped(name, torch16, torch.bfloat16, xs, h0, c0)
    ours = _stepped(name, fast, torch.bfloat16, xs, h0, c0)
    assert steps.forward == 3 and steps.backward == 3
    eps = torch.finfo(torch.bfloat16).eps
    for index, (w, t, o) in enumerate(zip(want, theirs, ours)):
        assert o.dtype == torch.bfloat16
        allowed = 2 * (t.double() - w).abs().max().item() + 8 * eps * w.abs().max().item()
        error = (o.double() - w).abs().max().item()
        assert error <= allowed, f"result {index}: {error:.3g} vs allowed {allowed:.3g}"


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_cell_step_without_bias_and_unbatched(name, steps):
    reference, fast = make_cell(name, 6, 9, bias=False)
    reference = reference.float()
    x = torch.randn(6)
    for state in (None, (torch.randn(9), torch.randn(9)) if name == "lstm" else torch.randn(9)):
        want, got = reference(x, state), fast(x, state)
        for w, g in zip(want if name == "lstm" else (want,), got if name == "lstm" else (got,)):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert steps.forward == 2


def test_inputs_are_not_modified(steps):
    reference, fast = make_cell("lstm", 5, 8)
    x = torch.randn(2, 5, requires_grad=True)
    h, c = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    grads = torch.randn(2, 8), torch.randn(2, 8)
    before = [t.detach().clone() for t in (x, h, c, *grads, *fast.parameters())]
    h_new, c_new = fast(x, (h, c))
    torch.autograd.backward((h_new, c_new), grads)
    after = [t.detach() for t in (x, h, c, *grads, *fast.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert steps.forward == 1 and steps.backward == 1


def _update_in_place(how: str, torch_cell: nn.Module, fast_cell: nn.Module) -> None:
    """Change the weights of both cells in the same way (the fastrnn cell already ran)."""
    generator = torch.Generator().manual_seed(7)
    if how == "optimizer.step":
        x = torch.randn(3, torch_cell.input_size, generator=generator)
        for cell in (torch_cell, fast_cell):
            optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)
            out = cell(x)
            (out[0] if isinstance(out, tuple) else out).square().sum().backward()
            optimizer.step()
    elif how == "load_state_dict":
        state = {name: torch.randn(p.shape, generator=generator)
                 for name, p in torch_cell.named_parameters()}
        torch_cell.load_state_dict(state)
        fast_cell.load_state_dict(state)
    elif how == "data.copy_":
        new = torch.randn(torch_cell.weight_hh.shape, generator=generator)
        torch_cell.weight_hh.data.copy_(new)
        version = fast_cell.weight_hh._version
        fast_cell.weight_hh.data.copy_(new)
        # the case a cache keyed on the version counter would miss
        assert fast_cell.weight_hh._version == version
    elif how == "no_grad in-place":
        with torch.no_grad():
            for cell in (torch_cell, fast_cell):
                cell.weight_ih.mul_(-1.5)
                cell.bias_hh.add_(0.25)
    elif how == "parameter replaced":
        new = torch.randn(torch_cell.weight_hh.shape, generator=generator)
        torch_cell.weight_hh = nn.Parameter(new.clone())
        fast_cell.weight_hh = nn.Parameter(new.clone())
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("how", ["optimizer.step", "load_state_dict", "data.copy_",
                                 "no_grad in-place", "parameter replaced"])
def test_weights_changed_between_calls_are_used(how, batch, steps):
    """Never a stale weight: after each kind of update the next step equals torch.nn's."""
    torch.manual_seed(0)
    torch_cell = nn.LSTMCell(12, 20)
    fast_cell = fastrnn.LSTMCell.from_torch(torch_cell)
    x = torch.randn(batch, 12)
    state = (torch.randn(batch, 20), torch.randn(batch, 20))
    with torch.no_grad():
        first = fast_cell(x, state)[0]
        torch.testing.assert_close(first, torch_cell(x, state)[0], rtol=1e-5, atol=1e-6)
    _update_in_place(how, torch_cell, fast_cell)
    with torch.no_grad():
        for _ in range(2):  # the call right after the update, and the one after it
            got, want = fast_cell(x, state)[0], torch_cell(x, state)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, first)  # the update changed the result
    assert steps.forward == 3 + (how == "optimizer.step")


class _Negated(nn.Module):
    def forward(self, weight):
        return -weight


@pytest.mark.parametrize("how", ["functional_call", "parametrize", "weight_norm"])
def test_weights_that_are_not_plain_parameters_are_used(how, steps):
    """A step reads its weights from the cell's registered parameters, or where one is not
    registered there, as the attribute torch.nn's cell would read: the weights given to
    functional_call, a parametrization's value, weight_norm's recomputed weight."""
    torch.manual_seed(12)
    torch_cell = nn.GRUCell(5, 6)
    fast_cell = fastrnn.GRUCell.from_torch(torch_cell)
    x, h = torch.randn(3, 5), torch.randn(3, 6)
    with torch.no_grad():
        before = fast_cell(x, h)
        if how == "functional_call":
            weights = {name: torch.randn(p.shape) for name, p in torch_cell.named_parameters()}
            got, want = (torch.func.functional_call(cell, weights, (x, h))
                         for cell in (fast_cell, torch_cell))
        else:
            name = "weight_hh" if how == "parametrize" else "weight_ih"
            for cell in (torch_cell, fast_cell):
                if how == "parametrize":
                    torch.nn.utils.parametrize.register_parametrization(cell, name, _Negated())
                else:
                    torch.nn.utils.parametrizations.weight_norm(cell, name)
                    cell.parametrizations.weight_ih.original0.mul_(1.5)
            assert name not in fast_cell._parameters  # read as an attribute
            got, want = fast_cell(x, h), torch_cell(x, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, before)  # the weights used are not the plain parameters
    assert steps.forward == 2


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch", [1, 32])
def test_one_step_layer_calls_match_torch(mode, batch, steps):
    """T = 1 per call, state carried (and reset), 2 layers, then one backward: outputs, states
    and gradients equal torch.nn's, one native step per layer and call."""
    torch.manual_seed(1)
    torch_layer = getattr(nn, mode)(10, 16, num_layers=2)
    fast_layer = getattr(fastrnn, mode).from_torch(torch_layer)
    xs = torch.randn(4, 1, batch, 10)

    def loop(module):
        x = xs.clone().requires_grad_()
        state, outputs = None, []
        for step in range(xs.shape[0]):
            if step == 2:  # an episode ends: the state starts again from zeros
                state = None
            output, state = module(x[step], state)
            outputs.append(output)
        outputs += list(state) if mode == "LSTM" else [state]
        grads = torch.autograd.grad(outputs, [x, *module.parameters()],
                                    [torch.ones_like(o) for o in outputs])
        return [o.detach() for o in outputs] + list(grads)

    for got, want in zip(loop(fast_layer), loop(torch_layer)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert steps.forward == 8 and steps.backward == 8


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_one_layer_one_step_calls_are_one_native_step(mode, batch_first, bias, steps,
                                                      monkeypatch):
    """A one-layer module called with T = 1 (the module's own one-step path): outputs, states,
    their layouts and gradients equal torch.nn's, with hx given or not, one native step per
    call; hx of another shape or dtype still gets torch.nn's error."""
    torch.manual_seed(2)
    torch_layer = getattr(nn, mode)(7, 9, bias=bias, batch_first=batch_first)
    fast_layer = getattr(fastrnn, mode).from_torch(torch_layer)
    x = torch.randn(3, 1, 7) if batch_first else torch.randn(1, 3, 7)
    shape = (1, 3, 9)
    hx = (torch.randn(shape), torch.randn(shape)) if mode == "LSTM" else torch.randn(shape)

    def run(module, state):
        inputs = [x.clone().requires_grad_()]
        if state is not None:
            state = tuple(s.clone().requires_grad_() for s in state) if mode == "LSTM" \
                else state.clone().requires_grad_()
            inputs += list(state) if mode == "LSTM" else [state]
        output, hidden = module(inputs[0], state)
        results = [output, *(hidden if mode == "LSTM" else [hidden])]
        grads = torch.autograd.grad(results, inputs + list(module.parameters()),
                                    [torch.randn_like(r, generator=torch.Generator().manual_seed(i))
                                     for i, r in enumerate(results)])
        return [r.detach() for r in results] + list(grads)

    def no_layer_path(*args, **kwargs):
        raise AssertionError("a one-step call took the per-layer path")

    for state in (None, hx):
        want = run(torch_layer, state)
        with monkeypatch.context() as patch:
            patch.setattr(fastrnn.modules.functional, "recurrence", no_layer_path)
            got = run(fast_layer, state)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.is_contiguous() == b.is_contiguous()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert steps.forward == 2 and steps.backward == 2

    wrong = torch.randn(1, 2, 9)
    with pytest.raises(RuntimeError) as ours:
        fast_layer(x, (wrong, wrong) if mode == "LSTM" else wrong)
    with pytest.raises(RuntimeError) as theirs:
        torch_layer(x, (wrong, wrong) if mode == "LSTM" else wrong)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError):  # torch's text depends on its kernel (oneDNN or not)
        fast_layer(x, tuple(h.double() for h in hx) if mode == "LSTM" else hx.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_one_step_calls_without_gradients_are_one_native_op(mode, batch_first, bias, dtype,
                                                            steps, monkeypatch):
    """Under no_grad and inference_mode a one-layer T = 1 call is one layer_step op: outputs
    and states, their shapes and layouts, equal torch.nn's, with hx given or not, batch 1 and
    5 and a non-contiguous input; the state passed in is left as it was."""
    torch.manual_seed(3)
    torch_layer = getattr(nn, mode)(7, 9, bias=bias, batch_first=batch_first).to(dtype)
    fast_layer = getattr(fastrnn, mode).from_torch(torch_layer)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2,
                                                                               atol=2e-2)

    def no_layer_path(*args, **kwargs):
        raise AssertionError("a one-step call without gradients took another path")

    calls = 0
    for batch in (1, 5):
        x = torch.randn(7, batch, 1, dtype=dtype).permute(2, 1, 0)  # [1, B, 7], not contiguous
        if batch_first:
            x = x.transpose(0, 1)
        shape = (1, batch, 9)
        hx = ((torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
              if mode == "LSTM" else torch.randn(shape, dtype=dtype))
        for state in (None, hx):
            kept = None if state is None else [t.clone() for t in
                                               (state if mode == "LSTM" else [state])]
            for context in (torch.no_grad, torch.inference_mode):
                with context():
                    want = torch_layer(x, state)
                    with monkeypatch.context() as patch:
                        patch.setattr(fastrnn.modules.functional, "recurrence", no_layer_path)
                        patch.setattr(fastrnn.modules, "direct_step", no_layer_path)
                        got = fast_layer(x, state)
                calls += 1
                got = [got[0], *(got[1] if mode == "LSTM" else [got[1]])]
                want = [want[0], *(want[1] if mode == "LSTM" else [want[1]])]
                for a, b in zip(got, want):
                    assert a.shape == b.shape and a.dtype == b.dtype
                    assert a.is_contiguous() == b.is_contiguous()
                    torch.testing.assert_close(a, b, **tolerance)
                assert got[0].data_ptr() != got[1].data_ptr()
            if kept is not None:
                for before, after in zip(kept, state if mode == "LSTM" else [state]):
                    assert torch.equal(before, after)
    assert steps.forward == calls and steps.backward == 0


def test_one_step_layer_output_and_h_n_are_separate(steps):
    layer = fastrnn.GRU(4, 6)
    with torch.no_grad():
        output, h_n = layer(torch.randn(1, 2, 4))
    kept = h_n.clone()
    output.add_(1.0)
    assert torch.equal(h_n, kept)
    assert steps.forward == 1


def _fresh_state(name: str, batch: int, hidden: int, seed: int):
    """(state for the cell, the tensors in it), leaves that require grad."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn(batch, hidden, generator=generator).requires_grad_()
             for _ in range(2 if name == "lstm" else 1)]
    return (tuple(parts) if name == "lstm" else parts[0]), parts


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", CELLS)
def test_double_backward_through_a_step(name, steps):
    """create_graph=True: the backward recomputes in torch's differentiable cell ops; second
    derivatives match torch.nn's."""
    torch.manual_seed(2)
    torch_cell, fast_cell = (c.float() for c in make_cell(name, 3, 4))
    x = torch.randn(2, 3)

    def second(cell):
        state, parts = _fresh_state(name, 2, 4, 3)
        (grad_h,) = torch.autograd.grad(_first(cell(x, state)).square().sum(), parts[0],
                                        create_graph=True)
        return torch.autograd.grad(grad_h.sum(), [*parts, *cell.parameters()],
                                   allow_unused=True)

    for got, want in zip(second(fast_cell), second(torch_cell)):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # one native backward: the second derivative through the first one's grad_output (2 h')
    assert steps.forward == 1 and steps.backward == 1


@pytest.mark.parametrize("name", CELLS)
def test_batched_gradients_through_a_step(name, steps):
    """is_grads_batched=True (vmap over the backward): the step is recomputed in torch's cell
    ops, which batch; every row equals torch.nn's gradient for that row's grad_output."""
    torch.manual_seed(6)
    torch_cell, fast_cell = (c.float() for c in make_cell(name, 5, 7))
    x = torch.randn(3, 5, requires_grad=True)
    grad_rows = torch.randn(4, 3, 7)

    def batched(cell):
        state, parts = _fresh_state(name, 3, 7, 8)
        return torch.autograd.grad(_first(cell(x, state)), [x, *parts, *cell.parameters()],
                                   grad_rows, is_grads_batched=True)

    for got, want in zip(batched(fast_cell), batched(torch_cell)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert steps.forward == 1 and steps.backward == 0


def test_a_step_uses_saved_tensor_hooks_and_checkpointing():
    """The step's node saves through torch.autograd.graph's hooks: packed and unpacked by them,
    and recomputed under non-reentrant checkpointing, with torch.nn's gradients."""
    torch.manual_seed(9)
    torch_cell, fast_cell = (c.float() for c in make_cell("lstm", 6, 5))
    xs = torch.randn(4, 2, 6)

    def loop(cell, step):
        x = xs.clone().requires_grad_()
        state, parts = _fresh_state("lstm", 2, 5, 10)
        for t in range(xs.shape[0]):
            state = step(cell, x[t], state)
        loss = state[0].square().sum() + state[1].sum()
        return torch.autograd.grad(loss, [x, *parts, *cell.parameters()])

    def plain(cell, x, state):
        return cell(x, state)

    def checkpointed(cell, x, state):
        return torch.utils.checkpoint.checkpoint(cell, x, state, use_reentrant=False)

    packed = []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor.clone()

    want = loop(torch_cell, plain)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hooked = loop(fast_cell, plain)
    assert torch.Size([2, 25]) in packed  # the step's workspace [B, 5 H] went through them
    for got in (hooked, loop(fast_cell, checkpointed)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_step_reports_misuse_as_torch_does(steps):
    """A saved input changed in place, and a second backward without retain_graph, raise
    torch's errors; retain_graph=True allows the second backward."""
    _, cell = make_cell("gru", 4, 3)
    x, h = torch.randn(2, 4, requires_grad=True), torch.randn(2, 3)
    out = cell(x, h)
    with torch.no_grad():
        x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = cell(x, h)
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    assert steps.forward == 2 and steps.backward == 2


@pytest.mark.parametrize("name", CELLS)
def test_a_step_in_inference_mode_and_with_one_output_used(name, steps):
    """torch.inference_mode runs the step below autograd; an LSTM step whose c' is unused gets
    no gradient for it (an undefined one, not zeros) and torch.nn's gradients."""
    torch_cell, fast_cell = (c.float() for c in make_cell(name, 5, 6))
    x = torch.randn(3, 5)
    state, parts = _fresh_state(name, 3, 6, 11)
    with torch.inference_mode():
        for g, w in zip(fast_cell(x, state), torch_cell(x, state)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    got, want = (torch.autograd.grad(_first(cell(x, state)).sum(), [*parts, *cell.parameters()])
                 for cell in (fast_cell, torch_cell))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert steps.forward == 2 and steps.backward == 1


def test_threads_split_the_units_without_changing_a_bit(steps):
    """Above the work threshold a step splits its hidden units over threads; every unit's sums
    are the same on any number of threads (B <= 4 and B >= 12, weights below 5 MiB: fastrnn's
    own products)."""
    if cpu_backend.kernel_isa() == "generic":
        pytest.skip("without AVX2 a step runs the layer kernel, on products split by ATen")
    torch.manual_seed(4)
    # above the 4 M multiply-adds from which a step splits: B1 I768 H768 (4.7 M), and B33 I100
    # H150 (4.9 M, 600 KB of weights)
    for batch, input_size, hidden in ((1, 768, 768), (33, 100, 150)):
        cell = fastrnn.LSTMCell(input_size, hidden)
        x, h, c = (torch.randn(batch, size) for size in (input_size, hidden, hidden))
        threads = torch.get_num_threads()
        results = []
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                with torch.no_grad():
                    results.append(cell(x, (h, c)))
        finally:
            torch.set_num_threads(threads)
        for result in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


@pytest.mark.parametrize("where", ["reference backend", "float64", "empty batch", "jit.trace",
                                   "torch.func.vmap", "torch.compile"])
def test_paths_that_keep_the_layer_ops(where, steps, monkeypatch):
    """Where the direct step must not run, the layer ops do, with torch.nn's results."""
    torch.manual_seed(5)
    torch_cell = nn.LSTMCell(3, 5)
    fast_cell = fastrnn.LSTMCell.from_torch(torch_cell)
    x = torch.randn(2, 3)
    if where == "reference backend":
        monkeypatch.setenv("FASTRNN_BACKEND", "reference")
    if where == "float64":
        torch_cell, fast_cell, x = torch_cell.double(), fast_cell.double(), x.double()
    if where == "empty batch":
        x = x[:0]
    run = fast_cell
    if where == "jit.trace":
        run = torch.jit.trace(fast_cell, (x,), check_trace=False)
    if where == "torch.func.vmap":
        def run(inputs):
            return torch.func.vmap(fast_cell)(inputs)
        x = x.unsqueeze(1)
    if where == "torch.compile":
        run = torch.compile(fast_cell, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = run(x)
        if where == "torch.func.vmap":  # torch.nn's cell has no batching rule: sample by sample
            want = [torch.stack(parts) for parts in zip(*(torch_cell(sample) for sample in x))]
        else:
            want = torch_cell(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert steps.forward == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", CELLS)
def test_torch_step_is_torch_nn_step(name, bias):
    """ops.torch_step, the CUDA step path, wired to torch.nn's own step (checked on the CPU)."""
    reference, _ = make_cell(name, 5, 6, bias=bias)
    reference = reference.float()
    x, h, c = torch.randn(3, 5), torch.randn(3, 6), torch.randn(3, 6)
    cell = fastrnn.cells.CELLS[name]
    got = ops.torch_step(cell, x, h, c if cell.has_cell_state else None, reference.weight_ih,
                         reference.weight_hh, reference.bias_ih, reference.bias_hh)
    want = reference(x, (h, c)) if cell.has_cell_state else (reference(x, h), None)
    for g, w in zip(got, want):
        assert (g is None and w is None) or torch.equal(g, w)


# ---- GPU: CUDA-graph capture of a step loop, and the kernels of a step -------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_cuda_graph_capture_of_a_step_loop(name):
    torch.manual_seed(6)
    _, fast = make_cell(name, 16, 32)
    cell = fast.cuda()
    x = torch.randn(8, 4, 16, device="cuda")
    h0 = torch.randn(4, 32, device="cuda")
    state0 = (h0, torch.randn(4, 32, device="cuda")) if name == "lstm" else h0

    def loop():
        state = state0
        for step in range(x.shape[0]):
            state = cell(x[step], state)
        return state

    with torch.no_grad():
        eager = loop()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (Triton compiles, allocator pools) off-graph
            loop()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = loop()
        graph.replay()
        torch.cuda.synchronize()
    for got, want in zip(captured if name == "lstm" else (captured,),
                         eager if name == "lstm" else (eager,)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _kernels_per_step(module, x, state) -> int:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            module(x, state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                module(x, state)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) // 10


@cuda
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_a_cuda_step_launches_no_more_kernels_than_torch(name):
    reference, fast = make_cell(name, 64, 128)
    torch_cell, fast_cell = reference.float().cuda(), fast.cuda()
    x = torch.randn(8, 64, device="cuda")
    h = torch.randn(8, 128, device="cuda")
    state = (h, torch.randn(8, 128, device="cuda")) if name == "lstm" else h
    ours, theirs = _kernels_per_step(fast_cell, x, state), _kernels_per_step(torch_cell, x, state)
    print(f"{name} cell step on CUDA: fastrnn {ours} kernels, torch.nn {theirs}")
    assert ours <= theirs


# ---- steps without gradients call the kernel without the dispatcher (direct_calls.cpp) -------
def _no_op_call(*args, **kwargs):
    raise AssertionError("the step ran the op through the dispatcher")


@pytest.fixture
def direct_steps():
    """ops' functions that skip the dispatcher, loaded (the extension is a module here)."""
    assert ops._CELL_STEP is not None or ops._load_step_op()
    if ops._LAYER_STEP_DIRECT is None:
        pytest.skip("the kernels were compiled on first use, not built as a module")
    return ops._LAYER_STEP_DIRECT, ops._CELL_STEP_DIRECT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_steps_without_gradients_skip_the_dispatcher(mode, dtype, direct_steps, monkeypatch,
                                                     poisoned_empty):
    """Under no_grad and inference_mode, and on tensors that want no gradient, a T = 1 layer
    call and a cell step run without the ops (made to raise here) and give what they give;
    with a gradient wanted they run the ops."""
    torch.manual_seed(11)
    layer = getattr(fastrnn, mode)(6, 8).to(dtype)
    cell = getattr(fastrnn, mode + "Cell")(6, 8).to(dtype)
    x = torch.randn(1, 3, 6, dtype=dtype)
    hx = torch.randn(1, 3, 8, dtype=dtype)
    layer_state = (hx, hx.neg()) if mode == "LSTM" else hx
    cell_state = (hx[0], hx[0].neg()) if mode == "LSTM" else hx[0]
    with torch.no_grad():  # through the ops
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            want = [layer(x, layer_state), layer(x), cell(x[0], cell_state)]
    monkeypatch.setattr(ops, "_LAYER_STEP", _no_op_call)
    monkeypatch.setattr(ops, "_CELL_STEP", _no_op_call)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = [layer(x, layer_state), layer(x), cell(x[0], cell_state)]
        assert torch.equal(torch.cat([t.flatten() for t in pytree_leaves(got)]),
                           torch.cat([t.flatten() for t in pytree_leaves(want)]))
    for parameter in (*layer.parameters(), *cell.parameters()):
        parameter.requires_grad_(False)
    assert torch.equal(layer(x, layer_state)[0], want[0][0])
    for parameter in (*layer.parameters(), *cell.parameters()):
        parameter.requires_grad_(True)
    with pytest.raises(AssertionError, match="through the dispatcher"):
        layer(x, layer_state)  # a gradient wanted: the differentiable op (here the cell step's)


def pytree_leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


@pytest.mark.parametrize("where", [*IN_FRONT_OF_THE_KERNEL, "torch.func.vmap", "jit.trace",
                                   "float64", "two dtypes", "empty batch"])
def test_direct_steps_leave_calls_to_the_dispatcher(where, direct_steps):
    """Where anything stands between an op call and its CPU kernel, or the kernel does not take
    the tensors, the functions return None (the caller runs the op); otherwise what the ops
    give."""
    layer_step, cell_step = direct_steps
    torch.manual_seed(12)
    x, h, c = torch.randn(3, 5), torch.randn(3, 4), torch.randn(3, 4)
    w_ih, w_hh, b_ih, b_hh = torch.randn(16, 5), torch.randn(16, 4), torch.randn(16), \
        torch.randn(16)

    def calls(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return [layer_step("lstm", x[None], h[None], c[None], w_ih, w_hh, b_ih, b_hh, False),
                layer_step("lstm", x[None], None, None, w_ih, w_hh, b_ih, b_hh, False),
                cell_step("lstm", x, h, c, w_ih, w_hh, b_ih, b_hh)]

    tensors = [x, h, c, w_ih, w_hh, b_ih, b_hh]
    with torch.no_grad():
        plain = calls(*tensors)
        ops_results = [
            torch.ops.fastrnn_cpu.layer_step("lstm", x[None], h[None], c[None], w_ih, w_hh, b_ih,
                                             b_hh, False),
            torch.ops.fastrnn_cpu.layer_step("lstm", x[None], None, None, w_ih, w_hh, b_ih, b_hh,
                                             False),
            torch.ops.fastrnn_cpu.cell_step_forward("lstm", x, h, c, w_ih, w_hh, b_ih, b_hh,
                                                    False)[:2]]
    for got, want in zip(plain, ops_results):
        assert all(torch.equal(g, w) for g, w in zip(got, want))

    results = []
    with contextlib.ExitStack() as stack:
        tensors = in_front_of_the_kernel(where, stack, tensors)
        if where == "float64":
            tensors = [t.double() for t in tensors]
        elif where == "two dtypes":
            tensors[3] = w_ih.double()
        elif where == "empty batch":
            tensors[:3] = [t[:0] for t in tensors[:3]]
        if where == "torch.func.vmap":
            def record(x):
                results.extend(calls(x, *tensors[1:]))
                return x
            torch.func.vmap(record)(x[None])
        elif where == "jit.trace":
            def record(x):
                results.extend(calls(x, *tensors[1:]))
                return x * 1
            torch.jit.trace(record, (x,), check_trace=False)
        else:
            results = calls(*tensors)
    assert results == [None, None, None]
