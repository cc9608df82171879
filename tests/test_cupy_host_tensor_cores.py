"""The tensor-core kernels (kernels/tensor_core_gemm.cu) executed on ``cupy-host``.

* Every configuration the planner can choose, for every dtype and pass, on a channels-last
  case (the cp.async fast path) and an NCHW case (the general path), with split-K wgrad; the
  shared suite (test_passes.py) runs only the configuration the heuristic picks.
* The SIMT kernels still planned for 16-bit types on GPUs before sm_80.
* dgrad and wgrad bit-identical in both block and thread orders; atomic split-K is not.
* Random geometries (hypothesis) in float16, bfloat16 and TF32, exact on integer data.
* Planted bugs in copies of the real kernels, each caught: a forgotten TF32 conversion, a
  missing __syncthreads() after the pipeline's wait, a missing wait in steady-state
  iterations, a misaligned tile (wrong padding), a divergent warp.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import convgrad
from convgrad import arrays
from convgrad.backends.cupy_backend import CupyHostBackend
from convgrad.backends.cupy_planner import Planner
from convgrad.backends.tensor_core_planner import DeviceModel, TensorCorePlanner
from convgrad.kernel_source import kernel_dir
from convgrad.tensor_core_catalog import TC_CONFIGS, TcConfig, configs_for
from convgrad.testing import (assert_close, reference_forward, reference_grad_input, reference_grad_weight,
                              round_to_tf32, truncate_to_tf32)
from convgrad.testing.cases import ConvCase, make_array, numpy_dtype

cuda_host = pytest.importorskip("convgrad.cuda_host")
pytestmark = pytest.mark.skipif(not cuda_host.compiler_available(), reason="no C++ compiler for the host emulation")

CONFIG_CASES = [(dtype, config) for dtype, configs in TC_CONFIGS.items() for config in configs]


class _Forced(TensorCorePlanner):
    """The tensor-core planner with its heuristic replaced by one configuration (where the pass has it)."""

    def __init__(self, config: TcConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        self.forced = config

    def choose(self, problem, pass_, device=None) -> TcConfig:
        if self.forced in configs_for(problem.dtype, pass_):
            return self.forced
        return super().choose(problem, pass_)


def _runner(block_order: str = "forward", thread_order: str = "forward", kernels=None):
    return cuda_host.HostRunner(kernels, block_order=block_order, thread_order=thread_order, num_threads=1,
                                sanitize="none")


def _backend(config: TcConfig | None = None, *, kernels=None, block_order="forward", thread_order="forward",
             device: DeviceModel | None = None, min_split_len: int = 64) -> CupyHostBackend:
    tensor_cores = _Forced(config, min_split_len=min_split_len) if config else TensorCorePlanner(
        min_split_len=min_split_len)
    backend = CupyHostBackend(runner=_runner(block_order, thread_order, kernels),
                              planner=Planner(tensor_cores=tensor_cores))
    if device is not None:
        backend._device_model = lambda like: device
    return backend


# (x shape, w shape, geometry): channels-last with channel counts the fast path takes, and the
# same convolution in NCHW with stride 2 (general path, dgrad stride phases).  wgrad's
# reduction (2*9*10 = 180) splits in two with min_split_len=64; the strided one (50) does not.
GEOMETRIES = {
    "nhwc": ((2, 9, 10, 16), (24, 3, 3, 16), dict(padding=1, channels_last=True)),
    "nchw_strided": ((2, 16, 9, 10), (24, 16, 3, 3), dict(padding=1, stride=2)),
}


def _data(name: str, dtype: str, integer: bool = True, seed: int = 3):
    x_shape, w_shape, geometry = GEOMETRIES[name]
    rng = np.random.default_rng(seed)
    cast = numpy_dtype(dtype)
    draw = (lambda shape: rng.integers(-2, 3, shape)) if integer else rng.standard_normal
    x, w = draw(x_shape).astype(cast), draw(w_shape).astype(cast)
    y_shape = convgrad.conv2d(x.astype(np.float64), w.astype(np.float64), backend="numpy", **geometry).shape
    return x, w, draw(y_shape).astype(cast), geometry


def _passes(backend, x, w, dy, geometry, *, allow_tf32: bool, deterministic: bool = True):
    common = dict(geometry, allow_tf32=allow_tf32, deterministic=deterministic)
    return (convgrad.conv2d(x, w, backend=backend, **common),
            convgrad.conv2d_input(x.shape, w, dy, backend=backend, **common),
            convgrad.conv2d_weight(x, w.shape, dy, backend=backend, **common))


def _reference(x, w, dy, geometry, rounding=None):
    f64 = (lambda a: a.astype(np.float64)) if rounding is None else (lambda a: rounding(a).astype(np.float64))
    return _passes("numpy", f64(x), f64(w), f64(dy), geometry, allow_tf32=False)


@pytest.mark.parametrize("dtype, config", CONFIG_CASES, ids=[f"{d}-{c.name}" for d, c in CONFIG_CASES])
def test_every_configuration_runs_every_pass_on_both_paths(dtype: str, config: TcConfig) -> None:
    backend = _backend(config)
    tf32 = dtype == "float32"
    splits = set()
    for name in GEOMETRIES:
        x, w, dy, geometry = _data(name, dtype)
        problem_wgrad = backend.planner.plan(
            convgrad.problem.conv_problem("conv2d", 2, x.shape, w.shape, geometry.get("stride", 1),
                                          geometry["padding"], 1, 1, dtype=dtype,
                                          channels_last=geometry.get("channels_last", False),
                                          allow_tf32=tf32), "wgrad")
        square = config.BM == config.BN
        assert problem_wgrad.algorithm == "tensor-core" and (problem_wgrad.tensor_core == config) == square
        splits.add(problem_wgrad.splits)
        got = _passes(backend, x, w, dy, geometry, allow_tf32=tf32)
        for result, expected, what in zip(got, _reference(x, w, dy, geometry), ("fprop", "dgrad", "wgrad")):
            assert_close(result, expected, dtype, exact=True, name=f"{name} {what} {config.name}")
    assert splits == {1, 2}, "wgrad runs with and without split-K"


def test_simt_kernels_still_run_16bit_types_before_sm80() -> None:
    backend = _backend(device=DeviceModel(capability=75))
    for dtype in ("float16", "bfloat16"):
        x, w, dy, geometry = _data("nhwc", dtype)
        problem = convgrad.problem.conv_problem("conv2d", 2, x.shape, w.shape, 1, 1, 1, 1, dtype=dtype,
                                                channels_last=True)
        assert backend.planner.plan(problem, "fprop", device=DeviceModel(capability=75)).algorithm == "gemm"
        for result, expected in zip(_passes(backend, x, w, dy, geometry, allow_tf32=False),
                                    _reference(x, w, dy, geometry)):
            assert_close(result, expected, dtype, exact=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dgrad_and_wgrad_are_bit_identical_in_both_orders(dtype: str) -> None:
    tf32 = dtype == "float32"
    x, w, dy, geometry = _data("nhwc", dtype, integer=False)
    forward = _passes(_backend(), x, w, dy, geometry, allow_tf32=tf32)[1:]
    reversed_ = _passes(_backend(block_order="reversed", thread_order="reversed"), x, w, dy, geometry,
                        allow_tf32=tf32)[1:]
    for a, b in zip(forward, reversed_):
        assert a.tobytes() == b.tobytes()


def test_atomic_split_k_depends_on_the_block_order() -> None:
    """deterministic=False adds wgrad's slices atomically: the determinism test would catch it."""
    x, w, dy, geometry = _data("nhwc", "float32", integer=False)
    x = np.concatenate([x] * 4)  # a longer reduction: more slices
    dy = np.concatenate([dy] * 4)
    got = [convgrad.conv2d_weight(x, w.shape, dy, backend=_backend(block_order=order, min_split_len=32),
                                  deterministic=False, allow_tf32=True, **geometry) for order in ("forward", "reversed")]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-4)
    assert got[0].tobytes() != got[1].tobytes()


# -- planted bugs in copies of the real kernels


def _broken_kernels(tmp_path, source: str, old: str, new: str):
    copy = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), copy)
    text = (copy / source).read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in {source}"
    (copy / source).write_text(text.replace(old, new))
    return copy


def test_forgotten_tf32_conversion_is_caught(tmp_path) -> None:
    """Unrounded TF32 operands are truncated by the tensor core: the rounded reference fails, the
    truncated one matches."""
    kernels = _broken_kernels(tmp_path, "wmma_tile.cuh", "f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);",
                              "f.x[e] = f.x[e];")
    x, w, dy, geometry = _data("nhwc", "float32", integer=False)
    y = convgrad.conv2d(x, w, backend=_backend(kernels=kernels), allow_tf32=True, **geometry)
    reduction = 16 * 9
    with pytest.raises(AssertionError):
        assert_close(y, _reference(x, w, dy, geometry, round_to_tf32)[0], "float32", reduction)
    assert_close(y, _reference(x, w, dy, geometry, truncate_to_tf32)[0], "float32", reduction)
    good = convgrad.conv2d(x, w, backend=_backend(), allow_tf32=True, **geometry)
    assert_close(good, _reference(x, w, dy, geometry, round_to_tf32)[0], "float32", reduction)


def test_missing_barrier_after_the_wait_is_caught(tmp_path) -> None:
    kernels = _broken_kernels(tmp_path, "wmma_tile.cuh",
                              "    cp_async_wait<Shape::STAGES - 2>();\n", "    cp_async_wait<Shape::STAGES - 2>();\n"
                              "    if (false)\n")
    x, w, dy, geometry = _data("nhwc", "float16")
    expected = _reference(x, w, dy, geometry)[0]
    caught = 0
    for order in ("forward", "reversed"):
        y = convgrad.conv2d(x, w, backend=_backend(kernels=kernels, thread_order=order), **geometry)
        caught += not np.array_equal(y.astype(np.float64), expected)
    assert caught >= 1


def test_missing_wait_in_steady_state_iterations_is_caught(tmp_path) -> None:
    """The wait is skipped only for k-tiles past the number of stages (9 taps, 3 stages)."""
    kernels = _broken_kernels(tmp_path, "wmma_tile.cuh", "    cp_async_wait<Shape::STAGES - 2>();\n",
                              "    if (kt < Shape::STAGES) cp_async_wait<Shape::STAGES - 2>();\n")
    x, w, dy, geometry = _data("nhwc", "bfloat16")
    y = convgrad.conv2d(x, w, backend=_backend(kernels=kernels), **geometry)
    assert np.isnan(y.astype(np.float32)).any()


def test_misaligned_tile_is_caught(tmp_path) -> None:
    """Stages shifted by 16 bytes: every cp.async stays legal, but no fragment is 256-bit aligned."""
    kernels = _broken_kernels(tmp_path, "tensor_core_gemm.cu",
                              "tc_mainloop<Shape>(loader, steps, reinterpret_cast<T*>(smem), mma);\n\n"
                              "  float* staged = reinterpret_cast<float*>(smem);\n  const bool n_fastest",
                              "tc_mainloop<Shape>(loader, steps, reinterpret_cast<T*>(smem) + Shape::VEC, mma);\n\n"
                              "  float* staged = reinterpret_cast<float*>(smem);\n  const bool n_fastest")
    x, w, dy, geometry = _data("nhwc", "float16")
    with pytest.raises(cuda_host.KernelError, match=r"is not 256-bit \(32-byte\) aligned"):
        convgrad.conv2d(x, w, backend=_backend(kernels=kernels), **geometry)


def test_divergent_warp_is_caught(tmp_path) -> None:
    """Half of each warp computing another sub-tile passes another pointer to the collective load."""
    kernels = _broken_kernels(tmp_path, "wmma_tile.cuh", "m0 = (warp / Shape::WARPS_N) * Shape::WM;",
                              "m0 = (warp / Shape::WARPS_N) * Shape::WM + (threadIdx.x % 32 < 16 ? 0 : 16);")
    x, w, dy, geometry = _data("nchw_strided", "float16")
    with pytest.raises(cuda_host.KernelError, match="every lane of the warp must pass the same values"):
        convgrad.conv2d(x, w, backend=_backend(kernels=kernels), **geometry)


# -- random geometries


@st.composite
def _geometries(draw):
    """Geometries PyTorch accepts, with channel counts that sometimes allow the fast path (multiples of 8)."""
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    per_group = st.sampled_from([1, 2, 3, 8, 16])
    C, K = groups * draw(per_group), groups * draw(per_group)
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(ndim))
    spatial = []
    for k, d, (before, after) in zip(kernel, dilation, padding):
        least = max(1, d * (k - 1) + 1 - before - after)
        spatial.append(draw(st.integers(least, least + 5)))
    batch = draw(st.sampled_from([None, 1, 2]))
    return ConvCase(ndim, batch, C, K, tuple(spatial), kernel, stride, padding, dilation, groups,
                    channels_last=draw(st.booleans()))


@settings(max_examples=30, deadline=None)
@given(case=_geometries(), dtype=st.sampled_from(["float16", "bfloat16", "tf32"]))
def test_random_geometries_on_tensor_cores(case: ConvCase, dtype: str) -> None:
    """Integer-valued data: every pass equals the reference rounded once to the dtype."""
    data_dtype = "float32" if dtype == "tf32" else dtype
    problem = case.problem(data_dtype).with_options(allow_tf32=dtype == "tf32")
    assume(not problem.is_depthwise)
    backend = convgrad.backends.get("cupy-host")
    assert backend.uses_tensor_cores(problem, "fprop")
    rng = np.random.default_rng(0)
    x = make_array(rng, case.x_shape(), data_dtype)
    w = make_array(rng, case.w_shape(), data_dtype)
    dy = make_array(rng, case.y_shape(), data_dtype)
    n, kw = case.ndim, dict(case.kwargs(), allow_tf32=dtype == "tf32", backend="cupy-host")
    view = lambda a, role: arrays.logical_view(a, "numpy", role, problem)  # noqa: E731
    y = getattr(convgrad, f"conv{n}d")(x, w, **kw)
    dx = getattr(convgrad, f"conv{n}d_input")(x.shape, w, dy, **kw)
    dw = getattr(convgrad, f"conv{n}d_weight")(x, w.shape, dy, **kw)
    for got, want, pass_ in ((view(y, "y"), reference_forward(view(x, "x"), view(w, "w"), problem), "fprop"),
                             (view(dx, "x"), reference_grad_input(view(dy, "y"), view(w, "w"), problem), "dgrad"),
                             (view(dw, "w"), reference_grad_weight(view(x, "x"), view(dy, "y"), problem), "wgrad")):
        assert_close(got, want, data_dtype, exact=True, name=case.name(pass_, data_dtype))
