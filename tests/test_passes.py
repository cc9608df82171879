"""The shared suite: every pass on every available backend, against the float64 reference.

A backend joins by registering; nothing here names one.  Each test's id names its case,
e.g. ``conv2d_fprop_nchw_2x3x7x9_k8x3x5x5_s2_p1_d1_g1_float32``.  Outputs are poisoned with
NaN before the run (and given as non-contiguous views for sliced cases), so an element the
backend forgets to write fails the comparison.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import convgrad
from convgrad import arrays
from convgrad.testing import (assert_close, reference_forward, reference_grad_input, reference_grad_weight,
                              round_to_tf32)
from convgrad.problem import conv_problem
from convgrad.testing.cases import CASES, TRANSPOSED_CASES, ConvCase, make_array, numpy_dtype, poisoned

PASSES = ("fprop", "dgrad", "wgrad")
# (dtype, integer-valued inputs, allow_tf32): integers compare exactly in every dtype; Gaussian
# within tolerance.  TF32 is float32 data with allow_tf32=True: where the backend says it
# rounds to TF32, the reference rounds its operands the same way (to nearest, ties away) and
# the comparison keeps the float32-accumulation tolerance, so truncating instead of rounding,
# or not rounding at all, fails.  Integer data (|v| <= 2 < 2^10) is exact in TF32 too.
DATA = (("float16", True, False), ("bfloat16", True, False), ("float32", True, False), ("float64", True, False),
        ("float32", False, False), ("float16", False, False), ("float32", True, True), ("float32", False, True))


def _functions(ndim: int):
    return (getattr(convgrad, f"conv{ndim}d"), getattr(convgrad, f"conv{ndim}d_input"),
            getattr(convgrad, f"conv{ndim}d_weight"))


def _case_params():
    params = []
    for case in CASES:
        marks = [pytest.mark.small] if case.small else []
        if case.slow:
            marks.append(pytest.mark.slow)
        for pass_ in PASSES:
            for dtype, integer, tf32 in DATA:
                kind = ("int" if integer else "gauss") + ("-tf32" if tf32 else "")
                params.append(pytest.param(case, pass_, dtype, integer, tf32, marks=marks,
                                           id=f"{case.name(pass_, dtype)}-{kind}"))
    return params


def _logical(array: np.ndarray, role: str, problem) -> np.ndarray:
    return arrays.logical_view(array, "numpy", role, problem)


def _skip_unsupported(backend_name: str, problem) -> None:
    reason = convgrad.backends.get(backend_name).unsupported(problem)
    if reason:
        pytest.skip(f"{backend_name} does not support this problem: {reason}")


def run_pass(case: ConvCase, pass_: str, dtype: str, integer: bool, backend_name: str, seed: int = 0,
             allow_tf32: bool = False):
    """Run one pass on a backend; returns (result, float64 reference, problem)."""
    rng = np.random.default_rng(seed)
    problem = case.problem(dtype).with_options(allow_tf32=allow_tf32)
    _skip_unsupported(backend_name, problem)
    x = make_array(rng, case.x_shape(), dtype, integer=integer, sliced=case.sliced)
    w = make_array(rng, case.w_shape(), dtype, integer=integer, sliced=case.sliced)
    dy = make_array(rng, case.y_shape(), dtype, integer=integer, sliced=case.sliced)
    conv, conv_input, conv_weight = _functions(case.ndim)
    geometry = dict(case.kwargs(), allow_tf32=allow_tf32)
    tf32 = convgrad.backends.get(backend_name).rounds_to_tf32(problem, pass_)
    if allow_tf32 and not tf32:
        pytest.skip(f"{backend_name} computes this pass in full float32 with allow_tf32: the float32 runs cover it")

    def operand(array: np.ndarray, role: str) -> np.ndarray:
        logical = _logical(array, role, problem)
        return round_to_tf32(logical) if tf32 else logical

    if pass_ == "fprop":
        out = poisoned(case.y_shape(), dtype, sliced=case.sliced)
        result = conv(x, w, out=out, backend=backend_name, **geometry)
        expected = reference_forward(operand(x, "x"), operand(w, "w"), problem)
        role = "y"
    elif pass_ == "dgrad":
        out = poisoned(case.x_shape(), dtype, sliced=case.sliced)
        result = conv_input(case.x_shape(), w, dy, out=out, backend=backend_name, **geometry)
        expected = reference_grad_input(operand(dy, "y"), operand(w, "w"), problem)
        role = "x"
    else:
        out = poisoned(case.w_shape(), dtype, sliced=case.sliced)
        result = conv_weight(x, case.w_shape(), dy, out=out, backend=backend_name, **geometry)
        expected = reference_grad_weight(operand(x, "x"), operand(dy, "y"), problem)
        role = "w"
    assert result is out, "the result must be written into out="
    return _logical(result, role, problem), expected, problem


@pytest.mark.parametrize(("case", "pass_", "dtype", "integer", "tf32"), _case_params())
def test_pass_matches_reference(backend_name: str, case: ConvCase, pass_: str, dtype: str, integer: bool,
                                tf32: bool) -> None:
    result, expected, problem = run_pass(case, pass_, dtype, integer, backend_name, allow_tf32=tf32)
    assert result.dtype == numpy_dtype(dtype)
    assert_close(result, expected, dtype, reduction=problem.gemm_reduction[pass_], exact=integer,
                 name=case.name(pass_, dtype))


def _adjoint_params():
    return [pytest.param(case, marks=[pytest.mark.small] if case.small else [pytest.mark.slow] if case.slow else [],
                         id=case.name("fprop", "float64")) for case in CASES]


@pytest.mark.parametrize("case", _adjoint_params())
def test_adjoint_identity(backend_name: str, case: ConvCase) -> None:
    """<conv(x, w), g> == <x, dgrad(g, w)> == <w, wgrad(x, g)>: ties the three passes together."""
    dtype = "float64" if convgrad.backends.get(backend_name).unsupported(case.problem("float64")) is None else "float32"
    _skip_unsupported(backend_name, case.problem(dtype))
    rng = np.random.default_rng(1)
    x = make_array(rng, case.x_shape(), dtype, integer=False, sliced=case.sliced)
    w = make_array(rng, case.w_shape(), dtype, integer=False)
    g = make_array(rng, case.y_shape(), dtype, integer=False)
    conv, conv_input, conv_weight = _functions(case.ndim)
    geometry = case.kwargs()
    y = conv(x, w, backend=backend_name, **geometry)
    dx = conv_input(case.x_shape(), w, g, backend=backend_name, **geometry)
    dw = conv_weight(x, case.w_shape(), g, backend=backend_name, **geometry)
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    lhs = float(np.sum(f64(y) * f64(g)))
    via_dgrad = float(np.sum(f64(x) * f64(dx)))
    via_wgrad = float(np.sum(f64(w) * f64(dw)))
    scale = math.sqrt(y.size * case.problem().gemm_reduction["fprop"])
    tol = (1e-10 if dtype == "float64" else 1e-4) * scale
    assert abs(lhs - via_dgrad) <= tol, (lhs, via_dgrad)
    assert abs(lhs - via_wgrad) <= tol, (lhs, via_wgrad)


@pytest.mark.small
@pytest.mark.parametrize("params", TRANSPOSED_CASES, ids=lambda p: f"conv_transpose{p[0]}d_{p}")
def test_conv_transpose_matches_reference(backend_name: str, params) -> None:
    """conv_transpose is the input gradient of the convolution whose weight it shares."""
    ndim, batch, c_in, c_out, spatial, kernel, stride, padding, output_padding, groups, dilation = params
    rng = np.random.default_rng(2)
    x = make_array(rng, (batch, c_in, *spatial), "float32")
    w = make_array(rng, (c_in, c_out // groups, *kernel), "float32")
    b = make_array(rng, (c_out,), "float32")
    fn = getattr(convgrad, f"conv_transpose{ndim}d")
    y = fn(x, w, b, stride, padding, output_padding, groups, dilation, backend=backend_name)
    # The convolution y -> x with this weight; with output_padding its formula may give a
    # longer output than x, so x's extents are set explicitly.
    problem = conv_problem("conv", ndim, y.shape, w.shape, stride, padding, dilation, groups, dtype="float64")
    problem = problem.with_options(output_size=(1,) * (3 - ndim) + tuple(spatial))
    expected = reference_grad_input(_logical(x, "y", problem), _logical(w, "w", problem), problem)
    expected += b.astype(np.float64).reshape(1, -1, 1, 1, 1)
    assert_close(_logical(y, "x", problem), expected, "float32", exact=True, name=fn.__name__)


@pytest.mark.small
@pytest.mark.parametrize("ndim", (1, 2, 3))
def test_two_layer_chain_rule_matches_finite_differences(backend_name: str, ndim: int) -> None:
    """3×3 input, 2×2 kernel, then a 2×2 kernel down to 1×1, squared error (DESIGN §6)."""
    dtype = "float64" if convgrad.backends.get(backend_name).unsupported(
        convgrad.testing.cases.ConvCase(ndim, 1, 1, 1, (3,) * ndim, (2,) * ndim).problem("float64")) is None else "float32"
    conv = getattr(convgrad, f"conv{ndim}d")
    conv_input = getattr(convgrad, f"conv{ndim}d_input")
    conv_weight = getattr(convgrad, f"conv{ndim}d_weight")
    rng = np.random.default_rng(3)
    cast = numpy_dtype(dtype)
    x = rng.standard_normal((1, 1, *(3,) * ndim)).astype(cast)
    w1 = rng.standard_normal((1, 1, *(2,) * ndim)).astype(cast)
    w2 = rng.standard_normal((1, 1, *(2,) * ndim)).astype(cast)
    target = 0.5

    def loss(x_, w1_, w2_):
        o1 = conv(x_, w1_, backend=backend_name)
        o2 = conv(o1, w2_, backend=backend_name)
        return float(((o2.astype(np.float64) - target) ** 2).sum()), o1, o2

    _, o1, o2 = loss(x, w1, w2)
    d_o2 = (2 * (o2.astype(np.float64) - target)).astype(cast)
    d_w2 = conv_weight(o1, w2.shape, d_o2, backend=backend_name)
    d_o1 = conv_input(o1.shape, w2, d_o2, backend=backend_name)
    d_w1 = conv_weight(x, w1.shape, d_o1, backend=backend_name)
    d_x = conv_input(x.shape, w1, d_o1, backend=backend_name)

    step = 1e-6 if dtype == "float64" else 1e-2
    tol = 1e-6 if dtype == "float64" else 2e-2
    for name, param, grad, position in (("w1", w1, d_w1, 1), ("w2", w2, d_w2, 2), ("x", x, d_x, 0)):
        numeric = np.zeros(param.shape)
        for idx in np.ndindex(param.shape):
            args = [x, w1, w2]
            plus, minus = param.copy(), param.copy()
            plus[idx] += step
            minus[idx] -= step
            args[position] = plus
            f_plus = loss(*args)[0]
            args[position] = minus
            f_minus = loss(*args)[0]
            numeric[idx] = (f_plus - f_minus) / (2 * step)
        np.testing.assert_allclose(np.asarray(grad, dtype=np.float64), numeric, rtol=tol, atol=tol, err_msg=name)
