"""PyTorch as a second oracle: forward, torch.nn.grad, conv_transpose and autograd agree.

Runs on every available backend, like the shared suite.  Asymmetric padding has no
PyTorch argument, so the oracle pads the input explicitly and lets autograd carry the
gradient through the pad.
"""

from __future__ import annotations

import numpy as np
import pytest

import convgrad
from convgrad.testing import assert_close
from convgrad.testing.cases import CASES, TRANSPOSED_CASES, ConvCase, make_array

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _to_torch(a: np.ndarray, channels_last: bool, unbatched: bool) -> "torch.Tensor":
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    if channels_last:
        # (N, *spatial, C) -> (N, C, *spatial); unbatched (*spatial, C) -> (C, *spatial)
        lead = 0 if unbatched else 1
        t = t.movedim(-1, lead)
    return t


def _from_torch(t: "torch.Tensor", channels_last: bool, unbatched: bool) -> np.ndarray:
    if channels_last:
        t = t.movedim(0 if unbatched else 1, -1)
    return t.detach().numpy()


def _weight_to_torch(w: np.ndarray, channels_last: bool) -> "torch.Tensor":
    t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64))
    return t.movedim(-1, 1) if channels_last else t


def _torch_passes(case: ConvCase, x: np.ndarray, w: np.ndarray, g: np.ndarray):
    """(y, dx, dw) from PyTorch autograd in float64, returned in the case's layout."""
    problem = case.problem("float64")
    unbatched = case.batch is None
    xt = _to_torch(x, case.channels_last, unbatched).requires_grad_(True)
    wt = _weight_to_torch(w, case.channels_last).requires_grad_(True)
    pads = []
    for before, after in zip(reversed(problem.pad_before[3 - case.ndim:]), reversed(problem.pad_after[3 - case.ndim:])):
        pads += [before, after]
    conv = getattr(F, f"conv{case.ndim}d")
    y = conv(F.pad(xt, pads), wt, None, problem.stride[3 - case.ndim:], 0, problem.dilation[3 - case.ndim:], case.groups)
    y.backward(_to_torch(g, case.channels_last, unbatched))
    dw = wt.grad.movedim(1, -1) if case.channels_last else wt.grad
    return (_from_torch(y, case.channels_last, unbatched), _from_torch(xt.grad, case.channels_last, unbatched),
            dw.numpy())


def _params():
    return [pytest.param(c, marks=[pytest.mark.slow] if c.slow else [pytest.mark.small] if c.small else [],
                         id=c.name("fprop", "float32")) for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_passes_agree_with_pytorch(backend_name: str, case: ConvCase) -> None:
    rng = np.random.default_rng(7)
    x = make_array(rng, case.x_shape(), "float32", integer=False, sliced=case.sliced)
    w = make_array(rng, case.w_shape(), "float32", integer=False)
    g = make_array(rng, case.y_shape(), "float32", integer=False)
    y_ref, dx_ref, dw_ref = _torch_passes(case, x, w, g)
    n = case.ndim
    kw = case.kwargs()
    y = getattr(convgrad, f"conv{n}d")(x, w, backend=backend_name, **kw)
    dx = getattr(convgrad, f"conv{n}d_input")(x.shape, w, g, backend=backend_name, **kw)
    dw = getattr(convgrad, f"conv{n}d_weight")(x, w.shape, g, backend=backend_name, **kw)
    red = case.problem().gemm_reduction
    assert_close(y, y_ref, "float32", red["fprop"], 4.0, name="fprop")
    assert_close(dx, dx_ref, "float32", red["dgrad"], 4.0, name="dgrad")
    assert_close(dw, dw_ref, "float32", red["wgrad"], 4.0, name="wgrad")


@pytest.mark.small
def test_torch_nn_grad_agrees_for_symmetric_padding(backend_name: str) -> None:
    """convNd_input / convNd_weight mirror torch.nn.grad argument for argument."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((6, 2, 3, 3))
    g = rng.standard_normal((2, 6, 5, 4))
    args = dict(stride=2, padding=1, dilation=1, groups=2)
    dx = convgrad.conv2d_input(x.shape, w, g, backend=backend_name, **args)
    dw = convgrad.conv2d_weight(x, w.shape, g, backend=backend_name, **args)
    dx_ref = torch.nn.grad.conv2d_input(x.shape, torch.from_numpy(w), torch.from_numpy(g), **args).numpy()
    dw_ref = torch.nn.grad.conv2d_weight(torch.from_numpy(x), w.shape, torch.from_numpy(g), **args).numpy()
    assert_close(dx, dx_ref, "float64", 18, 4.0)
    assert_close(dw, dw_ref, "float64", 32, 4.0)


@pytest.mark.small
@pytest.mark.parametrize("params", TRANSPOSED_CASES, ids=lambda p: f"conv_transpose{p[0]}d_{p}")
def test_conv_transpose_agrees_with_pytorch(backend_name: str, params) -> None:
    ndim, batch, c_in, c_out, spatial, kernel, stride, padding, output_padding, groups, dilation = params
    rng = np.random.default_rng(9)
    x = make_array(rng, (batch, c_in, *spatial), "float32", integer=False)
    w = make_array(rng, (c_in, c_out // groups, *kernel), "float32", integer=False)
    b = make_array(rng, (c_out,), "float32", integer=False)
    y = getattr(convgrad, f"conv_transpose{ndim}d")(x, w, b, stride, padding, output_padding, groups, dilation,
                                                     backend=backend_name)
    y_ref = getattr(F, f"conv_transpose{ndim}d")(
        torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
        torch.from_numpy(b.astype(np.float64)), stride, padding, output_padding, groups, dilation).numpy()
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, "float32", c_in * int(np.prod(kernel)), 4.0)
