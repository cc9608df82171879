"""cupy-host: dgrad and wgrad are bit-identical whatever order the blocks run in.

The emulator can run a grid's blocks forward or reversed (one OS thread, so the order is
strict).  Deterministic kernels write each output from one block and reduce split-K slices in
a fixed order, so both orders must give the same bits; the atomic path of
``deterministic=False`` does not, which shows the test can fail.  The planted-bug tests at the
end run broken copies of the real kernels and show the comparison with the reference catches
them.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import convgrad
from convgrad.backends import cupy_planner
from convgrad.backends.cupy_backend import CupyHostBackend
from convgrad.backends.cupy_planner import Planner
from convgrad.kernel_source import kernel_dir
from convgrad.problem import conv_problem

cuda_host = pytest.importorskip("convgrad.cuda_host")
pytestmark = pytest.mark.skipif(not cuda_host.compiler_available(), reason="no C++ compiler for the host emulation")


def _backend(block_order: str = "forward", thread_order: str = "forward", kernels=None) -> CupyHostBackend:
    runner = cuda_host.HostRunner(kernels, block_order=block_order, thread_order=thread_order, num_threads=1,
                                  sanitize="none")
    return CupyHostBackend(runner=runner)


# (x shape, w shape, geometry): the first has a reduction long enough for split-K to split.
CASES = {
    "split_k": ((2, 4, 32, 32), (4, 4, 3, 3), dict(padding=1)),
    "split_k_channels_last": ((2, 32, 32, 8), (8, 3, 3, 8), dict(padding=1, channels_last=True)),
    "strided_grouped": ((2, 6, 13, 11), (6, 3, 3, 3), dict(stride=2, padding=1, groups=2)),
    "depthwise_split": ((2, 3, 64, 64), (6, 1, 3, 3), dict(padding=1, groups=3)),
}


def _data(x_shape, w_shape, geometry):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    y_shape = convgrad.conv2d(x, w, backend="numpy", **geometry).shape
    dy = rng.standard_normal(y_shape).astype(np.float32)
    return x, w, dy


def _grads(backend, x, w, dy, geometry, deterministic=True):
    dx = convgrad.conv2d_input(x.shape, w, dy, backend=backend, deterministic=deterministic, **geometry)
    dw = convgrad.conv2d_weight(x, w.shape, dy, backend=backend, deterministic=deterministic, **geometry)
    return dx, dw


def test_the_split_k_case_really_splits() -> None:
    x_shape, w_shape, geometry = CASES["split_k"]
    problem = conv_problem("conv2d", 2, x_shape, w_shape, 1, geometry["padding"], 1, 1, dtype="float32")
    assert Planner().plan(problem, "wgrad").splits > 1
    x_shape, w_shape, geometry = CASES["depthwise_split"]
    problem = conv_problem("conv2d", 2, x_shape, w_shape, 1, 1, 1, 3, dtype="float32")
    assert Planner().plan(problem, "wgrad").splits > 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_dgrad_and_wgrad_are_bit_identical_in_both_block_orders(case: str) -> None:
    x_shape, w_shape, geometry = CASES[case]
    x, w, dy = _data(x_shape, w_shape, geometry)
    forward = _grads(_backend("forward"), x, w, dy, geometry)
    reversed_ = _grads(_backend("reversed", "reversed"), x, w, dy, geometry)
    for a, b in zip(forward, reversed_):
        assert a.tobytes() == b.tobytes()
    # And they are right.
    expected = _grads("numpy", x, w, dy, geometry)
    for a, b in zip(forward, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_atomic_split_k_depends_on_block_order() -> None:
    """deterministic=False adds slices atomically, in block order: the determinism test would catch it."""
    x_shape, w_shape, geometry = CASES["split_k"]
    x, w, dy = _data(x_shape, w_shape, geometry)
    _, forward = _grads(_backend("forward"), x, w, dy, geometry, deterministic=False)
    _, reversed_ = _grads(_backend("reversed"), x, w, dy, geometry, deterministic=False)
    np.testing.assert_allclose(forward, reversed_, rtol=1e-4, atol=1e-4)
    assert forward.tobytes() != reversed_.tobytes()


# -- planted bugs in copies of the real kernels


def _broken_kernels(tmp_path, source: str, old: str, new: str):
    copy = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), copy)
    text = (copy / source).read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in {source}"
    (copy / source).write_text(text.replace(old, new))
    return copy


def test_missing_barrier_in_the_gemm_mainloop_is_caught(tmp_path) -> None:
    """Without the per-step barrier, threads read a stage before all of it is written."""
    kernels = _broken_kernels(tmp_path, "gemm_tile.cuh", "    __syncthreads();\n    parity ^= 1;",
                              "    parity ^= 1;")
    x_shape, w_shape, geometry = CASES["strided_grouped"]
    x, w, dy = _data(x_shape, w_shape, geometry)
    expected = convgrad.conv2d(x, w, backend="numpy", **geometry)
    for order in ("forward", "reversed"):
        got = convgrad.conv2d(x, w, backend=_backend(thread_order=order, kernels=kernels), **geometry)
        assert not np.allclose(got, expected, rtol=1e-4, atol=1e-4, equal_nan=False)


def test_wrong_split_k_slice_bound_is_caught(tmp_path) -> None:
    """A slice that stops one reduction index early loses terms: the reference comparison fails."""
    kernels = _broken_kernels(tmp_path, "implicit_gemm.cu",
                              "red_begin + p.split_len < red_total ? red_begin + p.split_len : red_total",
                              "red_begin + p.split_len - 1 < red_total ? red_begin + p.split_len - 1 : red_total")
    x_shape, w_shape, geometry = CASES["split_k"]
    x, w, dy = _data(x_shape, w_shape, geometry)
    _, dw = _grads(_backend(kernels=kernels), x, w, dy, geometry)
    _, expected = _grads("numpy", x, w, dy, geometry)
    assert not np.allclose(dw, expected, rtol=1e-4, atol=1e-4)


def test_planner_and_backend_share_kernels_module() -> None:
    """cupy-host runs the cupy backend's own planner class."""
    assert isinstance(CupyHostBackend().planner, cupy_planner.Planner)
    assert isinstance(convgrad.backends.get("cupy-host"), CupyHostBackend)
