"""Admission: a fused GPU plan serves a layer configuration under `auto` only once it has run on
the user's own device beside torch's own kernels (the `torch` backend) and proved itself.

A configuration is what a verdict is about: the device (name, compute capability, driver), torch,
the backend and its build (compiler and kernel source), the cell, input, hidden and projection
sizes, directions, batch, dtype, bias, variable lengths, the tf32 switches and the pass
(inference, or training: forward and backward); not T. The plan the backend runs for it is
recorded beside the verdict. Its first call runs the check on that call's own inputs (its first
CHECK_STEPS steps):
  - correct: every output (training: and every gradient, for fixed random gradients of the
    outputs) has a largest error against the torch backend run in float64 on the same device of
    at most 2x the torch backend's own error in the layer's dtype, plus FLOOR_ULPS units of the
    dtype's rounding at the tensor's largest magnitude (two implementations that round the same
    sums in another order differ by a few units of the last place even where torch's own error
    happens to be near zero);
  - not slower: its fastest of REPETITIONS timed runs (CUDA events on a GPU; fewer where its
    runs took LONG_PASS_MS in all) is at most the torch backend's, timed in turns on the same
    inputs.
An admitted plan serves; a rejected one never serves that configuration again on this machine
(one warning says why). Verdicts persist in FASTRNN_CACHE_DIR (verdicts.json), so a process pays
for a check once per machine. A launch that fails on the device after admission (a grid barrier
that timed out) rejects the configuration too.

A configuration whose kernels are not compiled yet is served by the torch backend while they
compile on a background thread; the check runs at a later call. Nothing is checked during CUDA
graph capture: there the recorded verdict serves, else the torch backend. Under the layer ops
(torch.compile, tracers) a training call's backend is fixed for the process at its first call,
since the backward op must run the backend the forward ran.

FASTRNN_ADMISSION: "check" (the default), "off" (trust the fused plans: no check; compile on the
caller's thread) or "strict" (check; raise instead of falling back, and compile on the caller's
thread instead of serving torch's kernels meanwhile). `python -m fastrnn.gpu_report --device`
lists the verdicts of this machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import queue
import threading
import time
import warnings
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from . import backends, machine_cache
from .backends.base import Backend, LayerConfig
from .cells import CellSpec

MODES = ("check", "off", "strict")
CHECK_STEPS = 64  # steps of the call a check runs (all of them where the call has fewer)
REPETITIONS = 3  # timed runs of each backend, in turns, after the correctness runs
LONG_PASS_MS = 50.0  # a backend is timed again only while its runs took less than this in all
FLOOR_ULPS = 8
STORE_FILE = "verdicts.json"
_OUTPUTS = ("output", "h_n", "c_n")
_INPUTS = ("x", "w_ih", "b_ih", "h0", "c0", "w_hh", "b_hh", "w_hr")


def mode() -> str:
    """FASTRNN_ADMISSION, checked: "check" (default), "off" or "strict"."""
    value = os.environ.get("FASTRNN_ADMISSION", "") or "check"
    if value not in MODES:
        raise ValueError(f"FASTRNN_ADMISSION={value!r} is not one of {', '.join(map(repr, MODES))}")
    return value


# --- what a verdict is about ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerCall:
    """The tensors of one layer call, from its input (shapes as in backends/base.py)."""

    cell: CellSpec
    x: Tensor  # [T, B, I]
    w_ih: Tensor  # [D*G*H, I]
    b_ih: Optional[Tensor]  # [D*G*H]
    h0: Tensor  # [D, B, P]
    c0: Optional[Tensor]  # [D, B, H] (LSTM)
    w_hh: Tensor  # [D, G*H, P]
    b_hh: Optional[Tensor]  # [D, G*H]
    w_hr: Optional[Tensor]  # [D, P, H]
    lengths: Optional[Tensor]  # [B] int64

    @property
    def tensors(self) -> tuple:
        return (self.x, self.w_ih, self.b_ih, self.h0, self.c0, self.w_hh, self.b_hh, self.w_hr)

    def prepared_for_check(self, dtype: Optional[torch.dtype] = None) -> "LayerCall":
        """Detached copies (cast to `dtype` if given) over at most CHECK_STEPS steps."""
        steps = min(self.x.shape[0], CHECK_STEPS)

        def copy(t):
            return None if t is None else t.detach().to(dtype or t.dtype, copy=True)

        lengths = None if self.lengths is None else self.lengths.clamp(max=steps)
        return LayerCall(self.cell, copy(self.x[:steps]), *map(copy, self.tensors[1:]), lengths)


def device_description(device: torch.device) -> str:
    """The device a verdict holds for: name, compute capability, SMs and driver on CUDA."""
    if device.type == "cuda":
        return _cuda_description(device.index if device.index is not None
                                 else torch.cuda.current_device())
    return f"{device.type} {platform.machine()} {platform.processor() or ''}".strip()


@functools.cache
def _cuda_description(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: "?")()
    return (f"{props.name} sm_{props.major}{props.minor} {props.multi_processor_count} SMs "
            f"driver {driver} cuda {torch.version.cuda}")


def subject(backend: Backend, config: LayerConfig, input_size: int, has_bias: bool,
            training: bool, device: torch.device) -> dict:
    """The fields a verdict is keyed by (all but T)."""
    fields = dict(device=device_description(device), torch=torch.__version__,
                  backend=backend.name, build=backend.build_id(), cell=config.cell.name,
                  input=input_size, hidden=config.hidden_size, proj=config.proj_size,
                  directions=config.num_directions, batch=config.batch_size,
                  dtype=str(config.dtype).replace("torch.", ""), bias=has_bias,
                  lengths=config.variable_lengths, passes="training" if training else "inference")
    if config.dtype == torch.float32:
        fields["tf32"] = (f"matmul {torch.backends.cuda.matmul.allow_tf32} "
                          f"cudnn {torch.backends.cudnn.allow_tf32}")
    return fields


def key_of(fields: dict) -> str:
    return json.dumps(fields, sort_keys=True)


@functools.lru_cache(maxsize=4096)
def _subject_and_key(backend: Backend, config: LayerConfig, input_size: int, has_bias: bool,
                     training: bool, device: torch.device, *tf32: bool) -> tuple[dict, str]:
    """subject() and its key, once per call signature (tf32: the switches subject reads)."""
    fields = subject(backend, config, input_size, has_bias, training, device)
    return fields, key_of(fields)


# --- the verdicts --------------------------------------------------------------------------------

class _Store:
    """Verdicts in memory over verdicts.json (read once per process and file); entries are
    dicts: fields, plan, prepared, admitted (True or False; absent while undecided), reason,
    errors {name: [fused, torch, allowed]}, times_ms [fused, torch], steps, date. Safe to use
    from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memory: dict[str, dict] = {}
        self._read_from = ""  # the file _memory was read from
        self.seen: dict[str, None] = {}  # keys met in this process, in order

    def _load(self) -> None:
        file = machine_cache.path(STORE_FILE)
        if file != self._read_from:
            self._memory = machine_cache.read_json(file)
            self._read_from = file

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            self._load()
            self.seen[key] = None
            return self._memory.get(key)

    def put(self, key: str, **changes) -> dict:
        with self._lock:
            self._load()
            entry = {**self._memory.get(key, {}), **changes}
            self._memory[key] = entry
            self.seen[key] = None
            machine_cache.update_json(machine_cache.path(STORE_FILE), {key: entry})
            return entry

    def forget(self) -> None:
        """Drop what is held in memory (the file stays): tests, and a fresh look at the file."""
        with self._lock:
            self._memory, self._read_from = {}, ""
            self.seen.clear()

    def entries(self, seen_only: bool) -> list[dict]:
        """This process's entries (seen_only), else every entry of the file and this process."""
        with self._lock:
            self._load()
            keys = list(self.seen)
            memory = dict(self._memory)
        if seen_only:
            return [memory[key] for key in keys if key in memory]
        every = machine_cache.read_json(machine_cache.path(STORE_FILE))
        every.update(memory)
        return list(every.values())


STORE = _Store()


class _Preparer:
    """Compiles on one daemon thread (so that exiting never waits for a compiler), one job per
    key; `state` tells "pending", "done", or the exception a job raised."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, object] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, key: str, job: Callable[[], None]) -> None:
        with self._lock:
            if key in self._states:
                return
            self._states[key] = "pending"
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="fastrnn-prepare",
                                                daemon=True)
                self._thread.start()
        self._jobs.put((key, job))

    def state(self, key: str):
        with self._lock:
            return self._states.get(key)

    def wait(self, timeout: float = 600.0) -> None:
        """Wait until every submitted job has finished (tests, reports)."""
        deadline = time.monotonic() + timeout
        while any(state == "pending" for state in list(self._states.values())):
            if time.monotonic() > deadline:
                raise TimeoutError("fastrnn: background compiles did not finish in time")
            time.sleep(0.01)

    def _work(self) -> None:
        while True:
            key, job = self._jobs.get()
            try:
                job()
                outcome = "done"
            except Exception as error:  # noqa: BLE001 - reported as the verdict's reason
                outcome = error
            with self._lock:
                self._states[key] = outcome


PREPARER = _Preparer()


# --- choosing the backend of a call --------------------------------------------------------------

_frozen: dict[str, Backend] = {}
_frozen_lock = threading.Lock()
_warned: set[str] = set()


def serving_backend(requested: Optional[str], config: LayerConfig, *, input_size: int,
                    has_bias: bool, training: bool, device: torch.device,
                    call: Optional[Callable[[], LayerCall]] = None, op_path: bool = False
                    ) -> Optional[Backend]:
    """The backend that serves one layer call. An explicit request is served as asked
    (backends.resolve); `auto` takes the first backend that supports the layer, and where that
    one needs admission, the verdict decides between it and the torch backend, checking it now
    on the call's tensors (`call()` makes them) where there is none yet. Without `call` (a
    caller deciding ahead of running) None where a check would be needed. `op_path`: called
    from a layer op, whose training calls keep their first answer for the process (see the
    module docstring)."""
    name = backends.requested_backend(requested)
    candidate = backends.resolve(name, config)
    if name != "auto" or not candidate.needs_admission or mode() == "off":
        return candidate
    fields, key = _subject_and_key(candidate, dataclasses.replace(config, seq_len=0),
                                   input_size, has_bias, training, device,
                                   torch.backends.cuda.matmul.allow_tf32,
                                   torch.backends.cudnn.allow_tf32)
    if not (op_path and training):
        return _decide(candidate, config, training, device, fields, key, call)
    with _frozen_lock:
        chosen = _frozen.get(key)
    if chosen is None:
        chosen = _decide(candidate, config, training, device, fields, key, call)
        with _frozen_lock:
            chosen = _frozen.setdefault(key, chosen)
    return chosen


def _decide(candidate: Backend, config: LayerConfig, training: bool, device: torch.device,
            fields: dict, key: str, call: Optional[Callable[[], LayerCall]]
            ) -> Optional[Backend]:
    fallback = backends.resolve("torch", config)
    strict = mode() == "strict"
    entry = STORE.get(key) or {}
    failure = candidate.run_time_failure(config)
    if failure and entry.get("admitted") is not False:
        entry = _reject(key, fields, f"failed on the device: {failure}", strict)
    if entry.get("admitted") is False:
        if strict:
            raise RuntimeError(_rejection_message(entry))
        return fallback
    if entry.get("admitted"):  # compiled here before: quick where not yet in this process
        if (candidate.prepared(config, training, device)
                or _prepare_now(candidate, config, training, device, key, fields)):
            return candidate
        return fallback
    if not candidate.prepared(config, training, device):
        if strict or entry.get("prepared"):  # strict, or compiled here before: quick
            if not _prepare_now(candidate, config, training, device, key, fields):
                return fallback
        else:
            state = _prepare_in_background(candidate, config, training, device, key, fields)
            if isinstance(state, Exception):
                _reject(key, fields, f"does not compile: {type(state).__name__}: {state}", strict)
                return fallback
            if state != "done" or not candidate.prepared(config, training, device):
                return fallback
    if call is None:
        return None
    call = call()
    if not _can_check(call):
        if strict:
            raise RuntimeError(f"fastrnn: {candidate.name} has no verdict yet for "
                               f"{describe(fields)}, and cannot be checked here (CUDA graph "
                               "capture); run it once outside capture, or set "
                               "FASTRNN_ADMISSION=check")
        return fallback
    entry = check(candidate, fallback, config, call, training, device, key, fields)
    if entry is None:  # inconclusive (non-finite values, out of memory): ask again later
        return fallback
    if entry["admitted"]:
        return candidate
    _warn_rejected(key, entry)
    if strict:
        raise RuntimeError(_rejection_message(entry))
    return fallback


def _prepare_now(candidate: Backend, config: LayerConfig, training: bool, device: torch.device,
                 key: str, fields: dict) -> bool:
    """Compile on the caller's thread; False (and a rejection) where that fails."""
    try:
        candidate.prepare(config, training, device)
    except Exception as error:  # noqa: BLE001 - a kernel that does not compile is rejected
        _reject(key, fields, f"does not compile: {type(error).__name__}: {error}",
                mode() == "strict")
        return False
    STORE.put(key, fields=fields, prepared=True,
              plan=candidate.plan_description(config, training, device))
    return True


def _prepare_in_background(candidate: Backend, config: LayerConfig, training: bool,
                           device: torch.device, key: str, fields: dict):
    def job():
        candidate.prepare(config, training, device)
        STORE.put(key, fields=fields, prepared=True,
                  plan=candidate.plan_description(config, training, device))

    PREPARER.submit(key, job)
    return PREPARER.state(key)


def _can_check(call: LayerCall) -> bool:
    x = call.x
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return type(x) is Tensor and x.device.type != "meta"


def _reject(key: str, fields: dict, reason: str, strict: bool) -> dict:
    entry = STORE.put(key, fields=fields, admitted=False, reason=reason, date=_today())
    _warn_rejected(key, entry)
    if strict:
        raise RuntimeError(_rejection_message(entry))
    return entry


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def describe(fields: dict) -> str:
    """A configuration in a few words."""
    proj = f" P{fields['proj']}" if fields["proj"] else ""
    return (f"{fields['cell']} I{fields['input']} H{fields['hidden']}{proj} "
            f"{'bi' if fields['directions'] == 2 else 'uni'} B{fields['batch']} {fields['dtype']}"
            f"{'' if fields['bias'] else ' no bias'}{' lengths' if fields['lengths'] else ''} "
            f"{fields['passes']} on {fields['device']}")


def _rejection_message(entry: dict) -> str:
    fields = entry["fields"]
    return (f"fastrnn: the {fields['backend']} plan {entry.get('plan') or ''} was not admitted for "
            f"{describe(fields)}: {entry.get('reason')}")


def _warn_rejected(key: str, entry: dict) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(_rejection_message(entry) + ". torch's own kernels (the torch backend) serve "
                  "this configuration instead. Please report it as a fastrnn issue with the "
                  "output of `python -m fastrnn.gpu_report --device`; FASTRNN_ADMISSION=off "
                  "trusts the fused plans instead.", stacklevel=6)


# --- the check -----------------------------------------------------------------------------------

def check(candidate: Backend, fallback: Backend, config: LayerConfig, call: LayerCall,
          training: bool, device: torch.device, key: str, fields: dict) -> Optional[dict]:
    """Run `candidate` and `fallback` (the torch backend) on the call's inputs, judge the
    candidate (module docstring) and record the verdict; None where inconclusive."""
    mine_call = call.prepared_for_check()
    if not all(t is None or bool(torch.isfinite(t).all()) for t in mine_call.tensors):
        return None
    cotangents = _cotangents(mine_call, training)
    try:
        reference = _run(fallback, mine_call.prepared_for_check(torch.float64), training,
                         [None if g is None else g.double() for g in cotangents])
        theirs = _run(fallback, mine_call, training, cotangents)
    except torch.OutOfMemoryError:
        return None
    try:
        mine = _run(candidate, mine_call, training, cotangents)
    except torch.OutOfMemoryError:
        return None
    except Exception as error:  # noqa: BLE001 - a plan that fails to run is rejected
        verdict = (False, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return _record(key, fields, candidate.plan_description(config, training, device), verdict, {},
                       None, mine_call)
    errors, wrong = {}, []
    for name, expected in reference.items():
        if not bool(torch.isfinite(expected).all()):
            return None
        scale = expected.abs().max().item() if expected.numel() else 0.0
        floor = FLOOR_ULPS * torch.finfo(call.x.dtype).eps * scale
        mine_error = _max_error(mine[name], expected)
        theirs_error = _max_error(theirs[name], expected)
        allowed = 2 * theirs_error + floor
        errors[name] = [mine_error, theirs_error, allowed]
        if not mine_error <= allowed:  # NaN is wrong too
            wrong.append(f"{name} error {mine_error:.2e} > allowed {allowed:.2e} "
                         f"(torch {theirs_error:.2e})")
    times = time_ms(lambda: _run(candidate, mine_call, training, cotangents),
                    lambda: _run(fallback, mine_call, training, cotangents), call.x.device)
    if wrong:
        verdict = (False, "wrong: " + "; ".join(wrong))
    elif times[0] > times[1]:
        verdict = (False, f"slower: {times[0]:.3f} ms against torch's {times[1]:.3f} ms")
    else:
        verdict = (True, "")
    return _record(key, fields, candidate.plan_description(config, training, device), verdict, errors,
                   times, mine_call)


def _record(key: str, fields: dict, plan: str, verdict: tuple[bool, str], errors: dict,
            times: Optional[tuple[float, float]], call: LayerCall) -> dict:
    admitted, reason = verdict
    return STORE.put(key, fields=fields, plan=plan, prepared=True, admitted=admitted,
                     reason=reason, errors=errors, times_ms=None if times is None else list(times),
                     steps=call.x.shape[0], date=_today())


def _max_error(got: Tensor, expected: Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    if not got.numel():
        return 0.0
    return (got.double() - expected).abs().max().item()


def _cotangents(call: LayerCall, training: bool) -> list:
    """Fixed random gradients of output [T, B, D*P], h_n [D, B, P] and c_n [D, B, H] (LSTM) for
    a training check, from a generator of its own: the user's random stream stays untouched."""
    if not training:
        return [None, None, None]
    seq_len, batch, _ = call.x.shape
    num_directions, gate_rows, out_size = call.w_hh.shape
    shapes = [(seq_len, batch, num_directions * out_size), (num_directions, batch, out_size),
              (num_directions, batch, gate_rows // call.cell.gates)]
    generator = torch.Generator(call.x.device).manual_seed(0)
    return [torch.randn(shape, generator=generator, device=call.x.device, dtype=call.x.dtype)
            if index < 2 or call.cell.has_cell_state else None
            for index, shape in enumerate(shapes)]


def _run(backend: Backend, call: LayerCall, training: bool, cotangents: list) -> dict:
    """One pass of `backend` on `call`: the outputs, and in training every gradient for the
    given output gradients. The torch backend trains as the eager path runs it (its own
    autograd); the others through forward_from_input and backward_from_input."""
    from .backends.native import TorchBackend

    names = _OUTPUTS if call.cell.has_cell_state else _OUTPUTS[:2]
    present = [t is not None for t in call.tensors]
    if not training:
        with torch.no_grad():
            outputs = backend.forward_from_input(call.cell, *call.tensors, call.lengths,
                                                 keep_workspace=False)
        return dict(zip(names, outputs))
    if isinstance(backend, TorchBackend):
        leaves = [None if t is None else t.detach().requires_grad_() for t in call.tensors]
        with torch.enable_grad():
            outputs = backend.layer(call.cell, *leaves, call.lengths, train=True)
            targets = [leaf for leaf in leaves if leaf is not None]
            pairs = [(o, g) for o, g in zip(outputs, cotangents) if o is not None]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], targets,
                                             [g for _, g in pairs], allow_unused=True))
        grads = [next(grads) if here else None for here in present]
    else:
        with torch.no_grad():
            outputs = backend.forward_from_input(call.cell, *call.tensors, call.lengths,
                                                 keep_workspace=True)
            grads = backend.backward_from_input(call.cell, *cotangents, *call.tensors,
                                                call.lengths, outputs[0], outputs[3], present)
    result = dict(zip(names, outputs))
    for name, grad, here in zip(_INPUTS, grads, present):
        if here:
            result[f"grad {name}"] = grad if grad is not None else torch.zeros(0)
    return result


def time_ms(candidate: Callable[[], object], fallback: Callable[[], object],
            device: torch.device) -> tuple[float, float]:
    """The fastest of REPETITIONS runs of each, in turns (fallback first), in ms: CUDA events on
    a GPU, the wall clock elsewhere. A backend whose runs so far took LONG_PASS_MS in all is
    not run again (a large layer is timed once; the other backend still gets its runs)."""
    times: dict[int, list[float]] = {0: [], 1: []}  # 0: fallback, 1: candidate
    for _ in range(REPETITIONS):
        for which, run in ((0, fallback), (1, candidate)):
            if sum(times[which]) < LONG_PASS_MS:
                times[which].append(_elapsed_ms(run, device))
    return min(times[1]), min(times[0])


def _elapsed_ms(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    run()
    return (time.perf_counter() - begin) * 1e3


# --- reports -------------------------------------------------------------------------------------

def report(seen_only: bool = True) -> str:
    """A table of the verdicts: this process's (seen_only), else every one on this machine."""
    entries = [entry for entry in STORE.entries(seen_only) if "fields" in entry]
    if not entries:
        return "no configuration has met admission" + (" in this process" if seen_only else
                                                         " on this machine")
    lines = [f"{'configuration':58s} {'backend':7s} {'verdict':8s} {'fused ms':>8s} "
             f"{'torch ms':>8s}  plan; errors (fused / torch / allowed); reason"]
    for entry in entries:
        fields = entry["fields"]
        verdict = {True: "admitted", False: "rejected"}.get(entry.get("admitted"), "pending")
        times = entry.get("times_ms") or ["", ""]
        errors = "; ".join(f"{name} {mine:.1e}/{theirs:.1e}/{allowed:.1e}"
                           for name, (mine, theirs, allowed) in (entry.get("errors") or {}).items())
        times_text = [f"{t:8.3f}" if isinstance(t, float) else f"{t:>8s}" for t in times]
        lines.append(f"{describe(fields).split(' on ')[0]:58s} {fields['backend']:7s} "
                     f"{verdict:8s} {times_text[0]} {times_text[1]}  {entry.get('plan') or '-'}"
                     f"{'; ' + errors if errors else ''}"
                     f"{'; ' + entry['reason'] if entry.get('reason') else ''}")
    devices = sorted({entry["fields"]["device"] for entry in entries})
    return "\n".join([f"device: {', '.join(devices)}", *lines])
