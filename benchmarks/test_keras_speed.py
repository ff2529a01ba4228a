"""Keras' own recurrent layers, fastrnn.keras's and fastrnn called directly, timed side by
side on the course's layers (keras_cases.configs); skipped when Keras is not installed.

Each timed round of fastrnn.keras follows a round of Keras' layer on the same problem, and each
round of fastrnn called directly follows a round of fastrnn.keras, so that both ratios of the
report ("fastrnn.keras / Keras time ratios") compare rounds timed over the same stretch of time.
Every implementation is checked against Keras' layer before it is timed."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("keras")

import keras_cases  # noqa: E402

PARTNER = {"fastrnn.keras": "keras", "fastrnn": "fastrnn.keras"}  # paired with each round


def pytest_generate_tests(metafunc):
    if "keras_case" not in metafunc.fixturenames:
        return
    cases, ids = [], []
    for config in keras_cases.configs(metafunc.config.getoption("--quick")):
        for pass_name in config.passes:
            for implementation in keras_cases.IMPLEMENTATIONS:
                cases.append((config, pass_name, implementation))
                ids.append(f"{config.label}-{pass_name}-{implementation}")
    metafunc.parametrize("keras_case", cases, ids=ids)


_problems: dict = {}


def _problem(config):
    if config not in _problems:
        _problems.clear()
        _problems[config] = keras_cases.make_problem(config)
    return _problems[config]


def test_keras(benchmark, keras_case, record_keras_timing, timing_plan):
    config, pass_name, implementation = keras_case
    problem = _problem(config)
    workload = keras_cases.Workload(config, problem, implementation)
    run = workload.runner(pass_name)
    setup, partner_seconds = None, []
    if implementation in PARTNER:
        partner = keras_cases.Workload(config, problem, PARTNER[implementation]).runner(pass_name)
        keras_result = keras_cases.Workload(config, problem, "keras").runner(pass_name)()
        compared = run()
        if implementation == "fastrnn" and isinstance(compared, tuple):
            compared = compared[:1]  # the input's gradient: the weights' are in torch's layout
        error = keras_cases.mismatch(compared, keras_result)
        if error:
            pytest.fail(f"{implementation} is wrong, not timed: {error}")

        def setup():  # the partner's round, paired with the round that follows it
            start = time.perf_counter()
            partner()
            partner_seconds.append(time.perf_counter() - start)

        setup()
    start = time.perf_counter()
    run()
    warmup, rounds = timing_plan(time.perf_counter() - start + sum(partner_seconds))
    partner_seconds.clear()

    benchmark.group = f"{config.label} fp32 {pass_name}"
    benchmark.extra_info.update(config=config.label, passes=pass_name,
                                implementation=implementation)
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats is not None:
        paired = sorted(partner_seconds[-rounds:])
        record_keras_timing(keras_case, benchmark.stats.stats.min,
                            paired[0] if paired else None)
