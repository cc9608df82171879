"""The functional API's contract: shapes, padding forms, empty problems, options, selection."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import convgrad
from convgrad.testing import assert_close, reference_forward, reference_grad_input, reference_grad_weight
from convgrad.testing.cases import ConvCase, make_array


def test_import_loads_no_gpu_library_and_no_torch() -> None:
    code = "import sys, convgrad; print(sorted(m for m in ('cupy', 'numba', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_padding_forms_agree() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    symmetric = convgrad.conv2d(x, w, padding=(1, 2))
    pairs = convgrad.conv2d(x, w, padding=((1, 1), (2, 2)))
    single = convgrad.conv2d(x, w, padding=[1])
    np.testing.assert_array_equal(symmetric, pairs)
    np.testing.assert_array_equal(single, convgrad.conv2d(x, w, padding=1))
    same = convgrad.conv2d(x, w, padding="same")
    assert same.shape == (2, 4, 7, 8)
    np.testing.assert_array_equal(convgrad.conv2d(x, w, padding="valid"), convgrad.conv2d(x, w))


def test_same_padding_puts_the_odd_pixel_after_as_pytorch() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1, 6))
    w = rng.standard_normal((1, 1, 4))
    np.testing.assert_allclose(convgrad.conv1d(x, w, padding="same"), convgrad.conv1d(x, w, padding=((1, 2),)))


def test_unbatched_equals_batch_of_one() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 2))
    y = convgrad.conv2d(x, w, padding=1)
    assert y.shape == (4, 6, 6)
    np.testing.assert_array_equal(y, convgrad.conv2d(x[None], w, padding=1)[0])


@pytest.mark.parametrize("shape_x, shape_w, expected", [
    ((0, 3, 5, 5), (4, 3, 3, 3), (0, 4, 3, 3)),
    ((2, 0, 5, 5), (4, 0, 3, 3), (2, 4, 3, 3)),
    ((2, 3, 5, 5), (0, 3, 3, 3), (2, 0, 3, 3)),
])
def test_empty_problems_return_what_pytorch_returns(shape_x, shape_w, expected) -> None:
    x = np.ones(shape_x, np.float32)
    w = np.ones(shape_w, np.float32)
    bias = np.arange(shape_w[0], dtype=np.float32)
    y = convgrad.conv2d(x, w, bias)
    assert y.shape == expected
    # No input channels: each output is its bias alone.
    np.testing.assert_array_equal(y, np.broadcast_to(bias.reshape(1, -1, 1, 1), expected))
    g = np.ones(expected, np.float32)
    dx = convgrad.conv2d_input(shape_x, w, g)
    dw = convgrad.conv2d_weight(x, shape_w, g)
    assert dx.shape == shape_x and not dx.any()
    assert dw.shape == shape_w and not dw.any()
    if shape_x[0] == 0:
        # PyTorch agrees on an empty batch.  (For C = 0 it returns zero output channels,
        # and for K = 0 it raises; convgrad returns the (N, K, ...) of empty sums.)
        torch = pytest.importorskip("torch")
        y_ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias))
        assert y_ref.shape == y.shape


def test_result_keeps_the_input_dtype_and_out_is_returned() -> None:
    rng = np.random.default_rng(3)
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        x = rng.integers(-2, 3, (1, 2, 5, 5)).astype(dtype)
        w = rng.integers(-2, 3, (3, 2, 3, 3)).astype(dtype)
        out = np.empty((1, 3, 3, 3), dtype)
        assert convgrad.conv2d(x, w, out=out) is out
        assert out.dtype == np.dtype(dtype)


def test_bias_grad_sums_in_the_accumulator() -> None:
    g = np.full((32, 3, 32, 32), 1.0, dtype=np.float16)  # 32768 ones per channel; fp16 sums stall at 2048
    db = convgrad.conv_bias_grad(g)
    assert db.dtype == np.float16
    np.testing.assert_array_equal(db.astype(np.float64), np.float16(32768.0).astype(np.float64))
    g_cl = np.random.default_rng(4).standard_normal((2, 5, 4, 3))
    np.testing.assert_allclose(convgrad.conv_bias_grad(g_cl, channels_last=True), g_cl.sum(axis=(0, 1, 2)))


def test_backend_selection_by_argument_environment_and_data(monkeypatch) -> None:
    x = np.ones((1, 1, 3, 3))
    w = np.ones((1, 1, 2, 2))
    chosen = []

    class Recording(convgrad.backends.get("numpy").__class__):
        name = "recording"

        def forward(self, *args):
            chosen.append(self.name)
            super().forward(*args)

    convgrad.backends.register("recording", f"{__name__}:_RecordingFactory")
    global _RecordingFactory
    _RecordingFactory = Recording
    try:
        monkeypatch.setenv("CONVGRAD_BACKEND", "recording")
        convgrad.conv2d(x, w)
        monkeypatch.delenv("CONVGRAD_BACKEND")
        convgrad.conv2d(x, w)
        convgrad.conv2d(x, w, backend="recording")
        convgrad.conv2d(x, w, backend=Recording())
    finally:
        convgrad.backends._REGISTERED.pop("recording")
        convgrad.backends._INSTANCES.pop("recording", None)
    assert chosen == ["recording", "recording", "recording"]


def test_options_resolve_call_then_config_then_environment(monkeypatch) -> None:
    from convgrad import options

    assert options.get("deterministic") is True and options.get("allow_tf32") is False
    monkeypatch.setenv("CONVGRAD_ALLOW_TF32", "1")
    assert options.get("allow_tf32") is True
    with convgrad.config(allow_tf32=False):
        assert options.get("allow_tf32") is False
        assert options.get("allow_tf32", True) is True
    monkeypatch.setenv("CONVGRAD_WORKSPACE_MB", "abc")
    with pytest.raises(ValueError, match="CONVGRAD_WORKSPACE_MB must be a positive integer"):
        options.get("workspace_mb")


def test_problem_counts_flops_and_bytes() -> None:
    p = ConvCase(2, 2, 3, 4, (7, 9), (3, 3), padding=1).problem("float32")
    assert p.flops() == 2 * 2 * 4 * 7 * 9 * 3 * 9
    assert p.bytes("dgrad") == 4 * (2 * 3 * 7 * 9 + 4 * 3 * 9 + 2 * 4 * 7 * 9)


CASE = ConvCase(2, 3, 16, 8, (64, 60), (3, 3), stride=1, padding=1, groups=2)


def _run_all(case: ConvCase, workspace_mb: int, dtype: str = "float32"):
    rng = np.random.default_rng(5)
    x = make_array(rng, case.x_shape(), dtype)
    w = make_array(rng, case.w_shape(), dtype)
    g = make_array(rng, case.y_shape(), dtype)
    with convgrad.config(workspace_mb=workspace_mb):
        return (x, w, g), (convgrad.conv2d(x, w, **case.kwargs()),
                           convgrad.conv2d_input(x.shape, w, g, **case.kwargs()),
                           convgrad.conv2d_weight(x, w.shape, g, **case.kwargs()))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_numpy_backend_chunks_and_falls_back_to_shift_gemm_exactly(dtype) -> None:
    """A 1 MiB cap forces per-tap (shift-GEMM) chunking; results stay exact in every dtype."""
    from convgrad.backends.numpy_backend import _Plan

    with convgrad.config(workspace_mb=1):
        plan = _Plan(CASE.problem(dtype), CASE.K // CASE.groups)
    assert plan.batch == 1 and 1 <= plan.tap_chunk < 9, "the case must need tap chunking"
    (x, w, g), results = _run_all(CASE, 1, dtype)
    problem = CASE.problem(dtype)
    x5, w5, g5 = (a[:, :, None] for a in (x, w, g))  # logical 5-D views of the 2-D problem
    for result, expected in zip(results, (reference_forward(x5, w5, problem), reference_grad_input(g5, w5, problem),
                                          reference_grad_weight(x5, g5, problem))):
        assert_close(result[:, :, None], expected, dtype, exact=True)


@pytest.mark.parametrize("groups", [1, 64], ids=["dense", "depthwise"])
@pytest.mark.parametrize("pass_", ["fprop", "dgrad", "wgrad"])
def test_numpy_backend_peak_memory_stays_under_the_cap(pass_, groups) -> None:
    """tracemalloc sees NumPy's allocations: peak extra memory <= workspace cap + output."""
    def arrays(size: int, batch: int):
        case = ConvCase(2, batch, 64, 64, (size, size), (3, 3), padding=1, groups=groups)
        rng = np.random.default_rng(6)
        return tuple(make_array(rng, shape, "float32", integer=False)
                     for shape in (case.x_shape(), case.w_shape(), case.y_shape()))

    def calls(x, w, g):
        return {
            "fprop": (lambda: convgrad.conv2d(x, w, padding=1, groups=groups), g.nbytes),
            "dgrad": (lambda: convgrad.conv2d_input(x.shape, w, g, padding=1, groups=groups), x.nbytes),
            "wgrad": (lambda: convgrad.conv2d_weight(x, w.shape, g, padding=1, groups=groups), w.nbytes),
        }[pass_]

    cap_mb = 16
    # The unchunked im2col of this problem would need 8 * 576 * 3136 * 4 bytes = 58 MiB.
    call, output_bytes = calls(*arrays(56, 8))
    with convgrad.config(workspace_mb=cap_mb):
        # A tiny problem of the same kind first: the depthwise loops' one-time JIT compile
        # (Numba's own allocations) is not workspace, and its scratch buffers are too small
        # to be reused by the measured call.
        calls(*arrays(4, 1))[0]()
        tracemalloc.start()
        try:
            call()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak <= cap_mb * 2**20 + output_bytes, f"peak {peak / 2**20:.1f} MiB over the {cap_mb} MiB cap + output"
