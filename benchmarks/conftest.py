"""pytest-benchmark setup: options, the cases to time, and the fastrnn/torch.nn ratio report.

Run with `pytest benchmarks/` (add `--quick` for a short CPU run). See test_rnn_speed.py.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from pathlib import Path

# --isa holds torch.nn (oneDNN, ATen) and fastrnn's cpu kernels to one instruction set; the
# variables must be set before torch loads, so they are read from the command line here
ISA_VARIABLES = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                          "FASTRNN_CPU_ISA": "avx2"}}
_ISA = next((arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--isa=")), None)
if _ISA in ISA_VARIABLES:
    os.environ.update(ISA_VARIABLES[_ISA])

import pytest  # noqa: E402
import torch  # noqa: E402

import fastrnn
from fastrnn.backends import cpu as cpu_backend
import keras_report
import onnx_runtimes
import rnn_cases

TIMINGS = pytest.StashKey[dict]()
KERAS_TIMINGS = pytest.StashKey[dict]()  # test_keras_speed.py


def pytest_addoption(parser):
    group = parser.getgroup("fastrnn benchmarks")
    group.addoption("--quick", action="store_true",
                    help="fewer configs and rounds (a CPU run takes a few minutes)")
    group.addoption("--backends", default="",
                    help="comma-separated fastrnn backends to time (default: every available one; "
                         "'reference' only on small configs unless named here)")
    group.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to time on (default: cuda when present, else cpu)")
    group.addoption("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's default)")
    group.addoption("--isa", choices=sorted(ISA_VARIABLES), default=None,
                    help="hold both sides to one CPU instruction set, given as --isa=NAME "
                         "(avx2: ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2, "
                         "FASTRNN_CPU_ISA=avx2)")
    group.addoption("--rounds", type=int, default=0,
                    help="timed rounds per benchmark (default: as many as fit a time budget)")
    group.addoption("--results-dir", default=str(Path(__file__).parent / "results"),
                    help="where ratios.json and ratios.png are written")


def _requested_backends(config) -> tuple[list[str], bool]:
    """The fastrnn backends to time and whether the user named them. Not fastrnn's `torch`
    backend: it runs torch.nn's own kernels, which the `torch` column times."""
    available = fastrnn.available_backends()
    available.pop("torch", None)
    names = [name for name in config.getoption("--backends").split(",") if name]
    for name in names:
        if name not in available:
            raise pytest.UsageError(f"--backends: {name!r} is not part of this build of fastrnn "
                                    f"(it has {', '.join(available)})")
        if available[name]:
            raise pytest.UsageError(f"--backends: {name!r} is not available: {available[name]}")
    if names:
        return names, True
    return [name for name, reason in available.items() if not reason], False


def pytest_configure(config):
    config.stash[TIMINGS] = {}
    config.stash[KERAS_TIMINGS] = {}
    isa = config.getoption("--isa", None)
    if isa is not None and _ISA != isa:
        raise pytest.UsageError("--isa must be written as --isa=NAME (it is read before torch "
                                "loads)")
    if isa is not None and torch.backends.cpu.get_cpu_capability().lower() != isa:
        raise pytest.UsageError(f"--isa={isa}: torch runs {torch.backends.cpu.get_cpu_capability()}"
                                " kernels anyway (was torch imported before this conftest?)")
    if config.getoption("--threads", 0):
        torch.set_num_threads(config.getoption("--threads"))


def _device_description(config) -> str:
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads > 1 else ''})"


def pytest_report_header(config):
    lines = [f"fastrnn benchmarks: torch {torch.__version__} on {_device_description(config)}",
             f"  CPU kernels: torch {torch.backends.cpu.get_cpu_capability()}, "
             f"fastrnn cpu {cpu_backend.kernel_isa() or 'not loaded'}, oneDNN max ISA "
             f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'default')}"]
    for backend, reason in fastrnn.available_backends().items():
        lines.append(f"  fastrnn backend {backend}: {'available' if not reason else reason}")
    return lines


def _configs(config) -> list[rnn_cases.Config]:
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda":
        return rnn_cases.gpu_configs()
    return rnn_cases.cpu_configs(config.getoption("--quick"))


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    backends, named = _requested_backends(metafunc.config)
    cases, ids = [], []
    for bench_config in _configs(metafunc.config):
        for dtype in bench_config.dtypes:
            for pass_name in bench_config.passes:
                timed = [name for name in backends
                         if name != "reference" or named or bench_config.small]
                runtimes = list(onnx_runtimes.RUNTIMES) if bench_config.runtimes else []
                for implementation in ["torch", *timed, *runtimes]:
                    cases.append((bench_config, dtype, pass_name, implementation))
                    ids.append(f"{bench_config.label}-{dtype}-{pass_name}-{implementation}")
    metafunc.parametrize("case", cases, ids=ids)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    device = torch.device(pytestconfig.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda but CUDA is not available", returncode=4)
    return device


_current: dict = {}


@pytest.fixture
def yardstick(case, device) -> rnn_cases.Yardstick:
    """The config's problem and torch.nn's results on it; built once per run of a config's cases."""
    key = (case[0], device)
    if _current.get("key") != key:
        _current.clear()
        _current.update(key=key, yardstick=rnn_cases.Yardstick(rnn_cases.make_problem(*key),
                                                                case[0].stepwise))
    return _current["yardstick"]


@pytest.fixture
def record_timing(request):
    """Store the (min, median) seconds of a benchmark, and of the torch.nn rounds paired with it,
    for the end-of-session ratio report."""

    def record(case, seconds: tuple[float, float],
               torch_paired: tuple[float, float] | None = None) -> None:
        bench_config, dtype, pass_name, implementation = case
        key = (bench_config.label, dtype, pass_name)
        request.config.stash[TIMINGS].setdefault(key, {})[implementation] = (seconds, torch_paired)

    return record


@pytest.fixture
def record_keras_timing(request):
    """Store the min seconds of a Keras benchmark, and of the partner rounds paired with it."""

    def record(keras_case, seconds: float, partner_seconds: float | None) -> None:
        config, pass_name, implementation = keras_case
        key = (config.label, pass_name)
        request.config.stash[KERAS_TIMINGS].setdefault(key, {})[implementation] = (
            seconds, partner_seconds)

    return record


@pytest.fixture
def timing_plan(pytestconfig, device):
    """(warm-up rounds, timed rounds) for a pass that took `seconds_once` when first run."""
    quick = pytestconfig.getoption("--quick")
    fixed_rounds = pytestconfig.getoption("--rounds")
    warmup = 2 if device.type == "cuda" else 0

    def plan(seconds_once: float) -> tuple[int, int]:
        if fixed_rounds:
            return warmup, fixed_rounds
        budget, minimum = (0.5, 2) if quick else (3.0, 3)
        return warmup, max(minimum, min(200, math.floor(budget / max(seconds_once, 1e-6))))

    return plan


def _meta(config) -> dict:
    return {"device": _device_description(config),
            "torch": torch.__version__, "python": sys.version.split()[0],
            "date": datetime.date.today().isoformat(),
            "command": "pytest " + " ".join(config.invocation_params.args)}


def _keras_summary(terminalreporter, config) -> None:
    timings = config.stash.get(KERAS_TIMINGS, {})
    if not timings:
        return
    import keras

    rows = keras_report.rows(timings)
    meta = {**_meta(config), "keras": keras.__version__,
            "ratio": "keras / fastrnn.keras: min time of the Keras rounds paired with "
                     "fastrnn.keras's / fastrnn.keras's min time (> 1: fastrnn.keras is "
                     "faster); fastrnn.keras / fastrnn: min time of the fastrnn.keras rounds "
                     "paired with fastrnn's (called directly) / fastrnn's min time"}
    path = Path(config.getoption("--results-dir")) / "keras_ratios.json"
    rnn_cases.write_json(path, rows, meta)
    terminalreporter.section("fastrnn.keras / Keras time ratios")
    terminalreporter.write_line(f"{meta['ratio']} ({meta['device']}, torch {meta['torch']}, "
                                f"Keras {meta['keras']})")
    terminalreporter.write_line(keras_report.table(rows))
    terminalreporter.write_line(f"written: {path}")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    _keras_summary(terminalreporter, config)
    timings = config.stash.get(TIMINGS, {})
    if not timings:
        return
    rows = rnn_cases.ratio_rows(timings)
    meta = {**_meta(config),
            "ratio": "fastrnn min time / min time of the torch.nn calls paired with its rounds "
                     "(torch.nn, then fastrnn, round after round); < 1: fastrnn is faster"}
    results_dir = Path(config.getoption("--results-dir"))
    rnn_cases.write_json(results_dir / "ratios.json", rows, meta)
    note = rnn_cases.write_plot(results_dir / "ratios.png", rows,
                                f"fastrnn / torch.nn on {meta['device']}, torch {meta['torch']}")
    terminalreporter.section("fastrnn / torch.nn time ratios")
    terminalreporter.write_line(f"{meta['ratio']} ({meta['device']}, torch {meta['torch']})")
    terminalreporter.write_line(rnn_cases.ratio_table(rows))
    terminalreporter.write_line(f"written: {results_dir / 'ratios.json'}"
                                + ("" if note else f", {results_dir / 'ratios.png'}"))
    if note:
        terminalreporter.write_line(note)
