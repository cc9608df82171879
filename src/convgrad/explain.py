"""``convgrad explain``: the three passes of a small convolution, derived symbolically.

:func:`derive` builds a single-channel convolution (cross-correlation, as deep-learning
libraries compute it) out of SymPy symbols, numbered from 1 in row-major order:

* ``i1, i2, ...`` the input, ``w1, w2, ...`` the kernel;
* ``g1, g2, ...`` the upstream gradient ``g_k = dC/do_k`` of some cost ``C``.

Whatever ``C`` is, the chain rule only needs ``g``: ``dC/dtheta = sum_k g_k * do_k/dtheta``,
which is the derivative of the scalar ``sum_k g_k * o_k`` with ``g`` held fixed.  So the
weight gradient and the input gradient are the derivatives of that sum, and SymPy takes
them.  The derivation then compares them with the closed forms every library implements:

* weight gradient = cross-correlation of the (padded) input with ``g`` (``g`` spread out
  by the stride, the result sampled at the dilation);
* input gradient = full convolution of ``g`` (spread out by the stride) with the kernel
  (spread out by the dilation) rotated 180 degrees, cropped to the input.

The command prints every sum of products, the matrix forms, an optional second layer down
to one output with a squared-error loss (the chain rule one output at a time), and finally
runs the same numbers through every available backend's three passes.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


# ----------------------------------------------------------------------------------------
# Symbolic convolution on object arrays (one entry per position, any number of axes)


def _as_tuple(value: int | Sequence[int], ndim: int, name: str, minimum: int) -> tuple[int, ...]:
    values = (int(value),) * ndim if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(values) == 1 and ndim > 1:
        values = values * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} must be an int or {ndim} ints, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return values


def _symbols(prefix: str, shape: tuple[int, ...]) -> np.ndarray:
    import sympy

    count = math.prod(shape)
    return np.array([sympy.Symbol(f"{prefix}{k + 1}") for k in range(count)], dtype=object).reshape(shape)


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    import sympy

    out = np.empty(shape, dtype=object)
    out.fill(sympy.Integer(0))
    return out


def _positions(shape: Sequence[int]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(n) for n in shape)))


def _get(array: np.ndarray, index: Sequence[int]) -> Any:
    """``array[index]``, or 0 outside it."""
    import sympy

    if all(0 <= i < n for i, n in zip(index, array.shape)):
        return array[tuple(index)]
    return sympy.Integer(0)


def _spread(array: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """Insert ``step - 1`` zeros between neighbouring entries along every axis."""
    shape = tuple(s * (n - 1) + 1 for s, n in zip(step, array.shape))
    out = _zeros(shape)
    for index in _positions(array.shape):
        out[tuple(s * i for s, i in zip(step, index))] = array[index]
    return out


def _pad(array: np.ndarray, before: Sequence[int], after: Sequence[int]) -> np.ndarray:
    out = _zeros(tuple(n + b + a for n, b, a in zip(array.shape, before, after)))
    out[tuple(slice(b, b + n) for b, n in zip(before, array.shape))] = array
    return out


def _correlate(a: np.ndarray, k: np.ndarray, out_shape: tuple[int, ...], step: tuple[int, ...] | None = None,
               dilation: tuple[int, ...] | None = None) -> np.ndarray:
    """Cross-correlation: ``out[u] = sum over v of a[u*step + v*dilation] * k[v]`` (0 outside ``a``)."""
    import sympy

    step = step or (1,) * a.ndim
    dilation = dilation or (1,) * a.ndim
    out = _zeros(out_shape)
    for u in _positions(out_shape):
        terms = [_get(a, [ui * s + vi * d for ui, vi, s, d in zip(u, v, step, dilation)]) * k[v] for v in _positions(k.shape)]
        out[u] = sympy.Add(*terms)
    return out


def _to_sympy(array: np.ndarray) -> Any:
    """A SymPy Matrix for 1-D (one row) and 2-D arrays, a SymPy Array for 3-D."""
    import sympy

    if array.ndim == 1:
        return sympy.Matrix([list(array)])
    if array.ndim == 2:
        return sympy.Matrix(array.tolist())
    return sympy.ImmutableDenseNDimArray(array.flatten().tolist(), array.shape)


def _entries(matrix: Any) -> list[Any]:
    """The entries of a SymPy Matrix or Array in row-major order."""
    import sympy

    if isinstance(matrix, sympy.MatrixBase):
        return list(matrix)
    return list(sympy.flatten(matrix.tolist()))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    import sympy

    return a.shape == b.shape and all(sympy.expand(x - y) == 0 for x, y in zip(a.flat, b.flat))


@dataclass
class Derivation:
    """The symbolic three passes of one single-channel convolution.

    ``input``, ``kernel``, ``upstream`` hold the symbols ``i``, ``w``, ``g``; ``output``,
    ``grad_weight`` and ``grad_input`` are derived (``grad_*`` by differentiating ``cost``
    = sum of ``g_k * o_k``); the ``*_closed`` forms are built from their formulas, and the
    two ``*_matches_*`` flags say whether they agree with the derivatives.  All six arrays
    are SymPy matrices (SymPy arrays for 3-D).
    """

    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
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
    kernel_rotated: Any  # the kernel, spread by the dilation, rotated 180 degrees

    @property
    def ndim(self) -> int:
        return len(self.input_shape)

    def symbols(self) -> tuple[list[Any], list[Any], list[Any]]:
        return _entries(self.input), _entries(self.kernel), _entries(self.upstream)


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

    Examples
    --------
    >>> d = derive((3, 3), (2, 2))
    >>> d.grad_weight[0, 0]
    g1*i1 + g2*i2 + g3*i4 + g4*i5
    """
    import sympy

    input_shape, kernel_shape = tuple(int(n) for n in input_shape), tuple(int(n) for n in kernel_shape)
    ndim = len(input_shape)
    if not 1 <= ndim <= 3 or len(kernel_shape) != ndim:
        raise ValueError(f"input and kernel must both have 1 to 3 axes, got {input_shape} and {kernel_shape}")
    if min(input_shape + kernel_shape) < 1:
        raise ValueError(f"extents must be positive, got {input_shape} and {kernel_shape}")
    stride_ = _as_tuple(stride, ndim, "stride", 1)
    padding_ = _as_tuple(padding, ndim, "padding", 0)
    dilation_ = _as_tuple(dilation, ndim, "dilation", 1)
    padded_shape = tuple(n + 2 * p for n, p in zip(input_shape, padding_))
    output_shape = tuple((n - d * (k - 1) - 1) // s + 1
                         for n, k, s, d in zip(padded_shape, kernel_shape, stride_, dilation_))
    if min(output_shape) < 1:
        raise ValueError(f"a {kernel_shape} kernel with dilation {dilation_} does not fit the {input_shape} input "
                         f"padded by {padding_}")

    x, w, g = _symbols("i", input_shape), _symbols("w", kernel_shape), _symbols("g", output_shape)
    xpad = _pad(x, padding_, padding_)
    output = _correlate(xpad, w, output_shape, stride_, dilation_)
    cost = sympy.Add(*(gk * ok for gk, ok in zip(g.flat, output.flat)))
    grad_weight = np.array([sympy.diff(cost, wk) for wk in w.flat], dtype=object).reshape(kernel_shape)
    grad_input = np.array([sympy.diff(cost, ik) for ik in x.flat], dtype=object).reshape(input_shape)

    # Closed forms.  dW[t] = sum over v of xpad[t*dilation + v] * gs[v]: the padded input
    # cross-correlated with g spread by the stride, sampled every `dilation`.
    g_spread = _spread(g, stride_)
    grad_weight_closed = _correlate(xpad, g_spread, kernel_shape, dilation_, None)
    # dXpad = full convolution of gs with the spread kernel ws: sum over j of gs[u - j] ws[j],
    # which is gs zero-padded by len(ws) - 1 and cross-correlated with ws rotated 180 degrees.
    w_spread = _spread(w, dilation_)
    w_rotated = w_spread[tuple(slice(None, None, -1) for _ in range(ndim))]
    margin = tuple(n - 1 for n in w_spread.shape)
    full_shape = tuple(a + b - 1 for a, b in zip(g_spread.shape, w_spread.shape))
    full = _correlate(_pad(g_spread, margin, margin), w_rotated, full_shape)
    # The full convolution covers the padded input except a remainder the stride never reached.
    dxpad = _pad(full, (0,) * ndim, tuple(p - f for p, f in zip(padded_shape, full_shape)))
    grad_input_closed = dxpad[tuple(slice(p, p + n) for p, n in zip(padding_, input_shape))]

    im2col = np.array([[_get(xpad, [o * s + t * d for o, t, s, d in zip(out, tap, stride_, dilation_)])
                        for tap in _positions(kernel_shape)] for out in _positions(output_shape)], dtype=object)

    return Derivation(
        input_shape=input_shape, kernel_shape=kernel_shape, output_shape=output_shape, stride=stride_,
        padding=padding_, dilation=dilation_, input=_to_sympy(x), kernel=_to_sympy(w), upstream=_to_sympy(g),
        output=_to_sympy(output), cost=cost, grad_weight=_to_sympy(grad_weight), grad_input=_to_sympy(grad_input),
        grad_weight_closed=_to_sympy(grad_weight_closed), grad_input_closed=_to_sympy(grad_input_closed),
        weight_matches_correlation=_same(grad_weight, grad_weight_closed),
        input_matches_full_convolution=_same(grad_input, grad_input_closed),
        im2col=sympy.Matrix(im2col.tolist()), upstream_spread=_to_sympy(g_spread), kernel_rotated=_to_sympy(w_rotated),
    )


# ----------------------------------------------------------------------------------------
# Printing sums of products in reading order


_NAME = re.compile(r"^([A-Za-z]+)(\d+)$")


def _name_key(symbol: Any) -> tuple[str, int]:
    match = _NAME.match(symbol.name)
    return (match.group(1), int(match.group(2))) if match else (symbol.name, 0)


def format_sum(expr: Any, factor_order: Sequence[str], sort_by: str, rename: Callable[[Any], str] | None = None) -> str:
    """``expr`` (a sum of products of symbols) as ``a·b + c·d``.

    Factors in each product are ordered by the prefixes in ``factor_order``; products are
    ordered by the number of their ``sort_by`` symbol (so ``i1·g1 + i2·g2 + i4·g3``).
    """
    import sympy

    rename = rename or (lambda s: s.name)
    rank = {prefix: r for r, prefix in enumerate(factor_order)}
    expr = sympy.expand(expr)
    if expr == 0:
        return "0"
    terms = []
    for term in sympy.Add.make_args(expr):
        coefficient, factors = term.as_coeff_mul()
        symbols = []
        for factor in factors:
            base, power = factor.as_base_exp()
            symbols.extend([base] * int(power))
        symbols.sort(key=lambda s: (rank.get(_name_key(s)[0], len(rank)), _name_key(s)))
        key = next((_name_key(s)[1] for s in symbols if _name_key(s)[0] == sort_by), 0)
        text = "·".join(rename(s) for s in symbols)
        if coefficient != 1:
            text = f"{coefficient}·{text}"
        terms.append((key, text))
    terms.sort(key=lambda item: item[0])
    return " + ".join(text for _, text in terms).replace("+ -", "- ")


def _pretty(matrix: Any) -> str:
    import sympy

    return sympy.pretty(matrix, use_unicode=True)


def _side_by_side(*blocks: str, gap: str = "   ") -> str:
    split = [b.splitlines() for b in blocks]
    height = max(len(lines) for lines in split)
    widths = [max((len(line) for line in lines), default=0) for lines in split]
    rows = []
    for r in range(height):
        parts = []
        for lines, width in zip(split, widths):
            offset = (height - len(lines)) // 2
            line = lines[r - offset] if 0 <= r - offset < len(lines) else ""
            parts.append(line.ljust(width))
        rows.append(gap.join(parts).rstrip())
    return "\n".join(rows)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def explain_text(d: Derivation) -> str:
    """The human-readable derivation of one layer."""
    lines = []
    stride, padding, dilation = (str(v[0]) if len(set(v)) == 1 else ",".join(map(str, v))
                                 for v in (d.stride, d.padding, d.dilation))
    lines.append(f"Convolution (cross-correlation) of a {_shape_text(d.input_shape)} input with a "
                 f"{_shape_text(d.kernel_shape)} kernel, stride {stride}, padding {padding}, dilation {dilation}: "
                 f"a {_shape_text(d.output_shape)} output.")
    lines.append("Symbols are numbered from 1 in row-major order: input i, kernel w, upstream gradient g_k = ∂C/∂o_k.")
    lines.append("")
    lines.append(_side_by_side("X =", _pretty(d.input), "W =", _pretty(d.kernel), "G =", _pretty(d.upstream)))
    lines.append("")
    lines.append("Forward pass, each output a sum of products:")
    for k, expr in enumerate(_entries(d.output), 1):
        lines.append(f"  o{k} = {format_sum(expr, ('i', 'w'), 'w')}")
    lines.append("")
    lines.append("The cost reaches the weights only through the outputs, so by the chain rule")
    lines.append("  ∂C/∂θ = Σ_k ∂C/∂o_k · ∂o_k/∂θ = Σ_k g_k · ∂o_k/∂θ,  the derivative of  Σ_k g_k·o_k  with g held fixed.")
    lines.append("")
    lines.append("Weight gradient: each weight collects, over the outputs it touched, the input it met times that "
                 "output's upstream gradient:")
    for k, expr in enumerate(_entries(d.grad_weight), 1):
        lines.append(f"  ∂C/∂w{k} = {format_sum(expr, ('i', 'g'), 'g')}")
    lines.append("")
    lines.append("Input gradient: each input collects, over the outputs it fed, the weight it met times that output's "
                 "upstream gradient:")
    for k, expr in enumerate(_entries(d.grad_input), 1):
        lines.append(f"  ∂C/∂i{k} = {format_sum(expr, ('w', 'g'), 'g')}")
    lines.append("")
    lines.append("Matrix forms (⋆ is cross-correlation, as in the forward pass):")
    lines.append(_side_by_side("  O = X ⋆ W =", _pretty(d.output)))
    lines.append("")
    spread = " (G spread by the stride)" if any(s > 1 for s in d.stride) else ""
    lines.append(f"  ∂C/∂W = X ⋆ G{spread}, the input cross-correlated with the upstream gradient:")
    lines.append(_side_by_side("   ", _pretty(d.grad_weight_closed)))
    lines.append(f"  equals the derivative: {d.weight_matches_correlation}")
    lines.append("")
    lines.append(f"  ∂C/∂X = full convolution of G{spread} with W rotated 180°{' (W spread by the dilation)' if any(v > 1 for v in d.dilation) else ''},")
    lines.append("          i.e. G zero-padded all round, cross-correlated with rot180(W), cropped to the input:")
    lines.append(_side_by_side("    G' =", _pretty(d.upstream_spread), "rot180(W) =", _pretty(d.kernel_rotated)))
    lines.append(_side_by_side("   ", _pretty(d.grad_input_closed)))
    lines.append(f"  equals the derivative: {d.input_matches_full_convolution}")
    lines.append("")
    lines.append("  As one GEMM (im2col): o = A·w, row k of A holding the inputs output k reads, so ∂C/∂w = Aᵀ·g:")
    lines.append(_side_by_side("    A =", _pretty(d.im2col)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The two-layer chain


@dataclass
class Chain:
    """Two convolutions down to one output and a squared-error loss ``C = (o² - y)²``."""

    first: Derivation
    second_kernel: Any  # symbols w²₁, ...
    hidden: Any  # symbols o¹₁, ... standing for the first layer's outputs
    target: Any  # y
    output: Any  # o² in terms of o¹ and w²
    loss: Any  # C in terms of o², y
    grad_hidden: list[Any]  # ∂C/∂o¹ₖ, differentiated
    grad_first_weight: list[Any]  # ∂C/∂w¹ⱼ, differentiated through everything
    grad_second_weight: list[Any]
    hidden_matches_chain: bool  # ∂C/∂o¹ₖ == w²ₖ · 2(o² - y) for every k
    weight_matches_chain: bool  # ∂C/∂w¹ == the one-layer weight gradient with g = ∂C/∂o¹


def _layer_symbol(base: str, layer: int, k: int) -> Any:
    import sympy

    return sympy.Symbol(f"{base}{str(layer).translate(SUPERSCRIPT)}{str(k).translate(SUBSCRIPT)}")


def derive_chain(input_shape: Sequence[int], kernel_shape: Sequence[int], then_kernel: Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1) -> Chain:
    """Layer 1 as :func:`derive`, then a kernel as large as its output (one value), then ``(o² - y)²``."""
    import sympy

    first = derive(input_shape, kernel_shape, stride, padding, dilation)
    then_kernel = tuple(int(n) for n in then_kernel)
    if then_kernel != first.output_shape:
        raise ValueError(f"--then-kernel must be {_shape_text(first.output_shape)} (the first layer's output) "
                         f"to bring it down to a single value, got {_shape_text(then_kernel)}")
    count = math.prod(then_kernel)
    w2 = [_layer_symbol("w", 2, k + 1) for k in range(count)]
    o1 = [_layer_symbol("o", 1, k + 1) for k in range(count)]
    y = sympy.Symbol("y")
    o2 = sympy.Add(*(a * b for a, b in zip(o1, w2)))
    loss = (o2 - y) ** 2
    grad_hidden = [sympy.diff(loss, o) for o in o1]
    hidden_ok = all(sympy.expand(gk - w2k * 2 * (o2 - y)) == 0 for gk, w2k in zip(grad_hidden, w2))

    x_syms, w1_syms, g_syms = first.symbols()
    outputs = _entries(first.output)
    full_loss = loss.subs(dict(zip(o1, outputs)), simultaneous=True)
    direct = [sympy.diff(full_loss, wj) for wj in w1_syms]
    o2_full = o2.subs(dict(zip(o1, outputs)), simultaneous=True)
    upstream = {gk: w2k * 2 * (o2_full - y) for gk, w2k in zip(g_syms, w2)}
    chained = [expr.subs(upstream, simultaneous=True) for expr in _entries(first.grad_weight)]
    weight_ok = all(sympy.expand(a - b) == 0 for a, b in zip(direct, chained))
    grad_second = [sympy.diff(full_loss, w) for w in w2]
    return Chain(first, w2, o1, y, o2, loss, grad_hidden, direct, grad_second, hidden_ok, weight_ok)


def chain_text(chain: Chain) -> str:
    first = chain.first
    count = len(chain.hidden)
    one = lambda k: f"o¹{str(k).translate(SUBSCRIPT)}"
    w1 = lambda k: f"w¹{str(k).translate(SUBSCRIPT)}"
    w2 = lambda k: f"w²{str(k).translate(SUBSCRIPT)}"
    rename_first = lambda s: w1(_name_key(s)[1]) if _name_key(s)[0] == "w" else s.name
    lines = [f"Two layers: the {_shape_text(first.input_shape)} input through the {_shape_text(first.kernel_shape)} "
             f"kernel W¹ gives o¹ ({_shape_text(first.output_shape)}); a {_shape_text(first.output_shape)} kernel W² "
             f"brings o¹ down to one value o²; the loss is C = (o² − y)².", ""]
    for k, expr in enumerate(_entries(first.output), 1):
        lines.append(f"  {one(k)} = {format_sum(expr, ('i', 'w'), 'w', rename_first)}")
    lines.append("  o² = " + " + ".join(f"{one(k)}·{w2(k)}" for k in range(1, count + 1)))
    lines.append("  C = (o² − y)²,   ∂C/∂o² = 2(o² − y)")
    lines.append("")
    lines.append("Chain rule, one k at a time: o¹ₖ reaches C only through the term o¹ₖ·w²ₖ of o², so")
    for k in range(1, count + 1):
        lines.append(f"  ∂C/∂{one(k)} = ∂C/∂o² · ∂o²/∂{one(k)} = {w2(k)} · 2(o² − y)")
    lines.append(f"  (differentiated symbolically: {chain.hidden_matches_chain})")
    lines.append("and likewise")
    for k in range(1, count + 1):
        lines.append(f"  ∂C/∂{w2(k)} = {one(k)} · 2(o² − y)")
    lines.append("")
    lines.append("These ∂C/∂o¹ₖ are the upstream gradients g_k of the first layer, so its weight gradient is the")
    lines.append("one-layer result with g_k = w²ₖ · 2(o² − y):")
    for j, expr in enumerate(_entries(first.grad_weight), 1):
        terms = format_sum(expr, ("i", "g"), "g").split(" + ")
        expanded = " + ".join(re.sub(r"g(\d+)", lambda m: f"{w2(int(m.group(1)))}·2(o² − y)", t) for t in terms)
        factored = " + ".join(re.sub(r"g(\d+)", lambda m: w2(int(m.group(1))), t) for t in terms)
        lines.append(f"  ∂C/∂{w1(j)} = {expanded}")
        lines.append(f"  {' ' * len(f'∂C/∂{w1(j)}')} = 2(o² − y)·({factored})")
    lines.append(f"(differentiating C directly with respect to each w¹ gives the same: {chain.weight_matches_chain})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Numbers through the backends


def _functions(ndim: int) -> tuple[Callable, Callable, Callable]:
    import convgrad

    return (getattr(convgrad, f"conv{ndim}d"), getattr(convgrad, f"conv{ndim}d_input"),
            getattr(convgrad, f"conv{ndim}d_weight"))


def _evaluate(exprs: Sequence[Any], values: dict[Any, float]) -> np.ndarray:
    import sympy

    symbols = list(values)
    function = sympy.lambdify(symbols, list(exprs), modules="numpy")
    return np.asarray(function(*values.values()), dtype=np.float64)


def backend_names() -> list[str]:
    import convgrad

    names = convgrad.backends.available()
    return ["numpy"] + [n for n in names if n != "numpy"]


def _run_passes(d: Derivation, name: str, x: np.ndarray, w: np.ndarray, g: np.ndarray, dtype: Any) -> dict[str, np.ndarray]:
    conv, conv_input, conv_weight = _functions(d.ndim)
    args = dict(stride=d.stride, padding=d.padding, dilation=d.dilation, backend=name)
    x_, w_, g_ = (a.astype(dtype)[None, None] for a in (x, w, g))
    return {
        "output": np.asarray(conv(x_, w_, None, **args))[0, 0],
        "grad_input": np.asarray(conv_input((1, 1, *d.input_shape), w_, g_, **args))[0, 0],
        "grad_weight": np.asarray(conv_weight(x_, (1, 1, *d.kernel_shape), g_, **args))[0, 0],
    }


def check_backends(d: Derivation, seed: int = 0, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Random numbers through every backend's three passes, compared with the symbolic results.

    Each backend runs in float64 where it can, else float32 (with a float32 tolerance).

    Returns
    -------
    list of dict
        One per backend: ``backend``, ``emulated``, ``dtype``, ``max_error`` per pass,
        ``ok``, and ``error`` when the backend raised.
    """
    import convgrad

    rng = np.random.default_rng(seed)
    x_syms, w_syms, g_syms = d.symbols()
    x = rng.standard_normal(d.input_shape)
    w = rng.standard_normal(d.kernel_shape)
    g = rng.standard_normal(d.output_shape)
    values = dict(zip(x_syms, x.flat)) | dict(zip(w_syms, w.flat)) | dict(zip(g_syms, g.flat))
    expected = {
        "output": _evaluate(_entries(d.output), values).reshape(d.output_shape),
        "grad_input": _evaluate(_entries(d.grad_input), values).reshape(d.input_shape),
        "grad_weight": _evaluate(_entries(d.grad_weight), values).reshape(d.kernel_shape),
    }
    results = []
    for name in names if names is not None else backend_names():
        backend = convgrad.backends.get(name)
        row: dict[str, Any] = {"backend": name, "emulated": bool(backend.emulated), "ok": False, "error": None}
        for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
            try:
                got = _run_passes(d, name, x, w, g, dtype)
            except (TypeError, ValueError) as error:
                row["error"] = f"{type(error).__name__}: {error}"
                continue
            except Exception as error:  # a backend failing at run time is reported, not fatal
                row["error"] = f"{type(error).__name__}: {error}"
                break
            errors = {key: float(np.max(np.abs(got[key] - expected[key]) / (1 + np.abs(expected[key]))))
                      for key in expected}
            row.update(dtype=np.dtype(dtype).name, max_error=errors, ok=all(e <= tol for e in errors.values()),
                       error=None)
            break
        results.append(row)
    return results


def check_chain_backends(chain: Chain, seed: int = 0, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The two-layer network's gradients through every backend, against the symbolic ∂C/∂w¹ and ∂C/∂w²."""
    import convgrad

    d = chain.first
    rng = np.random.default_rng(seed + 1)
    x_syms, w_syms, _ = d.symbols()
    x, w1 = rng.standard_normal(d.input_shape), rng.standard_normal(d.kernel_shape)
    w2, y = rng.standard_normal(d.output_shape), float(rng.standard_normal())
    values = dict(zip(x_syms, x.flat)) | dict(zip(w_syms, w1.flat)) | dict(zip(chain.second_kernel, w2.flat))
    values[chain.target] = y
    expected_w1 = _evaluate(chain.grad_first_weight, values).reshape(d.kernel_shape)
    expected_w2 = _evaluate(chain.grad_second_weight, values).reshape(d.output_shape)
    conv, conv_input, conv_weight = _functions(d.ndim)
    args = dict(stride=d.stride, padding=d.padding, dilation=d.dilation)
    results = []
    for name in names if names is not None else backend_names():
        backend = convgrad.backends.get(name)
        row: dict[str, Any] = {"backend": name, "emulated": bool(backend.emulated), "ok": False, "error": None}
        for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
            try:
                xb, w1b, w2b = (a.astype(dtype)[None, None] for a in (x, w1, w2))
                o1 = conv(xb, w1b, None, backend=name, **args)
                o2 = conv(o1, w2b, backend=name)
                grad_o2 = (2 * (np.asarray(o2) - y)).astype(dtype)
                grad_o1 = conv_input(o1.shape, w2b, grad_o2, backend=name)
                grad_w1 = np.asarray(conv_weight(xb, w1b.shape, grad_o1, backend=name, **args))[0, 0]
                grad_w2 = np.asarray(conv_weight(o1, w2b.shape, grad_o2, backend=name))[0, 0]
            except (TypeError, ValueError) as error:
                row["error"] = f"{type(error).__name__}: {error}"
                continue
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
                break
            errors = {"grad_w1": float(np.max(np.abs(grad_w1 - expected_w1) / (1 + np.abs(expected_w1)))),
                      "grad_w2": float(np.max(np.abs(grad_w2 - expected_w2) / (1 + np.abs(expected_w2))))}
            row.update(dtype=np.dtype(dtype).name, max_error=errors, ok=all(e <= tol for e in errors.values()),
                       error=None)
            break
        results.append(row)
    return results


def _results_text(title: str, results: list[dict[str, Any]]) -> str:
    lines = [title]
    for row in results:
        label = row["backend"] + (" (emulated)" if row["emulated"] else "")
        if row.get("max_error") is None:
            lines.append(f"  {label}: could not run: {row['error']}")
            continue
        worst = max(row["max_error"].values())
        verdict = "match the symbolic results" if row["ok"] else "DO NOT match the symbolic results"
        parts = ", ".join(row["max_error"])
        lines.append(f"  {label}: {parts} {verdict} ({row['dtype']}, largest relative difference {worst:.1e})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Command line


def _shape(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected extents like 3x3, got {text!r}") from None
    if not 1 <= len(values) <= 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected 1 to 3 non-negative extents like 3x3, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=_shape, default=(3, 3), help="input extents, e.g. 3x3 (default), 5, 3x4x4")
    parser.add_argument("--kernel", type=_shape, default=(2, 2), help="kernel extents, e.g. 2x2 (default)")
    parser.add_argument("--stride", type=_shape, default=(1,), help="stride, one value or one per axis (2 or 2x1)")
    parser.add_argument("--padding", type=_shape, default=(0,), help="symmetric zero padding, one value or one per axis")
    parser.add_argument("--dilation", type=_shape, default=(1,), help="dilation, one value or one per axis")
    parser.add_argument("--then-kernel", type=_shape, metavar="SHAPE",
                        help="add a second layer with this kernel (the first output's extents), down to one value, "
                             "and a squared-error loss")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random numbers run through the backends")


def run(args: argparse.Namespace) -> int:
    try:
        d = derive(args.input, args.kernel, args.stride, args.padding, args.dilation)
        chain = derive_chain(args.input, args.kernel, args.then_kernel, args.stride, args.padding,
                             args.dilation) if args.then_kernel else None
    except ValueError as error:
        print(f"convgrad explain: {error}", file=sys.stderr)
        return 2
    print(explain_text(d))
    ok = d.weight_matches_correlation and d.input_matches_full_convolution
    if chain is not None:
        print()
        print(chain_text(chain))
        ok = ok and chain.hidden_matches_chain and chain.weight_matches_chain
    print()
    results = check_backends(d, args.seed)
    print(_results_text("Random numbers through every available backend's three passes (output, grad_input, "
                        "grad_weight):", results))
    ok = ok and all(row["ok"] for row in results)
    if chain is not None:
        chain_results = check_chain_backends(chain, args.seed)
        print(_results_text("The two-layer network through every available backend (forward, input gradient of "
                            "layer 2, weight gradients):", chain_results))
        ok = ok and all(row["ok"] for row in chain_results)
    return 0 if ok else 1
