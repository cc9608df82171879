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

# fastmath=False keeps the stated summation order; error_model="numpy" drops the Python
# division checks.  Unsigned indices in the inner loops (kept in range by the bounds below)
# spare Numba its negative-index test per element, which also blocks vectorisation.
_jit = numba.njit(nogil=True, cache=True, fastmath=False, error_model="numpy")


@numba.njit(cache=True, inline="always", error_model="numpy")
def _valid_outputs(offset, stride, size, outputs):
    """The range [q0, q1) of outputs q with ``0 <= q·stride + offset < size``."""
    q0 = 0 if offset >= 0 else (-offset + stride - 1) // stride
    last = size - 1 - offset
    q1 = 0 if last < 0 else min(outputs, last // stride + 1)
    return q0, max(q0, q1)


@_jit
def _im2col(x, col, taps, batch_last, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    n, c, D, H, W = x.shape
    L = taps.shape[0]
    Z, P, Q = col.shape[2], col.shape[3], col.shape[4]
    for i in range(n):
        for ch in range(c):
            for j in range(L):
                t, r, s = taps[j, 0], taps[j, 1], taps[j, 2]
                dest = col[ch * L + j, i] if batch_last else col[i, ch * L + j]
                offset = s * dw - pw
                q0, q1 = _valid_outputs(offset, sw, W, Q)
                for z in range(Z):
                    d = z * sd - pd + t * dd
                    for p in range(P):
                        h = p * sh - ph + r * dh
                        row = dest[z, p]
                        if d < 0 or d >= D or h < 0 or h >= H:
                            row[:] = 0
                            continue
                        source = x[i, ch, d, h]
                        for q in range(q0):
                            row[np.uint64(q)] = 0
                        for q in range(q0, q1):
                            row[np.uint64(q)] = source[np.uint64(q * sw + offset)]
                        for q in range(q1, Q):
                            row[np.uint64(q)] = 0


@_jit
def _col2im(col, x, taps, batch_last, sd, sh, sw, dd, dh, dw, pd, ph, pw):
    n, c, D, H, W = x.shape
    L = taps.shape[0]
    Z, P, Q = col.shape[2], col.shape[3], col.shape[4]
    for i in range(n):
        for ch in range(c):
            plane = x[i, ch]
            plane[:] = 0
            for j in range(L):
                t, r, s = taps[j, 0], taps[j, 1], taps[j, 2]
                source = col[ch * L + j, i] if batch_last else col[i, ch * L + j]
                offset = s * dw - pw
                q0, q1 = _valid_outputs(offset, sw, W, Q)
                for z in range(Z):
                    d = z * sd - pd + t * dd
                    if d < 0 or d >= D:
                        continue
                    for p in range(P):
                        h = p * sh - ph + r * dh
                        if h < 0 or h >= H:
                            continue
                        row = plane[d, h]
                        values = source[z, p]
                        for q in range(q0, q1):
                            row[np.uint64(q * sw + offset)] += values[np.uint64(q)]


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
    _im2col(x, col, taps, batch_last, *_geometry(stride, dilation, pad_before))


def col2im(col: np.ndarray, x: np.ndarray, taps: np.ndarray, batch_last: bool, stride, dilation,
           pad_before) -> None:
    """``x[...] =`` the sum, over taps in order, of each tap's rows of ``col`` put back where it read them.

    The adjoint of :func:`im2col`, with the same shapes; ``x`` is overwritten.
    """
    _col2im(col, x, taps, batch_last, *_geometry(stride, dilation, pad_before))


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
