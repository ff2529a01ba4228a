"""Shared test helpers: build torch.nn / fastrnn pairs, run them on the same inputs, compare."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn

TORCH_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}
FAST_CLASSES = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU, "rnn_tanh": fastrnn.RNN, "rnn_relu": fastrnn.RNN}


def cpu_backends() -> list[str]:
    """Backends that run CPU tensors in this build (reference and torch always; cpu once
    built)."""
    available = fastrnn.available_backends()
    return [name for name in ("reference", "torch", "cpu") if available.get(name) == ""]


def every_backend_here() -> list[str]:
    """The CPU backends, and triton where its interpreter runs CPU tensors (TRITON_INTERPRET=1,
    set by conftest.py without a GPU)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    triton = interpreting and fastrnn.available_backends().get("triton") == ""
    return cpu_backends() + (["triton"] if triton else [])


@dataclasses.dataclass
class Case:
    """One configuration of the parity matrix."""

    cell: str
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    input_kind: str = "padded"  # padded | packed_sorted | packed_unsorted | unbatched
    with_hx: bool = False
    bias: bool = True
    proj_size: int = 0
    batch: int = 3
    seq: int = 5
    input_size: int = 4
    hidden: int = 5

    @property
    def id(self) -> str:
        parts = [self.cell, f"L{self.layers}", "bi" if self.bidirectional else "uni",
                 self.input_kind, f"B{self.batch}", f"T{self.seq}", f"H{self.hidden}"]
        if self.batch_first:
            parts.append("bf")
        if self.with_hx:
            parts.append("hx")
        if not self.bias:
            parts.append("nobias")
        if self.proj_size:
            parts.append(f"proj{self.proj_size}")
        return "-".join(parts)

    def torch_module(self, dtype=torch.float64) -> nn.Module:
        kwargs = dict(num_layers=self.layers, bias=self.bias, batch_first=self.batch_first,
                      bidirectional=self.bidirectional, dtype=dtype)
        if self.proj_size:
            kwargs["proj_size"] = self.proj_size
        if self.cell.startswith("rnn"):
            kwargs["nonlinearity"] = self.cell[4:]
        return TORCH_CLASSES[self.cell](self.input_size, self.hidden, **kwargs)


def make_inputs(case: Case, dtype: torch.dtype, generator: torch.Generator):
    """Fresh random inputs for a case: (x, lengths or None, hx or None), all leaves."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()

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
        lengths[torch.randint(0, case.batch, (1,), generator=generator)] = case.seq
        if case.input_kind == "packed_sorted":
            lengths = lengths.sort(descending=True).values
    hx = None
    if case.with_hx:
        layers = case.layers * (2 if case.bidirectional else 1)
        batch = () if unbatched else (case.batch,)
        out_size = case.proj_size or case.hidden
        h0 = rand(layers, *batch, out_size)
        hx = (h0, rand(layers, *batch, case.hidden)) if case.cell == "lstm" else h0
    return x, lengths, hx


_OUTPUT_NAMES = ("output", "h_n", "c_n")


def loss_weight(name: str, shape, seed: int) -> torch.Tensor:
    """A fixed random float64 weight per output, so every gradient is non-trivial."""
    generator = torch.Generator().manual_seed(seed * 10 + _OUTPUT_NAMES.index(name))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64)


def run(module: nn.Module, case: Case, x, lengths, hx, seed: int = 0):
    """Forward, then gradients of a random-weighted sum of every output.

    Returns a dict name -> tensor: output (padded), h_n, [c_n], and grad_* for x, hx and params.
    """
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, lengths, batch_first=case.batch_first,
                                   enforce_sorted=case.input_kind == "packed_sorted")
    output, hidden = module(inp, hx)
    if isinstance(output, PackedSequence):
        output = torch.nn.utils.rnn.pad_packed_sequence(output, batch_first=case.batch_first)[0]
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    results = dict(zip(_OUTPUT_NAMES, (output, *states)))
    loss = sum((value * loss_weight(name, value.shape, seed).to(value.dtype)).sum()
               for name, value in results.items())
    leaves = {"x": x}
    if hx is not None:
        leaves.update({"h0": hx[0], "c0": hx[1]} if isinstance(hx, tuple) else {"h0": hx})
    leaves.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results.update({f"grad_{name}": grad for name, grad in zip(leaves, grads)})
    return {name: value.detach() for name, value in results.items()}


def detached_copy(x, hx, dtype):
    """Fresh leaves of the given dtype with the values of x and hx."""
    def conv(t):
        return t.detach().to(dtype).requires_grad_()
    if hx is not None:
        hx = tuple(map(conv, hx)) if isinstance(hx, tuple) else conv(hx)
    return conv(x), hx


def _with_lengths(x_hx, lengths):
    return x_hx[0], lengths, x_hx[1]


def compare_with_torch(case: Case, dtype: torch.dtype, backend: str, seed: int = 0):
    """Run torch.nn in float64 (the oracle) and in `dtype`, and fastrnn in `dtype`.

    Returns {name: (fastrnn max error, torch max error)} against the float64 oracle.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    oracle_module = case.torch_module(torch.float64)
    torch_module = case.torch_module(dtype)
    torch_module.load_state_dict(oracle_module.state_dict())
    fast_module = FAST_CLASSES[case.cell].from_torch(torch_module, backend=backend)
    x, lengths, hx = make_inputs(case, torch.float64, generator)
    oracle = run(oracle_module, case, *_with_lengths(detached_copy(x, hx, torch.float64), lengths), seed)
    theirs = run(torch_module, case, *_with_lengths(detached_copy(x, hx, dtype), lengths), seed)
    ours = run(fast_module, case, *_with_lengths(detached_copy(x, hx, dtype), lengths), seed)
    assert ours.keys() == oracle.keys()
    errors = {}
    for name, expected in oracle.items():
        assert ours[name].shape == expected.shape, name
        assert ours[name].dtype == dtype, name
        assert torch.isfinite(ours[name]).all(), name
        errors[name] = ((ours[name].double() - expected).abs().max().item(),
                        (theirs[name].double() - expected).abs().max().item())
    return errors


class _PassThroughMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


# What may stand between an op call and its CPU kernel (the calls that must keep the op)
IN_FRONT_OF_THE_KERNEL = ["grad wanted", "autocast", "dispatch mode", "profiler",
                          "forward-mode AD", "fake tensors"]


def in_front_of_the_kernel(where: str, stack, tensors: list) -> list:
    """Enter on `stack` what `where` (one of IN_FRONT_OF_THE_KERNEL, or "inference_mode") puts
    in front of ops called on `tensors` (a list, the input first); the tensors to call with."""
    tensors = list(tensors)
    if where == "inference_mode":
        stack.enter_context(torch.inference_mode())
    elif where == "grad wanted":
        tensors[0] = tensors[0].clone().requires_grad_()
    elif where == "autocast":
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    elif where == "dispatch mode":
        stack.enter_context(_PassThroughMode())
    elif where == "profiler":
        stack.enter_context(torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]))
    elif where == "forward-mode AD":
        stack.enter_context(torch.autograd.forward_ad.dual_level())
        tensors[0] = torch.autograd.forward_ad.make_dual(tensors[0], torch.randn_like(tensors[0]))
    elif where == "fake tensors":
        mode = torch._subclasses.fake_tensor.FakeTensorMode()
        tensors = [mode.from_tensor(t) for t in tensors]
    return tensors
