"""What the compiler reports for one variant of the triton kernels, compiled offline (no GPU).

A variant (kernel name, argument types, constexprs, num_warps, target arch) is compiled by
Triton for the target and its cubin read with Triton's own cuobjdump: registers and stack frame
per thread, and Triton's shared memory. Answers are remembered three ways, looked up in order:
  1. in memory, for the process;
  2. on disk (FASTRNN_CACHE_DIR, default ~/.cache/fastrnn/triton_resources.json);
  3. in the table shipped with the package (triton_resources.json beside this file; another
     with FASTRNN_RESOURCE_TABLE, none if it is empty), made by
     `python -m fastrnn.gpu_report --save-table` for the configs users run most, under each
     supported Triton version.
Every key holds Triton's version, a hash of the kernels' source and the way resources are read,
so an answer is only ever reused for the very kernel it was compiled from. Unknown variants are
compiled on several threads at once (compile_in_order; FASTRNN_COMPILE_THREADS, default the
usable cores up to 8): Triton's compiler and ptxas release the GIL for most of their time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
import threading
from typing import Callable, Iterator

from .. import machine_cache

READ_WITH = "cubin+cuobjdump"  # part of every key: answers read another way never mix
SHIPPED_TABLE = os.path.join(os.path.dirname(__file__), "triton_resources.json")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled kernel variant needs."""

    registers: int  # per thread
    spill_bytes: int  # stack frame + local memory per thread: register spills (the kernels
    #                   keep no arrays in local memory)
    shared_bytes: int  # Triton's shared memory per program
    num_warps: int

    def programs_per_sm(self, device: Device) -> int:
        """How many programs of this kernel one SM holds at once (CUDA occupancy rules: registers
        allocated per warp in units of 256, shared memory with 1 KB reserved per block)."""
        threads = self.num_warps * device.warp_size
        by_threads = device.max_threads // threads
        registers_per_warp = -(-max(self.registers, 1) * device.warp_size // 256) * 256
        by_registers = device.registers // (registers_per_warp * self.num_warps)
        by_shared = (device.shared_bytes // (self.shared_bytes + 1024) if self.shared_bytes
                     else device.max_programs)
        return min(by_threads, by_registers, by_shared, device.max_programs)

    def why_not(self, device: Device, programs: int) -> str:
        """Why `programs` programs of this kernel cannot all be co-resident without spills on
        `device`, or "" when they can."""
        if self.spill_bytes:
            return f"{self.spill_bytes} bytes of register spills"
        if self.shared_bytes > device.shared_bytes_per_program:
            return (f"{self.shared_bytes} bytes of shared memory per program "
                    f"(the device allows {device.shared_bytes_per_program})")
        resident = self.programs_per_sm(device) * device.sm_count
        if programs > resident:
            return f"{programs} programs but only {resident} can be resident at once"
        return ""


Variant = tuple  # (kernel_name, signature items, constexpr items, num_warps, arch)


def _cache_path() -> str:
    return machine_cache.path("triton_resources.json")


@functools.cache
def source_hash() -> str:
    """sha256 of the kernels' source (triton_kernels/recurrence.py)."""
    from ..triton_kernels import recurrence

    with open(recurrence.__file__, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def triton_version() -> str:
    import triton
    return triton.__version__


def variant_key(variant: Variant) -> str:
    """Identifies one compiled variant: Triton's version, the kernels' source, how resources are
    read, and the variant itself."""
    text = repr((triton_version(), source_hash(), READ_WITH, *variant))
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def shipped_table() -> dict:
    """{triton version: {"source": kernel source hash, "resources": {key: [4 ints]}}}, from
    FASTRNN_RESOURCE_TABLE if set (empty: no table), else from the package's own."""
    path = os.environ.get("FASTRNN_RESOURCE_TABLE", SHIPPED_TABLE)
    return machine_cache.read_json(path) if path else {}


class _Store:
    """The memory and disk caches over the shipped table; safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memory: dict[str, Resources] = {}
        self.used: dict[str, Resources] = {}  # every answer given in this process, by key

    def lookup(self, key: str) -> Resources | None:
        with self._lock:
            if key not in self._memory:
                found = machine_cache.read_json(_cache_path()).get(key)
                if found is None:
                    for table in shipped_table().values():
                        found = table.get("resources", {}).get(key) or found
                if found is not None:
                    self._memory[key] = Resources(*found)
            resources = self._memory.get(key)
            if resources is not None:
                self.used[key] = resources
            return resources

    def record(self, key: str, resources: Resources) -> None:
        with self._lock:
            self._memory[key] = self.used[key] = resources
            machine_cache.update_json(_cache_path(), {key: dataclasses.astuple(resources)})


STORE = _Store()


def is_known(variant: Variant) -> bool:
    return STORE.lookup(variant_key(variant)) is not None


def compiled_resources(variant: Variant) -> Resources:
    """The resources of `variant`, from the caches or compiled now."""
    key = variant_key(variant)
    resources = STORE.lookup(key)
    if resources is None:
        resources = _compile(*variant)
        STORE.record(key, resources)
    return resources


def _compile(kernel_name: str, signature: tuple, constexprs: tuple, num_warps: int,
             arch: int) -> Resources:
    """Compile for sm_`arch` and read the cubin Triton built (its own ptxas and options) with
    Triton's cuobjdump."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..triton_kernels import recurrence

    source = ASTSource(getattr(recurrence, kernel_name), dict(signature), dict(constexprs))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": 1,
                                       "enable_fp_fusion": True})
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as file:
            file.write(compiled.asm["cubin"])
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", cubin],
                                capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    return Resources(registers=int(usage.group(1)),
                     spill_bytes=int(usage.group(2)) + int(usage.group(3)),
                     shared_bytes=int(compiled.metadata.shared), num_warps=num_warps)


def compile_threads() -> int:
    if os.environ.get("FASTRNN_COMPILE_THREADS"):
        return max(1, int(os.environ["FASTRNN_COMPILE_THREADS"]))
    return max(1, min(8, len(os.sched_getaffinity(0))))


def compile_in_order(items: list, known: Callable[[object], bool],
                     resources: Callable[[object], Resources]) -> Iterator[tuple]:
    """Yields (item, resources(item) or the exception it raised) in the order of `items`.

    Items `known` (cached) are answered on the spot; an unknown one is compiled together with
    the next unknown ones, compile_threads() at a time, so that a caller stopping at the first
    item that suits it waits for about one compile, not one per item before it."""
    pool = concurrent.futures.ThreadPoolExecutor(compile_threads())
    pending: dict[int, concurrent.futures.Future] = {}
    try:
        for index, item in enumerate(items):
            if index not in pending and known(item):
                outcome = _outcome(resources, item)
            else:
                ahead = index
                while len(pending) < compile_threads() and ahead < len(items):
                    if ahead not in pending and (ahead == index or not known(items[ahead])):
                        pending[ahead] = pool.submit(_outcome, resources, items[ahead])
                    ahead += 1
                outcome = pending.pop(index).result()
            yield item, outcome
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # started compiles still fill the cache


def _outcome(resources: Callable[[object], Resources], item):
    try:
        return resources(item)
    except Exception as error:  # noqa: BLE001 - reported to the caller
        return error


def save_table(path: str = SHIPPED_TABLE) -> None:
    """Add the answers given in this process to the shipped table, as this Triton version's
    entries (its earlier entries are dropped if they were made from other kernel source; other
    versions' entries are kept)."""
    table = machine_cache.read_json(path)
    mine = table.get(triton_version(), {})
    entries = mine.get("resources", {}) if mine.get("source") == source_hash() else {}
    entries.update({key: list(dataclasses.astuple(value)) for key, value in STORE.used.items()})
    table[triton_version()] = {"source": source_hash(), "read_with": READ_WITH,
                               "resources": dict(sorted(entries.items()))}
    with open(path, "w") as file:
        json.dump(dict(sorted(table.items())), file, indent=1)
        file.write("\n")
    shipped_table.cache_clear()
