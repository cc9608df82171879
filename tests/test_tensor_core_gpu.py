"""The tensor-core kernels on a real GPU (``--run-slow``; skipped without a CuPy backend).

* dgrad and wgrad are bit-identical run to run for the same device, problem and
  configuration, in bfloat16, float16 and TF32 (split-K wgrad included);
* a channels-last float16 tensor above 2^31 elements (the cp.async fast path): sampled
  outputs at and around every multiple of 2^31 and the last one, exact against the float64
  definition on their receptive fields (integer-valued inputs).

The shared suite (test_passes.py) covers correctness on the GPU; bench/gpu_check.sh runs
these with ``-k "determinis or large"``.
"""

from __future__ import annotations

import numpy as np
import pytest

import convgrad
from convgrad.problem import conv_problem

pytestmark = pytest.mark.slow


def _cupy_or_skip(backend_name: str, free_gib: float = 1.0):
    if "cupy" not in convgrad.backends.get(backend_name).array_kinds:
        pytest.skip(f"{backend_name} does not run on CuPy arrays; this test needs a GPU backend")
    cupy = pytest.importorskip("cupy")
    major = cupy.cuda.Device().compute_capability
    if int(major) < 80:
        pytest.skip(f"tensor cores need sm_80 or newer, this GPU is sm_{major}")
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < free_gib * 2**30:
        pytest.skip(f"needs {free_gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    return cupy


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "tf32"])
def test_tensor_core_dgrad_and_wgrad_are_deterministic(backend_name: str, dtype: str) -> None:
    _cupy_or_skip(backend_name)
    import ml_dtypes

    host_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "tf32": np.float32}[dtype]
    rng = np.random.default_rng(5)
    # NumPy arrays, staged to the GPU by the named backend and back (CuPy has no bfloat16).
    x = rng.standard_normal((16, 28, 28, 64)).astype(host_dtype)
    w = rng.standard_normal((64, 3, 3, 64)).astype(host_dtype)
    dy = rng.standard_normal((16, 28, 28, 64)).astype(host_dtype)
    common = dict(padding=1, channels_last=True, backend=backend_name, allow_tf32=dtype == "tf32")
    problem = conv_problem("conv2d", 2, x.shape, w.shape, 1, 1, 1, 1, dtype=np.dtype(host_dtype).name,
                           channels_last=True, allow_tf32=dtype == "tf32")
    assert convgrad.backends.get(backend_name).uses_tensor_cores(problem, "wgrad")
    runs = [(convgrad.conv2d_input(x.shape, w, dy, **common).tobytes(),
             convgrad.conv2d_weight(x, w.shape, dy, **common).tobytes()) for _ in range(2)]
    assert runs[0] == runs[1]


def test_tensor_core_channels_last_large_tensor(backend_name: str) -> None:
    """x and y hold 2 * 11600 * 11600 * 8 = 2.15e9 float16 elements each (the cp.async fast path)."""
    cupy = _cupy_or_skip(backend_name, free_gib=16)
    N, C, K, H, W, samples = 2, 8, 8, 11600, 11600, 10_000
    rng = np.random.default_rng(6)
    x = cupy.random.randint(-2, 3, size=(N, H, W, C), dtype=cupy.int8).astype(cupy.float16)
    w_host = rng.integers(-2, 3, size=(K, 3, 3, C)).astype(np.float16)
    assert x.size > 2**31
    y = convgrad.conv2d(x, cupy.asarray(w_host), padding=1, channels_last=True, backend=backend_name)
    total = y.size
    boundaries = [b + d for b in range(2**31, total, 2**31) for d in (-2, -1, 0, 1)]
    flat = np.unique(np.concatenate([rng.integers(0, total, samples), boundaries, [total - 1]]))
    n, p, q, k = np.unravel_index(flat, y.shape)
    expected = np.zeros(len(flat))
    w64 = w_host.astype(np.float64)
    for r in range(3):
        for s in range(3):
            h, v = p - 1 + r, q - 1 + s
            inside = (h >= 0) & (h < H) & (v >= 0) & (v < W)
            values = cupy.asnumpy(x[cupy.asarray(n), cupy.asarray(np.clip(h, 0, H - 1)),
                                    cupy.asarray(np.clip(v, 0, W - 1))]).astype(np.float64)  # (samples, C)
            expected += np.where(inside, (values * w64[k, r, s, :]).sum(axis=1), 0.0)
    got = cupy.asnumpy(y.ravel()[cupy.asarray(flat)]).astype(np.float64)
    np.testing.assert_array_equal(got, expected, err_msg="channels-last fprop past 2^31 elements")
