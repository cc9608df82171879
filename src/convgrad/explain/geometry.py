"""Which weight meets which input cell in which output: the index sets of a small convolution.

Every sum that ``convgrad explain`` prints and every pair that its figures highlight comes
from :meth:`Geometry.terms`: one :class:`Term` (weight tap, input cell, output cell) for each
product ``i · w`` of the forward pass

    o[u] = sum over taps t of  i[u·stride − padding + t·dilation] · w[t]

(0 where that input cell lies in the zero padding).  The three passes read the same terms:
the forward pass groups them by output cell, the weight gradient by tap, the input gradient
by input cell.  Nothing here needs SymPy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

Cell = tuple[int, ...]

# How the arguments are called in the Python API; the command line passes its option names.
API_NAMES = {"input_shape": "input_shape", "kernel_shape": "kernel_shape", "stride": "stride",
             "padding": "padding", "dilation": "dilation"}


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def cells(shape: Sequence[int]) -> Iterator[Cell]:
    """Every cell of a grid, in row-major order (the order symbols are numbered in)."""
    return itertools.product(*(range(n) for n in shape))


def cell_number(shape: Sequence[int], cell: Sequence[int]) -> int:
    """The 1-based row-major number of ``cell``: the ``5`` of ``i5``."""
    return int(np.ravel_multi_index(tuple(cell), tuple(shape))) + 1


def cell_at(shape: Sequence[int], number: int) -> Cell:
    """The cell whose 1-based row-major number is ``number``."""
    return tuple(int(i) for i in np.unravel_index(number - 1, tuple(shape)))


def _per_axis(value: int | Sequence[int], ndim: int, name: str, minimum: int) -> tuple[int, ...]:
    values = (int(value),) * ndim if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(values) == 1 and ndim > 1:
        values = values * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} must be an int or {ndim} ints, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return values


@dataclass(frozen=True)
class Term:
    """One product of the forward pass: ``input_cell`` times ``tap`` feeds ``output_cell``.

    ``input_cell`` is in the coordinates of the unpadded input, so it lies outside the input
    (a negative index, or one past its end) when the tap meets the zero padding.
    """

    tap: Cell
    input_cell: Cell
    output_cell: Cell


@dataclass(frozen=True)
class Geometry:
    """A single-channel convolution's extents and hyper-parameters, checked.

    Build it with :meth:`create`.  Padding is symmetric: ``padding[a]`` zeros before and after
    the input along axis ``a``.
    """

    input_shape: Cell
    kernel_shape: Cell
    stride: Cell
    padding: Cell
    dilation: Cell
    output_shape: Cell

    @classmethod
    def create(cls, input_shape: Sequence[int], kernel_shape: Sequence[int], stride: int | Sequence[int] = 1,
               padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, *,
               names: Mapping[str, str] = API_NAMES) -> "Geometry":
        """Check the arguments and compute the output's extents.

        ``names`` maps each argument to the name it has for the caller (``--input`` on the
        command line), so that an error names what the caller typed.
        """
        input_shape, kernel_shape = tuple(int(n) for n in input_shape), tuple(int(n) for n in kernel_shape)
        input_name, kernel_name = names["input_shape"], names["kernel_shape"]
        for name, shape in ((input_name, input_shape), (kernel_name, kernel_shape)):
            if not 1 <= len(shape) <= 3:
                raise ValueError(f"{name} must have 1 to 3 axes, got {len(shape)} ({shape_text(shape)})")
        if len(input_shape) != len(kernel_shape):
            raise ValueError(f"{input_name} has {len(input_shape)} axes ({shape_text(input_shape)}) but "
                             f"{kernel_name} has {len(kernel_shape)} ({shape_text(kernel_shape)}): they must have "
                             f"the same number of axes")
        for name, shape in ((input_name, input_shape), (kernel_name, kernel_shape)):
            if min(shape) < 1:
                raise ValueError(f"{name} extents must be positive, got {shape_text(shape)}")
        ndim = len(input_shape)
        stride_ = _per_axis(stride, ndim, names["stride"], 1)
        padding_ = _per_axis(padding, ndim, names["padding"], 0)
        dilation_ = _per_axis(dilation, ndim, names["dilation"], 1)
        output_shape = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                             for n, k, s, p, d in zip(input_shape, kernel_shape, stride_, padding_, dilation_))
        if min(output_shape) < 1:
            raise ValueError(f"a {shape_text(kernel_shape)} kernel with dilation {dilation_} does not fit the "
                             f"{shape_text(input_shape)} input padded by {padding_}")
        return cls(input_shape, kernel_shape, stride_, padding_, dilation_, output_shape)

    @property
    def ndim(self) -> int:
        return len(self.input_shape)

    @property
    def padded_shape(self) -> Cell:
        return tuple(n + 2 * p for n, p in zip(self.input_shape, self.padding))

    @property
    def kernel_span(self) -> Cell:
        """The kernel's extents spread by the dilation: ``dilation·(kernel − 1) + 1``."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_shape, self.dilation))

    def in_input(self, cell: Sequence[int]) -> bool:
        """Whether ``cell`` (unpadded coordinates) is an input cell rather than padding."""
        return all(0 <= i < n for i, n in zip(cell, self.input_shape))

    def terms(self) -> list[Term]:
        """Every product ``i · w`` of the forward pass, by output cell, then tap, row-major.

        This is the one index set of the convolution: :func:`~convgrad.explain.derive`
        builds the outputs from it, and the figures pick their pairs out of it.
        """
        found = []
        for output_cell in cells(self.output_shape):
            for tap in cells(self.kernel_shape):
                input_cell = tuple(o * s - p + t * d for o, t, s, p, d in
                                   zip(output_cell, tap, self.stride, self.padding, self.dilation))
                found.append(Term(tap, input_cell, output_cell))
        return found

    def terms_of_weight(self, tap: Sequence[int]) -> list[Term]:
        """The terms of the weight gradient ``∂C/∂w[tap]``: every input cell the tap met."""
        return [term for term in self.terms() if term.tap == tuple(tap)]

    def terms_of_input(self, cell: Sequence[int]) -> list[Term]:
        """The terms of the input gradient ``∂C/∂i[cell]``: every tap and output the cell fed."""
        return [term for term in self.terms() if term.input_cell == tuple(cell)]

    def terms_of_output(self, cell: Sequence[int]) -> list[Term]:
        """The terms of the output ``o[cell]``: its receptive field, padding included."""
        return [term for term in self.terms() if term.output_cell == tuple(cell)]

    # The input gradient as a full convolution (see ``symbolic.derive``): the upstream gradient
    # spread by the stride and zero-padded by ``kernel_span − 1`` all round (more at the end,
    # where the stride left a remainder, so that every padded input cell has a whole window),
    # cross-correlated with the spread kernel rotated 180 degrees.

    @property
    def upstream_padded_shape(self) -> Cell:
        """The extents of G′, the upstream gradient spread by the stride and zero-padded."""
        return tuple(n + k - 1 for n, k in zip(self.padded_shape, self.kernel_span))

    def upstream_padded_cell(self, output_cell: Sequence[int]) -> Cell:
        """Where ``g[output_cell]`` sits in G′."""
        return tuple(o * s + k - 1 for o, s, k in zip(output_cell, self.stride, self.kernel_span))

    def rotated_tap_cell(self, tap: Sequence[int]) -> Cell:
        """Where ``w[tap]`` sits in the kernel spread by the dilation and rotated 180 degrees."""
        return tuple(k - 1 - t * d for t, d, k in zip(tap, self.dilation, self.kernel_span))

    def padded_cell(self, input_cell: Sequence[int]) -> Cell:
        """``input_cell`` in the coordinates of the padded input."""
        return tuple(i + p for i, p in zip(input_cell, self.padding))
