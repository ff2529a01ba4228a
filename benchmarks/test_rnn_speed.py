"""torch.nn and every fastrnn backend (and, for the inference configs, ONNX Runtime and OpenVINO)
timed side by side, one benchmark group per (config, dtype, pass). Cases come from conftest.py;
each implementation is checked against torch.nn first.

Each timed round of a fastrnn backend follows a torch.nn call on the same problem (pedantic's
setup, timed by the test itself), and the reported ratio compares the fastest rounds of the two
over the same stretch of time: on a shared or noisy machine, separate windows drift by more than
the gaps being measured."""

from __future__ import annotations

import time

import pytest

import rnn_cases


def test_rnn(benchmark, case, device, yardstick, record_timing, timing_plan):
    bench_config, dtype, pass_name, implementation = case
    if implementation != "torch":
        reason = rnn_cases.unsupported(bench_config, dtype, device, implementation, pass_name)
        if reason:
            pytest.skip(f"{implementation!r}: {reason}")
    workload = rnn_cases.workload(yardstick.problem, implementation, dtype, bench_config.stepwise)
    if implementation != "torch":
        error = rnn_cases.mismatch(workload, pass_name, yardstick.expected(pass_name), dtype)
        if error:
            pytest.fail(f"{implementation!r} is wrong, not timed: {error}")

    run = workload.runner(pass_name)
    setup, torch_seconds = None, []
    if implementation != "torch":
        run_torch = rnn_cases.Workload(yardstick.problem, "torch", dtype,
                                       bench_config.stepwise).runner(pass_name)

        def setup():  # torch.nn's round, paired with the fastrnn round that follows it
            start = time.perf_counter()
            run_torch()
            torch_seconds.append(time.perf_counter() - start)

        setup()
    start = time.perf_counter()
    run()
    # Rounds to fit the time budget, the paired torch.nn rounds included.
    warmup, rounds = timing_plan(time.perf_counter() - start + sum(torch_seconds))
    torch_seconds.clear()

    benchmark.group = f"{bench_config.label} {dtype} {pass_name}"
    benchmark.extra_info.update(config=bench_config.label, dtype=dtype, passes=pass_name,
                                implementation=implementation)
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats is not None:
        paired = sorted(torch_seconds[-rounds:])
        benchmark.extra_info.update(torch_paired_min=paired[0] if paired else None)
        record_timing(case, (benchmark.stats.stats.min, benchmark.stats.stats.median),
                      (paired[0], paired[len(paired) // 2]) if paired else None)
