"""Two layers down to one value and a squared-error loss: the chain rule one output at a time."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .geometry import shape_text
from .symbolic import Derivation, derive, entries
from .text import SUBSCRIPT, SUPERSCRIPT, format_sum, name_key


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
        raise ValueError(f"--then-kernel must be {shape_text(first.output_shape)} (the first layer's output) "
                         f"to bring it down to a single value, got {shape_text(then_kernel)}")
    count = math.prod(then_kernel)
    w2 = [_layer_symbol("w", 2, k + 1) for k in range(count)]
    o1 = [_layer_symbol("o", 1, k + 1) for k in range(count)]
    y = sympy.Symbol("y")
    o2 = sympy.Add(*(a * b for a, b in zip(o1, w2)))
    loss = (o2 - y) ** 2
    grad_hidden = [sympy.diff(loss, o) for o in o1]
    hidden_ok = all(sympy.expand(gk - w2k * 2 * (o2 - y)) == 0 for gk, w2k in zip(grad_hidden, w2))

    x_syms, w1_syms, g_syms = first.symbols()
    outputs = entries(first.output)
    full_loss = loss.subs(dict(zip(o1, outputs)), simultaneous=True)
    direct = [sympy.diff(full_loss, wj) for wj in w1_syms]
    o2_full = o2.subs(dict(zip(o1, outputs)), simultaneous=True)
    upstream = {gk: w2k * 2 * (o2_full - y) for gk, w2k in zip(g_syms, w2)}
    chained = [expr.subs(upstream, simultaneous=True) for expr in entries(first.grad_weight)]
    weight_ok = all(sympy.expand(a - b) == 0 for a, b in zip(direct, chained))
    grad_second = [sympy.diff(full_loss, w) for w in w2]
    return Chain(first, w2, o1, y, o2, loss, grad_hidden, direct, grad_second, hidden_ok, weight_ok)


def chain_text(chain: Chain) -> str:
    first = chain.first
    count = len(chain.hidden)
    one = lambda k: f"o¹{str(k).translate(SUBSCRIPT)}"
    w1 = lambda k: f"w¹{str(k).translate(SUBSCRIPT)}"
    w2 = lambda k: f"w²{str(k).translate(SUBSCRIPT)}"
    rename_first = lambda s: w1(name_key(s)[1]) if name_key(s)[0] == "w" else s.name
    lines = [f"Two layers: the {shape_text(first.input_shape)} input through the {shape_text(first.kernel_shape)} "
             f"kernel W¹ gives o¹ ({shape_text(first.output_shape)}); a {shape_text(first.output_shape)} kernel W² "
             f"brings o¹ down to one value o²; the loss is C = (o² − y)².", ""]
    for k, expr in enumerate(entries(first.output), 1):
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
    for j, expr in enumerate(entries(first.grad_weight), 1):
        terms = format_sum(expr, ("i", "g"), "g").split(" + ")
        expanded = " + ".join(re.sub(r"g(\d+)", lambda m: f"{w2(int(m.group(1)))}·2(o² − y)", t) for t in terms)
        factored = " + ".join(re.sub(r"g(\d+)", lambda m: w2(int(m.group(1))), t) for t in terms)
        lines.append(f"  ∂C/∂{w1(j)} = {expanded}")
        lines.append(f"  {' ' * len(f'∂C/∂{w1(j)}')} = 2(o² − y)·({factored})")
    lines.append(f"(differentiating C directly with respect to each w¹ gives the same: {chain.weight_matches_chain})")
    return "\n".join(lines)

