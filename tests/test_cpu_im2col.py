"""The numpy backend's compiled im2col, col2im and weight flip against plain NumPy statements of the same."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from convgrad.backends import cpu_im2col

# (input D, H, W), kernel, stride, dilation, padding before: 1-D, 2-D and 3-D, with taps
# that fall wholly outside the input at the edges.
GEOMETRIES = [
    ((1, 1, 11), (1, 1, 3), (1, 1, 1), (1, 1, 1), (0, 0, 1)),
    ((1, 7, 9), (1, 3, 3), (1, 2, 1), (1, 1, 2), (0, 1, 2)),
    ((1, 6, 6), (1, 5, 5), (1, 3, 3), (1, 1, 1), (0, 4, 4)),
    ((3, 5, 4), (2, 3, 2), (1, 2, 1), (2, 1, 1), (1, 1, 0)),
]


def _output_size(size, kernel, stride, dilation, pad):
    # Symmetric padding (pad before = pad after), as PyTorch's integer padding.
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, d, p in zip(size, kernel, stride, dilation, pad))


def _expected_columns(x, taps, stride, dilation, pad, out_size, batch_last):
    """im2col by indexing a zero-padded copy: one strided slice per tap."""
    n, c = x.shape[:2]
    padded = np.pad(x, [(0, 0), (0, 0)] + [(p, p + s * o) for p, s, o in zip(pad, stride, out_size)])
    rows = []
    for tap in taps:
        index = tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilation, stride, out_size))
        rows.append(padded[(slice(None), slice(None), *index)])
    col = np.stack(rows, axis=2).reshape(n, c * len(taps), *out_size)  # rows ordered (channel, tap)
    return np.ascontiguousarray(col.transpose(1, 0, 2, 3, 4)) if batch_last else col


@pytest.mark.parametrize("batch_last", [False, True], ids=["per_image", "batch_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["1d", "2d-strided-dilated", "2d-wide-padding", "3d"])
def test_im2col_matches_slices_of_the_padded_input(geometry, dtype, batch_last):
    size, kernel, stride, dilation, pad = geometry
    out_size = _output_size(size, kernel, stride, dilation, pad)
    rng = np.random.default_rng(3)
    x = rng.integers(-8, 9, (2, 3, *size)).astype(dtype)
    every_tap = list(itertools.product(*(range(k) for k in kernel)))
    for taps in (every_tap, every_tap[1::2]):  # all taps, and a chunk of them (shift-GEMM)
        expected = _expected_columns(x, taps, stride, dilation, pad, out_size, batch_last)
        col = np.full(expected.shape, np.nan, dtype)  # every element must be written
        cpu_im2col.im2col(x, col, np.array(taps, np.int64), batch_last, stride, dilation, pad)
        np.testing.assert_array_equal(col, expected)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["1d", "2d-strided-dilated", "2d-wide-padding", "3d"])
def test_im2col_reads_a_strided_view(geometry):
    """A channels-last caller's input reaches the loops as a transposed view, not a copy."""
    size, kernel, stride, dilation, pad = geometry
    out_size = _output_size(size, kernel, stride, dilation, pad)
    rng = np.random.default_rng(4)
    x = rng.integers(-8, 9, (2, *size, 3)).astype(np.float32).transpose(0, 4, 1, 2, 3)
    taps = list(itertools.product(*(range(k) for k in kernel)))
    expected = _expected_columns(x, taps, stride, dilation, pad, out_size, False)
    col = np.empty(expected.shape, np.float32)
    cpu_im2col.im2col(x, col, np.array(taps, np.int64), False, stride, dilation, pad)
    np.testing.assert_array_equal(col, expected)


@pytest.mark.parametrize("batch_last", [False, True], ids=["per_image", "batch_last"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["1d", "2d-strided-dilated", "2d-wide-padding", "3d"])
def test_col2im_is_the_adjoint_of_im2col(geometry, batch_last):
    """<im2col(x), c> = <x, col2im(c)>, exactly on small integers; col2im overwrites its output."""
    size, kernel, stride, dilation, pad = geometry
    out_size = _output_size(size, kernel, stride, dilation, pad)
    rng = np.random.default_rng(5)
    x = rng.integers(-8, 9, (2, 3, *size)).astype(np.float64)
    taps = np.array(list(itertools.product(*(range(k) for k in kernel))), np.int64)
    shape = (3 * len(taps), 2, *out_size) if batch_last else (2, 3 * len(taps), *out_size)
    col = np.empty(shape)
    cpu_im2col.im2col(x, col, taps, batch_last, stride, dilation, pad)
    c = rng.integers(-8, 9, shape).astype(np.float64)
    back = np.full(x.shape, np.nan)
    cpu_im2col.col2im(c, back, taps, batch_last, stride, dilation, pad)
    assert np.sum(col * c) == np.sum(x * back)


def test_col2im_pairs_only_real_positions():
    """A NaN in a column that only the padding reads stays out of the result (no 0 · NaN is formed)."""
    taps = np.array([(0, 0, 0), (0, 0, 1), (0, 0, 2)], np.int64)
    col = np.ones((1, 3, 1, 1, 4))
    col[0, 0, 0, 0, 0] = np.nan  # tap 0 at output 0 reads position -1: padding
    x = np.empty((1, 1, 1, 1, 4))
    cpu_im2col.col2im(col, x, taps, False, (1, 1, 1), (1, 1, 1), (0, 0, 1))
    assert np.isfinite(x).all()
    np.testing.assert_array_equal(x[0, 0, 0, 0], [2, 3, 3, 2])  # the edges are read by two taps each


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flip_transpose_matches_numpy(dtype):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, 5, 3, 2 * 3 * 3)).astype(dtype)
    expected = np.ascontiguousarray(w.transpose(0, 2, 1, 3)[..., ::-1])
    got = cpu_im2col.flip_transpose(w[:, :, :, :])
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
