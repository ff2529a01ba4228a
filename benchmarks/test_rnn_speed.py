"""torch.nn and every fastrnn backend timed side by side, one benchmark group per
(config, dtype, pass). Cases come from conftest.py; fastrnn is checked against torch.nn first."""

from __future__ import annotations

import time

import pytest

import rnn_cases


def test_rnn(benchmark, case, device, yardstick, record_timing, timing_plan):
    bench_config, dtype, pass_name, implementation = case
    if implementation != "torch":
        reason = rnn_cases.unsupported(bench_config, dtype, device, implementation)
        if reason:
            pytest.skip(f"fastrnn backend {implementation!r}: {reason}")
    workload = rnn_cases.Workload(yardstick.problem, implementation, dtype)
    if implementation != "torch":
        error = rnn_cases.mismatch(workload, pass_name, yardstick.expected(pass_name), dtype)
        if error:
            pytest.fail(f"fastrnn backend {implementation!r} is wrong, not timed: {error}")

    run = workload.runner(pass_name)
    start = time.perf_counter()
    run()
    warmup, rounds = timing_plan(time.perf_counter() - start)

    benchmark.group = f"{bench_config.label} {dtype} {pass_name}"
    benchmark.extra_info.update(config=bench_config.label, dtype=dtype, passes=pass_name,
                                implementation=implementation)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats is not None:
        record_timing(case, (benchmark.stats.stats.min, benchmark.stats.stats.median))
