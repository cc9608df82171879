"""The non-finite rule (DESIGN §7) on every backend, and a check that it can fail.

The rule: a NaN or infinity in an operand is never lost.  Every output that the exact
float64 reference makes non-finite is non-finite, and an infinity keeps its sign.  Besides
those, an output may become NaN where the backend's GEMM pairs a non-finite operand with a
zero-filled position (the padding; the border and the stride holes of dgrad's full
convolution), since 0 · NaN and 0 · Inf are NaN; there an infinity may become NaN as well.
Every other output equals the reference exactly.

Which outputs meet a zero-filled position is worked out here from the GEMM view of DESIGN
§1, independently of every backend: in fprop a weight tap ``w[k, c, t]`` is paired with one
gathered input position for every output of channel k; in dgrad with one position of the
zero-stuffed, zero-bordered ``dy`` for every input-gradient element of channel c; in wgrad an
output gradient ``dy[n, k, p]`` is paired with one gathered input position for every tap of
filter k.  The pairings with real positions are the ones the reference makes; all others
are with zero-filled positions.  The first operand of each pass (x in fprop and wgrad, dy in
dgrad) is never paired with a zero-filled position.

Placements, as measured when the rule was written down: one NaN, +Inf or -Inf at a corner,
an edge or the centre of each operand of each pass, with stride 1 and 2 and padding 0 and 1
(216 runs per backend), and pairs of non-finite values with padding 1.  Data are integers
in {-2, -1, 1, 2}, so every finite output is exact and no product of an infinity is 0 · Inf
by accident.  The planted-bug tests run the same check on backends that break the rule on
purpose and expect it to fail.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import convgrad
from convgrad.backends.base import Backend
from convgrad.problem import conv_problem
from convgrad.testing import reference_forward, reference_grad_input, reference_grad_weight

N, C, K, SIZE, KERNEL = 2, 2, 3, 5, 3
DTYPE = np.float32
#: The operands of each pass; the second is the one a GEMM may pair with zero-filled positions.
OPERANDS = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("x", "dy")}
VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
WHERE = ("corner", "edge", "centre")
#: A value no pass can produce from integer data: an element the backend leaves unwritten fails.
_UNWRITTEN = 0.5


def _problem(stride: int, padding: int, groups: int = 1):
    """The dense problem, or with ``groups == C`` a depthwise one with a channel multiplier of 2."""
    filters = K if groups == 1 else 2 * C
    return conv_problem("conv2d", 2, (N, C, SIZE, SIZE), (filters, C // groups, KERNEL, KERNEL), stride, padding,
                        1, groups,
                        dtype="float32")


def _shapes(problem) -> dict[str, tuple[int, ...]]:
    P, Q = problem.output_size[1:]
    return {"x": (N, C, SIZE, SIZE), "w": (problem.K, problem.C_per_group, KERNEL, KERNEL), "dy": (N, problem.K, P, Q)}


def _position(shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """An element at a spatial corner, edge or centre; batch and channel vary so that not everything is at 0."""
    outer, rows, cols = shape[:2], shape[2], shape[3]
    if where == "corner":
        return (0, 0, 0, 0)
    if where == "edge":
        return (outer[0] - 1, outer[1] - 1, 0, cols // 2)
    return (outer[0] - 1, 0, rows // 2, cols // 2)


def _operands(problem, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        role: (rng.integers(1, 3, size=shape) * rng.choice((-1, 1), size=shape)).astype(DTYPE)
        for role, shape in _shapes(problem).items()
    }


def _5d(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, np.float64)[:, :, None]


def _reference(pass_: str, a: np.ndarray, b: np.ndarray, problem) -> np.ndarray:
    """The exact float64 reference of ``pass_`` on its two operands (4-D in, 4-D out)."""
    if pass_ == "fprop":
        return reference_forward(_5d(a), _5d(b), problem)[:, :, 0]
    if pass_ == "dgrad":
        return reference_grad_input(_5d(a), _5d(b), problem)[:, :, 0]
    return reference_grad_weight(_5d(a), _5d(b), problem)[:, :, 0]


def meets_zero_fill(pass_: str, second: np.ndarray, problem) -> np.ndarray:
    """Outputs whose GEMM pairs a non-finite entry of the pass's second operand with a zero-filled position.

    For each such entry: the outputs its GEMM row or column reaches, less those the reference
    pairs it with a real position (found by running the reference on the entry alone, with
    ones as the other operand, so that no sum can cancel).
    """
    first_shape = _shapes(problem)[OPERANDS[pass_][0]]
    ones = np.ones(first_shape)
    touched = np.zeros(_reference(pass_, ones, np.zeros(second.shape), problem).shape, bool)
    Kg, Cg = problem.K_per_group, problem.C_per_group
    for entry in zip(*np.nonzero(~np.isfinite(second))):
        alone = np.zeros(second.shape)
        alone[entry] = 1
        real = _reference(pass_, ones, alone, problem) != 0
        reached = np.zeros_like(touched)
        if pass_ == "fprop":  # w[k, c, tap]: every output of channel k
            reached[:, entry[0]] = True
        elif pass_ == "dgrad":  # w[k, c, tap]: every input-gradient element of channel c of k's group
            reached[:, entry[0] // Kg * Cg + entry[1]] = True
        else:  # dy[n, k, p]: every tap of every input channel of filter k
            reached[entry[1]] = True
        touched |= reached & ~real
    return touched


def check_rule(result: np.ndarray, exact: np.ndarray, zero_fill: np.ndarray, name: str) -> None:
    """Every output equals the exact reference (NaN for NaN, the same infinity), or is NaN where it meets zero fill."""
    result = np.asarray(result, np.float64)
    same = (result == exact) | (np.isnan(result) & np.isnan(exact))
    allowed = same | (zero_fill & np.isnan(result))
    if allowed.all():
        return
    kinds = {
        "a non-finite value was lost": ~np.isfinite(exact) & np.isfinite(result),
        "an infinity changed sign": np.isinf(exact) & np.isinf(result) & (exact != result),
        "an infinity became NaN where it meets no zero fill": np.isinf(exact) & np.isnan(result) & ~zero_fill,
        "a non-finite value reached an output it never meets": np.isfinite(exact) & ~np.isfinite(result) & ~zero_fill,
        "an infinity appeared where only NaN may": np.isfinite(exact) & np.isinf(result),
        "a finite output is wrong": np.isfinite(exact) & np.isfinite(result) & (exact != result),
    }
    lines = [f"{name}: the non-finite rule is broken"]
    for kind, where in kinds.items():
        where = where & ~allowed
        for index in list(zip(*np.nonzero(where)))[:3]:
            lines.append(f"  {kind} at {tuple(int(i) for i in index)}: got {result[index]}, reference {exact[index]}")
    raise AssertionError("\n".join(lines))


def run_placement(backend: str | Backend, pass_: str, stride: int, padding: int,
                  placement: tuple[tuple[str, str, str], ...], groups: int = 1, *, exact: bool = False) -> None:
    """Put the non-finite values of ``placement`` ((operand, where, value), ...) in place, run, check the rule.

    ``exact``: allow no extra NaN at all; the result must equal the reference everywhere.
    """
    problem = _problem(stride, padding, groups)
    arrays = _operands(problem, seed=stride * 10 + padding)
    for operand, where, value in placement:
        arrays[operand][_position(arrays[operand].shape, where)] = VALUES[value]
    first, second = (arrays[role] for role in OPERANDS[pass_])
    geometry = {"stride": stride, "padding": padding, "groups": groups, "backend": backend}
    if pass_ == "fprop":
        out = np.full((N, problem.K, *problem.output_size[1:]), _UNWRITTEN, DTYPE)
        result = convgrad.conv2d(arrays["x"], arrays["w"], out=out, **geometry)
    elif pass_ == "dgrad":
        out = np.full(arrays["x"].shape, _UNWRITTEN, DTYPE)
        result = convgrad.conv2d_input(arrays["x"].shape, arrays["w"], arrays["dy"], out=out, **geometry)
    else:
        out = np.full(arrays["w"].shape, _UNWRITTEN, DTYPE)
        result = convgrad.conv2d_weight(arrays["x"], arrays["w"].shape, arrays["dy"], out=out, **geometry)
    with np.errstate(invalid="ignore"):  # the reference's own NaN from Inf - Inf
        expected = _reference(pass_, first, second, problem)
    label = " ".join("/".join(p) for p in placement)
    zero_fill = np.zeros(expected.shape, bool) if exact else meets_zero_fill(pass_, second, problem)
    check_rule(result, expected, zero_fill, f"{pass_} s{stride} p{padding} g{groups} {label}")


def _single_params():
    for pass_, (stride, padding) in itertools.product(OPERANDS, itertools.product((1, 2), (0, 1))):
        for operand, where, value in itertools.product(OPERANDS[pass_], WHERE, VALUES):
            yield pytest.param(pass_, stride, padding, ((operand, where, value),),
                               id=f"{pass_}-s{stride}-p{padding}-{operand}-{where}-{value}")


#: Pairs, as (operand index in OPERANDS[pass], where, value): two infinities of one sign that
#: some outputs meet once through a real and once through a zero-filled position (there +Inf
#: may become NaN); opposite infinities that some outputs sum (NaN in the reference too); a
#: NaN in one operand and an infinity in the other; infinities in both operands.
PAIRS = (
    ((1, "corner", "+inf"), (1, "centre", "+inf")),
    ((1, "corner", "+inf"), (1, "edge", "-inf")),
    ((0, "corner", "-inf"), (0, "centre", "+inf")),
    ((0, "centre", "nan"), (1, "corner", "+inf")),
    ((0, "edge", "+inf"), (1, "centre", "-inf")),
)


def _pair_params():
    for pass_, stride, pair in itertools.product(OPERANDS, (1, 2), PAIRS):
        placement = tuple((OPERANDS[pass_][index], where, value) for index, where, value in pair)
        label = "-".join(f"{o}-{w}-{v}" for o, w, v in placement)
        yield pytest.param(pass_, stride, 1, placement, id=f"{pass_}-s{stride}-p1-{label}")


@pytest.mark.parametrize(("pass_", "stride", "padding", "placement"), [*_single_params(), *_pair_params()])
def test_non_finite_values_follow_the_rule(backend_name: str, pass_: str, stride: int, padding: int,
                                           placement) -> None:
    run_placement(backend_name, pass_, stride, padding, placement)


#: Depthwise convolutions (groups == C) take their own kernels on every backend.
@pytest.mark.parametrize(("pass_", "stride", "padding", "placement"),
                         [p for p in _single_params() if p.values[3][0][1] != "edge"])
def test_non_finite_values_follow_the_rule_depthwise(backend_name: str, pass_: str, stride: int, padding: int,
                                                     placement) -> None:
    run_placement(backend_name, pass_, stride, padding, placement, groups=C)


def _numpy_exact_params():
    """The numpy backend's paths that follow the reference exactly (README, "Errors"): dgrad
    always, fprop and wgrad without padding."""
    for param in [*_single_params(), *_pair_params()]:
        pass_, _, padding, _ = param.values
        if pass_ == "dgrad" or padding == 0:
            yield param


@pytest.mark.parametrize(("pass_", "stride", "padding", "placement"), list(_numpy_exact_params()))
def test_numpy_exact_paths_match_the_reference(pass_: str, stride: int, padding: int, placement) -> None:
    run_placement("numpy", pass_, stride, padding, placement, exact=True)


def test_exact_check_rejects_extra_nan_at_zero_fill() -> None:
    """fprop with padding pairs a NaN weight with the padding: allowed by the rule, not exact."""
    placement = (("w", "corner", "nan"),)
    run_placement("numpy", "fprop", 1, 1, placement)
    with pytest.raises(AssertionError, match="reached an output it never meets"):
        run_placement("numpy", "fprop", 1, 1, placement, exact=True)

@pytest.mark.parametrize(("pass_", "stride", "padding", "placement"),
                         [p for p in _single_params() if p.values[3][0][1] != "edge"])
def test_numpy_depthwise_matches_the_reference_exactly(pass_: str, stride: int, padding: int, placement) -> None:
    """The numpy backend's depthwise loops skip the padding instead of multiplying it: exact in every pass."""
    run_placement("numpy", pass_, stride, padding, placement, groups=C, exact=True)


# ----------------------------------------------------------------------------------------
# The check can fail: backends that break the rule on purpose.


class _Breaking(Backend):
    """The numpy backend's results, then broken by ``damage(out)``."""

    name = "breaking"

    def __init__(self, damage) -> None:
        self.damage = damage
        self.inner = convgrad.backends.get("numpy")

    def available(self) -> bool:
        return True

    def forward(self, x, w, bias, problem, out) -> None:
        self.inner.forward(x, w, bias, problem, out)
        self.damage(out)

    def grad_input(self, dy, w, problem, out) -> None:
        self.inner.grad_input(dy, w, problem, out)
        self.damage(out)

    def grad_weight(self, x, dy, problem, out) -> None:
        self.inner.grad_weight(x, dy, problem, out)
        self.damage(out)


def _drop_nan(out):
    out[np.isnan(out)] = 0


def _flip_infinity(out):
    out[np.isinf(out)] *= -1


def _infinity_to_nan(out):
    out[np.isinf(out)] = np.nan


def _spread_nan(out):
    if not np.isfinite(out).all():
        out[...] = np.nan


def _off_by_one(out):
    out[np.isfinite(out)] += 1


BROKEN = [
    ("drops a NaN", _drop_nan, "fprop", 1, 0, (("x", "centre", "nan"),), "a non-finite value was lost"),
    ("drops a NaN in dgrad", _drop_nan, "dgrad", 2, 1, (("w", "edge", "nan"),), "a non-finite value was lost"),
    ("flips an infinity", _flip_infinity, "wgrad", 1, 1, (("x", "edge", "-inf"),), "an infinity changed sign"),
    ("infinity to NaN", _infinity_to_nan, "fprop", 2, 1, (("x", "centre", "+inf"),),
     "an infinity became NaN where it meets no zero fill"),
    ("infinity to NaN at real positions", _infinity_to_nan, "fprop", 1, 1, (("w", "centre", "+inf"),),
     "an infinity became NaN where it meets no zero fill"),
    ("spreads NaN", _spread_nan, "dgrad", 1, 1, (("w", "corner", "nan"),),
     "a non-finite value reached an output it never meets"),
    ("spreads NaN in wgrad", _spread_nan, "wgrad", 2, 1, (("dy", "corner", "nan"),),
     "a non-finite value reached an output it never meets"),
    ("wrong finite values", _off_by_one, "fprop", 1, 1, (("w", "corner", "+inf"),), "a finite output is wrong"),
]


@pytest.mark.parametrize(("damage", "pass_", "stride", "padding", "placement", "message"),
                         [pytest.param(*case[1:], id=case[0]) for case in BROKEN])
def test_the_check_rejects_a_backend_that_breaks_the_rule(damage, pass_, stride, padding, placement,
                                                          message) -> None:
    run_placement("numpy", pass_, stride, padding, placement)  # the same placement passes unbroken
    with pytest.raises(AssertionError, match=message):
        run_placement(_Breaking(damage), pass_, stride, padding, placement)


def test_zero_fill_sets_match_hand_counts() -> None:
    """The zero-fill set on cases small enough to count by hand (3×3 kernel on 5×5, padding 1)."""
    problem = _problem(1, 1)
    w = np.zeros((K, C, KERNEL, KERNEL))
    w[1, 0, 0, 0] = np.nan  # the top-left tap: it reads padding for the first output row and column
    touched = meets_zero_fill("fprop", w, problem)
    assert touched[:, 1].sum() == N * (5 + 5 - 1) and touched[0, 1, 0, :].all() and touched[0, 1, :, 0].all()
    assert not touched[:, [0, 2]].any()
    # dgrad: the same tap reaches every input-gradient element of channel 0, and pairs dx[h, w]
    # with dy[h + 1, w + 1]: a real one except in the last row and column.
    touched = meets_zero_fill("dgrad", w, problem)
    assert touched[:, 0].sum() == N * (5 + 5 - 1) and touched[0, 0, 4, :].all() and touched[0, 0, :, 4].all()
    assert not touched[:, 1].any()
    # wgrad: dy[0, 2, 0, 0] (the first output) reads padding at taps of the first row or column.
    dy = np.zeros((N, K, 5, 5))
    dy[0, 2, 0, 0] = np.inf
    touched = meets_zero_fill("wgrad", dy, problem)
    assert touched[2].sum() == C * 5 and touched[2, :, 0, :].all() and touched[2, :, :, 0].all()
    assert not touched[:2].any()
