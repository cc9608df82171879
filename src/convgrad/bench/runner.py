"""The benchmark run: machine set-up, then for every layer, pass and backend a checked, timed record.

:class:`Bench` holds the options, the timers of each device, the records and the description of the
machine (``meta``); ``convgrad bench`` (:mod:`.cli`) drives it and :mod:`.report` prints what it
collected.
"""

from __future__ import annotations

import datetime
import math
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import backends as backend_registry
from .arrays import array_kind, device_of, to_kind, to_torch
from .cases import Case, convgrad_call, make_case, torch_call
from .check import check_result, torch_result_logical
from .environment import cpu_identity, cpu_software, cuda_software, git_commit, gpu_name, library_versions, load_average
from .roofline import ROOFLINE_DEFINITION, cpu_peaks, gpu_peaks, roofline_tflops
from .suites import SUITES, Layer
from .timing import Contention, CpuTimer, GpuTimer, Timing, gpu_timer_library

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
        self.backend_devices = {name: device_of(backend_registry.get(name)) for name in options.backends}
        self.load_at_start = load_average()
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
                info.update(cpu_identity())
                info.update(cpu_peaks(opts.dtype))
                info.update(cpu_software(opts.reference == "torch"))  # after the peaks have loaded NumPy's BLAS pool
            else:
                library = gpu_timer_library(("cupy", "torch", "numba"))
                if library is None:
                    raise RuntimeError("a GPU backend was chosen but no CUDA device is visible to CuPy, PyTorch or Numba")
                timer = GpuTimer(library)
                self._timers["gpu"] = timer
                if opts.reference == "torch":
                    import torch

                    if torch.cuda.is_available():
                        self._reference_timers["gpu"] = GpuTimer("torch")
                info.update(name=gpu_name(), timer_library=library, l2_flush_bytes=timer.flush_bytes,
                            spin_hold=timer.can_spin, empty_launch_s=timer.empty_launch_s())
                info.update(gpu_peaks(opts.dtype, opts.allow_tf32))
                info.update(cuda_software(opts.reference == "torch"))
            self.devices[device] = info

    def meta(self) -> dict[str, Any]:
        from .. import options as convgrad_options

        opts = self.options
        return {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": ["convgrad", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv,
            "host": platform.node(),
            "load_average": {"start": self.load_at_start, "end": load_average()},
            # CPU seconds other processes used during the run, and the average number of CPUs they kept busy.
            "contention": self.contention.report(),
            "platform": platform.platform(),
            "versions": library_versions(),
            "git": git_commit(),
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
            "roofline_definition": ROOFLINE_DEFINITION,
            "timing": {
                "cpu": "median of time.perf_counter around each call, after warm-up; a pause of CPU_SETTLE_S "
                       "seconds before timing a different library lets the other's worker threads go idle",
                "gpu": "time_s: median CUDA-event time with the L2 flushed by reading a buffer of l2_flush_bytes "
                       "and the GPU held by a spin kernel while the host issues the call, the same for every "
                       "library; wall_s: median host time of call + synchronize; launch_overhead_s = "
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
        case = make_case(suite, layer, batch, opts.dtype, opts.channels_last, opts.allow_tf32,
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
                kind = array_kind(backend_registry.get(name))
                if kind not in arrays:
                    try:
                        arrays[kind] = {n: to_kind(getattr(case, n), kind) for n in ("x", "w", "dy")}
                    except Exception as error:
                        arrays[kind] = f"cannot make {kind} arrays of {case.dtype}: {type(error).__name__}: {error}"
                self.records.append(self._measure(case, pass_, name, device, reference, arrays[kind]))
        del references

    def _reference(self, case: Case, pass_: str, device: str) -> tuple[Any, Timing] | str:
        """PyTorch's result (logical layout, float64, where it was computed) and timing, or why there is none."""
        if device not in self._reference_timers:
            return "PyTorch has no CUDA device here"
        try:
            import torch  # noqa: F401  (an ImportError here is reported as the reason)

            torch_device = "cuda" if device == "gpu" else "cpu"
            tensors = {name: to_torch(getattr(case, name), case.channels_last, torch_device) for name in ("x", "w", "dy")}
            call = torch_call(case, pass_, tensors)
            result = torch_result_logical(call())
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
        try:
            call = convgrad_call(case, pass_, name, arrays)
            result = call()
            reference_result = reference[0] if isinstance(reference, tuple) else None
            record["check"], ok, max_abs, over = check_result(case, pass_, name, device, result, reference_result)
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
            roofline = roofline_tflops(peak, bandwidth, flops, nbytes)
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
