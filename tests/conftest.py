"""Test-session set-up: the Triton interpreter where there is no GPU, and a summary of the
float32 error ratios seen against torch.nn."""

import os

import pytest
import torch

# Without a CUDA device the triton backend runs its kernels under the Triton interpreter on CPU
# tensors. Triton reads this when it is first imported, so it is set before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_empty():
    """Fill every uninitialised tensor (kernels' outputs and buffers too) with NaN, so that any
    element a kernel forgets to write shows up."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)


def pytest_terminal_summary(terminalreporter):
    try:
        from test_parity import FLOAT32_RATIOS
    except ImportError:
        return
    if not FLOAT32_RATIOS:
        return
    ratios = sorted(ratio for _, ratio in FLOAT32_RATIOS)
    worst_case = max(FLOAT32_RATIOS, key=lambda item: item[1])
    terminalreporter.write_line(
        f"float32 max-error ratio fastrnn/torch (vs float64) over {len(ratios)} cases: "
        f"median {ratios[len(ratios) // 2]:.2f}, max {worst_case[1]:.2f} ({worst_case[0]})")
