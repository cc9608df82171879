"""Deliberately naive float64 references for the three passes.

Written for obviousness, not speed, and independent of every backend: each pass loops
over the kernel taps (t, r, s) and applies the definition of DESIGN §1 to a whole strided
slice at a time.  All arrays are logical 5-D: x (N, C, D, H, W), w (K, C/G, T, R, S),
y (N, K, Z, P, Q); results are float64.

The references are exact about non-finite values (DESIGN §7): a position outside the input
contributes no term at all, rather than a product ``0 · w`` that a NaN or infinite weight
(or, in wgrad, output gradient) would turn into NaN.  For finite inputs this changes nothing.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..problem import ConvProblem


def _padded_zeros(problem: ConvProblem) -> np.ndarray:
    spatial = [n + b + a for n, b, a in zip(problem.input_size, problem.pad_before, problem.pad_after)]
    return np.zeros((problem.N, problem.C, *spatial))


def _tap_slices(problem: ConvProblem, tap: tuple[int, int, int]) -> tuple[slice, ...]:
    """Positions of the padded input that kernel tap ``tap`` reads for every output position."""
    return tuple(
        slice(k * d, k * d + s * (n - 1) + 1, s)
        for k, d, s, n in zip(tap, problem.dilation, problem.stride, problem.output_size)
    )


def _tap_in_range(problem: ConvProblem, tap: tuple[int, int, int]) -> np.ndarray:
    """(Z, P, Q) mask: whether kernel tap ``tap`` reads a position inside the (unpadded) input."""
    masks = [
        (0 <= (pos := np.arange(n) * s + k * d - b)) & (pos < size)
        for k, d, s, n, b, size in zip(tap, problem.dilation, problem.stride, problem.output_size,
                                       problem.pad_before, problem.input_size)
    ]
    return masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]


def _interior(problem: ConvProblem) -> tuple[slice, ...]:
    return tuple(slice(b, b + n) for b, n in zip(problem.pad_before, problem.input_size))


def _taps(problem: ConvProblem):
    return itertools.product(*(range(k) for k in problem.kernel_size))


def reference_forward(x: np.ndarray, w: np.ndarray, problem: ConvProblem, bias: np.ndarray | None = None) -> np.ndarray:
    """y[n, k, z, p, q] = sum over c, t, r, s of xpad[n, g·C/G + c, z·sd + t·dd, ...] · w[k, c, t, r, s]."""
    G, Cg, Kg = problem.G, problem.C_per_group, problem.K_per_group
    xpad = _padded_zeros(problem)
    xpad[(slice(None), slice(None), *_interior(problem))] = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    y = np.zeros((problem.N, problem.K, *problem.output_size))
    for g in range(G):
        cs, ks = slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)
        y_group = y[:, ks]  # a view: writes reach y
        for tap in _taps(problem):
            inside = _tap_in_range(problem, tap)
            window = xpad[(slice(None), cs, *_tap_slices(problem, tap))][:, :, inside]
            y_group[:, :, inside] += np.einsum("ncv,kc->nkv", window, w[(ks, slice(None), *tap)])
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64).reshape(1, -1, 1, 1, 1)
    return y


def reference_grad_input(dy: np.ndarray, w: np.ndarray, problem: ConvProblem) -> np.ndarray:
    """dx: every output gradient sent back along the taps that produced it (the adjoint of the forward)."""
    G, Cg, Kg = problem.G, problem.C_per_group, problem.K_per_group
    dxpad = _padded_zeros(problem)
    dy = np.asarray(dy, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    for g in range(G):
        cs, ks = slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)
        for tap in _taps(problem):
            dxpad[(slice(None), cs, *_tap_slices(problem, tap))] += np.einsum(
                "nkzpq,kc->nczpq", dy[:, ks], w[(ks, slice(None), *tap)]
            )
    return dxpad[(slice(None), slice(None), *_interior(problem))].copy()


def reference_grad_weight(x: np.ndarray, dy: np.ndarray, problem: ConvProblem) -> np.ndarray:
    """dw[k, c, t, r, s] = sum over n, z, p, q of xpad[n, g·C/G + c, z·sd + t·dd, ...] · dy[n, k, z, p, q]."""
    G, Cg, Kg = problem.G, problem.C_per_group, problem.K_per_group
    xpad = _padded_zeros(problem)
    xpad[(slice(None), slice(None), *_interior(problem))] = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    dw = np.zeros((problem.K, Cg, *problem.kernel_size))
    for g in range(G):
        cs, ks = slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)
        for tap in _taps(problem):
            inside = _tap_in_range(problem, tap)
            window = xpad[(slice(None), cs, *_tap_slices(problem, tap))][:, :, inside]
            dw[(ks, slice(None), *tap)] = np.einsum("ncv,nkv->kc", window, dy[:, ks][:, :, inside])
    return dw
