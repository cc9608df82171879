"""Problems above 2^31 elements, on GPU backends only (``--run-slow``).

Libraries that index with 32-bit integers silently wrap past 2^31 elements (pytorch#117736,
#43476).  Here the input and output each hold more than 2^31 float16 elements; about 10^4
outputs are checked, among them the elements at and around every multiple of 2^31 and the
very last one, against the float64 definition evaluated on their receptive fields.
Integer-valued inputs make every sum exact, so the comparison is exact.
"""

from __future__ import annotations

import numpy as np
import pytest

import convgrad

pytestmark = pytest.mark.slow

N, C, K, H, W = 2, 4, 4, 16400, 16400  # 2.15e9 elements per activation: 4.3 GB in float16
SAMPLES = 10_000


def _cupy_backend_or_skip(backend_name: str):
    backend = convgrad.backends.get(backend_name)
    if "cupy" not in backend.array_kinds:
        pytest.skip(f"{backend_name} does not run on CuPy arrays; this test needs a GPU backend")
    cupy = pytest.importorskip("cupy")
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    return cupy


def _sample_flat_indices(total: int, rng: np.random.Generator) -> np.ndarray:
    boundaries = [b + d for b in range(2**31, total, 2**31) for d in (-2, -1, 0, 1)]
    picked = np.concatenate([rng.integers(0, total, SAMPLES), boundaries, [total - 1]])
    return np.unique(picked[(picked >= 0) & (picked < total)])


def _receptive_sum(cupy, source, weight_taps, n, ch, h, w, flip: bool) -> np.ndarray:
    """Σ over channels and 3×3 taps of source[n, :, h-1+r, w-1+s] · weight[ch, :, r, s] (zero outside).

    With ``flip`` the taps run backwards and the weight's channel axes are swapped: the
    input gradient of a stride-1, padding-1 convolution.
    """
    total = np.zeros(len(n))
    for r in range(3):
        for s in range(3):
            hh = h - 1 + r if not flip else h + 1 - r
            ww = w - 1 + s if not flip else w + 1 - s
            inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            hh_c, ww_c = np.clip(hh, 0, H - 1), np.clip(ww, 0, W - 1)
            for c in range(source.shape[1]):
                values = cupy.asnumpy(source[cupy.asarray(n), c, cupy.asarray(hh_c), cupy.asarray(ww_c)]).astype(np.float64)
                taps = weight_taps[c, ch, r, s] if flip else weight_taps[ch, c, r, s]
                total += np.where(inside, values * taps, 0.0)
    return total


def test_forward_and_input_gradient_past_two_to_the_31(backend_name: str) -> None:
    cupy = _cupy_backend_or_skip(backend_name)
    rng = np.random.default_rng(0)
    x = cupy.random.randint(-2, 3, size=(N, C, H, W), dtype=cupy.int8).astype(cupy.float16)
    w_host = rng.integers(-2, 3, size=(K, C, 3, 3)).astype(np.float16)
    w = cupy.asarray(w_host)
    assert x.size > 2**31
    y = convgrad.conv2d(x, w, padding=1, backend=backend_name)
    flat = _sample_flat_indices(y.size, rng)
    n, k, p, q = np.unravel_index(flat, y.shape)
    expected = _receptive_sum(cupy, x, w_host.astype(np.float64), n, k, p, q, flip=False)
    got = cupy.asnumpy(y.ravel()[cupy.asarray(flat)]).astype(np.float64)
    np.testing.assert_array_equal(got, expected, err_msg="fprop past 2^31 elements")
    del y

    dy = x  # the same integer-valued tensor serves as the output gradient (K == C)
    dx = convgrad.conv2d_input((N, C, H, W), w, dy, padding=1, backend=backend_name)
    flat = _sample_flat_indices(dx.size, rng)
    n, c, h, w_ = np.unravel_index(flat, dx.shape)
    expected = _receptive_sum(cupy, dy, w_host.astype(np.float64), n, c, h, w_, flip=True)
    got = cupy.asnumpy(dx.ravel()[cupy.asarray(flat)]).astype(np.float64)
    np.testing.assert_array_equal(got, expected, err_msg="dgrad past 2^31 elements")
