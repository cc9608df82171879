"""Per-dtype tolerances and an ``assert_close`` that says where and how much.

A result computed in the dtype's accumulator differs from the float64 reference by
rounding: of the inputs (none: the reference sees the same rounded inputs), of the
accumulation (about ``eps_acc · sqrt(terms)`` relative to the terms' magnitude) and of the
final store (half an ulp of the output dtype).  The table holds the unit roundoffs; the
bound scales them by the reduction length.
"""

from __future__ import annotations

import math

import numpy as np

# (unit roundoff of the stored dtype, unit roundoff of the accumulator)
_EPS = {
    "float16": (2.0**-11, 2.0**-24),
    "bfloat16": (2.0**-8, 2.0**-24),
    "float32": (2.0**-24, 2.0**-24),
    "float64": (2.0**-53, 2.0**-53),
}


def tolerance(dtype: str, reduction: int, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) for a result of ``dtype`` summed over ``reduction`` terms of size ``scale``.

    The accumulation bound is a generous multiple (8·sqrt(n) + 8) of the unit roundoff,
    which covers any summation order (blocked, split-K, pairwise) a backend may use.
    """
    store, acc = _EPS[dtype]
    rtol = 2 * store
    atol = (8 * math.sqrt(max(reduction, 1)) + 8) * acc * scale * math.sqrt(max(reduction, 1)) + 2 * store * scale
    return rtol, atol


def assert_close(actual, expected, dtype: str, reduction: int = 1, scale: float = 1.0, *, exact: bool = False,
                 name: str = "result") -> None:
    """Assert ``actual`` matches the float64 ``expected`` within the dtype's tolerance.

    With ``exact=True`` (integer-valued inputs, whose sums every accumulator represents
    exactly) the result must equal the reference rounded once to ``dtype``.

    Raises
    ------
    AssertionError
        Naming the mismatch count, the first bad indices and their values.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {actual.shape} != expected {expected.shape}")
    got = actual.astype(np.float64)
    if exact:
        want = expected.astype(actual.dtype).astype(np.float64)
        bad = ~((got == want) | (np.isnan(got) & np.isnan(want)))
        bound = "exactly"
    else:
        rtol, atol = tolerance(dtype, reduction, scale)
        want = expected
        with np.errstate(invalid="ignore"):
            bad = ~((np.abs(got - want) <= atol + rtol * np.abs(want)) | (np.isnan(got) & np.isnan(want)))
        bound = f"within rtol={rtol:.3g}, atol={atol:.3g}"
    count = int(bad.sum())
    if count:
        where = np.argwhere(bad)[:5]
        details = ", ".join(f"{tuple(int(i) for i in idx)}: {got[tuple(idx)]!r} vs {want[tuple(idx)]!r}" for idx in where)
        raise AssertionError(f"{name}: {count} of {bad.size} elements differ (expected {bound}); first: {details}")
