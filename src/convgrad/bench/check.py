"""The correctness check that runs before every timing: a result against PyTorch's or the float64 reference."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import backends as backend_registry
from ..testing.tolerance import tolerance
from .arrays import array_kind, device_of, to_host, to_kind, to_logical
from .cases import Case, convgrad_call


def torch_result_logical(result: Any) -> Any:
    """PyTorch's result in float64: a NumPy array from the CPU, a CUDA tensor from a GPU (compared there)."""
    import torch

    if result.is_cuda:
        return result.detach().to(torch.float64)
    return result.detach().to("cpu", torch.float64).numpy()


def compare_on_gpu(result: Any, expected: Any, channels_last: bool, rtol: float, atol: float,
                   dtype: str | None = None) -> tuple[bool, float, float]:
    """:func:`compare` on the GPU: ``result`` is any CUDA array (CUDA array interface), ``expected`` a tensor.

    Copying ResNet-50-sized results to the host and comparing them there would take longer
    than timing them.  A bfloat16 result given as bits (``dtype="bfloat16"``) is viewed as bfloat16.
    """
    import torch

    actual = torch.as_tensor(result, device=expected.device)
    if dtype == "bfloat16" and actual.dtype in (torch.int16, torch.uint16):
        actual = actual.view(torch.bfloat16)
    actual = actual.to(torch.float64)
    if channels_last:
        actual = actual.movedim(-1, 1)
    diff = (actual - expected).abs()
    allowed = 2.0 * (atol + rtol * expected.abs())
    over = float((diff / allowed).max()) if diff.numel() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(actual).all())
    return finite and over <= 1.0, max_abs, over


def pass_tolerance(case: Case, pass_: str, device: str) -> tuple[float, float]:
    """(rtol, atol) for one result against the true value; TF32 rounds each GEMM operand to 10 bits."""
    reduction = case.problem.gemm_reduction[pass_]
    rtol, atol = tolerance(case.dtype, reduction)
    if case.allow_tf32 and case.dtype == "float32" and device == "gpu":
        rtol = max(rtol, 2.0**-10)
        atol += 8 * 2.0**-11 * math.sqrt(reduction)
    return rtol, atol


def compare(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float, both_rounded: bool) -> tuple[bool, float, float]:
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


def naive_check(case: Case, pass_: str, backend: str, kind: str) -> tuple[bool, float, float]:
    """Check ``backend`` against the float64 reference on the first image only (keeps the loops cheap)."""
    from ..testing import reference_forward, reference_grad_input, reference_grad_weight

    one = Case(case.suite, case.layer, 1, case.dtype, case.channels_last, case.allow_tf32,
               case.x[:1], case.w, case.dy[:1])
    arrays = {name: to_kind(np.ascontiguousarray(getattr(one, name)), kind) for name in ("x", "w", "dy")}
    actual = to_logical(to_host(convgrad_call(one, pass_, backend, arrays)(), one.dtype), case.channels_last)
    problem = one.problem
    five = lambda a: a.astype(np.float64).reshape(a.shape[0], a.shape[1], *([1] * (3 - case.layer.ndim)), *a.shape[2:])
    x, w, dy = (five(to_logical(getattr(one, name), case.channels_last)) for name in ("x", "w", "dy"))
    if pass_ == "fprop":
        expected = reference_forward(x, w, problem)
    elif pass_ == "dgrad":
        expected = reference_grad_input(dy, w, problem)
    else:
        expected = reference_grad_weight(x, dy, problem)
    rtol, atol = pass_tolerance(one, pass_, device_of(backend_registry.get(backend)))
    return compare(actual, expected.reshape(actual.shape), rtol, atol, both_rounded=False)


def check_result(case: Case, pass_: str, backend: str, device: str, result: Any,
                 reference: Any | None) -> tuple[str, bool, float, float]:
    """Check one result of ``backend`` before it is timed.

    ``reference`` is PyTorch's result from :func:`torch_result_logical` (a NumPy array, or a
    CUDA tensor compared on the GPU), or None to check against the float64 reference on the
    first image.  Returns (what was checked and its verdict, ok, max abs error, worst error /
    allowed).
    """
    rtol, atol = pass_tolerance(case, pass_, device)
    if reference is None:
        ok, max_abs, over = naive_check(case, pass_, backend, array_kind(backend_registry.get(backend)))
        verdict = "ok (vs float64 reference, first image)" if ok else "MISMATCH (vs float64 reference)"
        return verdict, ok, max_abs, over
    if isinstance(reference, np.ndarray):
        actual = to_logical(to_host(result, case.dtype), case.channels_last)
        ok, max_abs, over = compare(actual, reference, rtol, atol, both_rounded=True)
    else:
        ok, max_abs, over = compare_on_gpu(result, reference, case.channels_last, rtol, atol, case.dtype)
    return ("ok (vs torch)" if ok else "MISMATCH (vs torch)"), ok, max_abs, over
