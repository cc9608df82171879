"""``convgrad bench --model``: a whole training step of a patched model beside the native one.

A step is forward, cross-entropy loss, backward and an SGD step (momentum 0.9).  The native
model and a copy patched with :func:`convgrad.torch.patch` start from the same weights.
Before anything is timed, the gradients of both copies are compared in float64 on a small
input, and a mismatch stops the run (:class:`GradientMismatch`).  Then each copy's step is
timed by the layer suites' method (:mod:`.timing`: on the CPU the median of
``perf_counter`` after a warm-up, with a pause before switching library; on a GPU CUDA
events).

The ratio is ``native_time_s / patched_time_s``: above 1 the patched model trains faster.
This module imports PyTorch only inside its functions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

from .timing import CpuTimer, GpuTimer, Timing

#: The networks ``--model`` accepts (defined in :mod:`.models`, which imports PyTorch).
MODEL_NAMES = ("resnet18", "mobilenetv2")

MODEL_RATIO_DEFINITION = (
    "ratio = native_time_s / patched_time_s (median times of one training step: forward, loss, backward, SGD step): "
    "above 1 the model patched with convgrad.torch.patch trains faster than native PyTorch, below 1 slower"
)

#: Largest gradient error allowed in the float64 check, relative to the gradient's scale (see compare_gradients).
GRADIENT_TOLERANCE = 1e-8
#: A parameter's scale is at least this fraction of the largest gradient entry of the whole model.
GRADIENT_SCALE_FLOOR = 1e-3
#: The check's input: batch and spatial size.  Small, but with 2x2 pixels left before the head:
#: at 1x1, training-mode batch norm over two values makes the gradients ill-conditioned.
CHECK_BATCH, CHECK_SIZE = 2, 64

MODEL_RECORD_FIELDS = (
    "model", "device", "dtype", "batch", "size", "thread_budget", "patched_layers", "gradient_check",
    "gradient_max_error", "gradient_worst_parameter", "repeats", "native_time_s", "native_time_min_s",
    "patched_time_s", "patched_time_min_s", "ratio",
)


class GradientMismatch(AssertionError):
    """The patched model's gradients differ from the native model's: its timing would mean nothing."""


@dataclass(frozen=True)
class GradientReport:
    """How far the patched gradients are from the native ones (errors relative to each parameter's scale)."""

    max_error: float
    worst_parameter: str
    parameters: int

    @property
    def ok(self) -> bool:
        return self.max_error <= GRADIENT_TOLERANCE


def build_model(name: str, dtype: Any = None, device: Any = "cpu", seed: int = 0) -> Any:
    """The named network with weights drawn from ``seed``, in ``dtype`` on ``device``."""
    import torch

    from .models import MODELS

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    model = MODELS[name]()
    return model.to(device=device, dtype=dtype or torch.float32).train()


def _inputs(batch: int, size: int, dtype: Any, device: Any, seed: int, classes: int = 1000) -> tuple[Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    target = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return x, target


def _gradients(model: Any, x: Any, target: Any) -> dict[str, Any]:
    import torch

    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), target).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def compare_gradients(native: Any, patched: Any, x: Any, target: Any) -> GradientReport:
    """Run one forward and backward on both models; the largest gradient error, relative to its scale.

    A parameter's error is the largest absolute difference of its gradient entries divided by
    its scale: the largest entry of its native gradient, but at least GRADIENT_SCALE_FLOOR
    times the largest entry of any parameter's.  The floor matters for gradients that are
    zero up to rounding (a batch norm's bias whose output feeds another batch norm: its
    gradient sums terms that cancel), where any rounding difference is 100% of the value.
    ``native`` and ``patched`` must have the same parameter names; a parameter that has a
    gradient in only one of them, or a non-finite difference, is an infinite error.
    """
    expected, got = _gradients(native, x, target), _gradients(patched, x, target)
    largest = max((float(g.abs().max()) for g in expected.values() if g.numel()), default=0.0)
    worst, max_error = "", -1.0
    for name in sorted(set(expected) | set(got)):
        if name not in expected or name not in got or expected[name].shape != got[name].shape:
            error = math.inf
        else:
            scale = max(float(expected[name].abs().max()) if expected[name].numel() else 0.0,
                        GRADIENT_SCALE_FLOOR * largest)
            error = float((got[name] - expected[name]).abs().max()) / (scale if scale > 0 else 1.0)
            if not math.isfinite(error):
                error = math.inf
        if error > max_error:
            worst, max_error = name, error
    return GradientReport(max(max_error, 0.0), worst, len(expected))


def require_matching_gradients(native: Any, patched: Any, x: Any, target: Any, label: str) -> GradientReport:
    """:func:`compare_gradients`, raising :class:`GradientMismatch` when the patched gradients are off."""
    report = compare_gradients(native, patched, x, target)
    if not report.ok:
        raise GradientMismatch(
            f"{label}: the patched model's gradients differ from native PyTorch's: largest error "
            f"{report.max_error:.3g} (relative to the gradient's scale) in {report.worst_parameter!r}, "
            f"tolerance {GRADIENT_TOLERANCE:g}; nothing was timed")
    return report


def check_model_gradients(name: str, device: Any = "cpu", seed: int = 0) -> GradientReport:
    """The float64 check of the named model on a small input: patched gradients against native ones."""
    import torch

    import convgrad.torch as convgrad_torch

    native = build_model(name, torch.float64, device, seed)
    patched = convgrad_torch.patch(copy.deepcopy(native))
    x, target = _inputs(CHECK_BATCH, CHECK_SIZE, torch.float64, device, seed + 1)
    return require_matching_gradients(native, patched, x, target, f"{name} (float64, batch {CHECK_BATCH}, "
                                                                   f"{CHECK_SIZE}x{CHECK_SIZE})")


def training_step(model: Any, optimizer: Any, x: Any, target: Any) -> Callable[[], None]:
    """One step as a call: zero the gradients, forward, cross-entropy, backward, optimizer step."""
    import torch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


@dataclass
class ModelOptions:
    models: list[str]
    batch: int = 4
    size: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int | None = None
    warmup: int | None = None
    seed: int = 0
    thread_budget: bool = True


def _timer(device: str) -> Any:
    return GpuTimer("torch") if device == "cuda" else CpuTimer()


def time_model(name: str, opts: ModelOptions, timer: Any = None) -> dict[str, Any]:
    """Check the gradients, then time a training step natively and patched; one record (MODEL_RECORD_FIELDS)."""
    import torch

    import convgrad.torch as convgrad_torch

    report = check_model_gradients(name, opts.device, opts.seed)
    dtype = getattr(torch, opts.dtype)
    native = build_model(name, dtype, opts.device, opts.seed)
    patched = convgrad_torch.patch(copy.deepcopy(native))
    x, target = _inputs(opts.batch, opts.size, dtype, opts.device, opts.seed + 1)
    timer = timer or _timer(opts.device)
    gpu = opts.device == "cuda"
    warmup = opts.warmup if opts.warmup is not None else (3 if gpu else 1)
    repeats = opts.repeats or (20 if gpu else 5)
    timings: dict[str, Timing] = {}
    with convgrad_torch._thread_budget(opts.thread_budget):
        for label, model in (("native", native), ("patched", patched)):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            timings[label] = timer.measure(training_step(model, optimizer, x, target), warmup, repeats,
                                           "torch" if label == "native" else "convgrad")
    record: dict[str, Any] = dict.fromkeys(MODEL_RECORD_FIELDS)
    record.update(model=name, device=opts.device, dtype=opts.dtype, batch=opts.batch, size=opts.size,
                  thread_budget=opts.thread_budget, patched_layers=len(convgrad_torch.patch_report(patched).patched),
                  gradient_check="ok", gradient_max_error=report.max_error,
                  gradient_worst_parameter=report.worst_parameter, repeats=repeats,
                  native_time_s=timings["native"].time_s, native_time_min_s=min(timings["native"].times_s),
                  patched_time_s=timings["patched"].time_s, patched_time_min_s=min(timings["patched"].times_s),
                  ratio=timings["native"].time_s / timings["patched"].time_s)
    return record
