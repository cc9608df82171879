"""The derivation as text: every sum of products, in reading order, and the matrix forms."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from .geometry import shape_text
from .symbolic import Derivation, entries

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
_NAME = re.compile(r"^([A-Za-z]+)(\d+)$")


def name_key(symbol: Any) -> tuple[str, int]:
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
        symbols.sort(key=lambda s: (rank.get(name_key(s)[0], len(rank)), name_key(s)))
        key = next((name_key(s)[1] for s in symbols if name_key(s)[0] == sort_by), 0)
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


def _per_axis_text(values: Sequence[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else shape_text(values)


def explain_text(d: Derivation) -> str:
    """The human-readable derivation of one layer."""
    lines = []
    stride, padding, dilation = (str(v[0]) if len(set(v)) == 1 else ",".join(map(str, v))
                                 for v in (d.stride, d.padding, d.dilation))
    lines.append(f"Convolution (cross-correlation) of a {shape_text(d.input_shape)} input with a "
                 f"{shape_text(d.kernel_shape)} kernel, stride {stride}, padding {padding}, dilation {dilation}: "
                 f"a {shape_text(d.output_shape)} output.")
    lines.append("Symbols are numbered from 1 in row-major order: input i, kernel w, upstream gradient g_k = ∂C/∂o_k.")
    lines.append("")
    lines.append(_side_by_side("X =", _pretty(d.input), "W =", _pretty(d.kernel), "G =", _pretty(d.upstream)))
    lines.append("")
    lines.append("Forward pass, each output a sum of products:")
    for k, expr in enumerate(entries(d.output), 1):
        lines.append(f"  o{k} = {format_sum(expr, ('i', 'w'), 'w')}")
    lines.append("")
    lines.append("The cost reaches the weights only through the outputs, so by the chain rule")
    lines.append("  ∂C/∂θ = Σ_k ∂C/∂o_k · ∂o_k/∂θ = Σ_k g_k · ∂o_k/∂θ,  the derivative of  Σ_k g_k·o_k  with g held fixed.")
    lines.append("")
    lines.append("Weight gradient: each weight collects, over the outputs it touched, the input it met times that "
                 "output's upstream gradient:")
    for k, expr in enumerate(entries(d.grad_weight), 1):
        lines.append(f"  ∂C/∂w{k} = {format_sum(expr, ('i', 'g'), 'g')}")
    lines.append("")
    lines.append("Input gradient: each input collects, over the outputs it fed, the weight it met times that output's "
                 "upstream gradient:")
    for k, expr in enumerate(entries(d.grad_input), 1):
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
    geometry = d.geometry
    margin = tuple(k - 1 for k in geometry.kernel_span)
    remainder = tuple(n - (s * (o - 1) + 1) - m
                      for n, s, o, m in zip(geometry.padded_shape, geometry.stride, geometry.output_shape, margin))
    dilated = " (spread by the dilation)" if any(v > 1 for v in d.dilation) else ""
    g_name = "G spread by the stride" if spread else "G"
    lines.append(f"  ∂C/∂X = full convolution of {g_name} with W{dilated} rotated 180°:")
    lines.append(f"          G′ = {g_name}, zero-padded all round by {_per_axis_text(margin)} (the {'dilated ' if dilated else ''}kernel's extent − 1),")
    if any(remainder):
        lines.append(f"          and by {_per_axis_text(remainder)} more at the end for the input cells that the stride "
                     f"never reached,")
    lines.append("          cross-correlated with rot180(W), cropped to the input"
                 + (f" (dropping the padding, {_per_axis_text(geometry.padding)} each side):"
                    if any(geometry.padding) else ":"))
    lines.append(_side_by_side("    G′ =", _pretty(d.upstream_padded), "rot180(W) =", _pretty(d.kernel_rotated)))
    lines.append(_side_by_side("   ", _pretty(d.grad_input_closed)))
    lines.append(f"  equals the derivative: {d.input_matches_full_convolution}")
    lines.append("")
    lines.append("  As one GEMM (im2col): o = A·w, row k of A holding the inputs output k reads, so ∂C/∂w = Aᵀ·g:")
    lines.append(_side_by_side("    A =", _pretty(d.im2col)))
    return "\n".join(lines)

