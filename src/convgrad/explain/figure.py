"""What ``convgrad explain --plot`` draws, as data: three grids, the highlighted pairs, the sum.

Each figure reads ``A ⋆ B = C`` from left to right:

* ``wgrad``: the padded input X ⋆ the upstream gradient G = ∂C/∂W, for one weight;
* ``dgrad``: G′ (G spread by the stride, zero-padded) ⋆ rot180(W) = ∂C/∂X, for one input cell;
* ``fprop``: the padded input X ⋆ the kernel W = the output O, for one output.

A :class:`Pair` joins a cell of A with a cell of B whose product is one term of the sum
written underneath.  The pairs are picked out of :meth:`Geometry.terms`, the index set that
:func:`~convgrad.explain.derive` builds the convolution from, and the sum is ``derive``'s own
expression; :func:`figure_data` checks that every term of the sum has its pair.  Nothing
here draws (see ``drawing.py``), so the tests can read exactly what would be highlighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from .geometry import Cell, Geometry, cell_at, cell_number, cells, shape_text
from .symbolic import Derivation, entries
from .text import format_sum

FIGURES = ("wgrad", "dgrad", "fprop")
# figure -> (the grid its chosen cell is numbered in, symbol, argument that chooses it, what it is)
_CHOICE = {"wgrad": ("kernel_shape", "w", "weight", "kernel"),
           "dgrad": ("input_shape", "i", "input_cell", "input"),
           "fprop": ("output_shape", "o", "output_cell", "output")}
CHOOSER = {figure: choice[2] for figure, choice in _CHOICE.items()}

# Kinds of cells: a symbol, a zero of the padding, or a zero that the stride or dilation inserts.
VALUE, PADDING, GAP = "value", "padding", "gap"


@dataclass(frozen=True)
class Grid:
    """One panel: a grid of labelled cells, drawn in 2-D (a 1-D grid is one row).

    ``labels`` and ``kinds`` cover every cell; ``chosen`` is the cell the figure is about;
    ``window`` is the first and last cell of a region to outline (a receptive field).
    """

    title: str
    shape: tuple[int, int]
    labels: Mapping[tuple[int, int], str]
    kinds: Mapping[tuple[int, int], str]
    chosen: tuple[int, int] | None = None
    window: tuple[tuple[int, int], tuple[int, int]] | None = None


@dataclass(frozen=True)
class Pair:
    """Cell ``left`` of the first grid times cell ``right`` of the second: one product.

    ``padding`` marks a product with the zero padding: it is 0 and not in the sum.
    """

    left: tuple[int, int]
    right: tuple[int, int]
    left_label: str
    right_label: str
    padding: bool

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset((self.left_label, self.right_label))


@dataclass(frozen=True)
class FigureData:
    """Everything one figure shows.

    ``terms`` are the products of ``derive``'s expression for ``sum_name`` as printed by
    ``convgrad explain`` (e.g. ``("i1·g1", "i2·g2")``), and ``term_pairs[k]`` is the index in
    ``pairs`` of term ``k``'s pair.
    """

    figure: str
    title: str
    subtitle: str
    grids: tuple[Grid, Grid, Grid]
    operators: tuple[str, str]
    pairs: tuple[Pair, ...]
    sum_name: str
    terms: tuple[str, ...]
    term_pairs: tuple[int, ...]
    notes: tuple[str, ...]


def choose(geometry: Geometry, figure: str, number: int, names: Mapping[str, str] | None = None) -> Cell:
    """The cell that ``number`` (1-based, as the symbols) picks for ``figure``, checked.

    Raises
    ------
    ValueError
        Naming the argument (``names`` maps it to the caller's name, e.g. ``--weight``) when
        the figure is unknown, the number lies outside the grid, or the convolution is 3-D.
    """
    names = names or {}
    if geometry.ndim > 2:
        raise ValueError(f"the figures draw 1-D and 2-D convolutions; {names.get('input_shape', 'input_shape')} "
                         f"is {geometry.ndim}-D ({shape_text(geometry.input_shape)})")
    if figure not in FIGURES:
        raise ValueError(f"{names.get('figure', 'figure')} must be one of {', '.join(FIGURES)}, got {figure!r}")
    shape_name, symbol, argument, what = _CHOICE[figure]
    shape = getattr(geometry, shape_name)
    count = math.prod(shape)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= count:
        raise ValueError(f"{names.get(argument, argument)} must be 1 to {count}, one of the {shape_text(shape)} "
                         f"{what}'s cells {symbol}1…{symbol}{count}, got {number!r}")
    return cell_at(shape, number)


def _flat(cell: Sequence[int]) -> tuple[int, int]:
    """A cell of a 1-D or 2-D grid as (row, column)."""
    return (0, int(cell[0])) if len(cell) == 1 else (int(cell[0]), int(cell[1]))


def _grid(title: str, shape: Sequence[int], labels: dict[Cell, str], kinds: dict[Cell, str],
          chosen: Cell | None = None, window: tuple[Cell, Cell] | None = None) -> Grid:
    rows_columns = (1, int(shape[0])) if len(shape) == 1 else (int(shape[0]), int(shape[1]))
    return Grid(title, rows_columns, {_flat(c): text for c, text in labels.items()},
                {_flat(c): kind for c, kind in kinds.items()}, None if chosen is None else _flat(chosen),
                None if window is None else (_flat(window[0]), _flat(window[1])))


def _padded_input(geometry: Geometry, title: str, chosen: Cell | None = None,
                  window: tuple[Cell, Cell] | None = None) -> Grid:
    """The input inside its zero padding, cells labelled ``i1, i2, ...`` and ``0``."""
    labels, kinds = {}, {}
    for padded in cells(geometry.padded_shape):
        cell = tuple(i - p for i, p in zip(padded, geometry.padding))
        inside = geometry.in_input(cell)
        labels[padded] = f"i{cell_number(geometry.input_shape, cell)}" if inside else "0"
        kinds[padded] = VALUE if inside else PADDING
    return _grid(title, geometry.padded_shape, labels, kinds, chosen, window)


def _symbol_grid(title: str, shape: Sequence[int], symbol: str, chosen: Cell | None = None) -> Grid:
    labels = {cell: f"{symbol}{cell_number(shape, cell)}" for cell in cells(shape)}
    return _grid(title, shape, labels, {cell: VALUE for cell in labels}, chosen)


def _upstream_padded(geometry: Geometry, window: tuple[Cell, Cell]) -> Grid:
    """G′: ``g`` spread by the stride, zero-padded so every input cell has a whole window."""
    labels: dict[Cell, str] = {}
    kinds: dict[Cell, str] = {}
    first = geometry.upstream_padded_cell((0,) * geometry.ndim)
    last = geometry.upstream_padded_cell(tuple(n - 1 for n in geometry.output_shape))
    for cell in cells(geometry.upstream_padded_shape):
        labels[cell] = "0"
        kinds[cell] = GAP if all(a <= c <= b for a, c, b in zip(first, cell, last)) else PADDING
    for output_cell in cells(geometry.output_shape):
        spot = geometry.upstream_padded_cell(output_cell)
        labels[spot] = f"g{cell_number(geometry.output_shape, output_cell)}"
        kinds[spot] = VALUE
    title = "G′ (G spread, zero-padded)" if any(s > 1 for s in geometry.stride) else "G′ (G zero-padded)"
    return _grid(title, geometry.upstream_padded_shape, labels, kinds, window=window)


def _rotated_kernel(geometry: Geometry) -> Grid:
    labels = {cell: "0" for cell in cells(geometry.kernel_span)}
    kinds = {cell: GAP for cell in labels}
    for tap in cells(geometry.kernel_shape):
        spot = geometry.rotated_tap_cell(tap)
        labels[spot] = f"w{cell_number(geometry.kernel_shape, tap)}"
        kinds[spot] = VALUE
    return _grid("rot180(W)", geometry.kernel_span, labels, kinds)


def _match_terms(terms: Sequence[str], pairs: Sequence[Pair], sum_name: str) -> tuple[int, ...]:
    """For each printed term, the index of the pair with the same two symbols."""
    by_symbols = {pair.symbols: k for k, pair in enumerate(pairs) if not pair.padding}
    matched = []
    for term in terms:
        key = frozenset(term.split("·"))
        if key not in by_symbols:
            raise RuntimeError(f"the term {term} of {sum_name} has no highlighted pair; pairs: "
                               f"{sorted(sorted(p.symbols) for p in pairs)}")
        matched.append(by_symbols.pop(key))
    if by_symbols:
        raise RuntimeError(f"{sum_name} has no term for the highlighted pairs {sorted(map(sorted, by_symbols))}")
    return tuple(matched)


def figure_data(derivation: Derivation, figure: str = "wgrad", number: int = 1, *,
                names: Mapping[str, str] | None = None, second_layer: bool = False) -> FigureData:
    """What the figure of one pass shows, for weight, input cell or output ``number``.

    Parameters
    ----------
    derivation : Derivation
        From :func:`~convgrad.explain.derive`; its geometry gives the index sets and its
        expressions give the sum written underneath.
    figure : {"wgrad", "dgrad", "fprop"}
    number : int
        1-based, as the symbols: weight ``w<number>`` for ``wgrad``, input cell
        ``i<number>`` for ``dgrad``, output ``o<number>`` for ``fprop``.
    names : mapping, optional
        The caller's names of the arguments, for error messages.
    second_layer : bool
        Add the note that the upstream gradients come from a second layer (``--then-kernel``).
    """
    geometry = derivation.geometry
    chosen = choose(geometry, figure, number, names)
    pairs: list[Pair] = []
    notes: list[str] = []
    if figure == "wgrad":
        a = _padded_input(geometry, "X (input)")
        b = _symbol_grid("G = ∂C/∂O", geometry.output_shape, "g")
        c = _symbol_grid("∂C/∂W", geometry.kernel_shape, "w", chosen)
        for term in geometry.terms_of_weight(chosen):
            left = _flat(geometry.padded_cell(term.input_cell))
            right = _flat(term.output_cell)
            pairs.append(Pair(left, right, a.labels[left], b.labels[right], not geometry.in_input(term.input_cell)))
        sum_name, expr, order = f"∂C/∂w{number}", entries(derivation.grad_weight)[number - 1], ("i", "g")
        title = f"Weight gradient of w{number}"
        subtitle = f"every input cell that w{number} multiplied, times the upstream gradient of the output it made"
    elif figure == "dgrad":
        padded = geometry.padded_cell(chosen)
        window = (padded, tuple(p + k - 1 for p, k in zip(padded, geometry.kernel_span)))
        a = _upstream_padded(geometry, window)
        b = _rotated_kernel(geometry)
        c = _padded_input(geometry, "∂C/∂X", chosen=padded)
        for term in geometry.terms_of_input(chosen):
            left = _flat(geometry.upstream_padded_cell(term.output_cell))
            right = _flat(geometry.rotated_tap_cell(term.tap))
            pairs.append(Pair(left, right, a.labels[left], b.labels[right], False))
        sum_name, expr, order = f"∂C/∂i{number}", entries(derivation.grad_input)[number - 1], ("w", "g")
        title = f"Input gradient of i{number}"
        subtitle = f"the flipped kernel laid on G′ where i{number} is: each weight times the gradient under it"
    else:
        start = tuple(o * s for o, s in zip(chosen, geometry.stride))
        window = (start, tuple(p + k - 1 for p, k in zip(start, geometry.kernel_span)))
        a = _padded_input(geometry, "X (input)", window=window)
        b = _symbol_grid("W (kernel)", geometry.kernel_shape, "w")
        c = _symbol_grid("O (output)", geometry.output_shape, "o", chosen)
        for term in geometry.terms_of_output(chosen):
            left = _flat(geometry.padded_cell(term.input_cell))
            right = _flat(term.tap)
            pairs.append(Pair(left, right, a.labels[left], b.labels[right], not geometry.in_input(term.input_cell)))
        sum_name, expr, order = f"o{number}", entries(derivation.output)[number - 1], ("i", "w")
        title = f"Forward pass of o{number}"
        subtitle = "its receptive field: each weight times the input cell under it"

    text = format_sum(expr, order, "g" if figure != "fprop" else "w")
    terms = () if text == "0" else tuple(text.split(" + "))
    term_pairs = _match_terms(terms, pairs, sum_name)

    kinds = [kind for grid in (a, b, c) for kind in grid.kinds.values()]
    if PADDING in kinds:
        notes.append("hatched: zero padding")
    if GAP in kinds:
        notes.append("grey 0: zeros that the stride or dilation puts between cells")
    if any(pair.padding for pair in pairs):
        notes.append("dashed: pairs with the zero padding, whose products are 0 and not in the sum")
    if second_layer:
        notes.append("with the second layer (--then-kernel): gₖ = ∂C/∂o¹ₖ = w²ₖ · 2(o² − y)")
    return FigureData(figure, title, subtitle, (a, b, c), ("⋆", "="), tuple(pairs), sum_name, terms, term_pairs,
                      tuple(notes))
