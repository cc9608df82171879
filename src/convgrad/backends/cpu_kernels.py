"""Numba-compiled CPU loops for depthwise convolutions (the ``numpy`` backend's depthwise path).

A depthwise convolution (``groups == C``) does a handful of multiply-adds per output and
no GEMM at all, so the time goes into memory traffic and loop overhead.  Whole-array NumPy
expressions pay one pass over memory per kernel tap; these loops read each row once and keep
the sums in registers or a row buffer.

Every kernel takes 5-D arrays in one of two element orders, in the accumulator dtype
(float32, or float64 for float64 data), with any strides:

* planar (NCDHW):        x ``(N, C, D, H, W)``, y ``(N, K, Z, P, Q)``; threads split (image, channel) planes
* channels-last (NDHWC): x ``(N, D, H, W, C)``, y ``(N, Z, P, Q, K)``; threads split output rows and
  the innermost loop runs along the contiguous channel axis

and the weight packed as ``wt`` ``(T, R, S, K)``.  Output channel ``k = c·m + j`` (multiplier
``m = K / C``) reads input channel ``c``.

Determinism: each output element is written by exactly one loop iteration, and its terms
are added in one fixed order:

* fprop: taps in (t, r, s) order; then the bias.
* dgrad: taps in (t, r, s) order, and for each tap the multiplier index ``j``.
* wgrad, planar: threads own whole output channels.  Per image and output plane ``z``, each
  tap's products are added row by row into a row of sums along ``q`` (independent work per
  ``q``, so the loop vectorises), the row is summed in four interleaved partial sums, planes
  into an image sum, images into the total.
* wgrad, channels-last: the output rows are cut into fixed runs (set by the problem, never
  by the thread count); each run sums its rows into its own partial gradient, reading along
  the contiguous channel axis, and the partials are added in run order.

No atomics, and no sum whose order depends on the thread count: results are bit-identical
run to run and for any number of threads.  The loops pair every product the float64
reference makes and nothing else (padding is skipped, not read as zero), so NaN and
infinity propagate exactly as in the reference.

Threading: Numba's threading layer is pinned to ``workqueue`` before anything here
compiles (unless ``NUMBA_THREADING_LAYER`` names one).  Its ``omp`` layer, picked by
default when present, is not safe to ``fork`` under GNU OpenMP, and PyTorch's DataLoader
workers and DDP fork.  ``workqueue`` aborts the
process if two threads launch a parallel kernel at once; the kernels keep the GIL (no
``nogil``) and launches also take a lock, so calls from several Python threads queue up.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np

# Must be set before the first parallel kernel runs, which is when Numba starts its threads
# (see above).  An explicit NUMBA_THREADING_LAYER is the user's choice and stays.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

_LAUNCH_LOCK = threading.Lock()


def _new_lock_in_child() -> None:
    # A child forked while another thread held the lock would otherwise wait for it forever.
    global _LAUNCH_LOCK
    _LAUNCH_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)

# fastmath=False: no reassociation, so the summation orders above are the ones executed.
# error_model="numpy": integer division without a Python ZeroDivisionError check per element.
_jit = numba.njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
_inline = numba.njit(cache=True, inline="always", error_model="numpy")

#: Channels-last wgrad: output rows per work item, and at most this many items (each holds
#: a partial gradient of K·T·R·S sums, added in item order at the end).
_WGRAD_ROWS_PER_ITEM = 8
_WGRAD_MAX_ITEMS = 512


@_inline
def _valid_outputs(offset, stride, size, outputs):
    """The range [q0, q1) of outputs q with ``0 <= q·stride + offset < size``."""
    q0 = 0 if offset >= 0 else (-offset + stride - 1) // stride
    last = size - 1 - offset
    q1 = 0 if last < 0 else min(outputs, last // stride + 1)
    return q0, max(q0, q1)


@_inline
def _source_index(position, pad, tap, dilation, stride, outputs):
    """The output index whose window puts ``tap`` on input ``position``, or -1 if none does."""
    numerator = position + pad - tap * dilation
    if numerator < 0 or numerator % stride != 0:
        return -1
    index = numerator // stride
    return index if index < outputs else -1


@_inline
def _column_ranges(S, sw, dw, pw, W, Q):
    """Per tap s along W: the column offset (input column of output q is q·sw + offset) and the valid outputs [lo, hi).

    Computed once per call: the divisions in it cost more than a short row of multiply-adds.
    """
    offsets = np.empty(S, np.int64)
    lo = np.empty(S, np.int64)
    hi = np.empty(S, np.int64)
    for s in range(S):
        offsets[s] = s * dw - pw
        lo[s], hi[s] = _valid_outputs(offsets[s], sw, W, Q)
    return offsets, lo, hi


# The innermost planar loops index with unsigned integers: a signed index makes Numba test
# it for wrap-around (negative indices count from the end), a branch per element that also
# blocks vectorisation.  The ranges above keep every such index in bounds and non-negative.
# -- fprop -------------------------------------------------------------------------------
@_jit
def _forward_planar(x, wt, bias, y, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    N, C, D, H, W = x.shape
    K, Z, P, Q = y.shape[1], y.shape[2], y.shape[3], y.shape[4]
    T, R, S = wt.shape[0], wt.shape[1], wt.shape[2]
    m = K // C
    offsets, lo, hi = _column_ranges(S, sw, dw, pw, W, Q)
    for nk in numba.prange(N * K):
        n = nk // K
        k = nk - n * K
        c = k // m
        row = np.empty(Q, dtype=bias.dtype)
        for z in range(Z):
            for p in range(P):
                row[:] = 0
                for t in range(T):
                    d = z * sd - pd + t * dd
                    if d < 0 or d >= D:
                        continue
                    for r in range(R):
                        h = p * sh - ph + r * dh
                        if h < 0 or h >= H:
                            continue
                        for s in range(S):
                            offset = offsets[s]
                            weight = wt[t, r, s, k]
                            for q in range(lo[s], hi[s]):
                                row[np.uint64(q)] += x[n, c, d, h, np.uint64(q * sw + offset)] * weight
                for q in range(Q):
                    y[n, k, z, p, q] = row[q] + bias[k]


@_jit
def _forward_channels_last(x, wt, bias, y, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    N, D, H, W, C = x.shape
    Z, P, Q, K = y.shape[1], y.shape[2], y.shape[3], y.shape[4]
    T, R, S = wt.shape[0], wt.shape[1], wt.shape[2]
    m = K // C
    for nzp in numba.prange(N * Z * P):
        n = nzp // (Z * P)
        z = (nzp // P) % Z
        p = nzp % P
        acc = np.empty(K, dtype=bias.dtype)
        for q in range(Q):
            acc[:] = 0
            for t in range(T):
                d = z * sd - pd + t * dd
                if d < 0 or d >= D:
                    continue
                for r in range(R):
                    h = p * sh - ph + r * dh
                    if h < 0 or h >= H:
                        continue
                    for s in range(S):
                        i = q * sw - pw + s * dw
                        if i < 0 or i >= W:
                            continue
                        if m == 1:
                            for c in range(C):
                                acc[c] += x[n, d, h, i, c] * wt[t, r, s, c]
                        else:
                            for c in range(C):
                                value = x[n, d, h, i, c]
                                for j in range(m):
                                    acc[c * m + j] += value * wt[t, r, s, c * m + j]
            for k in range(K):
                y[n, z, p, q, k] = acc[k] + bias[k]


# -- dgrad -------------------------------------------------------------------------------
@_jit
def _grad_input_planar(dy, wt, dx, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    N, C, D, H, W = dx.shape
    K, Z, P, Q = dy.shape[1], dy.shape[2], dy.shape[3], dy.shape[4]
    T, R, S = wt.shape[0], wt.shape[1], wt.shape[2]
    m = K // C
    offsets, lo, hi = _column_ranges(S, sw, dw, pw, W, Q)
    for nc in numba.prange(N * C):
        n = nc // C
        c = nc - n * C
        row = np.empty(W, dtype=wt.dtype)
        for d in range(D):
            for h in range(H):
                row[:] = 0
                for t in range(T):
                    z = _source_index(d, pd, t, dd, sd, Z)
                    if z < 0:
                        continue
                    for r in range(R):
                        p = _source_index(h, ph, r, dh, sh, P)
                        if p < 0:
                            continue
                        for s in range(S):
                            # Output q of this tap reads input column q·sw + offset.
                            offset = offsets[s]
                            for j in range(m):
                                k = c * m + j
                                weight = wt[t, r, s, k]
                                for q in range(lo[s], hi[s]):
                                    row[np.uint64(q * sw + offset)] += dy[n, k, z, p, np.uint64(q)] * weight
                for i in range(W):
                    dx[n, c, d, h, i] = row[i]


@_jit
def _grad_input_channels_last(dy, wt, dx, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    N, D, H, W, C = dx.shape
    Z, P, Q, K = dy.shape[1], dy.shape[2], dy.shape[3], dy.shape[4]
    T, R, S = wt.shape[0], wt.shape[1], wt.shape[2]
    m = K // C
    for ndh in numba.prange(N * D * H):
        n = ndh // (D * H)
        d = (ndh // H) % D
        h = ndh % H
        acc = np.empty(C, dtype=wt.dtype)
        for i in range(W):
            acc[:] = 0
            for t in range(T):
                z = _source_index(d, pd, t, dd, sd, Z)
                if z < 0:
                    continue
                for r in range(R):
                    p = _source_index(h, ph, r, dh, sh, P)
                    if p < 0:
                        continue
                    for s in range(S):
                        q = _source_index(i, pw, s, dw, sw, Q)
                        if q < 0:
                            continue
                        if m == 1:
                            for c in range(C):
                                acc[c] += dy[n, z, p, q, c] * wt[t, r, s, c]
                        else:
                            for c in range(C):
                                for j in range(m):
                                    acc[c] += dy[n, z, p, q, c * m + j] * wt[t, r, s, c * m + j]
            for c in range(C):
                dx[n, d, h, i, c] = acc[c]


# -- wgrad ------------------------------------------------------------------------------
@_inline
def _row_sum(rows, tap, Q):
    """``rows[tap, :Q]`` summed in four interleaved partial sums: four short dependency chains, not one long one."""
    s0 = rows.dtype.type(0)
    s1 = s0
    s2 = s0
    s3 = s0
    q = 0
    while q + 4 <= Q:
        s0 += rows[tap, q]
        s1 += rows[tap, q + 1]
        s2 += rows[tap, q + 2]
        s3 += rows[tap, q + 3]
        q += 4
    while q < Q:
        s0 += rows[tap, q]
        q += 1
    return (s0 + s1) + (s2 + s3)


@_jit
def _grad_weight_planar(x, dy, total, T, R, S, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    N, C, D, H, W = x.shape
    K, Z, P, Q = dy.shape[1], dy.shape[2], dy.shape[3], dy.shape[4]
    m = K // C
    taps = T * R * S
    offsets, lo, hi = _column_ranges(S, sw, dw, pw, W, Q)
    for k in numba.prange(K):
        c = k // m
        # Per tap, a row of sums along q: adding whole rows is independent work per q
        # (vectorisable); the row is summed once per output plane.
        rows = np.empty((taps, Q), dtype=total.dtype)
        image = np.empty(taps, dtype=total.dtype)
        for n in range(N):
            image[:] = 0
            for z in range(Z):
                rows[:] = 0
                for p in range(P):
                    for t in range(T):
                        d = z * sd - pd + t * dd
                        if d < 0 or d >= D:
                            continue
                        for r in range(R):
                            h = p * sh - ph + r * dh
                            if h < 0 or h >= H:
                                continue
                            for s in range(S):
                                offset = offsets[s]
                                tap = (t * R + r) * S + s
                                for q in range(lo[s], hi[s]):
                                    u = np.uint64(q)
                                    rows[tap, u] += x[n, c, d, h, np.uint64(q * sw + offset)] * dy[n, k, z, p, u]
                for tap in range(taps):
                    image[tap] += _row_sum(rows, tap, Q)
            for tap in range(taps):
                total[k, tap] += image[tap]


@_jit
def _grad_weight_channels_last(x, dy, total, T, R, S, sd, sh, sw, dd, dh, dw, pd, ph, pw, rows_per_item):
    N, D, H, W, C = x.shape
    Z, P, Q, K = dy.shape[1], dy.shape[2], dy.shape[3], dy.shape[4]
    m = K // C
    taps = T * R * S
    blocks = (P + rows_per_item - 1) // rows_per_item
    items = N * Z * blocks
    # Work items are fixed runs of output rows (by the problem, not the thread count); each
    # sums its rows into its own partial gradient, read along the contiguous channel axis.
    partials = np.zeros((items, taps, K), dtype=total.dtype)
    for item in numba.prange(items):
        n = item // (Z * blocks)
        z = (item // blocks) % Z
        p_start = (item % blocks) * rows_per_item
        part = partials[item]
        for p in range(p_start, min(P, p_start + rows_per_item)):
            for q in range(Q):
                for t in range(T):
                    d = z * sd - pd + t * dd
                    if d < 0 or d >= D:
                        continue
                    for r in range(R):
                        h = p * sh - ph + r * dh
                        if h < 0 or h >= H:
                            continue
                        for s in range(S):
                            i = q * sw - pw + s * dw
                            if i < 0 or i >= W:
                                continue
                            tap = (t * R + r) * S + s
                            if m == 1:
                                for k in range(K):
                                    part[tap, k] += x[n, d, h, i, k] * dy[n, z, p, q, k]
                            else:
                                for c in range(C):
                                    value = x[n, d, h, i, c]
                                    for j in range(m):
                                        part[tap, c * m + j] += value * dy[n, z, p, q, c * m + j]
    # Partials added in item order: the same sum for any thread count.
    for k in numba.prange(K):
        for tap in range(taps):
            acc = total.dtype.type(0)
            for item in range(items):
                acc += partials[item, tap, k]
            total[k, tap] += acc


# -- entry points ------------------------------------------------------------------------
def _geometry(stride, dilation, pad_before) -> tuple[int, ...]:
    return (*(int(v) for v in stride), *(int(v) for v in dilation), *(int(v) for v in pad_before))


def depthwise_forward(x: np.ndarray, wt: np.ndarray, bias: np.ndarray, y: np.ndarray, stride, dilation,
                      pad_before, channels_last: bool) -> None:
    """``y[...] = depthwise_conv(x, w) + bias``.

    Parameters
    ----------
    x : ndarray
        ``(N, C, D, H, W)``, or ``(N, D, H, W, C)`` when ``channels_last``; float32 or float64.
    wt : ndarray
        ``(T, R, S, K)``, the weight with its output channel last, in ``x``'s dtype.
    bias : ndarray
        ``(K,)`` in ``x``'s dtype (zeros for no bias).
    y : ndarray
        ``(N, K, Z, P, Q)``, or ``(N, Z, P, Q, K)``; overwritten.
    stride, dilation, pad_before : three ints each, along (D, H, W).
    channels_last : bool
        Which element order the activations are given in.
    """
    kernel = _forward_channels_last if channels_last else _forward_planar
    with _LAUNCH_LOCK:
        kernel(x, wt, bias, y, *_geometry(stride, dilation, pad_before))


def depthwise_grad_input(dy: np.ndarray, wt: np.ndarray, dx: np.ndarray, stride, dilation, pad_before,
                         channels_last: bool) -> None:
    """``dx[...] = dgrad(dy, w)``, gathered: each input-gradient element sums its own terms.

    ``dy`` is ``(N, K, Z, P, Q)`` and ``dx`` ``(N, C, D, H, W)`` (channel axis last for
    ``channels_last``), ``wt`` ``(T, R, S, K)``; one float dtype throughout.
    """
    kernel = _grad_input_channels_last if channels_last else _grad_input_planar
    with _LAUNCH_LOCK:
        kernel(dy, wt, dx, *_geometry(stride, dilation, pad_before))


def depthwise_grad_weight(x: np.ndarray, dy: np.ndarray, total: np.ndarray, kernel_size, stride, dilation,
                          pad_before, channels_last: bool) -> None:
    """``total += wgrad(x, dy)`` for the images in ``x``, added image by image in batch order.

    ``x`` is ``(N, C, D, H, W)`` and ``dy`` ``(N, K, Z, P, Q)`` (channel axis last for
    ``channels_last``); ``total`` is ``(K, T·R·S)``, C-contiguous, taps in (t, r, s) order.
    """
    T, R, S = (int(v) for v in kernel_size)
    geometry = _geometry(stride, dilation, pad_before)
    with _LAUNCH_LOCK:
        if channels_last:
            N, Z, P = dy.shape[:3]
            rows_per_item = max(_WGRAD_ROWS_PER_ITEM, -(-N * Z * P // _WGRAD_MAX_ITEMS))
            _grad_weight_channels_last(x, dy, total, T, R, S, *geometry, rows_per_item)
        else:
            _grad_weight_planar(x, dy, total, T, R, S, *geometry)
