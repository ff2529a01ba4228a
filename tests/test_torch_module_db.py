"""torch's own generic module tests (TestModule in torch's test/test_modules.py), run over the
module_db entries of nn.LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell with fastrnn's classes.

Each test mirrors its TestModule namesake on CPU, with the module class swapped for fastrnn's.
Where a test compares outputs, fastrnn runs side by side with a torch.nn twin holding the same
weights (load_state_dict), and outputs and gradients are compared too. A test that the ModuleInfo
skips or expects to fail on CPU, or that fails for torch.nn itself, is skipped with the reason:
every test that passes for torch.nn must pass for fastrnn. CUDA-only tests (test_cpu_gpu_parity,
test_multiple_device_transfer) and test_check_inplace (no `inplace` argument) are not run.
"""

from __future__ import annotations

import io
import os
import sys
import types
import unittest
from copy import deepcopy
from itertools import chain, combinations, product
from operator import methodcaller
from unittest.mock import patch

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

try:  # torch.testing._internal.common_utils imports expecttest, which torch does not ship
    import expecttest  # noqa: F401
except ImportError:
    _stub = types.ModuleType("expecttest")
    _stub.TestCase = unittest.TestCase
    sys.modules["expecttest"] = _stub

_flags_were_frozen = torch.backends.flags_frozen()
from torch._subclasses.meta_utils import assert_metadata_eq  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402
from torch.testing._internal.common_utils import (  # noqa: E402
    freeze_rng_state, get_tensors_from, gradcheck, gradgradcheck, mock_wrapper)

if not _flags_were_frozen:  # common_utils freezes torch.backends flags; undo it for other tests
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

import fastrnn  # noqa: E402

FAST_CLASSES = {nn.LSTM: fastrnn.LSTM, nn.GRU: fastrnn.GRU, nn.RNN: fastrnn.RNN,
                nn.LSTMCell: fastrnn.LSTMCell, nn.GRUCell: fastrnn.GRUCell,
                nn.RNNCell: fastrnn.RNNCell}
MODULE_INFOS = [info for info in module_db if info.module_cls in FAST_CLASSES]
DEVICE = "cpu"
# FASTRNN_MODULE_DB_FULL=1: run the costly tests (grad, gradgrad, non-contiguous, memory format)
# on every module input and parameter, as torch does (minutes); by default on covering subsets.
FULL = os.environ.get("FASTRNN_MODULE_DB_FULL", "") not in ("", "0")
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
# TestModule sets precision = rel_tol = 1e-5: floors on the default atol / rtol of assertEqual.
TOLS = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-5, rtol=1e-5)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny modules run many times slower with threads contending
    for two busy cores."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


# ---- helpers -------------------------------------------------------------------------------
def _close(actual, expected, dtype, msg: str = "", **tols) -> None:
    """assert_close over nested outputs with TestModule's tolerances (or the given ones)."""
    tols = tols or TOLS[dtype]
    torch.testing.assert_close(actual, expected, **tols,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def _traverse(obj, fn):
    """obj with fn applied to every tensor in nested tuples / lists / dicts (others kept)."""
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return type(obj)(_traverse(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _traverse(v, fn) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    return obj


def _clone(obj):
    """A detached copy of every tensor in obj, keeping requires_grad (fresh autograd leaves)."""
    return _traverse(obj, lambda t: t.detach().clone().requires_grad_(t.requires_grad))


def _grads(obj):
    """.grad of every tensor that requires grad in obj (None elsewhere)."""
    return _traverse(obj, lambda t: t.grad if t.requires_grad else None)


def _zero_grad(obj) -> None:
    """Drop the .grad of every tensor in obj."""
    def drop(t):
        t.grad = None
    _traverse(obj, drop)


def _retain_grad(obj) -> None:
    """retain_grad() on every tensor of obj that requires grad (inputs may be non-leaves)."""
    def retain(t):
        if t.requires_grad:
            t.retain_grad()
    _traverse(obj, retain)


def _inputs(info, dtype, training, requires_grad=False, device=DEVICE):
    """The ModuleInputs of info's entry."""
    return info.module_inputs_func(info, device=device, dtype=dtype,
                                   requires_grad=requires_grad, training=training)


def _covering(module_inputs, which: str) -> set[int]:
    """Indices of the module inputs to run: "all"; "none"; "cover": a few that between them
    take every value of every constructor argument and forward-argument count (typically
    all-off and all-on); "pairs": a few that take every pair of such values that occurs.
    Greedy covers; all inputs when there are only a few."""
    everything = set(range(len(module_inputs)))
    if which == "all" or (which != "none" and len(module_inputs) <= 4):
        return everything
    if which == "none":
        return set()

    def features(module_input):
        c, fw = module_input.constructor_input, module_input.forward_input
        single = sorted({("arg", i, repr(v)) for i, v in enumerate(c.args)}
                        | {("kwarg", k, repr(v)) for k, v in c.kwargs.items()}
                        | {("forward", len(fw.args), tuple(sorted(fw.kwargs)))})
        return set(single) if which == "cover" else set(combinations(single, 2))
    todo = [features(module_input) for module_input in module_inputs]
    missing, chosen = set().union(*todo), set()
    while missing:
        best = max(range(len(todo)), key=lambda i: len(todo[i] & missing))
        chosen.add(best)
        missing -= todo[best]
    return chosen


def _subset(info, dtype, training, which: str, requires_grad=False):
    """The ModuleInputs (with a forward input) that _covering picks; all of them when FULL."""
    module_inputs = [mi for mi in _inputs(info, dtype, training, requires_grad=requires_grad)
                     if mi.forward_input is not None]
    chosen = _covering(module_inputs, "all" if FULL else which)
    return [mi for index, mi in enumerate(module_inputs) if index in chosen]


def _twins(cls, info, module_input, dtype, training):
    """(module of cls, torch.nn twin with the same weights), built as TestModule does:
    constructor input, then .to(device).to(dtype), then .train(training)."""
    c = module_input.constructor_input
    ref = info.module_cls(*c.args, **c.kwargs).to(DEVICE).to(dtype).train(training)
    m = cls(*c.args, **c.kwargs).to(DEVICE).to(dtype)
    m.load_state_dict(ref.state_dict())
    return m.train(training), ref


def _backward(out, grad_outputs) -> None:
    """Backpropagate grad_outputs (nested like out) through every output that requires grad."""
    pairs = [(o, g) for o, g in zip(pytree.tree_leaves(out), pytree.tree_leaves(grad_outputs))
             if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], retain_graph=True)


def _compare_backward(m, ref, args, kwargs, dtype, grad_outputs=None):
    """Run m and ref forward and backward on copies of the same inputs; assert outputs, input
    grads and parameter grads agree. Returns (m's output, grad_outputs, m's input copies)."""
    m_in, ref_in = _clone((args, kwargs)), _clone((args, kwargs))
    _retain_grad((m_in, ref_in))
    with freeze_rng_state():
        out = m(*m_in[0], **m_in[1])
    with freeze_rng_state():
        ref_out = ref(*ref_in[0], **ref_in[1])
    _close(out, ref_out, dtype, "forward output differs from torch.nn")
    if grad_outputs is None:
        grad_outputs = _traverse(ref_out, lambda o: torch.randn_like(o))
    _backward(out, grad_outputs)
    _backward(ref_out, grad_outputs)
    _close(_grads(m_in), _grads(ref_in), dtype, "input gradients differ from torch.nn")
    _close({n: p.grad for n, p in m.named_parameters()},
           {n: p.grad for n, p in ref.named_parameters()}, dtype,
           "parameter gradients differ from torch.nn")
    return out, grad_outputs, m_in


def _assert_params_and_buffers_are(module, device, dtype) -> None:
    """Every parameter and buffer of module is on device, floating ones of dtype."""
    device = torch.device(device)
    for kind, items in (("Parameter", module.named_parameters()),
                        ("Buffer", module.named_buffers())):
        for name, item in items:
            assert item.device == device, f"{kind} {name} is on {item.device}, expected {device}"
            if item.dtype.is_floating_point:
                assert item.dtype == dtype, f"{kind} {name} is {item.dtype}, expected {dtype}"


class _Swap:
    """Context: torch.__future__.set_swap_module_params_on_conversion(swap), restored after."""

    def __init__(self, swap: bool) -> None:
        self.swap = swap

    def __enter__(self):
        self.was = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(self.swap)

    def __exit__(self, *exc):
        torch.__future__.set_swap_module_params_on_conversion(self.was)


# ---- the generic tests: check(cls, info, dtype, training, **variant) -----------------------
def check_forward(cls, info, dtype, training):
    """Forward runs, matches torch.nn and the entry's reference_fn (no-batch-dim inputs), and
    .float() / .double() convert the parameters."""
    for module_input in _inputs(info, dtype, training):
        if module_input.forward_input is None:
            continue
        m, ref = _twins(cls, info, module_input, dtype, training)
        args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        with freeze_rng_state():
            outputs = m(*args, **kwargs)
        with freeze_rng_state():
            _close(outputs, ref(*args, **kwargs), dtype, "output differs from torch.nn")
        if module_input.reference_fn is not None:
            with freeze_rng_state():
                # ModuleInput's reference_fn passes m's parameters on by itself
                ref_outputs = module_input.reference_fn(m, *args, **kwargs)
            _close(outputs, ref_outputs, dtype, "output differs from the batched reference_fn")
        methodcaller({torch.float32: "float", torch.float64: "double"}[dtype])(m)
        m(*args, **kwargs)
        _assert_params_and_buffers_are(m, DEVICE, dtype)


def check_factory_kwargs(cls, info, dtype, training):
    """device= / dtype= given to the constructor reach every parameter and buffer it creates."""
    for module_input in _inputs(info, dtype, training):
        c = module_input.constructor_input
        args, kwargs = c.args, dict(c.kwargs)
        creates = False
        parameter_new = mock_wrapper(nn.Parameter.__new__)
        register_buffer = mock_wrapper(nn.Module.register_buffer)
        with patch.object(nn.Parameter, "__new__", parameter_new), \
                patch.object(nn.Module, "register_buffer", register_buffer):
            cls(*args, **kwargs).train(training)
            given = get_tensors_from(args, kwargs)
            for mock in (parameter_new.mock, register_buffer.mock):
                for call_args, call_kwargs in mock.call_args_list:
                    made = get_tensors_from(call_args, call_kwargs)
                    creates = creates or (len(made) > 0 and not given.intersection(made))
        if not creates:
            continue
        kwargs.update(device=DEVICE, dtype=dtype)
        m = cls(*args, **kwargs).train(training)
        _assert_params_and_buffers_are(m, DEVICE, dtype)


def check_repr(cls, info, dtype, training):
    """repr() and str() work (and, for a drop-in, read as torch.nn's)."""
    for module_input in _inputs(info, dtype, training):
        m, ref = _twins(cls, info, module_input, dtype, training)
        m.__repr__()
        str(m)
        assert repr(m) == repr(ref), f"repr {m!r} differs from torch.nn's {ref!r}"


def check_pickle(cls, info, dtype, training):
    """torch.save / torch.load of the whole module gives a module with the same output."""
    for module_input in _inputs(info, dtype, training):
        if module_input.forward_input is None:
            continue
        m, ref = _twins(cls, info, module_input, dtype, training)
        args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        with freeze_rng_state():
            output = m(*args, **kwargs)
            _close(output, ref(*args, **kwargs), dtype, "output differs from torch.nn")
            buffer = io.BytesIO()
            torch.save(m, buffer)
            buffer.seek(0)
            m_copy = torch.load(buffer, weights_only=False)
            assert type(m_copy) is cls
            _close(m_copy(*args, **kwargs), output, dtype, "unpickled module's output differs")


def check_state_dict_round_trip(cls, info, dtype, training):
    """state_dict saved with torch.save loads (weights_only, strict) into fresh fastrnn and
    torch.nn modules in both directions, with torch.nn's keys, and outputs stay equal."""
    for module_input in _inputs(info, dtype, training):
        if module_input.forward_input is None:
            continue
        m, ref = _twins(cls, info, module_input, dtype, training)
        assert list(m.state_dict()) == list(ref.state_dict()), "state_dict keys differ"
        buffer = io.BytesIO()
        torch.save(m.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        fresh_m, fresh_ref = _twins(cls, info, module_input, dtype, training)
        fresh_m.load_state_dict(state)
        fresh_ref.load_state_dict(state)
        args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        with freeze_rng_state():
            expected = ref(*args, **kwargs)
            for who, module in (("reloaded module", fresh_m),
                                ("torch.nn loaded from it", fresh_ref)):
                _close(module(*args, **kwargs), expected, dtype, f"{who}: output differs")


def _make_non_contiguous(obj):
    """obj with every tensor of dim >= 1 replaced by a non-contiguous copy of it."""
    def nc(t):
        if t.dim() == 0:
            return t
        out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
        return out.requires_grad_(t.requires_grad)
    return _traverse(obj, nc)


def check_non_contiguous_tensors(cls, info, dtype, training):
    """Non-contiguous inputs and grad_outputs give the same outputs and gradients (checked
    against torch.nn for contiguous ones)."""
    for module_input in _subset(info, dtype, training, "pairs", requires_grad=True):
        args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        if not any(t.dim() > 0 for t in pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor)):
            continue
        m, ref = _twins(cls, info, module_input, dtype, training)
        default_out, grad_out, default_in = _compare_backward(m, ref, args, kwargs, dtype)
        default_in_grads = deepcopy(_grads(default_in))
        default_param_grads = deepcopy([p.grad for p in m.parameters()])
        # clone() would make the non-contiguous copies contiguous: only the defaults are cloned
        inputs = [_clone((args, kwargs)), _make_non_contiguous((args, kwargs))]
        grads = [grad_out, _make_non_contiguous(grad_out)]
        for (in_args, in_kwargs), g_out in product(inputs, grads):
            _zero_grad((in_args, in_kwargs))
            _zero_grad(list(m.parameters()))
            _retain_grad((in_args, in_kwargs))
            with freeze_rng_state():
                out = m(*in_args, **in_kwargs)
            _backward(out, deepcopy(g_out))
            _close(out, default_out, dtype, "output differs with non-contiguous tensors")
            _close(_grads((in_args, in_kwargs)), default_in_grads, dtype,
                   "input grads differ with non-contiguous tensors", atol=1e-4, rtol=0)
            _close([p.grad for p in m.parameters()], default_param_grads, dtype,
                   "parameter grads differ with non-contiguous tensors")


def _check_gradients(cls, info, dtype, training, check, totals: str, partials: str):
    """gradcheck / gradgradcheck of the total derivative (inputs + all parameters), then of
    each parameter alone (inputs + that parameter), as TestModule._test_gradients_helper does.
    totals / partials: on which module inputs (see _covering)."""
    module_inputs = [mi for mi in _inputs(info, dtype, training, requires_grad=True)
                     if mi.forward_input is not None]
    total_set, partial_set = _covering(module_inputs, totals), _covering(module_inputs, partials)
    for index, module_input in enumerate(module_inputs):
        do_total, do_partials = index in total_set, index in partial_set
        if not (do_total or do_partials):
            continue
        c = module_input.constructor_input
        m = cls(*c.args, **c.kwargs).to(DEVICE).to(dtype).train(training)
        params = tuple(m.parameters())
        input_args, input_kwargs = (module_input.forward_input.args,
                                    module_input.forward_input.kwargs)
        kwarg_tensors = [(k, v) for k, v in input_kwargs.items() if isinstance(v, torch.Tensor)]
        other_kwargs = {k: v for k, v in input_kwargs.items() if not isinstance(v, torch.Tensor)}
        spec = None

        def fn(*flat):
            rebuilt = pytree.tree_unflatten(flat, spec)
            new_args = rebuilt[:len(input_args)]
            new_kwargs = {name: obj for (name, _), obj in
                          zip(kwarg_tensors, rebuilt[len(rebuilt) - len(kwarg_tensors):])}
            with freeze_rng_state():
                return pytree.tree_leaves(m(*new_args, **new_kwargs, **other_kwargs))

        def do_check():
            nonlocal spec
            flat, spec = pytree.tree_flatten(
                input_args + params + tuple(v for _, v in kwarg_tensors))
            assert check(fn, flat, nondet_tol=0.0, fast_mode=info.gradcheck_fast_mode)

        if do_total:
            do_check()
        if do_partials:
            old = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(False)
            for p, was in zip(params, old):
                p.requires_grad_(was)
                do_check()
                p.requires_grad_(False)


def check_grad(cls, info, dtype, training):
    """gradcheck (fast mode, batched grad) over inputs and parameters. By default the total
    derivative on a pairwise-covering few module inputs, the per-parameter ones on fewer."""
    _check_gradients(cls, info, dtype, training, gradcheck, "all" if FULL else "pairs",
                     "all" if FULL else "cover")


def check_gradgrad(cls, info, dtype, training):
    """gradgradcheck (fast mode, batched grad) over inputs and parameters. By default only the
    total derivative, on a covering few module inputs."""
    _check_gradients(cls, info, dtype, training, gradgradcheck, "all" if FULL else "cover",
                     "all" if FULL else "none")


def check_memory_format(cls, info, dtype, training):
    """m.to(memory_format=preserve / contiguous) keeps outputs and grads of the contiguous run
    (itself checked against torch.nn); outputs and input grads are contiguous."""
    for module_input in _subset(info, dtype, training, "pairs", requires_grad=True):
        m, ref = _twins(cls, info, module_input, dtype, training)
        args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        _, grad_outputs, _ = _compare_backward(m, ref, args, kwargs, dtype)
        desired = desired_grads = None
        for module_format in (None, torch.preserve_format, torch.contiguous_format):
            if module_format is not None:
                m.to(memory_format=module_format)
            in_args, in_kwargs = _clone((args, kwargs))
            with freeze_rng_state():
                outputs = m(*in_args, **in_kwargs)
            if desired is None:
                desired = _traverse(outputs, lambda t: t.detach())
            else:
                _close(outputs, desired, dtype, f"output differs after m.to({module_format})")
            for t in pytree.tree_leaves(outputs):
                assert t.is_contiguous(), f"non-contiguous output {tuple(t.shape)} {t.stride()}"
            pairs = [(o, g) for o, g in zip(pytree.tree_leaves(outputs),
                                            pytree.tree_leaves(grad_outputs)) if o.requires_grad]
            if not (training and pairs):
                continue
            diff_in = [t for t in pytree.tree_leaves((in_args, in_kwargs, list(m.parameters())))
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], diff_in,
                                        grad_outputs=[g for _, g in pairs])
            if desired_grads is None:
                desired_grads = grads
            else:
                _close(grads, desired_grads, dtype, f"grads differ after m.to({module_format})")
            for g in grads:
                assert g.is_contiguous(), f"non-contiguous grad {tuple(g.shape)} {g.stride()}"


def check_if_train_and_eval_modes_differ(cls, info, dtype, training):
    """If forward reads .training, the entry must say train_and_eval_differ."""
    for module_input in _inputs(info, dtype, training):
        if module_input.forward_input is None:
            continue
        m, _ = _twins(cls, info, module_input, dtype, training)
        delattr(m, "training")
        args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        try:
            m(*args, **kwargs)
        except AttributeError as error:
            if "'training'" not in str(error):
                raise
            assert info.train_and_eval_differ, (
                f"{info.name} has train_and_eval_differ=False but forward reads .training")


def check_device_ctx_init(cls, info, dtype, training):
    """Built under `with torch.device('meta')`, parameters and buffers are meta tensors with the
    metadata of a CPU-built module."""
    module_inputs = _inputs(info, dtype, training)
    with torch.device("meta"):
        meta_inputs = _inputs(info, dtype, training, device=None)
    for module_input, meta_input in zip(module_inputs, meta_inputs):
        c, c_meta = module_input.constructor_input, meta_input.constructor_input
        m_cpu = cls(*c.args, **c.kwargs)
        with torch.device("meta"):
            m = cls(*c_meta.args, **c_meta.kwargs)
        for p_meta, p_cpu in chain(zip(m.parameters(), m_cpu.parameters()),
                                   zip(m.buffers(), m_cpu.buffers())):
            assert p_meta.is_meta
            assert_metadata_eq(_assert_eq, p_meta, p_cpu)


def _assert_eq(a, b) -> None:
    """The equality assertion assert_metadata_eq calls."""
    assert a == b, f"{a} != {b}"


def check_errors(cls, info, dtype, training):
    """The entry's error inputs raise torch.nn's exception type and message."""
    for error_input in info.module_error_inputs_func(info, device=DEVICE, dtype=dtype,
                                                     requires_grad=False, training=training):
        module_input = error_input.module_error_input
        c = module_input.constructor_input
        if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                cls(*c.args, **c.kwargs)
        elif error_input.error_on == ModuleErrorEnum.FORWARD_ERROR:
            m = cls(*c.args, **c.kwargs)
            fw = module_input.forward_input
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                m(*fw.args, **fw.kwargs)
        else:
            raise NotImplementedError(f"Unknown error_on {error_input.error_on}")


def check_to(cls, info, dtype, training, swap, set_grad):
    """module.to(device, dtype) over the entry's dtypes keeps Parameters (and grads), by .data
    assignment or, with swap, by swap_tensors."""
    with _Swap(swap):
        for module_input in _inputs(info, dtype, training):
            c, fw = module_input.constructor_input, module_input.forward_input
            m = cls(*c.args, **c.kwargs)

            def place(module):  # not module.to(): that is what is tested
                for child in module.children():
                    place(child)
                for name, p in module.named_parameters(recurse=False):
                    new_p = nn.Parameter(p.detach().clone().to(DEVICE, dtype))
                    setattr(module, name, new_p)
                    if set_grad:
                        new_p.grad = torch.randn_like(new_p)
                for name, b in module.named_buffers(recurse=False):
                    setattr(module, name, b.detach().clone().to(DEVICE, dtype))
            place(m)
            if swap and not set_grad and list(m.parameters()):
                out = m(*fw.args, **fw.kwargs)
                (out[0] if isinstance(out, tuple) else out).sum().backward()
                m.to(dtype=torch.half)
                m.to(dtype=torch.float32)
            prev = (DEVICE, dtype)
            for device_, dtype_ in product([DEVICE], info.dtypes):
                g_no_swap = (device_, dtype_) == prev
                prev = (device_, dtype_)
                p_ids = [id(p) for p in m.parameters()]
                p_cdatas = [p._cdata for p in m.parameters()]
                if set_grad:
                    g_ids = [id(p.grad) for p in m.parameters()]
                    g_cdatas = [p.grad._cdata for p in m.parameters()]
                m.to(device=device_, dtype=dtype_)
                params = list(m.parameters())
                assert all(isinstance(p, nn.Parameter) for p in params)
                assert all(p.device.type == device_ and p.dtype == dtype_ for p in params)
                p_ids_after = [id(p) for p in params]
                p_cdatas_after = [p._cdata for p in params]
                if set_grad:
                    assert all(p.grad.device.type == device_ and p.grad.dtype == dtype_
                               for p in params)
                    g_ids_after = [id(p.grad) for p in params]
                    g_cdatas_after = [p.grad._cdata for p in params]
                if swap:
                    assert p_ids == p_ids_after
                    assert all(a != b for a, b in zip(p_cdatas, p_cdatas_after))
                    if set_grad:
                        assert all((a == b) if g_no_swap else (a != b)
                                   for a, b in zip(g_cdatas, g_cdatas_after))
                else:
                    assert p_ids == p_ids_after and p_cdatas == p_cdatas_after
                    if set_grad:
                        assert g_ids == g_ids_after and g_cdatas == g_cdatas_after


def check_to_empty(cls, info, dtype, training, swap):
    """module.to_empty(device) from the meta device gives Parameters on device."""
    with torch.device("meta"):
        module_inputs = _inputs(info, dtype, training, device=None)
    device = torch.device(DEVICE)
    with _Swap(swap):
        for module_input in module_inputs:
            c = module_input.constructor_input
            with torch.device("meta"):
                m = cls(*c.args, **c.kwargs)
            p_ids = [id(p) for p in m.parameters()]
            p_cdatas = [p._cdata for p in m.parameters()]
            m.to_empty(device=device)
            params = list(m.parameters())
            assert all(isinstance(p, nn.Parameter) for p in params)
            assert all(p.device == device and p.dtype == dtype for p in params)
            p_cdatas_after = [p._cdata for p in params]
            assert all(a != b for a, b in zip(p_cdatas, p_cdatas_after))
            if swap:
                assert p_ids == [id(p) for p in params]
            else:
                assert all(a != b for a, b in zip(p_ids, [id(p) for p in params]))


# ---- parametrization -----------------------------------------------------------------------
F32, F64 = torch.float32, torch.float64
# (id, check, torch's test name, dtypes, train_only, variant kwargs)
TESTS = [
    ("test_forward", check_forward, "test_forward", (F32, F64), False, {}),
    ("test_factory_kwargs", check_factory_kwargs, "test_factory_kwargs", (F32, F64), False, {}),
    ("test_repr", check_repr, "test_repr", (F32, F64), False, {}),
    ("test_pickle", check_pickle, "test_pickle", (F32, F64), False, {}),
    ("test_state_dict_round_trip", check_state_dict_round_trip, None, (F32, F64), False, {}),
    ("test_non_contiguous_tensors", check_non_contiguous_tensors, "test_non_contiguous_tensors",
     (F32, F64), False, {}),
    ("test_grad", check_grad, "test_grad", (F64,), False, {}),
    ("test_gradgrad", check_gradgrad, "test_gradgrad", (F64,), False, {}),
    ("test_memory_format", check_memory_format, "test_memory_format", (F32, F64), False, {}),
    ("test_if_train_and_eval_modes_differ", check_if_train_and_eval_modes_differ,
     "test_if_train_and_eval_modes_differ", (F32, F64), True, {}),
    ("test_device_ctx_init", check_device_ctx_init, "test_device_ctx_init", (F32, F64), False, {}),
    ("test_errors", check_errors, "test_errors", (F32, F64), False, {}),
    *[(f"test_to{'_swap' if swap else ''}{'_setgrad' if set_grad else ''}", check_to, "test_to",
       (F32,), False, dict(swap=swap, set_grad=set_grad))
      for swap, set_grad in product((False, True), (False, True))],
    *[(f"test_to_empty{'_swap' if swap else ''}", check_to_empty, "test_to_empty", (F32,), False,
       dict(swap=swap)) for swap in (False, True)],
]


def _cases():
    """pytest params: entry x test x training mode x dtype, with readable ids."""
    for info in MODULE_INFOS:
        short = info.module_cls.__name__
        for name, check, torch_name, dtypes, train_only, variant in TESTS:
            if check is check_gradgrad and not info.supports_gradgrad:
                continue
            if check is check_errors and info.module_error_inputs_func is None:
                continue
            modes = [True] if train_only or not info.train_and_eval_differ else [True, False]
            for training, dtype in product(modes, [d for d in dtypes if d in info.dtypes]):
                mode = "" if len(modes) == 1 else ("-train" if training else "-eval")
                yield pytest.param(info, check, torch_name, dtype, training, variant,
                                   id=f"{short}-{name}{mode}-{str(dtype).split('.')[-1]}")


class _ProbeSelf:
    """Stand-in for a device-specific TestCase instance when probing torch's skip decorators."""

    device_type = DEVICE
    precision = 0.0
    rel_tol = 0.0


def _torch_skip_reason(info, torch_name, dtype, training) -> str | None:
    """Why the ModuleInfo skips torch_name (or expects it to fail) for torch.nn on CPU, if so."""
    if torch_name is None:
        return None
    param_kwargs = {"module_info": info, "dtype": dtype, "training": training}
    for decorator in info.get_decorators("TestModule", torch_name, DEVICE, dtype, param_kwargs):
        def probe(self, *args, **kwargs):
            return None
        decorated = decorator(probe)
        if getattr(decorated, "__unittest_expecting_failure__", False):
            return f"{info.name} {torch_name}: expected failure for torch.nn on CPU (ModuleInfo)"
        if getattr(decorated, "__unittest_skip__", False):
            return f"{info.name} {torch_name}: {decorated.__unittest_skip_why__} (ModuleInfo)"
        try:
            decorated(_ProbeSelf())
        except unittest.SkipTest as skip:
            return f"{info.name} {torch_name}: {skip} (ModuleInfo)"
        except Exception:  # a decorator this probe cannot exercise: run the test
            pass
    return None


@pytest.mark.parametrize("info, check, torch_name, dtype, training, variant", list(_cases()))
def test_module_db(info, check, torch_name, dtype, training, variant):
    """One TestModule test for one entry with fastrnn's class; skipped where torch.nn fails."""
    reason = _torch_skip_reason(info, torch_name, dtype, training)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    try:
        check(FAST_CLASSES[info.module_cls], info, dtype, training, **variant)
    except Exception:
        torch.manual_seed(0)
        try:
            check(info.module_cls, info, dtype, training, **variant)
        except Exception as torch_error:
            pytest.skip(f"fails for torch.nn too: {type(torch_error).__name__}: "
                        f"{str(torch_error).splitlines()[0][:200] if str(torch_error) else ''}")
        raise
