"""Timers: CPU wall time, and CUDA events with the L2 flushed by a read and the GPU held by a spin kernel.

Also :class:`Contention`, how much CPU other processes took while we measured.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class Timing:
    time_s: float  # CPU: median wall time; GPU: median CUDA-event time
    wall_s: float  # median host time of the call, synchronised
    repeats: int
    times_s: list[float] = field(default_factory=list)

    @property
    def launch_overhead_s(self) -> float:
        return max(0.0, self.wall_s - self.time_s)


#: Pause before timing a different library on the CPU.  After a call, OpenBLAS's worker
#: threads keep spinning for about 0.1 s; PyTorch timed inside that window ran 2-3 times
#: slower on two cores.  The pause lets them sleep, in both directions, before the warm-up.
CPU_SETTLE_S = 0.15


class CpuTimer:
    device = "cpu"

    def __init__(self) -> None:
        self._last_library: str | None = None

    def measure(self, fn: Callable[[], Any], warmup: int, repeats: int, library: str = "") -> Timing:
        if library != self._last_library:
            time.sleep(CPU_SETTLE_S)
            self._last_library = library
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        return Timing(median, median, repeats, times)


_CUDA_SOURCE = r"""
extern "C" __global__ void convgrad_bench_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
extern "C" __global__ void convgrad_bench_empty() {}
// Reads every word of the buffer: the L2 then holds only clean lines of it.  The store is
// taken only when `store` is set, which it never is; it keeps the loads from being removed.
extern "C" __global__ void convgrad_bench_read(const unsigned long long* __restrict__ buffer, long long words,
                                               unsigned long long* sink, int store) {
    unsigned long long folded = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < words;
         i += (long long)gridDim.x * blockDim.x) {
        folded ^= buffer[i];
    }
    if (store) sink[0] = folded;
}
"""
#: Blocks x threads of the L2-flushing read: enough loads in flight to stream the buffer.
_READ_GRID, _READ_BLOCK = 1024, 256
#: Nanoseconds per step of the Numba hold (Numba has no clock64; it sleeps in steps instead).
_NUMBA_SLEEP_NS = 1000


def _numba_kernels() -> tuple[Any, Any, Any]:
    """The read, hold and empty kernels as Numba compiles them (compiled on first launch)."""
    from numba import cuda

    def read(buffer, sink, store):  # pragma: no cover - runs on the GPU
        folded = buffer[0] ^ buffer[0]
        i = cuda.grid(1)
        while i < buffer.size:
            folded ^= buffer[i]
            i += cuda.gridsize(1)
        if store:
            sink[0] = folded

    def hold(steps):  # pragma: no cover - runs on the GPU
        for _ in range(steps):
            cuda.nanosleep(_NUMBA_SLEEP_NS)

    def empty():  # pragma: no cover - runs on the GPU
        pass

    return cuda.jit(read), cuda.jit(hold), cuda.jit(empty)


class _CupyDevice:
    """The timer's primitives through CuPy, on CuPy's current stream."""

    def __init__(self, flush_bytes: int) -> None:
        import cupy

        self.cupy = cupy
        module = cupy.RawModule(code=_CUDA_SOURCE)
        self._spin = module.get_function("convgrad_bench_spin")
        self._empty = module.get_function("convgrad_bench_empty")
        self._read = module.get_function("convgrad_bench_read")
        self.buffer = cupy.zeros(flush_bytes // 8, dtype=cupy.uint64)
        self._sink = cupy.zeros(1, dtype=cupy.uint64)

    def synchronize(self) -> None:
        self.cupy.cuda.runtime.deviceSynchronize()

    def event(self) -> Any:
        event = self.cupy.cuda.Event()
        event.record()
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        return self.cupy.cuda.get_elapsed_time(start, end) / 1e3

    def flush(self) -> None:
        self._read((_READ_GRID,), (_READ_BLOCK,), (self.buffer, np.int64(self.buffer.size), self._sink, np.int32(0)))

    def spin(self, units: int) -> None:
        self._spin((1,), (1,), (np.int64(units),))

    def empty_launch(self) -> None:
        self._empty((1,), (1,), ())


class _TorchDevice:
    """The timer's primitives through PyTorch, on its current stream."""

    def __init__(self, flush_bytes: int) -> None:
        import torch

        self.torch = torch
        self.buffer = torch.zeros(flush_bytes // 8, dtype=torch.int64, device="cuda")

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def event(self) -> Any:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3

    def flush(self) -> None:
        self.buffer.max()  # a reduction: reads the whole buffer, writes one element elsewhere

    def spin(self, units: int) -> None:
        self.torch.cuda._sleep(int(units))

    def empty_launch(self) -> None:
        self.torch.cuda._sleep(1)


class _NumbaDevice:
    """The timer's primitives through Numba, on the default stream; the hold sleeps in steps."""

    def __init__(self, flush_bytes: int) -> None:
        from numba import cuda

        self.cuda = cuda
        self._read, self._hold, self._empty = _numba_kernels()
        self.buffer = cuda.to_device(np.zeros(flush_bytes // 8, np.uint64))
        self._sink = cuda.to_device(np.zeros(1, np.uint64))

    def synchronize(self) -> None:
        self.cuda.synchronize()

    def event(self) -> Any:
        try:
            event = self.cuda.event(timing=True)
        except TypeError:  # the simulator's events take no arguments
            event = self.cuda.event()
        event.record()
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3

    def flush(self) -> None:
        self._read[_READ_GRID, _READ_BLOCK](self.buffer, self._sink, 0)

    def spin(self, units: int) -> None:
        self._hold[1, 1](int(units))

    def empty_launch(self) -> None:
        self._empty[1, 1]()


_DEVICES = {"cupy": _CupyDevice, "torch": _TorchDevice, "numba": _NumbaDevice}


class GpuTimer:
    """CUDA-event timing through CuPy, PyTorch or Numba, the same method for all three.

    Every repeat: flush the L2 by reading a 256 MiB buffer (reading leaves only clean lines, so
    no write-back of the flush lands in the timed interval, and it evicts whatever the previous
    repeat left dirty before the start event), hold the GPU with a spin kernel long enough for
    the host to issue the call (so host launch latency is not timed), record the start event,
    call, record the end event.  A CuPy or PyTorch default stream, and Numba's stream 0, are all
    the legacy default stream, so events of one library order the kernels of another.

    Parameters
    ----------
    library : str
        ``"cupy"``, ``"torch"`` or ``"numba"``.
    flush_bytes : int
        Size of the buffer read between repeats (several times any L2 there is).
    """

    device = "gpu"
    can_spin = True

    def __init__(self, library: str, flush_bytes: int = L2_FLUSH_BYTES) -> None:
        if library not in _DEVICES:
            raise ValueError(f"unknown GPU timing library {library!r}")
        self.library = library
        self.flush_bytes = flush_bytes
        self._device = _DEVICES[library](flush_bytes)
        self._units_per_second: float | None = None
        self._device.synchronize()  # the buffer's initial zeros are written before any timing

    # -- primitives ------------------------------------------------------------------------
    def synchronize(self) -> None:
        self._device.synchronize()

    def event(self) -> Any:
        return self._device.event()

    def elapsed_s(self, start: Any, end: Any) -> float:
        return self._device.elapsed_s(start, end)

    def flush(self) -> None:
        self._device.flush()

    def spin(self, units: int) -> None:
        if units > 0:
            self._device.spin(units)

    def units_per_second(self) -> float:
        """The hold kernel's rate (clock cycles, or Numba's sleep steps), measured once with events."""
        if self._units_per_second is None:
            units = 10_000_000 if self.library != "numba" else 10_000
            self.spin(units)
            self.synchronize()
            start = self.event()
            self.spin(units)
            end = self.event()
            self.synchronize()
            self._units_per_second = units / max(self.elapsed_s(start, end), 1e-9)
        return self._units_per_second

    def empty_launch_s(self, launches: int = 500) -> float:
        """Host time of one launch of an empty kernel, averaged over a loop of launches."""
        self._device.empty_launch()
        self.synchronize()
        start = time.perf_counter()
        for _ in range(launches):
            self._device.empty_launch()
        self.synchronize()
        return (time.perf_counter() - start) / launches

    # -- measurement -----------------------------------------------------------------------
    def measure(self, fn: Callable[[], Any], warmup: int, repeats: int, library: str = "") -> Timing:
        for _ in range(warmup):
            fn()
        self.synchronize()
        walls, issues = [], []
        for _ in range(repeats):
            self.flush()
            self.synchronize()
            start = time.perf_counter()
            fn()
            issued = time.perf_counter()
            self.synchronize()
            walls.append(time.perf_counter() - start)
            issues.append(issued - start)
        # Hold the GPU for twice the host's issue time (at least 0.5 ms, at most 50 ms).
        hold_s = min(0.05, max(5e-4, 2 * statistics.median(issues)))
        units = max(1, int(hold_s * self.units_per_second()))
        pairs = []
        for _ in range(repeats):
            self.flush()
            self.spin(units)
            start_event = self.event()
            fn()
            pairs.append((start_event, self.event()))
        self.synchronize()
        times = [self.elapsed_s(start, end) for start, end in pairs]
        return Timing(statistics.median(times), statistics.median(walls), repeats, times)


def gpu_timer_library(prefer: Sequence[str]) -> str | None:
    for library in prefer:
        if importlib.util.find_spec(library) is None:
            continue
        try:
            if library == "torch":
                import torch

                if not torch.cuda.is_available():
                    continue
            elif library == "cupy":
                import cupy

                if cupy.cuda.runtime.getDeviceCount() < 1:
                    continue
            elif library == "numba":
                from numba import cuda

                if not cuda.is_available():
                    continue
            return library
        except Exception:  # a library that is installed but finds no usable GPU
            continue
    return None


def _system_busy_s() -> float | None:
    """CPU seconds every process has used since boot (/proc/stat), None where unknown."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Contention:
    """How much CPU other processes used while we measured: the honest caveat of a CPU timing."""

    def __init__(self) -> None:
        self.start_wall, self.start_busy, self.start_own = time.perf_counter(), _system_busy_s(), _own_cpu_s()

    def report(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start_wall
        busy = _system_busy_s()
        other = None
        if busy is not None and self.start_busy is not None:
            other = max(0.0, (busy - self.start_busy) - (_own_cpu_s() - self.start_own))
        return {"elapsed_s": elapsed, "other_processes_cpu_s": other,
                "other_processes_cpus": None if other is None or elapsed <= 0 else other / elapsed}


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system
