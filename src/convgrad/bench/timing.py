"""Timers: CPU wall time, and CUDA events with the L2 flushed and the GPU held by a spin kernel.

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


_SPIN_SOURCE = r"""
extern "C" __global__ void convgrad_bench_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
extern "C" __global__ void convgrad_bench_empty() {}
"""


class GpuTimer:
    """CUDA-event timing on the default stream through CuPy, PyTorch or Numba.

    Every repeat: flush the L2 (write a 256 MiB buffer), hold the GPU with a spin kernel
    long enough for the host to issue the call, record the start event, call, record the
    end event.  A CuPy or PyTorch default stream, and Numba's stream 0, are all the legacy
    default stream, so events of one library order the kernels of another.
    """

    device = "gpu"

    def __init__(self, library: str) -> None:
        self.library = library
        self.flush_bytes = 0
        self._cycles_per_second: float | None = None
        if library == "cupy":
            import cupy

            self._cupy = cupy
            module = cupy.RawModule(code=_SPIN_SOURCE)
            self._spin_kernel = module.get_function("convgrad_bench_spin")
            self._empty_kernel = module.get_function("convgrad_bench_empty")
            self._flush_buffer = cupy.empty(L2_FLUSH_BYTES, dtype=cupy.uint8)
            self.flush_bytes = L2_FLUSH_BYTES
        elif library == "torch":
            import torch

            self._torch = torch
            self._flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
            self.flush_bytes = L2_FLUSH_BYTES
        elif library == "numba":
            from numba import cuda

            self._cuda = cuda  # no flush and no spin: events only
        else:
            raise ValueError(f"unknown GPU timing library {library!r}")

    # -- primitives ------------------------------------------------------------------------
    def synchronize(self) -> None:
        if self.library == "cupy":
            self._cupy.cuda.runtime.deviceSynchronize()
        elif self.library == "torch":
            self._torch.cuda.synchronize()
        else:
            self._cuda.synchronize()

    def event(self) -> Any:
        if self.library == "cupy":
            event = self._cupy.cuda.Event()
        elif self.library == "torch":
            event = self._torch.cuda.Event(enable_timing=True)
        else:
            try:
                event = self._cuda.event(timing=True)
            except TypeError:  # the simulator's events take no arguments
                event = self._cuda.event()
        event.record()
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        if self.library == "cupy":
            return self._cupy.cuda.get_elapsed_time(start, end) / 1e3
        return start.elapsed_time(end) / 1e3  # PyTorch and Numba events: milliseconds

    def flush(self) -> None:
        if self.library == "cupy":
            self._flush_buffer.fill(0)
        elif self.library == "torch":
            self._flush_buffer.zero_()

    def spin(self, cycles: int) -> None:
        if cycles <= 0:
            return
        if self.library == "cupy":
            self._spin_kernel((1,), (1,), (np.int64(cycles),))
        elif self.library == "torch":
            self._torch.cuda._sleep(int(cycles))

    @property
    def can_spin(self) -> bool:
        return self.library in ("cupy", "torch")

    def cycles_per_second(self) -> float:
        """The spin kernel's clock rate, measured once with events."""
        if self._cycles_per_second is None:
            cycles = 10_000_000
            self.spin(cycles)
            self.synchronize()
            start = self.event()
            self.spin(cycles)
            end = self.event()
            self.synchronize()
            self._cycles_per_second = cycles / max(self.elapsed_s(start, end), 1e-9)
        return self._cycles_per_second

    def empty_launch_s(self, launches: int = 500) -> float | None:
        """Host time of one launch of an empty kernel, averaged over a loop of launches."""
        if self.library == "numba":
            return None
        launch = (lambda: self._empty_kernel((1,), (1,), ())) if self.library == "cupy" else (lambda: self.spin(1))
        launch()
        self.synchronize()
        start = time.perf_counter()
        for _ in range(launches):
            launch()
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
        cycles = int(hold_s * self.cycles_per_second()) if self.can_spin else 0
        pairs = []
        for _ in range(repeats):
            self.flush()
            self.spin(cycles)
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
