"""A property-based differential test against torch.nn (tests/fuzz_cases.py: the cases and the
rule that judges them), with hypothesis.

`test_random_cases` draws FASTRNN_FUZZ_EXAMPLES cases (default 40) in this process, from a fixed
seed (derandomized), so that CI runs the same cases every time. `test_random_cases_per_setting`
runs it again in one worker process per setting of the kernels' environment (FASTRNN_CPU_ISA x
FASTRNN_CPU_SPLIT x 1 or 2 threads), FASTRNN_FUZZ_EXAMPLES_PER_SETTING cases each (default 12).
A night's run: FASTRNN_FUZZ=long, which draws 450 cases per setting and 600 here (5,000+ in
all) from a seed that changes per run (FASTRNN_FUZZ_SEED fixes it). A failure prints the case;
once fixed it becomes an explicit case of tests/test_reliability.py.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import fastrnn  # noqa: E402
from fuzz_cases import cases, check  # noqa: E402
from helpers import cpu_backends  # noqa: E402

LONG = os.environ.get("FASTRNN_FUZZ") == "long"
EXAMPLES = int(os.environ.get("FASTRNN_FUZZ_EXAMPLES", 600 if LONG else 40))
PER_SETTING = int(os.environ.get("FASTRNN_FUZZ_EXAMPLES_PER_SETTING", 450 if LONG else 12))
SEED = int(os.environ.get("FASTRNN_FUZZ_SEED", random.randrange(2**32) if LONG else 20261207))
CPU_BUILT = fastrnn.available_backends().get("cpu") == ""

_SETTINGS = dict(deadline=None, database=None, derandomize=False, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@seed(SEED)
@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(case=cases(tuple(cpu_backends())))
def test_random_cases(case):
    check(case)


SETTINGS = list(itertools.product(["", "avx2", "generic"], ["rows", "units"], [1, 2]))


@pytest.mark.skipif(not CPU_BUILT, reason="the settings are the cpu kernels'")
@pytest.mark.parametrize("isa,split,threads", SETTINGS,
                         ids=[f"{isa or 'native'}-{split}-{threads}t" for isa, split, threads
                              in SETTINGS])
def test_random_cases_per_setting(isa, split, threads):
    env = {**os.environ, "FASTRNN_CPU_SPLIT": split, "FASTRNN_FUZZ_THREADS": str(threads),
           "FASTRNN_FUZZ_EXAMPLES": str(PER_SETTING),
           "FASTRNN_FUZZ_SEED": str(SEED + 1 + SETTINGS.index((isa, split, threads)))}
    if isa:
        env["FASTRNN_CPU_ISA"] = isa
    worker = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         f"{__file__}::test_random_cases"], capture_output=True, text=True, env=env,
        cwd=os.path.dirname(__file__), timeout=3600)
    assert worker.returncode == 0, worker.stdout[-6000:] + worker.stderr[-2000:]


if os.environ.get("FASTRNN_FUZZ_THREADS"):  # a worker's thread count
    import torch

    torch.set_num_threads(int(os.environ["FASTRNN_FUZZ_THREADS"]))
