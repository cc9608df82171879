"""``convgrad explain``: the three passes of a small convolution, derived symbolically and drawn.

:func:`derive` builds a single-channel convolution (cross-correlation, as deep-learning
libraries compute it) out of SymPy symbols, numbered from 1 in row-major order: ``i1, i2,
...`` the input, ``w1, w2, ...`` the kernel, ``g1, g2, ...`` the upstream gradient
``g_k = ∂C/∂o_k`` of some cost ``C``.  It differentiates ``Σ_k g_k · o_k`` and compares the
result with the closed forms every library implements.  :func:`derive_chain` adds a second
layer down to one value and a squared-error loss; :func:`check_backends` runs the same
numbers through every backend; :func:`plot` draws one pass: which input cells meet which
weights and upstream gradients, from the same index set (:meth:`Geometry.terms`) that
:func:`derive` builds the convolution from.

SymPy (and matplotlib, for the figures) come with ``pip install "convgrad[explain]"``.
Importing this package imports neither.

Modules, one job each: ``geometry`` (the index sets), ``symbolic`` (the derivation),
``text`` (printing it), ``chain`` (two layers), ``numeric`` (the backends), ``figure`` (what
a figure shows), ``drawing`` (matplotlib), ``extras`` (the optional packages), ``command``
(the command line).
"""

from __future__ import annotations

from .chain import Chain, chain_text, derive_chain
from .command import add_arguments, run
from .drawing import draw, plot
from .extras import MissingExtra
from .figure import FigureData, figure_data
from .geometry import Geometry, Term
from .numeric import backend_names, check_backends, check_chain_backends
from .symbolic import Derivation, derive
from .text import explain_text, format_sum

__all__ = [
    "Chain", "Derivation", "FigureData", "Geometry", "MissingExtra", "Term", "add_arguments", "backend_names",
    "chain_text", "check_backends", "check_chain_backends", "derive", "derive_chain", "draw", "explain_text",
    "figure_data", "format_sum", "plot", "run",
]
