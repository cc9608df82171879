"""The roofline of each device: peak GEMM rate and copy bandwidth, measured at start-up, never from a table."""

from __future__ import annotations

import importlib.util
import math
import time
from typing import Any, Callable

import numpy as np

ROOFLINE_DEFINITION = ("roofline_tflops = min(peak_tflops, bandwidth_gbs * flops / bytes / 1000); "
                       "roofline_fraction = tflops / roofline_tflops")


def roofline_tflops(peak_tflops: float, bandwidth_gbs: float, flops: float, nbytes: float) -> float:
    """The rate a pass can reach: the peak, or less where its FLOPs per byte make it memory-bound."""
    return min(peak_tflops, bandwidth_gbs * flops / nbytes / 1e3)


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


def cpu_peaks(dtype: str) -> dict[str, Any]:
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


def gpu_peaks(dtype: str, allow_tf32: bool) -> dict[str, Any]:
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
