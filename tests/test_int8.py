"""fastrnn's int8 modules (fastrnn.quantized): every option against an oracle of the same
quantization in float64, on each ISA path of the int8 kernels (FASTRNN_CPU_ISA, one child process
each); accuracy against torch's own dynamic int8 modules; the entry points (quantize_int8,
torch's quantize_dynamic); saving, loading, tracing, compiling; errors."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import quantized
from helpers import IN_FRONT_OF_THE_KERNEL, in_front_of_the_kernel

pytestmark = pytest.mark.filterwarnings("ignore:.*torchao.*", "ignore:.*torch.ao.quantization.*")


# ---- the oracle -----------------------------------------------------------------------------
def quantized_rows(x: Tensor) -> Tensor:
    """x [..., K] float32 as the kernels quantize it per row, dequantized, in float64."""
    x = x.float()
    largest = x.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, 127 / largest, torch.zeros_like(largest))
    steps = torch.round(x * inverse).clamp(-127, 127)
    return steps.double() * (largest / 127).double()


def int8_product(x: Tensor, module, name: str) -> Tensor:
    """x [..., K] (quantized per row) times weight `name`'s int8 rows, in float64."""
    return quantized_rows(x) @ module.dequantized_weight(name).double().t()


def oracle(module, x: Tensor, h0: Tensor, c0: Tensor | None, lengths: Tensor | None
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The int8 recurrence of `module` in float64: x [T, B, I], h0 [L*D, B, P], c0 [L*D, B, H],
    lengths [B] or None -> (output [T, B, D*P], h_n, c_n)."""
    mode, H = module.mode, module.hidden_size
    T, B = x.shape[:2]
    directions = 2 if module.bidirectional else 1
    lengths = torch.full((B,), T) if lengths is None else lengths
    h_n, c_n = [], []
    layer_input = x.double()
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            index = layer * directions + direction
            h = h0[index].double()
            c = None if c0 is None else c0[index].double()
            out = torch.zeros(T, B, h.shape[1], dtype=torch.float64)
            order = range(T - 1, -1, -1) if direction else range(T)
            for t in order:
                gx = int8_product(layer_input[t], module, "weight_ih" + suffix)
                gh = int8_product(h, module, "weight_hh" + suffix)
                if module.bias:
                    gx = gx + getattr(module, "bias_ih" + suffix).double()
                    gh = gh + getattr(module, "bias_hh" + suffix).double()
                if mode == "LSTM":
                    i, f, g, o = (gx + gh).chunk(4, 1)
                    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h_new = torch.sigmoid(o) * torch.tanh(c_new)
                    if module.proj_size:
                        h_new = int8_product(h_new, module, "weight_hr" + suffix)
                elif mode == "GRU":
                    xr, xz, xn = gx.chunk(3, 1)
                    hr, hz, hn = gh.chunk(3, 1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + r * hn)
                    h_new, c_new = (1 - z) * n + z * h, None
                else:
                    pre = gx + gh
                    h_new = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
                    c_new = None
                running = (t < lengths).unsqueeze(1)
                h = torch.where(running, h_new, h)
                if c is not None:
                    c = torch.where(running, c_new, c)
                out[t] = torch.where(running, h_new, 0)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, 2)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)


# ---- cases ----------------------------------------------------------------------------------
CASES = {  # name: (class, input_size, hidden_size, constructor kwargs, T, B)
    "lstm": ("LSTM", 7, 13, {}, 9, 3),
    "gru": ("GRU", 7, 13, {}, 9, 3),
    "rnn_tanh": ("RNN", 7, 13, {}, 9, 3),
    "rnn_relu": ("RNN", 7, 13, {"nonlinearity": "relu"}, 9, 3),
    "lstm_h1_b1_t1": ("LSTM", 3, 1, {}, 1, 1),
    "gru_h100_long": ("GRU", 20, 100, {}, 60, 2),
    "lstm_i100_b8": ("LSTM", 100, 64, {}, 5, 8),
    "gru_b17": ("GRU", 10, 24, {}, 6, 17),  # on 2 threads: two groups of rows (8 and 9)
    "lstm_bi_b16": ("LSTM", 10, 40, {"bidirectional": True}, 6, 16),
    "lstm_2layer_bi": ("LSTM", 5, 16, {"num_layers": 2, "bidirectional": True}, 8, 4),
    "gru_bi_batch_first": ("GRU", 5, 16, {"bidirectional": True, "batch_first": True}, 8, 4),
    "lstm_proj": ("LSTM", 6, 20, {"proj_size": 7}, 7, 3),
    "lstm_proj_bi_2layer": ("LSTM", 6, 20, {"proj_size": 7, "bidirectional": True,
                                            "num_layers": 2}, 7, 3),
    "lstm_no_bias": ("LSTM", 6, 12, {"bias": False}, 7, 3),
    "rnn_bi_no_bias": ("RNN", 6, 12, {"bias": False, "bidirectional": True}, 7, 5),
}


def make(case: str, seed: int = 0):
    kind, input_size, hidden, kwargs, T, B = CASES[case]
    torch.manual_seed(seed)
    float_module = getattr(fastrnn, kind)(input_size, hidden, **kwargs)
    return float_module, quantized.int8_module(float_module), T, B


def check_case(case: str, packed: bool, with_state: bool) -> None:
    """The int8 module's outputs against the oracle, for padded or packed input, hx or none."""
    float_module, module, T, B = make(case)
    batch_first = module.batch_first
    x = torch.randn(T, B, module.input_size)
    directions = 2 if module.bidirectional else 1
    P = module.proj_size or module.hidden_size
    h0 = torch.randn(module.num_layers * directions, B, P) if with_state else torch.zeros(
        module.num_layers * directions, B, P)
    c0 = None
    if module.mode == "LSTM":
        c0 = (torch.randn if with_state else torch.zeros)(h0.shape[0], B, module.hidden_size)
    lengths = torch.randint(1, T + 1, (B,)) if packed else None
    if packed:
        lengths[0] = T
    hx = None if not with_state else ((h0, c0) if c0 is not None else h0)
    given = x.transpose(0, 1) if batch_first else x
    if packed:
        given = pack_padded_sequence(given, lengths, batch_first=batch_first, enforce_sorted=False)
    originals = [t.clone() for t in (x, h0, c0) if t is not None]
    with torch.no_grad():
        output, state = module(given, hx)
    for original, passed in zip(originals, [t for t in (x, h0, c0) if t is not None]):
        assert torch.equal(original, passed)  # nothing the caller passed is modified
    if packed:
        output, _ = pad_packed_sequence(output, batch_first=batch_first, total_length=T)
    if batch_first:
        output = output.transpose(0, 1)
    h_n, c_n = state if module.mode == "LSTM" else (state, None)
    want_output, want_h, want_c = oracle(module, x, h0, c0, lengths)
    assert_matches_oracle(output, want_output, T)
    assert_matches_oracle(h_n, want_h, T)
    if c_n is not None:
        assert_matches_oracle(c_n, want_c, T)


def assert_matches_oracle(got: Tensor, want: Tensor, steps: int) -> None:
    """Equal to float32 rounding over a few steps. Over many, the oracle's h (float64) may round
    to the neighbouring int8 step where the kernel's float32 h lies within ~1e-7 of a step's
    midpoint, and the next steps then differ by up to ~1e-3 (test_long_sequences_step_by_step
    checks those steps one by one)."""
    difference = (got.double() - want).abs()
    assert not got.isnan().any() and difference.max() <= (2e-5 if steps <= 10 else 2e-3), (
        difference.max())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("case", CASES)
def test_layers_match_the_int8_oracle(case, packed, with_state):
    check_case(case, packed, with_state)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_long_sequences_step_by_step(kind):
    """Each step of a long sequence from the kernel's own h before it (output t - 1): the same
    int8 steps as the kernel's, so equal to float32 rounding at every step."""
    torch.manual_seed(2)
    module = quantized.int8_module(getattr(fastrnn, kind)(20, 100))
    x = torch.randn(200, 2, 20)
    with torch.no_grad():
        output, _ = module(x)
    h_before = torch.cat([torch.zeros(1, 2, 100), output[:-1]])
    for t in range(200):
        want, _, _ = oracle(module, x[t:t + 1], h_before[t:t + 1], None, None)
        torch.testing.assert_close(output[t].double(), want[0], rtol=0, atol=2e-5)


def check_steps_equal_one_step_calls():
    """A sequence gives bit for bit what calls of one step from its states give (the kernels read
    W_hh last to first on odd steps: the int32 sums are the same)."""
    torch.manual_seed(3)
    for kind, hidden, batch in (("LSTM", 100, 5), ("GRU", 100, 17), ("LSTM", 512, 1),
                                ("RNN", 40, 3)):
        module = quantized.int8_module(getattr(fastrnn, kind)(24, hidden))
        x = torch.randn(5, batch, 24)
        with torch.no_grad():
            output, final = module(x)
            state = None
            for t in range(5):
                step, state = module(x[t:t + 1], state)
                assert torch.equal(step[0], output[t]), (kind, hidden, batch, t)
        for got, want in zip(state if kind == "LSTM" else [state],
                             final if kind == "LSTM" else [final]):
            assert torch.equal(got, want)


def test_steps_equal_one_step_calls():
    check_steps_equal_one_step_calls()


def check_zero_states_read_no_weights():
    """A step whose rows of h are all zero (the first from a zero state) does not read W_hh: a
    zero row's results are bit for bit those the kernels give it beside a nonzero row (which
    reads W_hh), and a weight row with an infinity (a scale of inf) is NaN in both."""
    torch.manual_seed(4)
    for kind, hidden in (("LSTM", 40), ("GRU", 33), ("RNN", 17)):
        float_module = getattr(fastrnn, kind)(12, hidden)
        with torch.no_grad():
            float_module.weight_hh_l0[1, 2] = float("inf")
        module = quantized.int8_module(float_module)
        x = torch.randn(1, 2, 12)
        zeros = torch.zeros(1, 2, hidden)
        mixed = zeros.clone()
        mixed[0, 1] = torch.randn(hidden)
        with torch.no_grad():
            skipped = module(x, (zeros, zeros) if kind == "LSTM" else zeros)
            read = module(x, (mixed, zeros) if kind == "LSTM" else mixed)
        for a, b in zip(torch.utils._pytree.tree_leaves(skipped),
                        torch.utils._pytree.tree_leaves(read)):
            assert a[..., 0, 1].isnan().all() and not a[..., 0, 0].isnan().any()
            torch.testing.assert_close(a[..., 0, :], b[..., 0, :], rtol=0, atol=0,
                                       equal_nan=True)


def test_zero_states_read_no_weights():
    check_zero_states_read_no_weights()


def check_all_cases() -> int:
    """Every case as the test above checks them; the number checked."""
    check_steps_equal_one_step_calls()
    check_zero_states_read_no_weights()
    count = 0
    for case in CASES:
        for packed in (False, True):
            for with_state in (False, True):
                check_case(case, packed, with_state)
                count += 1
    return count


_CHILD = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import torch
torch.set_num_threads(int(sys.argv[1]))
import test_int8
from fastrnn import quantized
print(quantized.int8_kernels(), test_int8.check_all_cases())
"""


@pytest.mark.parametrize("isa,kernels", [("avx2", "avx2"), ("generic", "generic")])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_isa_path(isa, kernels, threads):
    if kernels == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "FASTRNN_CPU_ISA": isa}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(threads)], capture_output=True,
                           text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split()[-2:] == [kernels, str(4 * len(CASES))]


@pytest.mark.parametrize("where", ["plain", "inference_mode", *IN_FRONT_OF_THE_KERNEL,
                                   "jit.trace"])
def test_calls_skip_the_dispatcher_only_where_it_would_run_the_kernel(where):
    """The int8 op's kernel called without the dispatcher (csrc/cpu/direct_calls.cpp) gives
    what the op gives, and leaves every call that something stands in front of to the op
    (None)."""
    quantized._kernels_loaded()
    if not quantized._DIRECT:
        pytest.skip("the kernels were compiled on first use, not built as a module")
    direct = quantized._DIRECT[0]
    torch.manual_seed(5)
    module = quantized.int8_module(fastrnn.LSTM(6, 8))
    x = torch.randn(3, 2, 6)
    h0, c0 = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    weights = module._layer_weights(0)
    want = torch.ops.fastrnn_cpu.layer_forward_int8("lstm", x, h0, c0, weights, True, None)
    tensors = [x, h0, c0]
    results = []
    with contextlib.ExitStack() as stack:
        tensors = in_front_of_the_kernel(where, stack, tensors)
        if where == "jit.trace":
            def record(x):
                results.append(direct("lstm", x, *tensors[1:], weights, True, None))
                return x * 1
            torch.jit.trace(record, (x,), check_trace=False)
            got = results[0]
        else:
            got = direct("lstm", *tensors, weights, True, None)
    if where in ("plain", "inference_mode"):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    else:
        assert got is None


@pytest.mark.parametrize("case", ["lstm", "gru", "rnn_tanh", "lstm_2layer_bi"])
def test_cells_and_unbatched_input_match_the_layers(case):
    float_module, module, T, B = make(case)
    x = torch.randn(T, module.input_size)
    with torch.no_grad():
        batched, _ = module(x.unsqueeze(1))
        unbatched, _ = module(x)
    torch.testing.assert_close(unbatched, batched.squeeze(1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batched", [True, False])
def test_cells_match_a_one_step_layer(kind, batched):
    torch.manual_seed(1)
    cell = getattr(fastrnn, kind)(6, 11)
    int8_cell = quantized.int8_module(cell)
    layer = quantized.int8_module(_layer_of(cell))
    lstm = kind == "LSTMCell"
    x, h, c = torch.randn(4, 6), torch.randn(4, 11), torch.randn(4, 11)
    with torch.no_grad():
        _, state = layer(x.unsqueeze(0), (h[None], c[None]) if lstm else h[None])
        want = (state[0][0], state[1][0]) if lstm else state[0]
        if batched:
            got = int8_cell(x, (h, c) if lstm else h)
        else:  # row 1 alone: the rows are quantized each on its own
            got = int8_cell(x[1], (h[1], c[1]) if lstm else h[1])
            want = (want[0][1], want[1][1]) if lstm else want[1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _layer_of(cell: nn.Module) -> nn.Module:
    kind = type(cell).__name__[:-4]
    layer = getattr(fastrnn, kind)(cell.input_size, cell.hidden_size)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(layer, name + "_l0").data.copy_(getattr(cell, name))
    return layer


# ---- accuracy against torch's dynamic int8 --------------------------------------------------
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("hidden,batch", [(32, 1), (128, 4), (64, 16)])
def test_per_step_error_within_torchs_own_int8_error(kind, hidden, batch):
    torch.manual_seed(hidden + batch)
    reference = getattr(nn, kind)(hidden, hidden, num_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(reference), {getattr(nn, kind)}, dtype=torch.qint8)
    ours = fastrnn.quantize_int8(reference)
    x = torch.randn(50, batch, hidden)
    with torch.no_grad():
        exact = reference.double()(x.double())[0]
        reference.float()
        their_error = (theirs(x)[0].double() - exact).abs().amax(dim=(1, 2))  # per step
        our_error = (ours(x)[0].double() - exact).abs().amax(dim=(1, 2))
    assert (our_error <= their_error).float().mean() >= 0.9, (our_error, their_error)
    assert our_error.max() <= their_error.max()


# ---- entry points ---------------------------------------------------------------------------
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(8, 16, batch_first=True)
        self.decoder = fastrnn.GRU(16, 16, batch_first=True)
        self.cell = fastrnn.RNNCell(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y, _ = self.encoder(x)
        y, h = self.decoder(y)
        return self.head(self.cell(y[:, -1], h[0]))


def test_quantize_int8_replaces_every_recurrence_and_keeps_the_rest():
    torch.manual_seed(0)
    model = Model()
    int8 = fastrnn.quantize_int8(model)
    assert type(int8.encoder) is quantized.LSTM and type(int8.decoder) is quantized.GRU
    assert type(int8.cell) is quantized.RNNCell and type(int8.head) is nn.Linear
    assert type(model.encoder) is nn.LSTM  # the float model is left as it was
    x = torch.randn(3, 7, 8)
    error = quantized.output_error(model, int8, x)
    assert 0 < error["relative_rms"] < 0.02, error
    assert fastrnn.quantize_int8(model, inplace=True) is model
    assert type(model.decoder) is quantized.GRU


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_quantize_dynamic_maps_fastrnn_modules_to_fastrnn_int8(kind):
    from torch.ao.quantization import quantize_dynamic
    torch.manual_seed(0)
    model = nn.Sequential(getattr(fastrnn, kind)(8, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize_dynamic(model, {getattr(fastrnn, kind)}, dtype=torch.qint8)
    assert type(result[0]) is getattr(quantized, kind)
    direct = quantized.int8_module(model[0])
    x = torch.randn(5, 2, 8) if not kind.endswith("Cell") else torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(result[0](x), direct(x), rtol=0, atol=0)


# ---- saving, loading, tracing, compiling ----------------------------------------------------
def test_state_dict_saves_and_loads_with_torch_load_defaults():
    float_module, module, T, B = make("lstm_proj_bi_2layer")
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only=True
    assert state["weight_ih_l0"].dtype == torch.int8
    assert state["weight_ih_l0_scale"].dtype == torch.float32
    assert not any(name.endswith("_sum") for name in state)
    _, fresh, _, _ = make("lstm_proj_bi_2layer", seed=5)
    fresh.load_state_dict(state)
    x = torch.randn(T, B, module.input_size)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    whole = torch.load(buffer)  # the int8 classes are declared safe
    with torch.no_grad():
        torch.testing.assert_close(whole(x), module(x), rtol=0, atol=0)


def test_trace_and_compile_give_the_eager_results():
    float_module, module, T, B = make("gru_bi_batch_first")
    x = torch.randn(B, T, module.input_size)
    with torch.no_grad():
        eager = module(x)
        traced = torch.jit.trace(module, x)
        torch.testing.assert_close(traced(x), eager, rtol=0, atol=0)
        compiled = torch.compile(module, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)


# ---- errors ---------------------------------------------------------------------------------
def test_errors_are_clear():
    float_module, module, T, B = make("lstm")
    x = torch.randn(T, B, module.input_size)
    with pytest.raises(RuntimeError, match="for inference and has no gradients"):
        module(x.requires_grad_())
    with pytest.raises(ValueError, match="does not match weight dtype \\(torch.float32\\)"):
        module(x.detach().double())
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        module(torch.randn(T, B, module.input_size + 1))
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size"):
        module(x.detach(), (torch.zeros(1, B + 1, 13), torch.zeros(1, B + 1, 13)))
    with pytest.raises(TypeError, match="has no fastrnn int8 module"):
        quantized.int8_module(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="float32 CPU modules"):
        quantized.int8_module(fastrnn.LSTM(2, 2, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="no torch.nn twin"):
        module.to_torch()


def test_nan_stays_in_its_row():
    float_module, module, T, B = make("gru")
    x = torch.randn(T, B, module.input_size)
    x[3, 1, 2] = float("nan")
    with torch.no_grad():
        output, h_n = module(x)
    assert output[3:, 1].isnan().all() and not output[:3].isnan().any()
    assert not output[:, [0, 2]].isnan().any() and h_n[0, 1].isnan().all()


def test_torchao_quantize_with_the_fastrnn_config():
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from fastrnn.torchao import Int8DynamicRNNConfig, is_recurrent
    torch.manual_seed(0)
    model = Model()
    expected = fastrnn.quantize_int8(model)
    quantize_(model, Int8DynamicRNNConfig(), filter_fn=is_recurrent)
    assert type(model.encoder) is quantized.LSTM and type(model.cell) is quantized.RNNCell
    assert type(model.head) is nn.Linear
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)


@pytest.mark.parametrize("model", ["lstm", "gru", "bilstm"])
def test_trained_digits_classifiers_keep_their_accuracy(model):
    pytest.importorskip("sklearn")
    from fastrnn.examples import digits
    result = digits.train(model, "rows", "fastrnn", log=lambda line: None)
    assert result.test_accuracy > 0.85
    assert abs(result.int8_test_accuracy - result.test_accuracy) <= 0.005


def test_calls_without_hx_equal_calls_with_zero_hx_across_batch_sizes():
    float_module, module, T, B = make("lstm")
    for batch in (3, 5, 3, 1):
        x = torch.randn(T, batch, module.input_size)
        zeros = torch.zeros(1, batch, module.hidden_size)
        with torch.no_grad():
            output, (h_n, c_n) = module(x)
            h_before = h_n.clone()
            h_n.add_(1)  # the results are the caller's: nothing kept inside changes
            c_n.add_(1)
            want = module(x, (zeros, zeros))
        torch.testing.assert_close(output, want[0], rtol=0, atol=0)
        torch.testing.assert_close(h_before, want[1][0], rtol=0, atol=0)
