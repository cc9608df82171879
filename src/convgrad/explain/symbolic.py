"""The three passes of a small single-channel convolution, derived with SymPy.

:func:`derive` builds the forward pass out of symbols, numbered from 1 in row-major order
(``i1, i2, ...`` the input, ``w1, w2, ...`` the kernel, ``g1, g2, ...`` the upstream gradient
``g_k = ∂C/∂o_k`` of some cost ``C``), from the index set of :meth:`Geometry.terms`.

Whatever ``C`` is, the chain rule only needs ``g``: ``∂C/∂θ = Σ_k g_k · ∂o_k/∂θ``, the
derivative of the scalar ``Σ_k g_k · o_k`` with ``g`` held fixed.  So the weight gradient
and the input gradient are derivatives of that sum, and SymPy takes them.  They are then
compared with the closed forms every library implements, built separately here:

* weight gradient = cross-correlation of the (padded) input with ``g`` (``g`` spread out
  by the stride, the result sampled at the dilation);
* input gradient = full convolution of ``g`` (spread out by the stride) with the kernel
  (spread out by the dilation) rotated 180 degrees, cropped to the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .extras import require
from .geometry import Geometry, cells


def _sympy() -> Any:
    return require("sympy", "convgrad.explain")


def _symbols(prefix: str, shape: tuple[int, ...]) -> np.ndarray:
    sympy = _sympy()
    count = math.prod(shape)
    return np.array([sympy.Symbol(f"{prefix}{k + 1}") for k in range(count)], dtype=object).reshape(shape)


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    out.fill(_sympy().Integer(0))
    return out


def _get(array: np.ndarray, index: Sequence[int]) -> Any:
    """``array[index]``, or 0 outside it."""
    if all(0 <= i < n for i, n in zip(index, array.shape)):
        return array[tuple(index)]
    return _sympy().Integer(0)


def _spread(array: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """Insert ``step - 1`` zeros between neighbouring entries along every axis."""
    shape = tuple(s * (n - 1) + 1 for s, n in zip(step, array.shape))
    out = _zeros(shape)
    for index in cells(array.shape):
        out[tuple(s * i for s, i in zip(step, index))] = array[index]
    return out


def _pad(array: np.ndarray, before: Sequence[int], after: Sequence[int]) -> np.ndarray:
    out = _zeros(tuple(n + b + a for n, b, a in zip(array.shape, before, after)))
    out[tuple(slice(b, b + n) for b, n in zip(before, array.shape))] = array
    return out


def _correlate(a: np.ndarray, k: np.ndarray, out_shape: tuple[int, ...], step: tuple[int, ...] | None = None,
               dilation: tuple[int, ...] | None = None) -> np.ndarray:
    """Cross-correlation: ``out[u] = sum over v of a[u*step + v*dilation] * k[v]`` (0 outside ``a``)."""
    sympy = _sympy()
    step = step or (1,) * a.ndim
    dilation = dilation or (1,) * a.ndim
    out = _zeros(out_shape)
    for u in cells(out_shape):
        terms = [_get(a, [ui * s + vi * d for ui, vi, s, d in zip(u, v, step, dilation)]) * k[v] for v in cells(k.shape)]
        out[u] = sympy.Add(*terms)
    return out


def to_sympy(array: np.ndarray) -> Any:
    """A SymPy Matrix for 1-D (one row) and 2-D arrays, a SymPy Array for 3-D."""
    sympy = _sympy()
    if array.ndim == 1:
        return sympy.Matrix([list(array)])
    if array.ndim == 2:
        return sympy.Matrix(array.tolist())
    return sympy.ImmutableDenseNDimArray(array.flatten().tolist(), array.shape)


def entries(matrix: Any) -> list[Any]:
    """The entries of a SymPy Matrix or Array in row-major order."""
    sympy = _sympy()
    if isinstance(matrix, sympy.MatrixBase):
        return list(matrix)
    return list(sympy.flatten(matrix.tolist()))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    sympy = _sympy()
    return a.shape == b.shape and all(sympy.expand(x - y) == 0 for x, y in zip(a.flat, b.flat))


@dataclass
class Derivation:
    """The symbolic three passes of one single-channel convolution.

    ``input``, ``kernel``, ``upstream`` hold the symbols ``i``, ``w``, ``g``; ``output``,
    ``grad_weight`` and ``grad_input`` are derived (``grad_*`` by differentiating ``cost``
    = sum of ``g_k * o_k``); the ``*_closed`` forms are built from their formulas, and the
    two ``*_matches_*`` flags say whether they agree with the derivatives.  All arrays are
    SymPy matrices (SymPy arrays for 3-D).
    """

    geometry: Geometry
    input: Any
    kernel: Any
    upstream: Any
    output: Any
    cost: Any
    grad_weight: Any
    grad_input: Any
    grad_weight_closed: Any
    grad_input_closed: Any
    weight_matches_correlation: bool
    input_matches_full_convolution: bool
    im2col: Any  # row k: the input entries output k multiplies with w1, w2, ...
    upstream_spread: Any  # g with stride - 1 zeros between entries
    upstream_padded: Any  # G′: upstream_spread zero-padded so that every input cell has a whole window
    kernel_rotated: Any  # the kernel, spread by the dilation, rotated 180 degrees

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.geometry.input_shape

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.geometry.kernel_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.geometry.output_shape

    @property
    def stride(self) -> tuple[int, ...]:
        return self.geometry.stride

    @property
    def padding(self) -> tuple[int, ...]:
        return self.geometry.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.geometry.dilation

    @property
    def ndim(self) -> int:
        return self.geometry.ndim

    def symbols(self) -> tuple[list[Any], list[Any], list[Any]]:
        return entries(self.input), entries(self.kernel), entries(self.upstream)


def derive(input_shape: Sequence[int], kernel_shape: Sequence[int], stride: int | Sequence[int] = 1,
           padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1) -> Derivation:
    """Derive the forward pass, weight gradient and input gradient of a small convolution.

    Parameters
    ----------
    input_shape : tuple of 1 to 3 ints, e.g. ``(3, 3)``
    kernel_shape : tuple of as many ints, e.g. ``(2, 2)``
    stride, padding, dilation : int or tuple of ints
        As ``torch.nn.functional.conv2d`` (symmetric zero padding).

    Returns
    -------
    Derivation
        With SymPy matrices ``output`` (the output's shape), ``grad_weight`` (the kernel's)
        and ``grad_input`` (the input's), and the checks against the closed forms.

    Raises
    ------
    ValueError
        For shapes of different ranks, extents below 1, or a kernel that does not fit.
    convgrad.explain.MissingExtra
        When SymPy is not installed.

    Examples
    --------
    >>> d = derive((3, 3), (2, 2))
    >>> d.grad_weight[0, 0]
    g1*i1 + g2*i2 + g3*i4 + g4*i5
    """
    geometry = Geometry.create(input_shape, kernel_shape, stride, padding, dilation)
    sympy = _sympy()
    ndim = geometry.ndim
    x, w, g = (_symbols(p, s) for p, s in (("i", geometry.input_shape), ("w", geometry.kernel_shape),
                                           ("g", geometry.output_shape)))

    # The forward pass from the one index set that the figures read too.  Products with the
    # zero padding vanish, so they are left out.
    products: dict[tuple[int, ...], list[Any]] = {cell: [] for cell in cells(geometry.output_shape)}
    for term in geometry.terms():
        if geometry.in_input(term.input_cell):
            products[term.output_cell].append(x[term.input_cell] * w[term.tap])
    output = np.empty(geometry.output_shape, dtype=object)
    for cell, factors in products.items():
        output[cell] = sympy.Add(*factors)
    cost = sympy.Add(*(gk * ok for gk, ok in zip(g.flat, output.flat)))
    grad_weight = np.array([sympy.diff(cost, wk) for wk in w.flat], dtype=object).reshape(geometry.kernel_shape)
    grad_input = np.array([sympy.diff(cost, ik) for ik in x.flat], dtype=object).reshape(geometry.input_shape)

    # Closed forms, built from their formulas rather than from the terms.
    # dW[t] = sum over v of xpad[t*dilation + v] * gs[v]: the padded input cross-correlated
    # with g spread by the stride, sampled every `dilation`.
    xpad = _pad(x, geometry.padding, geometry.padding)
    g_spread = _spread(g, geometry.stride)
    grad_weight_closed = _correlate(xpad, g_spread, geometry.kernel_shape, geometry.dilation, None)
    # dXpad = full convolution of gs with the spread kernel ws: sum over j of gs[u - j] ws[j],
    # which is gs zero-padded by len(ws) - 1 and cross-correlated with ws rotated 180 degrees.
    # The stride may leave a remainder of the padded input that no output reached; padding gs
    # by that much more at the end gives those cells a window of zeros too.
    w_spread = _spread(w, geometry.dilation)
    w_rotated = w_spread[tuple(slice(None, None, -1) for _ in range(ndim))]
    margin = tuple(n - 1 for n in w_spread.shape)
    remainder = tuple(p - (s + m) for p, s, m in zip(geometry.padded_shape, g_spread.shape, margin))
    g_padded = _pad(g_spread, margin, tuple(m + r for m, r in zip(margin, remainder)))
    dxpad = _correlate(g_padded, w_rotated, geometry.padded_shape)
    grad_input_closed = dxpad[tuple(slice(p, p + n) for p, n in zip(geometry.padding, geometry.input_shape))]

    im2col = np.empty((math.prod(geometry.output_shape), math.prod(geometry.kernel_shape)), dtype=object)
    im2col.fill(sympy.Integer(0))
    output_row = {cell: k for k, cell in enumerate(cells(geometry.output_shape))}
    tap_column = {cell: k for k, cell in enumerate(cells(geometry.kernel_shape))}
    for term in geometry.terms():
        if geometry.in_input(term.input_cell):
            im2col[output_row[term.output_cell], tap_column[term.tap]] = x[term.input_cell]

    return Derivation(
        geometry=geometry, input=to_sympy(x), kernel=to_sympy(w), upstream=to_sympy(g),
        output=to_sympy(output), cost=cost, grad_weight=to_sympy(grad_weight), grad_input=to_sympy(grad_input),
        grad_weight_closed=to_sympy(grad_weight_closed), grad_input_closed=to_sympy(grad_input_closed),
        weight_matches_correlation=_same(grad_weight, grad_weight_closed),
        input_matches_full_convolution=_same(grad_input, grad_input_closed),
        im2col=sympy.Matrix(im2col.tolist()), upstream_spread=to_sympy(g_spread), upstream_padded=to_sympy(g_padded),
        kernel_rotated=to_sympy(w_rotated),
    )
