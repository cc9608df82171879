"""Random geometries (hypothesis): every shape PyTorch accepts gives the reference's answer.

Runs on every available backend with integer-valued float32 inputs, so results compare
exactly; shapes are small enough for the emulated backends.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convgrad
from convgrad import arrays
from convgrad.testing import assert_close, reference_forward, reference_grad_input, reference_grad_weight
from convgrad.testing.cases import ConvCase, make_array


@st.composite
def geometries(draw) -> ConvCase:
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    C = groups * draw(st.integers(1, 3))
    K = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(ndim))
    spatial = []
    for k, d, (before, after) in zip(kernel, dilation, padding):
        reach = d * (k - 1) + 1
        # At least one output position: input + padding must cover the dilated kernel.
        spatial.append(draw(st.integers(max(1, reach - before - after), max(1, reach - before - after) + 6)))
    batch = draw(st.sampled_from([None, 1, 2]))
    channels_last = draw(st.booleans())
    return ConvCase(ndim, batch, C, K, tuple(spatial), kernel, stride, padding, dilation, groups,
                    channels_last=channels_last)


@pytest.mark.small
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=geometries())
def test_random_geometry_matches_reference(backend_name: str, case: ConvCase) -> None:
    rng = np.random.default_rng(0)
    problem = case.problem("float32")
    x = make_array(rng, case.x_shape(), "float32")
    w = make_array(rng, case.w_shape(), "float32")
    dy = make_array(rng, case.y_shape(), "float32")
    n, kw = case.ndim, case.kwargs()
    view = lambda a, role: arrays.logical_view(a, "numpy", role, problem)  # noqa: E731
    y = getattr(convgrad, f"conv{n}d")(x, w, backend=backend_name, **kw)
    dx = getattr(convgrad, f"conv{n}d_input")(x.shape, w, dy, backend=backend_name, **kw)
    dw = getattr(convgrad, f"conv{n}d_weight")(x, w.shape, dy, backend=backend_name, **kw)
    _check_shape_against_pytorch(case, x, w, y)
    assert_close(view(y, "y"), reference_forward(view(x, "x"), view(w, "w"), problem), "float32", exact=True,
                 name=case.name("fprop"))
    assert_close(view(dx, "x"), reference_grad_input(view(dy, "y"), view(w, "w"), problem), "float32", exact=True,
                 name=case.name("dgrad"))
    assert_close(view(dw, "w"), reference_grad_weight(view(x, "x"), view(dy, "y"), problem), "float32", exact=True,
                 name=case.name("wgrad"))


def _check_shape_against_pytorch(case: ConvCase, x: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
    """The output extents agree with PyTorch's for the same (explicitly padded) convolution."""
    try:
        import torch
    except ImportError:
        return
    problem = case.problem("float32")
    keep = 3 - case.ndim  # the logical views carry 3 spatial axes; PyTorch's the case's own
    xt = torch.from_numpy(np.ascontiguousarray(view_logical(x, "x", problem)).reshape(
        problem.N, problem.C, *problem.input_size[keep:]))
    wt = torch.from_numpy(np.ascontiguousarray(view_logical(w, "w", problem)).reshape(
        problem.K, problem.C_per_group, *problem.kernel_size[keep:]))
    pads = []
    for before, after in zip(reversed(problem.pad_before[keep:]), reversed(problem.pad_after[keep:])):
        pads += [before, after]
    conv = getattr(torch.nn.functional, f"conv{case.ndim}d")
    expected = conv(torch.nn.functional.pad(xt, pads), wt, None, problem.stride[keep:], 0, problem.dilation[keep:], case.groups)
    assert (problem.N, problem.K, *problem.output_size[keep:]) == tuple(expected.shape)
    got = np.ascontiguousarray(view_logical(y, "y", problem)).reshape(expected.shape)
    np.testing.assert_array_equal(got, expected.numpy())


def view_logical(a: np.ndarray, role: str, problem) -> np.ndarray:
    return arrays.logical_view(a, "numpy", role, problem)
