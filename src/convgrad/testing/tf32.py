"""TF32 rounding as the GPU's ``__float_to_tf32`` (``cvt.rna.tf32.f32``) does it, in NumPy.

TF32 keeps float32's sign and 8 exponent bits and the top 10 of its 23 mantissa bits.  The
conversion rounds to nearest with ties away from zero (``rna``); the tensor core then reads
only those bits.  References for ``allow_tf32=True`` round both GEMM operands with
:func:`round_to_tf32` and accumulate exactly; :func:`truncate_to_tf32` is what the hardware
makes of an operand that was never converted.
"""

from __future__ import annotations

import numpy as np

_LOW_BITS = np.uint32(0x1FFF)
_HALF_ULP = np.uint32(0x1000)


def round_to_tf32(values: np.ndarray) -> np.ndarray:
    """float32 copy of ``values`` rounded to TF32: to nearest, ties away from zero; NaN stays NaN.

    Parameters
    ----------
    values : array_like
        Any shape; converted to float32 first.

    Returns
    -------
    ndarray of float32, same shape, with the low 13 mantissa bits zero (NaN excepted).
    """
    x = np.ascontiguousarray(values, dtype=np.float32)
    bits = x.view(np.uint32)
    # Adding half a TF32 ulp to the magnitude bits and truncating rounds ties away from zero;
    # a carry out of the mantissa correctly bumps the exponent (to infinity at the top).
    rounded = ((bits + _HALF_ULP) & ~_LOW_BITS).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), rounded).astype(np.float32)


def truncate_to_tf32(values: np.ndarray) -> np.ndarray:
    """float32 copy of ``values`` with the low 13 mantissa bits cleared (what an unconverted operand becomes)."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    return (x.view(np.uint32) & ~_LOW_BITS).view(np.float32).copy()
