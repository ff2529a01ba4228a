"""Random differential cases against torch.nn (tests/test_fuzz.py runs them): what a case is, a
hypothesis strategy that draws one, and the rule that judges it.

A case is a recurrence (LSTM, GRU, RNN tanh/relu; 1-3 layers; uni or bi; proj_size; bias;
dropout in train mode) or a cell stepped in a loop, fed padded, batch_first, unbatched or packed
(sorted or not) input with or without hx, called once or twice (the second call fed the first's
state), under grad, no_grad or inference_mode, with weights maybe scaled to saturate the units,
in float64, float32, bfloat16 or float16, on the cpu, torch or reference backend; or an invalid
input of one of several kinds. It runs torch.nn in float64 (the oracle) and in the case's dtype,
and fastrnn from the same state_dict, on the same inputs; the oracle solves the problem as the
case's dtype holds it (weights, inputs and output weightings rounded to that dtype), so that an
error measures the computation, not the rounding of a badly conditioned problem (saturated
units, a ReLU unit near 0).

The rule (README, "Tests"): in float64 fastrnn's outputs and gradients lie within 1e-10 of the
oracle (relative to each tensor's scale); in other dtypes fastrnn's largest error against the
oracle is at most 2x torch.nn's own plus 8 ulp of the tensor's scale (summation order), judged
where torch.nn's result is finite, and a failure counts only when it repeats on at least 3 of 5
draws of data, torch.nn's error there taken as at least how far half an ulp of the weights moves
the exact result and as its own largest error on the same problem with the input features in
another order or with oneDNN off (the problem's own conditioning: how far rounding alone moves
the result). An invalid input must raise what torch.nn raises (type and message), and fastrnn gives no warning
torch.nn does not.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastrnn

TORCH_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}
FAST_CLASSES = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU, "rnn_tanh": fastrnn.RNN,
                "rnn_relu": fastrnn.RNN}
TORCH_CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn_tanh": nn.RNNCell,
               "rnn_relu": nn.RNNCell}
FAST_CELLS = {"lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell, "rnn_tanh": fastrnn.RNNCell,
              "rnn_relu": fastrnn.RNNCell}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
INVALID_KINDS = ("input_dims", "input_size", "hx_shape", "hx_dims", "cx_shape", "input_dtype",
                 "hx_dtype", "weight_dtype", "empty_sequence", "cell_input_size",
                 "cell_state_batch", "cell_state_size", "cell_input_dims")
DRAWS = 5  # draws of data a lower-precision failure is tried on
FLOOR_ULPS = 8


@dataclasses.dataclass(frozen=True)
class Case:
    cell: str
    step_loop: bool  # a cell module stepped over T, instead of a whole recurrence
    layers: int
    bidirectional: bool
    proj_size: int
    bias: bool
    dropout: float
    training: bool
    input_kind: str  # padded | packed_sorted | packed_unsorted | unbatched
    batch_first: bool
    with_hx: bool
    calls: int  # 2: the second call is fed the first call's final state
    grad_mode: str  # grad | no_grad | inference_mode
    saturate: bool
    dtype: str
    backend: str
    batch: int
    seq: int
    input_size: int
    hidden: int
    seed: int
    invalid: str = ""  # one of INVALID_KINDS, or "" for a valid call

    def __str__(self) -> str:
        fields = dataclasses.asdict(self)
        return "Case(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


@st.composite
def cases(draw, backends: tuple[str, ...]) -> Case:
    cell = draw(st.sampled_from(list(TORCH_CLASSES)))
    step_loop = draw(st.booleans()) and draw(st.booleans())  # a quarter of the cases
    hidden = draw(st.sampled_from([1, 2, 5, 7, 8, 13]))
    layers = 1 if step_loop else draw(st.integers(1, 3))
    proj = 0
    if cell == "lstm" and not step_loop and hidden > 1 and draw(st.booleans()):
        proj = draw(st.integers(1, hidden - 1))
    dropout = 0.0 if step_loop or layers == 1 else draw(st.sampled_from([0.0, 0.0, 0.4]))
    input_kind = "padded" if step_loop else draw(st.sampled_from(
        ["padded", "padded", "packed_sorted", "packed_unsorted", "unbatched"]))
    invalid = draw(st.sampled_from(INVALID_KINDS)) if draw(st.integers(0, 9)) == 0 else ""
    if invalid.startswith("cell_"):
        step_loop, layers, proj, dropout, input_kind = True, 1, 0, 0.0, "padded"
    elif invalid:
        step_loop = False
    return Case(
        cell=cell, step_loop=step_loop, layers=layers,
        bidirectional=not step_loop and draw(st.booleans()), proj_size=proj,
        bias=draw(st.booleans()) or draw(st.booleans()), dropout=dropout,
        training=draw(st.booleans()), input_kind=input_kind,
        batch_first=not step_loop and draw(st.booleans()), with_hx=draw(st.booleans()),
        calls=draw(st.sampled_from([1, 1, 2])),
        grad_mode=draw(st.sampled_from(["grad", "grad", "no_grad", "inference_mode"])),
        saturate=draw(st.integers(0, 4)) == 0,
        dtype=draw(st.sampled_from(["float64", "float32", "float32", "bfloat16", "float16"])),
        backend=draw(st.sampled_from(list(backends))), batch=draw(st.integers(1, 5)),
        seq=draw(st.sampled_from([1, 2, 3, 7, 12])), input_size=draw(st.integers(1, 6)),
        hidden=hidden, seed=draw(st.integers(0, 2**16)), invalid=invalid)


# --- running one case -----------------------------------------------------------------------------

def _modules(case: Case):
    """(oracle float64 torch.nn, torch.nn in the case's dtype, fastrnn from its state_dict)."""
    torch.manual_seed(case.seed)
    if case.step_loop:
        kwargs = dict(bias=case.bias)
        if case.cell.startswith("rnn"):
            kwargs["nonlinearity"] = case.cell[4:]
        make = lambda dtype: TORCH_CELLS[case.cell](case.input_size, case.hidden, dtype=dtype,
                                                    **kwargs)
        fast_class = FAST_CELLS[case.cell]
    else:
        kwargs = dict(num_layers=case.layers, bias=case.bias, batch_first=case.batch_first,
                      dropout=case.dropout, bidirectional=case.bidirectional)
        if case.proj_size:
            kwargs["proj_size"] = case.proj_size
        if case.cell.startswith("rnn"):
            kwargs["nonlinearity"] = case.cell[4:]
        make = lambda dtype: TORCH_CLASSES[case.cell](case.input_size, case.hidden, dtype=dtype,
                                                      **kwargs)
        fast_class = FAST_CLASSES[case.cell]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dropout with one layer: both warn
        oracle = make(torch.float64)
        if case.saturate:
            with torch.no_grad():
                for parameter in oracle.parameters():
                    parameter.mul_(4.0)
        theirs = make(DTYPES[case.dtype])
        theirs.load_state_dict(oracle.state_dict())
        oracle.load_state_dict(theirs.state_dict())  # the weights as the case's dtype holds them
        ours = fast_class.from_torch(theirs, backend=case.backend)
    for module in (oracle, theirs, ours):
        module.train(case.training)
    return oracle, theirs, ours


def _inputs(case: Case, data_seed: int):
    """Fresh float64 leaves: x, lengths (packed) or None, hx or None."""
    generator = torch.Generator().manual_seed(data_seed)
    scale = 3.0 if case.saturate else 1.0

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    if case.step_loop:
        x = rand(case.seq, case.batch, case.input_size)
        hx = None
        if case.with_hx:
            hx = ((rand(case.batch, case.hidden), rand(case.batch, case.hidden))
                  if case.cell == "lstm" else rand(case.batch, case.hidden))
        return x, None, hx
    unbatched = case.input_kind == "unbatched"
    if unbatched:
        x = rand(case.seq, case.input_size)
    elif case.batch_first:
        x = rand(case.batch, case.seq, case.input_size)
    else:
        x = rand(case.seq, case.batch, case.input_size)
    lengths = None
    if case.input_kind.startswith("packed"):
        lengths = torch.randint(1, case.seq + 1, (case.batch,), generator=generator)
        lengths[0] = case.seq
        if case.input_kind == "packed_sorted":
            lengths = lengths.sort(descending=True).values
    hx = None
    if case.with_hx:
        rows = case.layers * (2 if case.bidirectional else 1)
        batch = () if unbatched else (case.batch,)
        h0 = rand(rows, *batch, case.proj_size or case.hidden)
        hx = (h0, rand(rows, *batch, case.hidden)) if case.cell == "lstm" else h0
    return x, lengths, hx


def _flat(result) -> list[torch.Tensor]:
    out = []
    for item in result if isinstance(result, tuple) else (result,):
        if isinstance(item, PackedSequence):
            out.append(item.data)
        elif isinstance(item, tuple):
            out.extend(_flat(item))
        else:
            out.append(item)
    return out


def _run(case: Case, module: nn.Module, dtype: torch.dtype, x, lengths, hx):
    """Forward (twice where the case says, the state carried), then in grad mode the gradients
    of a fixed random weighting of every output: {name: tensor}, all float64."""
    leaf = x.detach().to(dtype).requires_grad_(case.grad_mode == "grad")
    state = None if hx is None else (tuple(h.detach().to(dtype) for h in hx)
                                     if isinstance(hx, tuple) else hx.detach().to(dtype))
    context = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad,
               "inference_mode": torch.inference_mode}[case.grad_mode]
    outputs = []
    torch.manual_seed(case.seed + 1)  # the same dropout masks for every module
    with context():
        for _ in range(case.calls):
            if case.step_loop:
                for t in range(leaf.shape[0]):
                    state = module(leaf[t], state)
                    outputs.extend(_flat(state))
                continue
            inp = leaf
            if lengths is not None:
                inp = pack_padded_sequence(leaf, lengths, batch_first=case.batch_first,
                                           enforce_sorted=case.input_kind == "packed_sorted")
            output, state = module(inp, state)
            if lengths is not None:
                output = pad_packed_sequence(output, batch_first=case.batch_first)[0]
            outputs.extend([output, *_flat(state)])
    result = {f"out{i}": o.detach().double() for i, o in enumerate(outputs)}
    if case.grad_mode == "grad":
        generator = torch.Generator().manual_seed(99)
        held = DTYPES[case.dtype]  # weights the case's dtype can hold, for every module
        loss = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(held)
                    .to(o.dtype)).sum() for o in outputs)
        targets = [leaf, *module.parameters()]
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        for index, grad in enumerate(grads):
            result[f"grad{index}"] = None if grad is None else grad.double()
    return result


def _errors(case: Case, data_seed: int, conditioned: bool = False) -> dict:
    """{name: (fastrnn error, torch.nn error, scale)} against the float64 oracle; raises on a
    mismatch of shape or of which gradients exist. conditioned: torch.nn's error is taken as at
    least how far the exact result moves when the weights move by half an ulp of the case's dtype
    (_moved), as its own error with the input features reordered (_reordered) and as its error
    with oneDNN off (_without_onednn): a badly conditioned problem, where torch.nn may land
    closer than its rounding warrants."""
    oracle, theirs, ours = _modules(case)
    x, lengths, hx = _inputs(case, data_seed)
    dtype = DTYPES[case.dtype]

    def held(t):  # the oracle solves the problem as the case's dtype holds it
        return t.to(dtype).double()

    x = held(x)
    hx = None if hx is None else (tuple(map(held, hx)) if isinstance(hx, tuple) else held(hx))
    exact = _run(case, oracle, torch.float64, x, lengths, hx)
    moved = {}
    if conditioned:
        moved = _moved(case, oracle, x, lengths, hx, exact)
        for name, error in (*_reordered(case, theirs, x, lengths, hx, exact).items(),
                            *_without_onednn(case, theirs, x, lengths, hx, exact).items()):
            moved[name] = max(moved.get(name, 0.0), error)
    theirs_result = _run(case, theirs, dtype, x, lengths, hx)
    ours_result = _run(case, ours, dtype, x, lengths, hx)
    assert ours_result.keys() == exact.keys()
    errors = {}
    for name, expected in exact.items():
        got, reference = ours_result[name], theirs_result[name]
        assert (got is None) == (expected is None), f"{name}: gradient None differs"
        if expected is None:
            continue
        assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
        # judged where the dtype holds the exact value and torch.nn's result is finite (a value
        # beyond the dtype's range, or an intermediate one, overflows torch.nn's computation too)
        finite = (torch.isfinite(expected) & (expected.abs() <= torch.finfo(dtype).max)
                  & torch.isfinite(reference))
        assert torch.isfinite(got)[finite].all(), f"{name}: non-finite where torch.nn's is finite"
        lost = ~torch.isfinite(expected) & ~torch.isfinite(reference)  # a NaN or inf carried
        assert not torch.isfinite(got)[lost].any(), f"{name}: finite where torch.nn's is not"
        scale = expected[finite].abs().max().item() if finite.any() else 0.0
        errors[name] = ((got - expected)[finite].abs().max().item() if finite.any() else 0.0,
                        max((reference - expected)[finite].abs().max().item()
                            if finite.any() else 0.0, moved.get(name, 0.0)),
                        scale)
    return errors


def _moved(case: Case, oracle: nn.Module, x, lengths, hx, exact: dict) -> dict:
    """{name: how far the oracle's result moves (at most, over 2 draws) when each weight is
    scaled by 1 + u, u uniform within half an ulp of the case's dtype}."""
    eps = torch.finfo(DTYPES[case.dtype]).eps
    moved: dict = {}
    for draw in range(2):
        nudged = copy.deepcopy(oracle)
        generator = torch.Generator().manual_seed(draw)
        with torch.no_grad():
            for parameter in nudged.parameters():
                parameter.mul_(1 + (torch.rand(parameter.shape, generator=generator,
                                               dtype=torch.float64) - 0.5) * eps)
        for name, value in _run(case, nudged, torch.float64, x, lengths, hx).items():
            _keep_largest(moved, name, value, exact[name])
    return moved


def _keep_largest(errors: dict, name: str, value, expected) -> None:
    """errors[name] = the largest of it and |value - expected| where both are finite."""
    if value is None or expected is None:
        return
    finite = torch.isfinite(value) & torch.isfinite(expected)
    if finite.any():
        errors[name] = max(errors.get(name, 0.0), (value - expected)[finite].abs().max().item())


_FIRST_INPUT_WEIGHTS = {"weight_ih", "weight_ih_l0", "weight_ih_l0_reverse"}  # [G*H, I]


def _reordered(case: Case, theirs: nn.Module, x, lengths, hx, exact: dict) -> dict:
    """{name: torch.nn's largest error (over 3 draws) on the same problem with the input features
    in another order}: the sums over them round in another order, which moves torch.nn's result
    as far as the conditioning of the problem lets it (a 6-term reordering moves a saturated
    float32 GRU's bias gradients 10x)."""
    if case.input_size < 2:
        return {}
    dtype = DTYPES[case.dtype]
    names = [name for name, _ in theirs.named_parameters()]
    errors: dict = {}
    for draw in range(3):
        order = torch.randperm(case.input_size, generator=torch.Generator().manual_seed(draw))
        reordered = copy.deepcopy(theirs)
        with torch.no_grad():  # the first layer's input weights, every direction
            for name, parameter in reordered.named_parameters():
                if name in _FIRST_INPUT_WEIGHTS:
                    parameter.copy_(parameter[:, order])
        result = _run(case, reordered, dtype, x[..., order], lengths, hx)
        back = torch.argsort(order)
        for key, value in result.items():
            index = int(key[4:]) if key.startswith("grad") else None
            if value is not None and (index == 0 or (
                    index is not None and names[index - 1] in _FIRST_INPUT_WEIGHTS)):
                value = value[..., back]
            _keep_largest(errors, key, value, exact[key])
    return errors


def _without_onednn(case: Case, theirs: nn.Module, x, lengths, hx, exact: dict) -> dict:
    """{name: torch.nn's error with oneDNN off}: torch.nn runs a float32 CPU recurrence through
    oneDNN where it can and through ATen's cell ops otherwise, and the two round differently (a
    saturated 1-unit LSTM's input gradient: 7.6e-8 through oneDNN, 2.3e-7 through ATen)."""
    errors: dict = {}
    with torch.backends.mkldnn.flags(enabled=False):
        result = _run(case, theirs, DTYPES[case.dtype], x, lengths, hx)
    for key, value in result.items():
        _keep_largest(errors, key, value, exact[key])
    return errors


def _failures(case: Case, errors: dict) -> list[str]:
    failed = []
    eps = torch.finfo(DTYPES[case.dtype]).eps
    for name, (mine, theirs, scale) in errors.items():
        if case.dtype == "float64":
            if mine > 1e-10 * max(1.0, scale):
                failed.append(f"{name} error {mine:.2e} (float64, scale {scale:.2e})")
        elif mine > 2 * theirs + FLOOR_ULPS * eps * scale:
            failed.append(f"{name} error {mine:.2e} > 2x torch {theirs:.2e} + floor "
                          f"(scale {scale:.2e})")
    return failed


def _invalid_call(case: Case, module: nn.Module, dtype: torch.dtype):
    """Call `module` with the case's invalid input."""
    torch.manual_seed(case.seed)
    lstm = case.cell == "lstm"
    if case.invalid.startswith("cell_"):
        x = torch.randn(case.batch, case.input_size, dtype=dtype)
        h = torch.randn(case.batch, case.hidden, dtype=dtype)
        if case.invalid == "cell_input_size":
            x = torch.randn(case.batch, case.input_size + 1, dtype=dtype)
        elif case.invalid == "cell_state_batch":
            h = torch.randn(case.batch + 1, case.hidden, dtype=dtype)
        elif case.invalid == "cell_state_size":
            h = torch.randn(case.batch, case.hidden + 1, dtype=dtype)
        elif case.invalid == "cell_input_dims":
            x = torch.randn(2, case.batch, case.input_size, dtype=dtype)
        return module(x, (h, h.clone()) if lstm else h)
    rows = case.layers * (2 if case.bidirectional else 1)
    out_size = case.proj_size or case.hidden
    shape = (case.batch, case.seq) if case.batch_first else (case.seq, case.batch)
    x = torch.randn(*shape, case.input_size, dtype=dtype)
    h0 = torch.randn(rows, case.batch, out_size, dtype=dtype)
    c0 = torch.randn(rows, case.batch, case.hidden, dtype=dtype)
    if case.invalid == "input_dims":
        x = torch.randn(2, *shape, case.input_size, dtype=dtype)
    elif case.invalid == "input_size":
        x = torch.randn(*shape, case.input_size + 1, dtype=dtype)
    elif case.invalid == "hx_shape":
        h0 = torch.randn(rows, case.batch + 1, out_size, dtype=dtype)
    elif case.invalid == "hx_dims":
        h0 = torch.randn(case.batch, out_size, dtype=dtype)
    elif case.invalid == "cx_shape":
        c0 = torch.randn(rows, case.batch, case.hidden + 1, dtype=dtype)
    elif case.invalid == "input_dtype":
        x = x.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif case.invalid == "hx_dtype":
        h0 = h0.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif case.invalid == "weight_dtype":
        weight = module.weight_hh_l0
        module.weight_hh_l0 = nn.Parameter(
            weight.detach().to(torch.float64 if dtype != torch.float64 else torch.float32))
    elif case.invalid == "empty_sequence":
        x = torch.randn(*((case.batch, 0) if case.batch_first else (0, case.batch)),
                        case.input_size, dtype=dtype)
    return module(x, (h0, c0) if lstm else h0)


def _invalid_outcome(case: Case, module: nn.Module, dtype: torch.dtype) -> tuple:
    try:
        _invalid_call(case, module, dtype)
    except Exception as error:  # noqa: BLE001 - compared with torch.nn's
        return type(error), str(error).split("\n")[0]
    return None, ""


def check(case: Case) -> None:
    """Judge one case by the rule (module docstring); raises AssertionError naming the case."""
    torch.manual_seed(case.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case.invalid:
            _, theirs, ours = _modules(case)
            dtype = DTYPES[case.dtype]
            expected, got = _invalid_outcome(case, theirs, dtype), _invalid_outcome(case, ours,
                                                                                    dtype)
            if expected[0] is not None and case.invalid in _DIFFERENCES:
                assert got[0] is not None, f"{case}: torch.nn raised {expected}, fastrnn did not"
            elif expected[0] is not None:
                assert got == expected, f"{case}: torch.nn raised {expected}, fastrnn {got}"
            return
        failed = _failures(case, _errors(case, 0))
        if failed and case.dtype != "float64":  # counts only where it repeats on most draws,
            # torch.nn's error taken as at least what half an ulp of the weights, another
            # order of the input features or its kernels without oneDNN move
            repeats = sum(bool(_failures(case, _errors(case, seed, conditioned=True)))
                          for seed in range(DRAWS))
            failed = failed if repeats >= 3 else []
        assert not failed, f"{case}: " + "; ".join(failed)
    ours_warnings = [str(w.message) for w in caught if "fastrnn" in str(w.filename)
                     and "fastrnn" in str(w.message)]
    assert not ours_warnings, f"{case}: fastrnn warned {ours_warnings}"


# Invalid inputs where fastrnn's error is documented to differ from torch.nn's (README, known
# differences): fastrnn raises, with a message of its own where torch's is a library's internal.
_DIFFERENCES = {"hx_dtype", "weight_dtype", "input_dtype"}
