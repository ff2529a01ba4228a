"""The triton planner: occupancy from compiled resources, candidate order, the fallback and its
warning, and (in a child process compiling for sm_90, no GPU needed) the offline report."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

from fastrnn.backends import triton as triton_backend  # noqa: E402
from fastrnn import benchmark_configs  # noqa: E402
from fastrnn.backends import triton_plan, triton_resources  # noqa: E402
from fastrnn.backends.base import LayerConfig  # noqa: E402
from fastrnn.cells import CELLS  # noqa: E402

H100 = triton_plan.TARGETS["sm_90"]


def _config(name="lstm", hidden=512, proj=0, dtype=torch.float32, directions=1, batch=64):
    return LayerConfig(cell=CELLS[name], device_type="cuda", dtype=dtype, batch_size=batch,
                       seq_len=100, hidden_size=hidden, proj_size=proj,
                       num_directions=directions, variable_lengths=False)


@pytest.mark.parametrize("registers,shared,num_warps,expected", [
    (128, 0, 8, 2),  # 65536 / (128 * 256) registers
    (255, 0, 4, 2),  # 255 registers are allocated as 256 per thread
    (32, 0, 4, 16),  # 2048 threads / 128
    (64, 100_000, 4, 2),  # 233472 // (100000 + 1024 reserved)
    (64, 232_448, 4, 1),
    (16, 0, 1, 32),  # the block limit
])
def test_programs_per_sm_follows_cuda_occupancy(registers, shared, num_warps, expected):
    resources = triton_plan.Resources(registers, 0, shared, num_warps)
    assert resources.programs_per_sm(H100) == expected


def test_why_not_names_each_limit():
    assert triton_plan.Resources(128, 0, 8192, 8).why_not(H100, 132) == ""
    assert "spills" in triton_plan.Resources(255, 24, 8192, 4).why_not(H100, 32)
    assert "shared memory" in triton_plan.Resources(64, 0, 300_000, 4).why_not(H100, 32)
    # two programs per SM at most: 265 programs cannot all be resident on 132 SMs
    assert "resident" in triton_plan.Resources(128, 0, 8192, 8).why_not(H100, 265)


@pytest.mark.parametrize("name,hidden,directions", [
    ("lstm", 256, 1), ("lstm", 512, 2), ("lstm", 1024, 1), ("gru", 768, 2), ("rnn_tanh", 2048, 2),
])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_candidates_have_at_most_one_program_per_sm(name, hidden, directions, backward):
    config = _config(name, hidden, directions=directions)
    plans = triton_plan.candidates(config, H100, backward)
    assert plans and all(plan.persistent for plan in plans)
    for plan in plans:
        assert plan.total_programs(hidden, 64, directions) <= H100.sm_count
        assert plan.group_rows(64) % plan.block_b == 0 or plan.batch_groups == 1
        columns = plan.block_h * (1 if backward else triton_plan.pow2(config.cell.gates))
        assert columns >= triton_plan.MIN_COLUMNS  # the matmul tile's columns
    resident = [plan for plan in plans if plan.resident]
    for plan in resident:  # only offered when the weight slices could fit a program
        assert triton_plan.resident_bytes(config, plan, backward) <= H100.shared_bytes_per_program
    assert plans[-1].kind == "streamed"
    assert {plan.batch_groups for plan in plans if plan.resident} <= {1, 2, 4}
    estimates = [triton_plan.estimate_us_per_step(config, plan, backward) for plan in plans]
    assert estimates == sorted(estimates, key=lambda value: round(value, 1))  # cheapest first


def test_projection_columns_are_covered():
    config = _config("lstm", 200, proj=120, directions=2)
    plans = (triton_plan.candidates(config, H100, False) + triton_plan.candidates(config, H100, True)
             + [triton_plan.stepwise_plan(config)])
    for plan in plans:
        assert plan.num_programs(200) * plan.block_r >= 120


def _fake_resources(table):
    """A kernel_resources that answers from {plan kind: Resources}."""
    def resources(config, plan, backward, arch):
        return table[plan.kind]
    return resources


def test_choose_takes_the_first_plan_that_fits(monkeypatch):
    fits = triton_plan.Resources(96, 0, 8192, 4)
    monkeypatch.setattr(triton_plan, "kernel_resources", _fake_resources(
        {"persistent": triton_plan.Resources(255, 700, 150_000, 8), "streamed": fits,
         "step-wise": fits}))
    choice = triton_plan.choose(_config("lstm", 256), H100, backward=False)
    assert choice.plan.kind == "streamed" and choice.resources == fits
    resident = [plan for plan in triton_plan.candidates(_config("lstm", 256), H100, False)
                if plan.resident]
    assert len(choice.rejected) == len(resident) > 0
    assert all("700 bytes of register spills" in reason for reason in choice.rejected)


def test_nothing_fits_falls_to_step_wise_with_one_warning(monkeypatch):
    spills = triton_plan.Resources(255, 64, 8192, 4)
    monkeypatch.setattr(triton_plan, "kernel_resources", _fake_resources(
        {"persistent": spills, "streamed": spills, "step-wise": spills}))
    monkeypatch.setattr(triton_backend, "cuda_device", lambda index: H100)
    monkeypatch.setattr(triton_backend, "_warned", set())
    triton_backend._choose.cache_clear()
    config = _config("gru", 512)
    choice = triton_plan.choose(config, H100, backward=True)
    assert choice.plan.kind == "step-wise" and len(choice.rejected) >= 2
    with pytest.warns(UserWarning, match="one launch per phase .* 64 bytes of register spills"):
        plan = triton_backend.plan_layer(config, torch.device("cuda", 0), backward=True)
    assert not plan.persistent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_backend.plan_layer(config, torch.device("cuda", 0), backward=True)
    triton_backend._choose.cache_clear()


def test_interpreter_runs_one_program_per_direction():
    config = _config("lstm", 9, proj=5, directions=2)
    plan = triton_backend.plan_layer(config, torch.device("cpu"))
    assert plan.num_programs(9) == 1 and plan.persistent and plan.block_r >= 5


def test_estimates_follow_the_stated_model():
    config = _config("lstm", 512, batch=16)
    plan = triton_plan.Plan(16, 16, 16, resident=True, persistent=True)
    # one barrier + h [16, 512] float32 read by every program
    expected = triton_plan.BARRIER_US + 16 * 512 * 4 / triton_plan.L2_BYTES_PER_US_PER_SM
    assert triton_plan.estimate_us_per_step(config, plan, backward=False) == pytest.approx(expected)
    streamed = triton_plan.Plan(16, 16, 16, resident=False, persistent=True)
    weights = 4 * 16 * 512 * 4 / triton_plan.L2_BYTES_PER_US_PER_SM
    assert triton_plan.estimate_us_per_step(config, streamed, False) == pytest.approx(
        expected + weights)


def test_gpu_report_small_configs_all_fit(tmp_path):
    """Compiles the small benchmark configs for sm_90 (no GPU; an empty resources cache): every
    plan persistent, with no spills and shared memory within a program's limit, exit status 0;
    a second run answers from the cache it wrote."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTRNN_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "fastrnn.gpu_report", "--target", "sm_90",
                             "--configs", "small"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split() for line in result.stdout.splitlines()[2:-1]
             if line and not line.startswith(" ")]
    assert lines, result.stdout
    for config, dtype, pass_name, plan, programs, _, warps, regs, spills, shared, fits, _ in lines:
        assert plan in ("persistent", "streamed") and fits == "yes", (config, dtype, pass_name)
        assert spills == "0" and int(shared) <= H100.shared_bytes_per_program
        assert int(programs) <= H100.sm_count and int(regs) <= 255
    total = len(lines)
    assert result.stdout.splitlines()[-1] == f"fits: {total}/{total}"
    assert (tmp_path / "triton_resources.json").exists()
    again = subprocess.run([sys.executable, "-m", "fastrnn.gpu_report", "--configs", "small"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.stdout == result.stdout


def test_a_candidate_that_does_not_compile_is_passed_over(monkeypatch):
    fits = triton_plan.Resources(96, 0, 8192, 4)

    def resources(config, plan, backward, arch):
        if plan.resident:
            raise ValueError("dot shape too small\nmore")
        return fits

    monkeypatch.setattr(triton_plan, "kernel_resources", resources)
    choice = triton_plan.choose(_config("lstm", 512), H100, backward=True)
    assert choice.plan.kind == "streamed"
    assert choice.rejected and all("does not compile (ValueError: dot shape too small)" in reason
                                   for reason in choice.rejected)


def test_no_compiler_at_all_still_gives_a_step_wise_plan(monkeypatch):
    def resources(config, plan, backward, arch):
        raise FileNotFoundError("ptxas")

    monkeypatch.setattr(triton_plan, "kernel_resources", resources)
    choice = triton_plan.choose(_config("rnn_tanh", 64), H100, backward=False)
    assert choice.plan.kind == "step-wise" and choice.resources is None
    assert all("does not compile (FileNotFoundError: ptxas)" in reason
               for reason in choice.rejected)


def test_compile_in_order_answers_in_order_and_compiles_ahead(monkeypatch):
    """Known items are answered at once; unknown ones are compiled compile_threads() at a time,
    in order; an exception comes back as the item's answer; stopping early leaves the rest."""
    monkeypatch.setenv("FASTRNN_COMPILE_THREADS", "2")
    started = []

    def resources(item):
        started.append(item)
        if item == 3:
            raise ValueError("does not compile")
        return item * 10

    compiled = triton_resources.compile_in_order(list(range(8)), lambda item: item < 2, resources)
    answers = [next(compiled) for _ in range(5)]
    compiled.close()
    assert [item for item, _ in answers] == [0, 1, 2, 3, 4]
    assert [answer for _, answer in answers if not isinstance(answer, Exception)] == [0, 10, 20, 40]
    assert isinstance(answers[3][1], ValueError)
    assert set(started) <= set(range(6))  # at most one item compiled ahead of the last asked


def test_shipped_resource_table_is_current_for_this_triton():
    """The table shipped with the package holds this Triton's answers for the current kernels
    (regenerate: python -m fastrnn.gpu_report --configs check --save-table and
    python tests/test_triton_gpu_compile.py --save-table, under each supported Triton)."""
    table = triton_resources.shipped_table()
    assert {"3.6.0", "3.9.0"} <= set(table), sorted(table)
    entry = table.get(triton_resources.triton_version())
    if entry is None:
        pytest.skip(f"no shipped resources for Triton {triton_resources.triton_version()}")
    assert entry["source"] == triton_resources.source_hash(), "kernels changed: regenerate"
    assert entry["read_with"] == triton_resources.READ_WITH and entry["resources"]


@pytest.mark.parametrize("shape", benchmark_configs.SMOKE_SHAPES, ids=str)
def test_smoke_shapes_plan_from_the_shipped_table_without_compiling(monkeypatch, tmp_path, shape):
    """A first call on a shipped shape plans at once: nothing is compiled."""
    if triton_resources.triton_version() not in triton_resources.shipped_table():
        pytest.skip("no shipped resources for this Triton")
    monkeypatch.setenv("FASTRNN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # plan the GPU's kernels (bf16 dots)
    monkeypatch.setattr(triton_resources, "STORE", triton_resources._Store())

    def refuse(*variant):
        raise AssertionError(f"compiled {variant[0]}")

    monkeypatch.setattr(triton_resources, "_compile", refuse)
    mode, batch, _, hidden, bidirectional, dtype = shape
    config = benchmark_configs.layer_config(
        benchmark_configs.Config("smoke", mode, batch, 1, hidden, bidirectional=bidirectional),
        dtype, "cuda")
    for backward in (False, True):
        choice = triton_plan.choose(config, H100, backward)
        assert choice.plan.persistent and choice.resources is not None
