"""The ``numba`` backend's kernels under Numba's CUDA simulator, against the float64 reference.

Runs only with ``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported; ``test_numba_backend.py``
starts it as a child process, so the simulator never touches the rest of the suite.

The cases are sized against the dense kernels' 16x16 tiles (extents 1, 17 and 33, so several
blocks and ragged edges in every GEMM dimension), force each larger tile and an uneven
split-K once, and run every array path: staged NumPy (contiguous, channels-last, sliced),
Numba device arrays with ``out=``, the fused and separate bias, and the bias gradient.
Inputs are small integers, so every accumulator sums them exactly and results must equal
the reference rounded once to the dtype.  Outputs start as NaN, so an element no thread
writes fails the comparison.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
    reason="runs under Numba's CUDA simulator, as a child process of test_numba_backend.py",
)

import convgrad  # noqa: E402
from convgrad import arrays, backends  # noqa: E402
from convgrad.problem import conv_problem  # noqa: E402
from convgrad.testing import assert_close, reference_forward, reference_grad_input, reference_grad_weight  # noqa: E402

# (name, ndim, N, C, K, spatial, kernel, stride, padding, dilation, groups)
CASES = [
    ("w33_c17_k33", 1, 1, 17, 33, (33,), (1,), 1, 0, 1, 1),
    ("w17_c33_k1", 1, 1, 33, 1, (17,), (3,), 1, 1, 1, 1),
    ("1x1_c1_k17", 2, 1, 1, 17, (1, 1), (1, 1), 1, 0, 1, 1),
    ("5x7_c17_k17_s2", 2, 2, 17, 17, (5, 7), (3, 3), 2, 1, 1, 1),
    ("3x5_g2_c34_k66_d2", 2, 1, 34, 66, (3, 5), (3, 2), (1, 2), ((1, 1), (2, 0)), (1, 2), 2),
    ("4x9_s3x2_asym", 2, 1, 3, 17, (4, 9), (2, 4), (3, 2), ((0, 1), (2, 1)), 1, 1),
    ("3d_3x4x5", 3, 1, 2, 3, (3, 4, 5), (2, 2, 2), (1, 2, 1), ((1, 0), (0, 1), (1, 1)), (1, 1, 2), 1),
    ("depthwise_17x2_s2", 2, 2, 17, 34, (5, 6), (3, 3), 2, 1, 1, 17),
    ("depthwise_1x1", 2, 1, 3, 3, (1, 1), (1, 1), 1, 0, 1, 3),
    ("depthwise_1d_s3_d2", 1, 2, 4, 4, (17,), (3,), 3, ((2, 0),), 2, 4),
]
CASE_IDS = [case[0] for case in CASES]
BY_NAME = {case[0]: case for case in CASES}


@pytest.fixture
def numba_backend():
    backend = backends.get("numba")
    assert backend.available() and backend.emulated
    yield backend
    backend.overrides.clear()


def _int_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return rng.integers(-3, 4, shape).astype(dtype)


def _nan(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return np.full(shape, np.nan, dtype)


def _function(kind: str, ndim: int) -> Any:
    return getattr(convgrad, {"fprop": f"conv{ndim}d", "dgrad": f"conv{ndim}d_input", "wgrad": f"conv{ndim}d_weight"}[kind])


def check_passes(case: tuple, dtype: str, *, passes=("fprop", "dgrad", "wgrad"), channels_last: bool = False,
                 bias: bool = True, seed: int = 0) -> None:
    """Run the passes of ``case`` through the public API on NumPy arrays (staged) and compare exactly."""
    name, ndim, N, C, K, spatial, kernel, stride, padding, dilation, groups = case
    rng = np.random.default_rng(seed)
    if channels_last:
        x_shape, w_shape = (N, *spatial, C), (K, *kernel, C // groups)
    else:
        x_shape, w_shape = (N, C, *spatial), (K, C // groups, *kernel)
    problem = conv_problem("test", ndim, x_shape, w_shape, stride, padding, dilation, groups, dtype=dtype,
                           channels_last=channels_last)
    y_spatial = problem.output_size[3 - ndim:]
    y_shape = (N, *y_spatial, K) if channels_last else (N, K, *y_spatial)
    x = _int_array(rng, x_shape, dtype)
    w = _int_array(rng, w_shape, dtype)
    dy = _int_array(rng, y_shape, dtype)
    b = _int_array(rng, (K,), dtype) if bias else None

    def view(a: np.ndarray, role: str) -> np.ndarray:
        return arrays.logical_view(a, "numpy", role, problem)

    args = (stride, padding, dilation, groups)
    opts = {"channels_last": channels_last, "backend": "numba"}
    if "fprop" in passes:
        y = _function("fprop", ndim)(x, w, b, *args, out=_nan(y_shape, dtype), **opts)
        assert_close(view(y, "y"), reference_forward(view(x, "x"), view(w, "w"), problem, b), dtype, exact=True,
                     name=problem.name("fprop"))
    if "dgrad" in passes:
        dx = _function("dgrad", ndim)(x_shape, w, dy, *args, out=_nan(x_shape, dtype), **opts)
        assert_close(view(dx, "x"), reference_grad_input(view(dy, "y"), view(w, "w"), problem), dtype, exact=True,
                     name=problem.name("dgrad"))
    if "wgrad" in passes:
        dw = _function("wgrad", ndim)(x, w_shape, dy, *args, out=_nan(w_shape, dtype), **opts)
        assert_close(view(dw, "w"), reference_grad_weight(view(x, "x"), view(dy, "y"), problem), dtype, exact=True,
                     name=problem.name("wgrad"))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_pass_float32(case, numba_backend):
    check_passes(case, "float32")


@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize("name", ["5x7_c17_k17_s2", "3x5_g2_c34_k66_d2", "depthwise_17x2_s2"])
def test_other_dtypes(name, dtype, numba_backend):
    check_passes(BY_NAME[name], dtype, seed=1)


@pytest.mark.parametrize(
    "tile, name, passes",
    [
        ("small", "5x7_c17_k17_s2", ("fprop", "dgrad", "wgrad")),
        ("small", "3x5_g2_c34_k66_d2", ("fprop", "dgrad", "wgrad")),
        ("medium", "w33_c17_k33", ("fprop", "dgrad", "wgrad")),
        ("large", "1x1_c1_k17", ("fprop", "dgrad", "wgrad")),
        ("large", "w17_c33_k1", ("fprop",)),
    ],
)
def test_forced_tiles(tile, name, passes, numba_backend):
    """The 64- and 256-thread tiles, which the planner keeps for larger problems."""
    numba_backend.overrides["tile"] = tile
    check_passes(BY_NAME[name], "float32", passes=passes, seed=2)


@pytest.mark.parametrize("name", ["w33_c17_k33", "5x7_c17_k17_s2", "depthwise_17x2_s2", "depthwise_1d_s3_d2"])
def test_uneven_split_k(name, numba_backend):
    """wgrad's reduction split into three chunks, the last one short."""
    numba_backend.overrides["splits"] = 3
    check_passes(BY_NAME[name], "float32", passes=("wgrad",), seed=3)


@pytest.mark.parametrize("name", ["5x7_c17_k17_s2", "depthwise_17x2_s2"])
def test_channels_last(name, numba_backend):
    check_passes(BY_NAME[name], "float32", channels_last=True, seed=4)


def test_sliced_inputs_keep_their_strides(numba_backend):
    """A sliced NumPy input is staged with its strides, so the kernels read a strided view."""
    rng = np.random.default_rng(5)
    base = _int_array(rng, (2, 4, 7, 10), "float32")
    x = base[:, 1:, :, 1:]                  # (2, 3, 7, 9), non-contiguous
    w = _int_array(rng, (5, 3, 3, 3), "float32")
    staged = numba_backend.to_device(x)
    assert staged.strides == x.strides
    problem = conv_problem("test", 2, x.shape, w.shape, 1, 1, 1, 1, dtype="float32")
    y = convgrad.conv2d(x, w, None, 1, 1, backend="numba")
    expected = reference_forward(x[:, :, None], w[:, :, None], problem)[:, :, 0]
    assert_close(y, expected, "float32", exact=True, name="sliced fprop")
    dy = _int_array(rng, y.shape, "float32")[..., ::-1]   # negative strides: staged as a copy
    dw = convgrad.conv2d_weight(x, w.shape, dy, 1, 1, backend="numba")
    expected = reference_grad_weight(x[:, :, None], dy[:, :, None], problem)[:, :, 0]
    assert_close(dw, expected, "float32", exact=True, name="sliced wgrad")


def test_device_arrays_and_out(numba_backend):
    """Numba device arrays are used in place; results come back as device arrays (or in ``out``)."""
    from numba import cuda

    rng = np.random.default_rng(6)
    x = _int_array(rng, (2, 3, 6, 5), "float32")
    w = _int_array(rng, (4, 3, 2, 2), "float32")
    b = _int_array(rng, (4,), "float32")
    problem = conv_problem("test", 2, x.shape, w.shape, 2, 1, 1, 1, dtype="float32")
    out = cuda.to_device(_nan((2, 4, *problem.output_size[1:]), "float32"))
    y = convgrad.conv2d(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), 2, 1, out=out)
    assert y is out
    assert arrays.array_kind(y) == "numba"
    expected = reference_forward(x[:, :, None], w[:, :, None], problem, b)[:, :, 0]
    assert_close(y.copy_to_host(), expected, "float32", exact=True, name="device fprop")
    dy = cuda.to_device(_int_array(rng, tuple(out.shape), "float32"))
    dx = convgrad.conv2d_input(x.shape, cuda.to_device(w), dy, 2, 1)
    assert arrays.array_kind(dx) == "numba"
    expected = reference_grad_input(dy.copy_to_host()[:, :, None], w[:, :, None], problem)[:, :, 0]
    assert_close(dx.copy_to_host(), expected, "float32", exact=True, name="device dgrad")


@pytest.mark.parametrize("on_device, channels_last", [(True, False), (False, True)])
def test_transposed_convolution_with_bias(on_device, channels_last, numba_backend):
    """conv_transpose is dgrad plus the separate bias kernel (device arrays, or staged NumPy)."""
    from numba import cuda

    rng = np.random.default_rng(7)
    x = _int_array(rng, (2, 4, 4, 5) if not channels_last else (2, 4, 5, 4), "float16")
    w = _int_array(rng, (4, 3, 3, 3) if not channels_last else (4, 3, 3, 3), "float16")
    b = _int_array(rng, (6,), "float16")
    args = {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2, "channels_last": channels_last}
    expected = convgrad.conv_transpose2d(x, w, b, backend="numpy", **args)
    if on_device:
        got = convgrad.conv_transpose2d(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), **args).copy_to_host()
    else:
        got = convgrad.conv_transpose2d(x, w, b, backend="numba", **args)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape, channels_last", [((2, 5, 3, 4), False), ((2, 3, 4, 5), True), ((3, 17), False)])
def test_bias_gradient(shape, channels_last, numba_backend):
    from numba import cuda

    rng = np.random.default_rng(8)
    dy = _int_array(rng, shape, "float32")
    got = convgrad.conv_bias_grad(cuda.to_device(dy), channels_last=channels_last)
    axis = len(shape) - 1 if channels_last else 1
    expected = dy.astype(np.float64).sum(axis=tuple(a for a in range(len(shape)) if a != axis))
    np.testing.assert_array_equal(got.copy_to_host(), expected.astype(np.float32))


def test_every_launch_copy_and_allocation_uses_the_stream_the_arrays_are_bound_to(numba_backend, monkeypatch):
    """Arrays bound to a stream (as ``convgrad.torch`` binds them to PyTorch's) keep all work on it.

    Every kernel configuration, device allocation and host<->device copy is recorded with the
    stream it was given (a copy's default is its array's bound stream, as in Numba).
    """
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from convgrad.backends import numba_backend as module

    stream = cuda.stream()
    used: list[tuple[str, str, Any]] = []
    real_kernel = module.NumbaBackend._kernel

    class Recording:
        def __init__(self, name: str, compiled: Any) -> None:
            self.name, self.compiled = name, compiled

        def __getitem__(self, config: tuple) -> Any:
            used.append(("launch", self.name, config[2]))
            return self.compiled[config]

    monkeypatch.setattr(module.NumbaBackend, "_kernel",
                        lambda self, kernel, tile, dtype: Recording(kernel, real_kernel(self, kernel, tile, dtype)))
    real_device_array = cuda.device_array

    def device_array(*args: Any, stream: Any = 0, **kwargs: Any) -> Any:
        used.append(("alloc", str(args[0]), stream))
        return real_device_array(*args, stream=stream, **kwargs)

    monkeypatch.setattr(cuda, "device_array", device_array)
    real_copy = FakeCUDAArray.copy_to_device

    def copy_to_device(self: Any, ary: Any, stream: Any = 0) -> None:
        used.append(("copy", str(self.shape), stream or self.stream))
        real_copy(self, ary, stream)

    monkeypatch.setattr(FakeCUDAArray, "copy_to_device", copy_to_device)

    rng = np.random.default_rng(3)

    def bound(shape: tuple[int, ...]) -> Any:
        return cuda.to_device(_int_array(rng, shape, "float32")).bind(stream)

    x, w, b, dy = bound((2, 4, 9, 9)), bound((6, 4, 3, 3)), bound((6,)), bound((2, 6, 9, 9))
    used.clear()  # from here on, only what convgrad does
    convgrad.conv2d(x, w, b, padding=1)
    convgrad.conv2d(x, w, b, padding=1, out=bound((2, 6, 9, 9)))
    convgrad.conv2d_input(x.shape, w, dy, padding=1)
    numba_backend.overrides["splits"] = 3  # a split-K workspace and its reduction
    convgrad.conv2d_weight(x, w.shape, dy, padding=1)
    convgrad.conv_transpose2d(dy, w, bound((4,)), padding=1)  # dgrad, then the bias kernel
    convgrad.conv_bias_grad(dy)
    convgrad.conv2d(bound((2, 0, 9, 9)), bound((6, 0, 3, 3)), padding=1)  # empty: the output is filled by a copy
    kinds = {kind for kind, _, _ in used}
    assert kinds == {"launch", "alloc", "copy"}, used
    wrong = [entry for entry in used if entry[2] is not stream]
    assert not wrong, f"work outside the arrays' stream: {wrong}"
    launched = {name for kind, name, _ in used if kind == "launch"}
    assert {"fprop_dense", "dgrad_dense", "wgrad_dense", "wgrad_reduce", "add_bias", "grad_bias"} <= launched
