"""Testing helpers: float64 references, tolerances and the case list.

* :mod:`convgrad.testing.reference`: naive float64 implementations of the three passes.
* :mod:`convgrad.testing.tolerance`: per-dtype tolerances and :func:`assert_close`.
* :mod:`convgrad.testing.cases`: the curated case list every backend runs.
* :mod:`convgrad.testing.tf32`: TF32 rounding of GEMM operands, for ``allow_tf32=True`` references.
"""

from .reference import reference_forward, reference_grad_input, reference_grad_weight
from .tf32 import round_to_tf32, truncate_to_tf32
from .tolerance import assert_close, tolerance

__all__ = ["assert_close", "reference_forward", "reference_grad_input", "reference_grad_weight", "round_to_tf32",
           "tolerance", "truncate_to_tf32"]
