"""The cpu kernels' float32 activations (csrc/cpu/activations.cpp) against torch's own, on every
ISA path, and the gradients of saturated units against torch.nn's.

sigmoid must equal torch.sigmoid bit for bit and tanh lie within 1 ulp of torch.tanh over the
whole range, the tails included (tanh is 1.0 only from |x| = 9.0108 on, as torch's); a
rational approximation that saturated at |x| = 7.9 had zeroed the gradients of saturated units.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastrnn

pytestmark = pytest.mark.skipif(fastrnn.available_backends().get("cpu") != "",
                                reason="needs the cpu kernels")

_CHECK = r"""
import torch, fastrnn
from fastrnn.backends import cpu
assert cpu.BACKEND.available()[0]
def ulps(a, b):
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()
# every 7th float from 2^-14 to 12, both signs, special values, and random magnitudes
positive = torch.arange(0x38800000, 0x41400000, 7, dtype=torch.int64).to(torch.int32)
special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-30, 9.0108, 9.0109, 88.72, -88.72, 103.9,
                        -104.1, 100.1, 3.4e38, -3.4e38, float("inf"), -float("inf")])
generator = torch.Generator().manual_seed(0)
random = ((torch.rand(1 << 20, generator=generator) * 2 - 1)
          * torch.pow(2.0, torch.randint(-40, 8, (1 << 20,), generator=generator).float()))
x = torch.cat([positive.view(torch.float32), -positive.view(torch.float32), special, random])
for name, reference in (("sigmoid", torch.sigmoid), ("tanh", torch.tanh)):
    got, expected = torch.ops.fastrnn_cpu.activation(x, name), reference(x)
    assert torch.equal(got[:-2], expected[:-2]) if name == "sigmoid" else True
    assert int(ulps(got, expected).max()) <= (0 if name == "sigmoid" else 1), name
    assert torch.equal(torch.ops.fastrnn_cpu.activation(torch.tensor([float("nan")]), name).isnan(),
                       torch.tensor([True]))
saturated = torch.linspace(8.0, 9.5, 100001)
ones = saturated[torch.ops.fastrnn_cpu.activation(saturated, "tanh") == 1]
assert abs(float(ones.min()) - float(saturated[torch.tanh(saturated) == 1].min())) < 1e-4
print(torch.ops.fastrnn_cpu.activation_kernels())
"""


@pytest.mark.parametrize("isa,torch_isa", [("", ""), ("avx2", "avx2"), ("generic", "default")])
def test_activations_match_torchs(isa, torch_isa):
    """Each path against torch held to the same vector width (ATEN_CPU_CAPABILITY): a CPU
    without AVX2 runs torch's scalar functions too."""
    env = dict(os.environ)
    if isa:
        env.update(FASTRNN_CPU_ISA=isa, ATEN_CPU_CAPABILITY=torch_isa)
    child = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                           env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    expected = {"": None, "avx2": "avx2", "generic": "libm"}[isa]
    if expected:
        assert child.stdout.strip() == expected


def _errors(name, weight_scale, x_scale, seed):
    """Per gradient (and output): fastrnn's and torch.nn's largest error in float32 against
    torch.nn in float64, for weights and inputs scaled to saturate the units."""
    torch.manual_seed(seed)
    oracle = getattr(nn, name)(4, 6, dtype=torch.float64)
    with torch.no_grad():
        for parameter in oracle.parameters():
            parameter.mul_(weight_scale)
    theirs = getattr(nn, name)(4, 6)
    theirs.load_state_dict(oracle.state_dict())
    ours = getattr(fastrnn, name).from_torch(theirs, backend="cpu")
    x = torch.randn(20, 3, 4, dtype=torch.float64) * x_scale
    results = []
    for module, dtype in ((oracle, torch.float64), (theirs, torch.float32), (ours, torch.float32)):
        leaf = x.to(dtype).requires_grad_()
        output, _ = module(leaf)
        grads = torch.autograd.grad(output.sum(), [leaf, *module.parameters()])
        results.append([output.double(), *(grad.double() for grad in grads)])
    exact, torch_results, fast_results = results
    return [((f - e).abs().max().item(), (t - e).abs().max().item(), e.abs().max().item())
            for e, t, f in zip(exact, torch_results, fast_results)]


@pytest.mark.parametrize("weight_scale,x_scale", [(4.0, 8.0), (3.0, 10.0)])
@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM"])
def test_saturated_units_keep_their_gradients(name, weight_scale, x_scale):
    """Weights and inputs scaled until the units saturate: the output and every gradient within
    2x torch.nn's own float32 error plus 8 ulp of its scale (summation order), failing only
    where that repeats on most of 5 draws (README: the fidelity rule)."""
    failures = {}
    for seed in range(5):
        for index, (mine, theirs, scale) in enumerate(_errors(name, weight_scale, x_scale, seed)):
            if mine > 2 * theirs + 8 * torch.finfo(torch.float32).eps * scale:
                failures.setdefault(index, []).append((seed, mine, theirs))
    assert all(len(draws) < 3 for draws in failures.values()), failures


def test_a_saturated_one_unit_rnn_has_torchs_gradient():
    """x = 8, weights 1, biases 0: tanh(8) = 1 - 2.2e-7; a tanh that rounds to 1 from 7.9 on
    gives a zero gradient there."""
    theirs = nn.RNN(1, 1)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.fill_(1.0 if parameter.dim() == 2 else 0.0)
    ours = fastrnn.RNN.from_torch(theirs, backend="cpu")
    grads = []
    for module in (theirs, ours):
        x = torch.full((1, 1, 1), 8.0, requires_grad=True)
        (grad,) = torch.autograd.grad(module(x)[0].sum(), [x])
        grads.append(grad)
    assert grads[1].item() != 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
