"""``convgrad bench``: time the three passes on built-in layer suites, beside PyTorch.

For every layer of the chosen suites, every pass and every backend, the benchmark

1. makes Gaussian inputs on the host and copies them to the backend's arrays;
2. runs the pass once and checks the result against the reference (PyTorch when it is the
   reference, else ``convgrad.testing.reference_*`` on the first image);
3. times it: on the CPU the median of ``time.perf_counter`` over the repeats; on a GPU the
   median of CUDA-event times, after a warm-up, with the L2 cache flushed (a 256 MiB buffer
   written) before every repeat;
4. reports time, TFLOP/s (``problem.flops(pass) / time``), GB/s (``problem.bytes(pass) /
   time``), the fraction of the device's roofline and the ratio to the reference.

The ratio is ``reference_time / backend_time``: above 1 means convgrad is faster than the
reference, below 1 slower.  The roofline is ``min(peak, bandwidth * flops / bytes)``, with the
peak and the bandwidth measured at start-up by a GEMM and a copy (NumPy on the CPU; CuPy,
else PyTorch, on a GPU), never taken from a table.

GPU kernel time and launch overhead are reported apart.  Before each timed repeat a
"spin" kernel that busy-waits a fixed number of clock cycles holds the GPU while the host
issues the call, so the events bracket only the kernels (``time_s``).  A second loop times
the call from the host with a synchronisation after it (``wall_s``); the difference is the
host-side cost of the call (checks, planning, launches) that the GPU sat idle for
(``launch_overhead_s``).  The cost of one empty kernel launch is recorded per device.

Only real backends are benchmarked; emulated ones (``cupy-host``, the Numba simulator) are
refused.  This module imports neither PyTorch, CuPy nor Numba until they are needed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import backends as backend_registry
from ..problem import PASSES, ConvProblem, conv_problem, y_user_shape
from ..testing.tolerance import tolerance

DTYPES = ("float32", "float16", "bfloat16", "float64")
L2_FLUSH_BYTES = 256 * 2**20

#: Every field of a record in the JSON output, in order.
RECORD_FIELDS = (
    "suite", "layer", "problem", "pass", "backend", "device", "dtype", "layout", "batch", "count",
    "flops", "bytes", "status", "error", "check", "max_abs_error", "error_over_tolerance",
    "repeats", "time_s", "time_min_s", "wall_s", "launch_overhead_s", "tflops", "gbs", "roofline_tflops", "roofline_fraction",
    "reference", "reference_time_s", "reference_wall_s", "reference_tflops", "ratio",
)

RATIO_DEFINITION = (
    "ratio = reference_time_s / time_s (median times of the same layer and pass on the same device): "
    "above 1 convgrad is faster than the reference, below 1 slower"
)


# ----------------------------------------------------------------------------------------
# Layer suites


@dataclass(frozen=True)
class Layer:
    """One convolution of a network, without its batch size."""

    C: int
    K: int
    size: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    count: int = 1  # how often the network uses this shape
    label: str = ""

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def name(self) -> str:
        kernel = "x".join(map(str, self.kernel)) if self.ndim > 1 else f"k{self.kernel[0]}"
        if self.stride > 1:
            kernel += f"/{self.stride}"
        if self.dilation > 1:
            kernel += f"d{self.dilation}"
        size = "x".join(map(str, self.size)) if self.ndim != 2 or self.size[0] != self.size[1] else str(self.size[0])
        if self.groups == self.C and self.groups > 1:
            channels = f"dw{self.C}" if self.K == self.C else f"dw{self.C}->{self.K}"
        else:
            channels = f"{self.C}->{self.K}" + (f" g{self.groups}" if self.groups > 1 else "")
        name = f"{kernel} {channels} @{size}"
        return f"{self.label} {name}" if self.label else name

    def shapes(self, batch: int, channels_last: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Input and weight shapes in the caller's layout."""
        if channels_last:
            return (batch, *self.size, self.C), (self.K, *self.kernel, self.C // self.groups)
        return (batch, self.C, *self.size), (self.K, self.C // self.groups, *self.kernel)

    def problem(self, batch: int, dtype: str, channels_last: bool, allow_tf32: bool = False) -> ConvProblem:
        x_shape, w_shape = self.shapes(batch, channels_last)
        return conv_problem(f"conv{self.ndim}d", self.ndim, x_shape, w_shape, self.stride, self.padding,
                            self.dilation, self.groups, dtype=dtype, channels_last=channels_last,
                            allow_tf32=allow_tf32)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    layers: tuple[Layer, ...]
    batch_gpu: int
    batch_cpu: int

    def batch(self, device: str) -> int:
        return self.batch_gpu if device == "gpu" else self.batch_cpu


def _square(C: int, K: int, size: int, kernel: int, stride: int = 1, count: int = 1, groups: int = 1,
            label: str = "") -> Layer:
    return Layer(C, K, (size, size), (kernel, kernel), stride, kernel // 2, 1, groups, count, label)


def _resnet50() -> tuple[Layer, ...]:
    """Every distinct convolution of torchvision's ResNet-50 (stride on the 3x3, as v1.5) at 224x224.

    ``count`` is how many of the network's 53 convolutions have the shape.
    """
    counts: dict[tuple[int, int, int, int, int], int] = {(3, 64, 224, 7, 2): 1}
    stages = [(64, 56, 3, 1), (128, 56, 4, 2), (256, 28, 6, 2), (512, 14, 3, 2)]  # width, input size, blocks, stride
    in_channels = 64
    for width, size, blocks, stride in stages:
        expanded = width * 4
        for block in range(blocks):
            block_in = in_channels if block == 0 else expanded
            block_size = size if block == 0 else size // stride
            block_stride = stride if block == 0 else 1
            shapes = [
                (block_in, width, block_size, 1, 1),  # reduce
                (width, width, block_size, 3, block_stride),  # 3x3, strided in the first block
                (width, expanded, size // stride, 1, 1),  # expand
            ]
            if block == 0:
                shapes.append((block_in, expanded, size, 1, stride))  # projection shortcut
            for shape in shapes:
                counts[shape] = counts.get(shape, 0) + 1
        in_channels = expanded
    return tuple(_square(C, K, size, kernel, stride, count=n, label="stem" if kernel == 7 else "")
                 for (C, K, size, kernel, stride), n in counts.items())


def _mobilenetv2_depthwise() -> tuple[Layer, ...]:
    """The distinct depthwise 3x3 layers of MobileNetV2 (width 1.0, 224x224)."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    counts: dict[tuple[int, int, int], int] = {}
    in_channels, size = 32, 112
    for expand, out_channels, repeats, stride in settings:
        for i in range(repeats):
            s = stride if i == 0 else 1
            hidden = in_channels * expand
            key = (hidden, size, s)
            counts[key] = counts.get(key, 0) + 1
            in_channels, size = out_channels, size // s
    return tuple(_square(c, c, size, 3, s, count=n, groups=c) for (c, size, s), n in counts.items())


def _audio1d() -> tuple[Layer, ...]:
    """A 1-D stack over 4096 samples: a strided front end, then kernels 9 down to 3, one dilated, one depthwise."""
    return (
        Layer(1, 64, (4096,), (9,), 2, 4),
        Layer(64, 64, (2048,), (7,), 1, 3),
        Layer(64, 128, (2048,), (5,), 2, 2),
        Layer(128, 128, (1024,), (5,), 1, 2),
        Layer(128, 256, (1024,), (3,), 2, 1),
        Layer(256, 256, (512,), (3,), 1, 1),
        Layer(256, 256, (512,), (3,), 1, 2, 2),
        Layer(256, 256, (512,), (9,), 1, 4, 1, 256),
    )


def _video3d() -> tuple[Layer, ...]:
    """3x3x3 convolutions of a video network at 16 frames of 56x56."""
    return (
        Layer(64, 64, (16, 56, 56), (3, 3, 3), 1, 1),
        Layer(64, 128, (16, 56, 56), (3, 3, 3), 2, 1),
        Layer(128, 128, (8, 28, 28), (3, 3, 3), 1, 1),
    )


def _quick() -> tuple[Layer, ...]:
    """One layer of each kind, small enough that a CPU runs all of them in seconds."""
    return (
        _square(3, 64, 112, 7, 2),
        _square(64, 64, 28, 3),
        _square(128, 128, 28, 3, 2),
        _square(256, 64, 28, 1),
        _square(144, 144, 28, 3, groups=144),
        Layer(64, 64, (2048,), (5,), 1, 2),
        Layer(16, 16, (8, 16, 16), (3, 3, 3), 1, 1),
    )


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("quick", "one small layer of each kind; seconds on a CPU", _quick(), batch_gpu=8, batch_cpu=2),
        Suite("resnet50", "every distinct convolution of ResNet-50 at 224x224", _resnet50(), batch_gpu=32, batch_cpu=8),
        Suite("mobilenetv2-dw", "MobileNetV2's depthwise 3x3 layers", _mobilenetv2_depthwise(), batch_gpu=32, batch_cpu=8),
        Suite("audio1d", "a 1-D stack over 4096 samples, kernels 3 to 9", _audio1d(), batch_gpu=32, batch_cpu=4),
        Suite("video3d", "3x3x3 convolutions at 16x56x56", _video3d(), batch_gpu=8, batch_cpu=1),
    )
}


# ----------------------------------------------------------------------------------------
# Arrays on each side


def _dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(_dtype(dtype))


def _logical(array: np.ndarray, channels_last: bool) -> np.ndarray:
    """A caller-layout host array as (N or K, C, *spatial): channels-last moves its last axis to 1."""
    return np.moveaxis(array, -1, 1) if channels_last else array


def _device_of(backend: Any) -> str:
    return "cpu" if "numpy" in backend.array_kinds else "gpu"


def _array_kind(backend: Any) -> str:
    """The array library a benchmark of ``backend`` computes on."""
    kinds = backend.array_kinds
    if "numpy" in kinds:
        return "numpy"
    if "cupy" in kinds and importlib.util.find_spec("cupy") is not None:
        return "cupy"
    return kinds[0]


def _to_kind(array: np.ndarray, kind: str) -> Any:
    if kind == "numpy":
        return array
    if kind == "cupy":
        import cupy

        return cupy.asarray(array)
    if kind == "numba":
        from numba import cuda

        return cuda.to_device(array)
    raise TypeError(f"cannot make {kind} arrays")


def _to_host(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    return array.get()


def _to_torch(array: np.ndarray, channels_last: bool, device: str) -> Any:
    """A torch tensor with logical shape and the host array's strides (channels-last stays channels-last)."""
    import torch

    logical = _logical(array, channels_last)
    if logical.dtype == _dtype("bfloat16"):
        tensor = torch.from_numpy(logical.view(np.uint16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(logical)
    return tensor.to(device)


# ----------------------------------------------------------------------------------------
# Timers


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


def _gpu_timer_library(prefer: Sequence[str]) -> str | None:
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


# ----------------------------------------------------------------------------------------
# Device description and roofline


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _best_rate(fn: Callable[[], Any], amount: float, repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return amount / best


def _cpu_peaks(dtype: str) -> dict[str, Any]:
    """sgemm (dgemm for float64) and copy bandwidth with NumPy.

    16-bit types are widened to float32 by the numpy backend, so their peak is sgemm's.
    """
    gemm_dtype = np.float64 if dtype == "float64" else np.float32
    n = 1536
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(gemm_dtype)
    b = rng.standard_normal((n, n)).astype(gemm_dtype)
    c = np.empty((n, n), gemm_dtype)
    flops = _best_rate(lambda: np.matmul(a, b, out=c), 2.0 * n**3, 3)
    src = np.ones(64 * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    bandwidth = _best_rate(lambda: np.copyto(dst, src), 2.0 * src.nbytes, 5)
    return {
        "peak_tflops": flops / 1e12,
        "bandwidth_gbs": bandwidth / 1e9,
        "peak_source": f"numpy matmul {n}x{n} {np.dtype(gemm_dtype).name}; np.copyto of 64 MiB",
    }


def _gpu_peaks(dtype: str, allow_tf32: bool) -> dict[str, Any]:
    """GEMM and device-to-device copy rates with CuPy; PyTorch for what CuPy cannot do (bf16, TF32)."""
    n = 8192
    errors = []
    if importlib.util.find_spec("cupy") is not None and not (allow_tf32 and dtype == "float32") and dtype != "bfloat16":
        try:
            import cupy

            a = cupy.ones((n, n), dtype=dtype)
            b = cupy.ones((n, n), dtype=dtype)
            sync = cupy.cuda.runtime.deviceSynchronize
            flops = _best_rate(lambda: cupy.matmul(a, b), 2.0 * n**3, 5, sync)
            src = cupy.ones(2**30 // 4, dtype=cupy.float32)
            dst = cupy.empty_like(src)
            bandwidth = _best_rate(lambda: cupy.copyto(dst, src), 2.0 * src.nbytes, 10, sync)
            return {"peak_tflops": flops / 1e12, "bandwidth_gbs": bandwidth / 1e9,
                    "peak_source": f"cupy matmul {n}x{n} {dtype}; cupy.copyto of 1 GiB"}
        except Exception as error:  # fall through to PyTorch
            errors.append(f"cupy: {error}")
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            tdtype = getattr(torch, dtype)
            a = torch.ones((n, n), dtype=tdtype, device="cuda")
            b = torch.ones((n, n), dtype=tdtype, device="cuda")
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            try:
                flops = _best_rate(lambda: torch.matmul(a, b), 2.0 * n**3, 5, torch.cuda.synchronize)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
            src = torch.ones(2**30 // 4, dtype=torch.float32, device="cuda")
            dst = torch.empty_like(src)
            bandwidth = _best_rate(lambda: dst.copy_(src), 2.0 * src.numel() * 4, 10, torch.cuda.synchronize)
            return {"peak_tflops": flops / 1e12, "bandwidth_gbs": bandwidth / 1e9,
                    "peak_source": f"torch.matmul {n}x{n} {dtype} (allow_tf32={allow_tf32}); copy_ of 1 GiB"}
        except Exception as error:
            errors.append(f"torch: {error}")
    return {"peak_tflops": None, "bandwidth_gbs": None, "peak_source": "not measured: " + "; ".join(errors)}


def _gpu_name() -> str | None:
    with contextlib.suppress(Exception):
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    with contextlib.suppress(Exception):
        import torch

        return torch.cuda.get_device_name()
    with contextlib.suppress(Exception):
        from numba import cuda

        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    return None


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
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


def _threadpools() -> list[dict[str, Any]] | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return threadpool_info()


_ENV_RECORDED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                 "CONVGRAD_BACKEND", "CONVGRAD_DETERMINISTIC", "CONVGRAD_ALLOW_TF32", "CONVGRAD_AUTOTUNE",
                 "CONVGRAD_WORKSPACE_MB", "CUDA_VISIBLE_DEVICES", "NUMBA_ENABLE_CUDASIM")


def _versions() -> dict[str, str | None]:
    from .. import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "convgrad": __version__,
                                       "numpy": np.__version__}
    for dist in ("torch", "cupy-cuda13x", "cupy-cuda12x", "cupy", "numba", "numba-cuda", "ml_dtypes", "threadpoolctl"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def _git_commit() -> dict[str, Any] | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------
# One layer


@dataclass
class Case:
    """The host data of one layer at one batch size, shared by every backend of a device."""

    suite: str
    layer: Layer
    batch: int
    dtype: str
    channels_last: bool
    allow_tf32: bool
    x: np.ndarray
    w: np.ndarray
    dy: np.ndarray

    @property
    def problem(self) -> ConvProblem:
        return self.layer.problem(self.batch, self.dtype, self.channels_last, self.allow_tf32)


def _make_case(suite: str, layer: Layer, batch: int, dtype: str, channels_last: bool, allow_tf32: bool,
               seed: int) -> Case:
    rng = np.random.default_rng(seed)
    x_shape, w_shape = layer.shapes(batch, channels_last)
    problem = layer.problem(batch, dtype, channels_last)
    return Case(suite, layer, batch, dtype, channels_last, allow_tf32, _random(rng, x_shape, dtype),
                _random(rng, w_shape, dtype), _random(rng, y_user_shape(problem), dtype))


def _convgrad_call(case: Case, pass_: str, backend: str, arrays: dict[str, Any]) -> Callable[[], Any]:
    import convgrad

    layer, n = case.layer, case.layer.ndim
    common = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  channels_last=case.channels_last, backend=backend, allow_tf32=case.allow_tf32)
    x, w, dy = arrays["x"], arrays["w"], arrays["dy"]
    if pass_ == "fprop":
        conv = getattr(convgrad, f"conv{n}d")
        return lambda: conv(x, w, None, **common)
    if pass_ == "dgrad":
        conv_input = getattr(convgrad, f"conv{n}d_input")
        x_shape = tuple(case.x.shape)
        return lambda: conv_input(x_shape, w, dy, **common)
    conv_weight = getattr(convgrad, f"conv{n}d_weight")
    w_shape = tuple(case.w.shape)
    return lambda: conv_weight(x, w_shape, dy, **common)


def _torch_call(case: Case, pass_: str, tensors: dict[str, Any]) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    layer, n = case.layer, case.layer.ndim
    stride, padding, dilation = [layer.stride] * n, [layer.padding] * n, [layer.dilation] * n
    x, w, dy = tensors["x"], tensors["w"], tensors["dy"]
    if pass_ == "fprop":
        conv = getattr(F, f"conv{n}d")
        return lambda: conv(x, w, None, stride, padding, dilation, layer.groups)
    mask = [pass_ == "dgrad", pass_ == "wgrad", False]
    index = 0 if pass_ == "dgrad" else 1
    backward = torch.ops.aten.convolution_backward
    return lambda: backward(dy, x, w, None, stride, padding, dilation, False, [0] * n, layer.groups, mask)[index]


def _torch_result_logical(result: Any) -> Any:
    """PyTorch's result in float64: a NumPy array from the CPU, a CUDA tensor from a GPU (compared there)."""
    import torch

    if result.is_cuda:
        return result.detach().to(torch.float64)
    return result.detach().to("cpu", torch.float64).numpy()


def _compare_on_gpu(result: Any, expected: Any, channels_last: bool, rtol: float, atol: float) -> tuple[bool, float, float]:
    """:func:`_compare` on the GPU: ``result`` is any CUDA array (CUDA array interface), ``expected`` a tensor.

    Copying ResNet-50-sized results to the host and comparing them there would take longer
    than timing them.
    """
    import torch

    actual = torch.as_tensor(result, device=expected.device).to(torch.float64)
    if channels_last:
        actual = actual.movedim(-1, 1)
    diff = (actual - expected).abs()
    allowed = 2.0 * (atol + rtol * expected.abs())
    over = float((diff / allowed).max()) if diff.numel() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(actual).all())
    return finite and over <= 1.0, max_abs, over


def _tolerance(case: Case, pass_: str, device: str) -> tuple[float, float]:
    """(rtol, atol) for one result against the true value; TF32 rounds each GEMM operand to 10 bits."""
    reduction = case.problem.gemm_reduction[pass_]
    rtol, atol = tolerance(case.dtype, reduction)
    if case.allow_tf32 and case.dtype == "float32" and device == "gpu":
        rtol = max(rtol, 2.0**-10)
        atol += 8 * 2.0**-11 * math.sqrt(reduction)
    return rtol, atol


def _compare(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float, both_rounded: bool) -> tuple[bool, float, float]:
    """(ok, max abs error, worst error / allowed); ``both_rounded`` doubles the bound (two inexact sides)."""
    scale = 2.0 if both_rounded else 1.0
    actual = np.asarray(actual, dtype=np.float64)
    diff = np.abs(actual - expected)
    allowed = scale * (atol + rtol * np.abs(expected))
    with np.errstate(invalid="ignore", divide="ignore"):
        over = diff / allowed
    finite = bool(np.isfinite(actual).all())
    worst = float(np.nanmax(over)) if over.size else 0.0
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    return finite and worst <= 1.0, max_abs, worst


def _naive_check(case: Case, pass_: str, backend: str, kind: str) -> tuple[bool, float, float]:
    """Check ``backend`` against the float64 reference on the first image only (keeps the loops cheap)."""
    from ..testing import reference_forward, reference_grad_input, reference_grad_weight

    one = Case(case.suite, case.layer, 1, case.dtype, case.channels_last, case.allow_tf32,
               case.x[:1], case.w, case.dy[:1])
    arrays = {name: _to_kind(np.ascontiguousarray(getattr(one, name)), kind) for name in ("x", "w", "dy")}
    actual = _logical(_to_host(_convgrad_call(one, pass_, backend, arrays)()), case.channels_last)
    problem = one.problem
    five = lambda a: a.astype(np.float64).reshape(a.shape[0], a.shape[1], *([1] * (3 - case.layer.ndim)), *a.shape[2:])
    x, w, dy = (five(_logical(getattr(one, name), case.channels_last)) for name in ("x", "w", "dy"))
    if pass_ == "fprop":
        expected = reference_forward(x, w, problem)
    elif pass_ == "dgrad":
        expected = reference_grad_input(dy, w, problem)
    else:
        expected = reference_grad_weight(x, dy, problem)
    rtol, atol = _tolerance(one, pass_, _device_of(backend_registry.get(backend)))
    return _compare(actual, expected.reshape(actual.shape), rtol, atol, both_rounded=False)


# ----------------------------------------------------------------------------------------
# The run


@dataclass
class Options:
    suites: list[str]
    backends: list[str]
    passes: list[str]
    dtype: str
    channels_last: bool
    reference: str
    batch: int | None
    allow_tf32: bool
    repeats: int | None
    warmup: int | None
    seed: int


class Bench:
    """Runs the benchmark and collects records; ``meta`` describes the machine and the run."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.records: list[dict[str, Any]] = []
        self.devices: dict[str, dict[str, Any]] = {}
        self._timers: dict[str, Any] = {}
        self._reference_timers: dict[str, Any] = {}
        self._reference_cache: dict[tuple, tuple[np.ndarray, Timing] | str] = {}
        self.backend_devices = {name: _device_of(backend_registry.get(name)) for name in options.backends}
        self.load_at_start = _load_average()
        self.contention = Contention()

    # -- set-up --------------------------------------------------------------------------
    def devices_used(self) -> list[str]:
        return sorted(set(self.backend_devices.values()))

    def setup(self) -> None:
        opts = self.options
        if opts.reference == "torch":
            import torch

            if torch.cuda.is_available():
                torch.backends.cudnn.benchmark = True
                torch.backends.cudnn.allow_tf32 = opts.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = opts.allow_tf32
        for device in self.devices_used():
            info: dict[str, Any] = {"device": device}
            if device == "cpu":
                self._timers["cpu"] = CpuTimer()
                self._reference_timers["cpu"] = self._timers["cpu"]
                info.update(name=_cpu_name(), logical_cpus=os.cpu_count(),
                            usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
                info.update(_cpu_peaks(opts.dtype))
                if opts.reference == "torch":
                    import torch

                    info["torch_threads"] = torch.get_num_threads()
                info["threadpools"] = _threadpools()  # after numpy and torch have loaded their pools
                info["environment"] = {name: os.environ.get(name) for name in _ENV_RECORDED}
            else:
                library = _gpu_timer_library(("cupy", "torch", "numba"))
                if library is None:
                    raise RuntimeError("a GPU backend was chosen but no CUDA device is visible to CuPy, PyTorch or Numba")
                timer = GpuTimer(library)
                self._timers["gpu"] = timer
                if opts.reference == "torch":
                    import torch

                    if torch.cuda.is_available():
                        self._reference_timers["gpu"] = GpuTimer("torch")
                info.update(name=_gpu_name(), timer_library=library, l2_flush_bytes=timer.flush_bytes,
                            spin_hold=timer.can_spin, empty_launch_s=timer.empty_launch_s())
                info.update(_gpu_peaks(opts.dtype, opts.allow_tf32))
                with contextlib.suppress(Exception):
                    import cupy

                    info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
                    info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
                if opts.reference == "torch":
                    import torch

                    info["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
                    info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
                    info["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
                    info["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
            self.devices[device] = info

    def meta(self) -> dict[str, Any]:
        from .. import options as convgrad_options

        opts = self.options
        return {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": ["convgrad", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv,
            "host": platform.node(),
            "load_average": {"start": self.load_at_start, "end": _load_average()},
            # CPU seconds other processes used during the run, and the average number of CPUs they kept busy.
            "contention": self.contention.report(),
            "platform": platform.platform(),
            "versions": _versions(),
            "git": _git_commit(),
            "suites": opts.suites,
            "backends": opts.backends,
            "passes": opts.passes,
            "dtype": opts.dtype,
            "layout": "nhwc" if opts.channels_last else "nchw",
            "allow_tf32": opts.allow_tf32,
            "deterministic": bool(convgrad_options.get("deterministic")),
            "reference": opts.reference,
            "repeats": opts.repeats,
            "warmup": opts.warmup,
            "seed": opts.seed,
            "devices": self.devices,
            "ratio_definition": RATIO_DEFINITION,
            "roofline_definition": "roofline_tflops = min(peak_tflops, bandwidth_gbs * flops / bytes / 1000); "
                                   "roofline_fraction = tflops / roofline_tflops",
            "timing": {
                "cpu": "median of time.perf_counter around each call, after warm-up; a pause of CPU_SETTLE_S "
                       "seconds before timing a different library lets the other's worker threads go idle",
                "gpu": "time_s: median CUDA-event time with the L2 flushed and the GPU held by a spin kernel while the "
                       "host issues the call; wall_s: median host time of call + synchronize; launch_overhead_s = "
                       "wall_s - time_s",
            },
        }

    # -- work ----------------------------------------------------------------------------
    def tasks(self) -> Iterator[tuple[str, Layer, str, int]]:
        for suite_name in self.options.suites:
            suite = SUITES[suite_name]
            for layer in suite.layers:
                for device in self.devices_used():
                    yield suite_name, layer, device, self.options.batch or suite.batch(device)

    def count(self) -> int:
        per_layer = sum(len(self.options.passes) * sum(1 for b in self.options.backends if self.backend_devices[b] == d)
                        for d in self.devices_used())
        return per_layer * sum(len(SUITES[s].layers) for s in self.options.suites)

    def repeats(self, device: str) -> tuple[int, int]:
        opts = self.options
        repeats = opts.repeats or (20 if device == "gpu" else 5)
        warmup = opts.warmup if opts.warmup is not None else (3 if device == "gpu" else 1)
        return warmup, repeats

    def run_layer(self, suite: str, layer: Layer, device: str, batch: int, advance: Callable[[str], None]) -> None:
        opts = self.options
        case = _make_case(suite, layer, batch, opts.dtype, opts.channels_last, opts.allow_tf32,
                          opts.seed + len(self.records))
        names = [b for b in opts.backends if self.backend_devices[b] == device]
        arrays: dict[str, dict[str, Any] | str] = {}  # per array library, made once per layer
        # The reference first for every pass, then each backend: one switch of library per layer.
        references = {pass_: self._reference(case, pass_, device) if opts.reference == "torch" else None
                      for pass_ in opts.passes}
        for name in names:
            for pass_ in opts.passes:
                reference = references[pass_]
                advance(f"{layer.name} {pass_} {name}")
                kind = _array_kind(backend_registry.get(name))
                if kind not in arrays:
                    try:
                        arrays[kind] = {n: _to_kind(getattr(case, n), kind) for n in ("x", "w", "dy")}
                    except Exception as error:
                        arrays[kind] = f"cannot make {kind} arrays of {case.dtype}: {type(error).__name__}: {error}"
                self.records.append(self._measure(case, pass_, name, device, reference, arrays[kind]))
        del references

    def _reference(self, case: Case, pass_: str, device: str) -> tuple[Any, Timing] | str:
        """PyTorch's result (logical layout, float64, where it was computed) and timing, or why there is none."""
        if device not in self._reference_timers:
            return "PyTorch has no CUDA device here"
        try:
            import torch

            torch_device = "cuda" if device == "gpu" else "cpu"
            tensors = {name: _to_torch(getattr(case, name), case.channels_last, torch_device) for name in ("x", "w", "dy")}
            call = _torch_call(case, pass_, tensors)
            result = _torch_result_logical(call())
            warmup, repeats = self.repeats(device)
            timing = self._reference_timers[device].measure(call, warmup, repeats, "torch")
            del tensors
            return result, timing
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    def _measure(self, case: Case, pass_: str, name: str, device: str,
                 reference: tuple[np.ndarray, Timing] | str | None, arrays: dict[str, Any] | str) -> dict[str, Any]:
        problem = case.problem
        flops, nbytes = problem.flops(pass_), problem.bytes(pass_)
        record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
        record.update(suite=case.suite, layer=case.layer.name, problem=problem.name(pass_), backend=name, device=device,
                      dtype=case.dtype, layout="nhwc" if case.channels_last else "nchw", batch=case.batch,
                      count=case.layer.count, flops=flops, bytes=nbytes, check="not run")
        record["pass"] = pass_
        backend = backend_registry.get(name)
        reason = backend.unsupported(problem)
        if reason:
            record.update(status="unsupported", error=reason)
            return record
        if isinstance(arrays, str):
            record.update(status="unsupported", error=arrays)
            return record
        kind = _array_kind(backend)
        try:
            call = _convgrad_call(case, pass_, name, arrays)
            result = call()
            rtol, atol = _tolerance(case, pass_, device)
            if isinstance(reference, tuple) and not isinstance(reference[0], np.ndarray):
                ok, max_abs, over = _compare_on_gpu(result, reference[0], case.channels_last, rtol, atol)
                record["check"] = "ok (vs torch)" if ok else "MISMATCH (vs torch)"
            elif isinstance(reference, tuple):
                actual = _logical(_to_host(result), case.channels_last)
                ok, max_abs, over = _compare(actual, reference[0], rtol, atol, both_rounded=True)
                record["check"] = "ok (vs torch)" if ok else "MISMATCH (vs torch)"
            else:
                ok, max_abs, over = _naive_check(case, pass_, name, kind)
                record["check"] = "ok (vs float64 reference, first image)" if ok else "MISMATCH (vs float64 reference)"
            del result
            record.update(max_abs_error=max_abs, error_over_tolerance=over)
            warmup, repeats = self.repeats(device)
            timing = self._timers[device].measure(call, warmup, repeats, name)
        except Exception as error:
            record.update(status="error", error=f"{type(error).__name__}: {error}")
            return record
        record.update(status="ok" if ok else "mismatch", repeats=timing.repeats, time_s=timing.time_s,
                      time_min_s=min(timing.times_s), wall_s=timing.wall_s, tflops=flops / timing.time_s / 1e12, gbs=nbytes / timing.time_s / 1e9)
        if device == "gpu":
            record["launch_overhead_s"] = timing.launch_overhead_s
        info = self.devices.get(device, {})
        peak, bandwidth = info.get("peak_tflops"), info.get("bandwidth_gbs")
        if peak and bandwidth:
            roofline = min(peak, bandwidth * flops / nbytes / 1e3)
            record.update(roofline_tflops=roofline, roofline_fraction=record["tflops"] / roofline)
        if isinstance(reference, tuple):
            ref_timing = reference[1]
            record.update(reference="torch", reference_time_s=ref_timing.time_s, reference_wall_s=ref_timing.wall_s,
                          reference_tflops=flops / ref_timing.time_s / 1e12, ratio=ref_timing.time_s / timing.time_s)
        elif isinstance(reference, str):
            record["reference"] = f"none: {reference}"
        return record

    # -- summary -------------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per backend and pass: geometric means of the ratio and of TFLOP/s over the layers timed."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for name in self.options.backends:
            for pass_ in self.options.passes:
                rows = [r for r in self.records if r["backend"] == name and r["pass"] == pass_ and r["time_s"]]
                ratios = [r["ratio"] for r in rows if r["ratio"]]
                out.setdefault(name, {})[pass_] = {
                    "layers": len(rows),
                    "geomean_ratio": _geomean(ratios),
                    "geomean_tflops": _geomean([r["tflops"] for r in rows]),
                    "mismatches": sum(1 for r in self.records if r["backend"] == name and r["pass"] == pass_
                                      and r["status"] in ("mismatch", "error")),
                }
        return out


def _geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# ----------------------------------------------------------------------------------------
# Output


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(bench: Bench, file: Any = None) -> None:
    """The per-layer table and the geometric means, with rich when it is installed."""
    gpu = "gpu" in bench.devices_used()
    columns = ["layer", "pass", "backend", "ms", "TFLOP/s", "GB/s", "roofline", "ref ms", "ratio", "check"]
    if gpu:
        columns.insert(4, "overhead ms")
    rows = []
    for r in bench.records:
        status = r["status"]
        check = {"ok": "ok", "mismatch": "MISMATCH", "unsupported": "unsupported", "error": "ERROR"}.get(status, status)
        row = [r["layer"], r["pass"], r["backend"], _fmt(r["time_s"], ".3f", 1e3), _fmt(r["tflops"], ".3g"),
               _fmt(r["gbs"], ".1f"), _fmt(r["roofline_fraction"], ".0%"), _fmt(r["reference_time_s"], ".3f", 1e3),
               _fmt(r["ratio"], ".2f"), check]
        if gpu:
            row.insert(4, _fmt(r["launch_overhead_s"], ".3f", 1e3))
        rows.append(row)
    summary_rows = [[name, pass_, str(s["layers"]), _fmt(s["geomean_tflops"], ".3g"), _fmt(s["geomean_ratio"], ".2f"),
                     str(s["mismatches"])]
                    for name, passes in bench.summary().items() for pass_, s in passes.items()]
    summary_columns = ["backend", "pass", "layers", "geomean TFLOP/s", "geomean ratio", "mismatches/errors"]
    title = (f"convgrad bench: {', '.join(bench.options.suites)}, {bench.options.dtype}, "
             f"{'nhwc' if bench.options.channels_last else 'nchw'}, allow_tf32={bench.options.allow_tf32}")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        out = file or sys.stdout
        print(title, file=out)
        for table_columns, table_rows in ((columns, rows), (summary_columns, summary_rows)):
            widths = [max(len(c), *(len(r[i]) for r in table_rows)) if table_rows else len(c)
                      for i, c in enumerate(table_columns)]
            print("  ".join(c.ljust(w) for c, w in zip(table_columns, widths)), file=out)
            for row in table_rows:
                print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=out)
            print(file=out)
        print(RATIO_DEFINITION, file=out)
        return
    console = Console(file=file, width=None if file is None and sys.stdout.isatty() else 160)
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("layer", "pass", "backend", "check") else "right")
    for row in rows:
        style = "red" if row[-1] in ("MISMATCH", "ERROR") else ("dim" if row[-1] == "unsupported" else None)
        table.add_row(*row, style=style)
    console.print(table)
    summary = Table(title="geometric means over the layers")
    for c in summary_columns:
        summary.add_column(c, justify="left" if c in ("backend", "pass") else "right")
    for row in summary_rows:
        summary.add_row(*row)
    console.print(summary)
    console.print(RATIO_DEFINITION)


def write_plot(bench: Bench, path: str) -> None:
    """TFLOP/s per layer, one panel per pass, a bar per backend and per reference device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = bench.options.passes
    layers = list(dict.fromkeys(r["layer"] for r in bench.records))
    series: dict[str, dict[tuple[str, str], float]] = {}
    for r in bench.records:
        if r["tflops"]:
            series.setdefault(r["backend"], {})[(r["layer"], r["pass"])] = r["tflops"]
        if r["reference_tflops"]:
            series.setdefault(f"torch ({r['device']})", {})[(r["layer"], r["pass"])] = r["reference_tflops"]
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(8.0, 0.45 * len(layers) * max(len(series), 1)), 3.2 * len(passes)),
                             squeeze=False)
    width = 0.8 / max(len(series), 1)
    for ax, pass_ in zip(axes[:, 0], passes):
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(layers))]
            ax.bar(xs, [values.get((layer, pass_), math.nan) for layer in layers], width, label=label)
        ax.set_title(pass_)
        ax.set_yscale("log")  # depthwise and dense layers differ by orders of magnitude
        ax.set_ylabel("TFLOP/s")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"convgrad bench ({bench.options.dtype}, {', '.join(bench.options.suites)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="layer suite (repeatable; default quick): " +
                        "; ".join(f"{s.name}: {s.description}" for s in SUITES.values()))
    parser.add_argument("--backend", action="append",
                        help="backend to time (repeatable, or 'all'); default every available real backend")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--pass", dest="passes", default="all", choices=(*PASSES, "all"))
    parser.add_argument("--batch", type=int, help="batch size (default per suite: larger on a GPU than on the CPU)")
    parser.add_argument("--layout", default="nchw", choices=("nchw", "nhwc"),
                        help="nhwc: channels-last arrays on both sides (NWC / NDHWC for 1-D / 3-D)")
    parser.add_argument("--reference", choices=("torch", "none"),
                        help="library timed beside convgrad (default torch when installed)")
    parser.add_argument("--allow-tf32", action="store_true", help="TF32 on GPU, for convgrad and cuDNN alike")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 1 CPU, 3 GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write every record and the machine description as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a plot of TFLOP/s per layer (PNG, SVG, PDF)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve_backends(requested: list[str] | None) -> list[str]:
    real = backend_registry.available(include_emulated=False)
    if not requested or "all" in requested:
        return real
    chosen = []
    for name in requested:
        backend = backend_registry.get(name)  # ValueError for unknown names
        if backend.emulated:
            raise ValueError(f"backend {name!r} is emulated (runs GPU code on the CPU) and is never benchmarked")
        if not backend.available():
            raise ValueError(f"backend {name!r} is not available on this machine; available: {', '.join(real)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def options_from_args(args: argparse.Namespace) -> Options:
    reference = args.reference or ("torch" if importlib.util.find_spec("torch") is not None else "none")
    if reference == "torch" and importlib.util.find_spec("torch") is None:
        raise ValueError("--reference torch needs PyTorch installed")
    for name in ("batch", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be non-negative, got {args.warmup}")
    return Options(
        suites=list(dict.fromkeys(args.suite or ["quick"])),
        backends=_resolve_backends(args.backend),
        passes=list(PASSES) if args.passes == "all" else [args.passes],
        dtype=args.dtype,
        channels_last=args.layout == "nhwc",
        reference=reference,
        batch=args.batch,
        allow_tf32=bool(args.allow_tf32),
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
    )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``timeout``) into KeyboardInterrupt so the partial results still get written."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda description: None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        yield lambda description: None
        return
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("bench", total=total)
        started = [False]

        def advance(description: str) -> None:
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=description)

        yield advance
        progress.update(task, completed=total)


def run(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
    except ValueError as error:
        print(f"convgrad bench: {error}", file=sys.stderr)
        return 2
    if not opts.backends:
        print("convgrad bench: no real backend is available", file=sys.stderr)
        return 2
    bench = Bench(opts)
    interrupted = False
    with _terminate_as_interrupt():
        try:
            try:
                bench.setup()
            except (RuntimeError, ImportError) as error:
                print(f"convgrad bench: cannot set up: {error}", file=sys.stderr)
                return 2
            with _progress(bench.count(), not args.no_progress) as advance:
                for suite, layer, device, batch in bench.tasks():
                    bench.run_layer(suite, layer, device, batch, advance)
        except KeyboardInterrupt:
            interrupted = True
            print("convgrad bench: interrupted; writing what was measured", file=sys.stderr)
        finally:
            if args.json:
                document = {"meta": {**bench.meta(), "interrupted": interrupted}, "records": bench.records,
                            "summary": bench.summary()}
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(document, indent=1, default=str) + "\n")
    print_table(bench)
    if args.plot and bench.records:
        write_plot(bench, args.plot)
    if interrupted:
        return 130
    failed = [r for r in bench.records if r["status"] in ("mismatch", "error")]
    for r in failed:
        print(f"convgrad bench: {r['status']}: {r['problem']} on {r['backend']}: "
              f"{r['error'] or r['check']} (max |error| {r['max_abs_error']}, {r['error_over_tolerance']} x tolerance)",
              file=sys.stderr)
    return 1 if failed else 0
