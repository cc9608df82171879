"""Numba-compiled data movement around the ``numpy`` backend's GEMMs: im2col, col2im, the weight flip.

NumPy builds im2col with one strided copy, but holds the GIL while it copies, so chunks of a
call run on several threads (``cpu_workers``) would copy one after another.  These loops
release the GIL (``nogil``) and run single-threaded on the thread of their chunk; they read
the unpadded input and write zeros where a tap falls outside it, so no padded copy is made.

Arrays are 5-D, in the accumulator dtype (float32 or float64), with any strides:

* ``x`` ``(n, c, D, H, W)``: the input (im2col) or the input gradient (col2im);
* ``col`` ``(n, c·L, Z, P, Q)`` (``batch_last=False``) or ``(c·L, n, Z, P, Q)``: one row per
  channel and tap, taps ``taps[j] = (t, r, s)`` for ``j < L``, row ``ch·L + j``.

col2im adds, for every input-gradient element, the taps that read it in the order of
``taps``, starting from zero: the same sums in the same order as adding whole tap views one
after another.  Products of the zero-filled positions are never formed, so NaN and infinity
reach only the elements the reference gives them.
"""

from __future__ import annotations

import numba
import numpy as np

from .cpu_kernels import _valid_outputs

# fastmath=False keeps the stated summation order; error_model="numpy" drops the Python
# division checks.  Unsigned indices in the inner loops (kept in range by the bounds below)
# spare Numba its negative-index test per element, which also blocks vectorisation.
_jit = numba.njit(nogil=True, cache=True, fastmath=False, error_model="numpy")


#: Rows shorter than this are copied by one loop with a bounds test per element.
_SHORT_ROW = 16


@numba.njit(cache=True, inline="always", error_model="numpy")
def _tap_columns(taps, sw, dw, pw, W, Q):
    """Per tap: its column offset (input column of output q is q·sw + offset) and valid outputs [q0, q1).

    Computed once per call: the divisions cost more than copying a short row.
    """
    L = taps.shape[0]
    offsets = np.empty(L, np.int64)
    q0 = np.empty(L, np.int64)
    q1 = np.empty(L, np.int64)
    for j in range(L):
        offsets[j] = taps[j, 2] * dw - pw
        q0[j], q1[j] = _valid_outputs(offsets[j], sw, W, Q)
    return offsets, q0, q1


@_jit
def _im2col(x, col, taps, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    # col is indexed [row, image, z, p, q] whatever its memory order (see im2col), and
    # elements by direct indexing rather than row views: with rows of a few outputs (late
    # layers at 7x7 and below) a view per row cost more than its copy.
    n, c, D, H, W = x.shape
    L = taps.shape[0]
    Z, P, Q = col.shape[2], col.shape[3], col.shape[4]
    offsets, starts, stops = _tap_columns(taps, sw, dw, pw, W, Q)
    for i in range(n):
        for ch in range(c):
            for j in range(L):
                t, r = taps[j, 0], taps[j, 1]
                row = ch * L + j
                offset, q0, q1 = offsets[j], starts[j], stops[j]
                for z in range(Z):
                    d = z * sd - pd + t * dd
                    for p in range(P):
                        h = p * sh - ph + r * dh
                        if d < 0 or d >= D or h < 0 or h >= H:
                            for q in range(Q):
                                col[row, i, z, p, np.uint64(q)] = 0
                            continue
                        if Q < _SHORT_ROW:
                            # One loop with a test per element: cheaper than three loop setups.
                            for q in range(Q):
                                inside = q0 <= q < q1
                                col[row, i, z, p, np.uint64(q)] = x[i, ch, d, h, np.uint64(q * sw + offset)] if inside else 0
                            continue
                        for q in range(q0):
                            col[row, i, z, p, np.uint64(q)] = 0
                        for q in range(q0, q1):
                            col[row, i, z, p, np.uint64(q)] = x[i, ch, d, h, np.uint64(q * sw + offset)]
                        for q in range(q1, Q):
                            col[row, i, z, p, np.uint64(q)] = 0


@_jit
def _col2im(col, x, taps, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    n, c, D, H, W = x.shape
    L = taps.shape[0]
    Z, P, Q = col.shape[2], col.shape[3], col.shape[4]
    offsets, starts, stops = _tap_columns(taps, sw, dw, pw, W, Q)
    for i in range(n):
        for ch in range(c):
            x[i, ch] = 0
            for j in range(L):
                t, r = taps[j, 0], taps[j, 1]
                row = ch * L + j
                offset, q0, q1 = offsets[j], starts[j], stops[j]
                for z in range(Z):
                    d = z * sd - pd + t * dd
                    if d < 0 or d >= D:
                        continue
                    for p in range(P):
                        h = p * sh - ph + r * dh
                        if h < 0 or h >= H:
                            continue
                        for q in range(q0, q1):
                            x[i, ch, d, h, np.uint64(q * sw + offset)] += col[row, i, z, p, np.uint64(q)]


@_jit
def _flip_transpose(w, out):
    # Reads in w's order and writes runs of T·R·S taps: 2.5 times faster than tiling over
    # channels or reading in out's order, measured on a 512x512x3x3 weight.
    G, Kg, Cg, taps = w.shape
    for g in range(G):
        for k in range(Kg):
            for c in range(Cg):
                for tap in range(taps):
                    out[g, c, k, np.uint64(taps - 1 - tap)] = w[g, k, c, np.uint64(tap)]


def _geometry(stride, dilation, pad_before) -> tuple[int, ...]:
    return (*(int(v) for v in stride), *(int(v) for v in dilation), *(int(v) for v in pad_before))


def im2col(x: np.ndarray, col: np.ndarray, taps: np.ndarray, batch_last: bool, stride, dilation,
           pad_before) -> None:
    """Fill ``col`` with the taps ``taps`` of ``x`` (zero outside it).

    Parameters
    ----------
    x : ndarray
        ``(n, c, D, H, W)``, float32 or float64, any strides.
    col : ndarray
        ``(n, c·L, Z, P, Q)``, or ``(c·L, n, Z, P, Q)`` when ``batch_last``; ``x``'s dtype; overwritten.
    taps : ndarray
        ``(L, 3)`` int64, the (t, r, s) of each tap, in row order.
    stride, dilation, pad_before : three ints each, along (D, H, W).
    """
    _im2col(x, col if batch_last else col.transpose(1, 0, 2, 3, 4), taps, *_geometry(stride, dilation, pad_before))


def col2im(col: np.ndarray, x: np.ndarray, taps: np.ndarray, batch_last: bool, stride, dilation,
           pad_before) -> None:
    """``x[...] =`` the sum, over taps in order, of each tap's rows of ``col`` put back where it read them.

    The adjoint of :func:`im2col`, with the same shapes; ``x`` is overwritten.
    """
    _col2im(col if batch_last else col.transpose(1, 0, 2, 3, 4), x, taps, *_geometry(stride, dilation, pad_before))


def flip_transpose(w: np.ndarray) -> np.ndarray:
    """The stride-1 input gradient's weight: channels transposed within each group, every tap axis reversed.

    Parameters
    ----------
    w : ndarray
        ``(G, K/G, C/G, T·R·S)``, float32 or float64, any strides.

    Returns
    -------
    ndarray
        ``(G, C/G, K/G, T·R·S)``, C-contiguous, with ``out[g, c, k, i] = w[g, k, c, T·R·S - 1 - i]``
        (reversing the flattened taps reverses every tap axis at once).
    """
    out = np.empty((w.shape[0], w.shape[2], w.shape[1], w.shape[3]), w.dtype)
    _flip_transpose(w, out)
    return out
