"""Parity with torch.nn: outputs, final states and the gradients of input, h0, c0 and every
parameter, over the matrix cell x layers x direction x input kind, with batch_first, hx, bias and
proj_size varied across it; in float64 (tight) and float32 (judged against torch's own error)."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import Case, compare_with_torch, cpu_backends

pytestmark = pytest.mark.usefixtures("poisoned_empty")

CELLS = ["lstm", "lstm-proj", "gru", "rnn_tanh", "rnn_relu"]
INPUT_KINDS = ["padded", "packed_sorted", "packed_unsorted", "unbatched"]


def matrix() -> list[Case]:
    """Every cell x {1,2,3 layers} x {uni, bi} x input kind; batch_first, hx and bias cycle so
    that each of their values meets every other axis value."""
    cases = []
    for index, (cell, layers, bidirectional, kind) in enumerate(
            itertools.product(CELLS, (1, 2, 3), (False, True), INPUT_KINDS)):
        proj = 3 if cell == "lstm-proj" else 0
        cases.append(Case(cell.split("-")[0], layers, bidirectional,
                          batch_first=index % 2 == 1, input_kind=kind,
                          with_hx=(index // 2) % 2 == 1, bias=(index // 4) % 3 != 2,
                          proj_size=proj))
    return cases


ODD_SIZES = [
    Case("lstm", hidden=1, input_size=1, batch=1, seq=1),
    Case("lstm", hidden=1, proj_size=0, batch=2, seq=7, input_kind="packed_unsorted"),
    Case("lstm", hidden=33, input_size=9, batch=1, seq=9, bidirectional=True, proj_size=5, with_hx=True),
    Case("gru", hidden=1, input_size=2, batch=1, seq=1, bidirectional=True),
    Case("gru", hidden=33, input_size=5, batch=4, seq=1, with_hx=True, input_kind="packed_sorted"),
    Case("rnn_tanh", hidden=1, input_size=3, batch=5, seq=11, input_kind="packed_unsorted", bidirectional=True),
    Case("rnn_relu", hidden=33, input_size=7, batch=1, seq=2, layers=2, with_hx=True),
    Case("lstm", hidden=7, input_size=3, batch=6, seq=30, layers=2, bidirectional=True,
         input_kind="packed_unsorted", with_hx=True),
]

CASES = matrix() + ODD_SIZES
BACKENDS = cpu_backends()

# float32 errors (ours / torch's) seen in this run, printed in the terminal summary
FLOAT32_RATIOS: list[tuple[str, float]] = []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float64_matches_torch(case: Case, backend: str):
    errors = compare_with_torch(case, torch.float64, backend)
    for name, (ours, _) in errors.items():
        assert ours < 1e-10, f"{name}: {ours:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[::3] + ODD_SIZES, ids=lambda c: c.id)
def test_float32_error_no_worse_than_torch(case: Case, backend: str):
    errors = compare_with_torch(case, torch.float32, backend, seed=1)
    worst = 0.0
    for name, (ours, theirs) in errors.items():
        # 2x torch's own float32 error against float64, with a floor at a few float32 ulps
        bound = 2 * theirs + 2e-6
        assert ours <= bound, f"{name}: fastrnn error {ours:.3g}, torch error {theirs:.3g}"
        worst = max(worst, ours / max(theirs, 1e-7))
    FLOAT32_RATIOS.append((f"{backend}:{case.id}", worst))
