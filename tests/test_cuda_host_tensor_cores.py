"""The WMMA and cp.async emulation of convgrad.cuda_host, with planted kernels.

The kernels live in tests/cuda_host_kernels/tensor_cores.cu.  The first tests show the
emulated calls compute what CUDA documents; the planted-bug tests show each rule the
emulation enforces turns its bug into a failure: a misaligned tile, a divergent or partial
warp, a forgotten TF32 conversion, a missing wait in a steady-state pipeline iteration, a
missing __syncthreads() after the wait, and every cp.async operand rule.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from convgrad import cuda_host
from convgrad.cuda_host import HostRunner, KernelError
from convgrad.kernel_source import kernel_dir
from convgrad.testing import round_to_tf32, truncate_to_tf32

pytestmark = pytest.mark.skipif(not cuda_host.compiler_available(), reason="the host emulation needs g++ >= 11")

SOURCE = "tensor_cores.cu"
KERNELS = Path(__file__).parent / "cuda_host_kernels"
ROW, COL = "nvcuda::wmma::row_major", "nvcuda::wmma::col_major"
TF32 = "nvcuda::wmma::precision::tf32"
GEMMS = [f"wmma_gemm<{t}, {la}, {lb}, {r}>" for t in ("__half", "__nv_bfloat16")
         for la in (ROW, COL) for lb in (ROW, COL) for r in ("false",)]
GEMMS += [f"wmma_gemm<{TF32}, {ROW}, {COL}, true>", f"wmma_gemm<{TF32}, {COL}, {ROW}, true>",
          f"wmma_gemm<{TF32}, {ROW}, {COL}, false>"]
PIPELINES = [f"pipelined_mirror_sum<{stages}, {bug}>" for stages in (2, 3) for bug in (0, 1, 2)]
OTHERS = ["wmma_divergent", "read_before_wait", "cp_async_rules", "to_tf32"]


def _runner(**kwargs) -> HostRunner:
    runner = HostRunner(KERNELS, extra_include_dirs=[kernel_dir()], num_threads=1, **kwargs)
    runner.compile(SOURCE, GEMMS + PIPELINES + OTHERS)
    return runner


@pytest.fixture(scope="module")
def runner() -> HostRunner:
    return _runner()


@pytest.fixture(scope="module")
def reversed_runner() -> HostRunner:
    return _runner(thread_order="reversed", block_order="reversed")


def aligned(values: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A copy of ``values`` whose first element sits on an ``alignment``-byte boundary."""
    raw = np.empty(values.nbytes + alignment, np.uint8)
    start = (-raw.ctypes.data) % alignment
    out = raw[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out


def _template_args(kernel: str) -> list[str]:
    return kernel[kernel.index("<") + 1:-1].split(", ")


def _dtype(type_name: str):
    if type_name == "__half":
        return np.float16
    if type_name == "__nv_bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float32


def run_gemm(runner, kernel: str, a: np.ndarray, b: np.ndarray, d: np.ndarray, *, a_row: bool, b_row: bool,
             d_col: bool = False, lda: int | None = None, ldb: int | None = None, a_offset: int = 0) -> np.ndarray:
    """d + a @ b through one warp of ``wmma_gemm``; a (16 x K), b (K x 16) stored as the layouts say."""
    k_total = a.shape[1]
    a_mem = a if a_row else a.T
    b_mem = b if b_row else b.T
    lda = lda or a_mem.shape[1]
    ldb = ldb or b_mem.shape[1]
    a_buf = np.zeros((a_mem.shape[0], lda), a.dtype)
    a_buf[:, :a_mem.shape[1]] = a_mem
    b_buf = np.zeros((b_mem.shape[0], ldb), b.dtype)
    b_buf[:, :b_mem.shape[1]] = b_mem
    a_dev = aligned(np.concatenate([a_buf.ravel(), np.zeros(16, a.dtype)]))[a_offset:]
    d_dev = aligned(np.ascontiguousarray(d.T if d_col else d))
    runner.launch(SOURCE, kernel, (1,), (32,), 0,
                  [a_dev, aligned(b_buf), d_dev, np.int32(k_total), np.uint32(lda), np.uint32(ldb), np.uint32(16),
                   np.int32(d_col)])
    return d_dev.T if d_col else d_dev


@pytest.mark.parametrize("kernel", GEMMS[:8])
def test_wmma_16bit_gemm_matches_numpy_in_every_layout(runner, kernel: str) -> None:
    type_name, layout_a, layout_b, _ = _template_args(kernel)
    dtype, a_row, b_row = _dtype(type_name), layout_a == ROW, layout_b == ROW
    rng = np.random.default_rng(5)
    a = rng.integers(-8, 9, (16, 48)).astype(dtype)
    b = rng.integers(-8, 9, (48, 16)).astype(dtype)
    c = rng.integers(-100, 100, (16, 16)).astype(np.float32)
    for d_col in (False, True):
        got = run_gemm(runner, kernel, a, b, c.copy(), a_row=a_row, b_row=b_row, d_col=d_col)
        np.testing.assert_array_equal(got, c + a.astype(np.float64) @ b.astype(np.float64))
    # Gaussian data: products exact, fp32-accumulation error only.
    a = rng.standard_normal((16, 32)).astype(dtype)
    b = rng.standard_normal((32, 16)).astype(dtype)
    got = run_gemm(runner, kernel, a, b, np.zeros((16, 16), np.float32), a_row=a_row, b_row=b_row)
    np.testing.assert_allclose(got, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-6, atol=1e-5)


def test_wmma_leading_dimension_larger_than_the_tile(runner) -> None:
    """Padded shared-memory rows (ldm = tile width + 8 halves) are read with their stride."""
    rng = np.random.default_rng(6)
    a = rng.integers(-4, 5, (16, 16)).astype(np.float16)
    b = rng.integers(-4, 5, (16, 16)).astype(np.float16)
    got = run_gemm(runner, GEMMS[1], a, b, np.zeros((16, 16), np.float32), a_row=True, b_row=False, lda=24, ldb=40)
    np.testing.assert_array_equal(got, a.astype(np.float64) @ b.astype(np.float64))


def _tf32_data(rng):
    a = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal((32, 16)).astype(np.float32)
    return a, b


def _distance(got, a, b) -> float:
    return float(np.max(np.abs(got - a.astype(np.float64) @ b.astype(np.float64))))


@pytest.mark.parametrize("kernel", GEMMS[8:10])
def test_tf32_with_conversion_matches_the_rounded_reference(runner, kernel: str) -> None:
    a, b = _tf32_data(np.random.default_rng(7))
    a_row = _template_args(kernel)[1] == ROW
    got = run_gemm(runner, kernel, a, b, np.zeros((16, 16), np.float32), a_row=a_row, b_row=not a_row)
    rounded = _distance(got, round_to_tf32(a), round_to_tf32(b))
    assert rounded <= 1e-5, rounded
    # Rounding, not truncation, and not full fp32: both are far off at TF32 precision.
    assert _distance(got, truncate_to_tf32(a), truncate_to_tf32(b)) > 100 * max(rounded, 1e-7)
    assert _distance(got, a, b) > 100 * max(rounded, 1e-7)


def test_forgotten_tf32_conversion_is_caught(runner) -> None:
    """Without __float_to_tf32 the tensor core reads truncated operands: the TF32 reference fails."""
    a, b = _tf32_data(np.random.default_rng(7))
    got = run_gemm(runner, GEMMS[10], a, b, np.zeros((16, 16), np.float32), a_row=True, b_row=False)
    truncated = _distance(got, truncate_to_tf32(a), truncate_to_tf32(b))
    assert truncated <= 1e-5
    assert _distance(got, round_to_tf32(a), round_to_tf32(b)) > 100 * max(truncated, 1e-7)


def test_float_to_tf32_rounds_to_nearest_ties_away(runner) -> None:
    ulp = 2.0**-10
    x = np.array([1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 - 2**-23, 1 + 3 * ulp / 2, 3.4028235e38, -3.4028235e38,
                  np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, 1.0 + 2**-23], np.float32)
    out = np.zeros_like(x)
    runner.launch(SOURCE, "to_tf32", (1,), (32,), 0, [x, out, np.int32(x.size)])
    # 1e-40 is the subnormal 0x000116c2: its 13 low bits 0x16c2 round up to 0x00012000.
    subnormal = np.array([0x00012000], np.uint32).view(np.float32)[0]
    expected = np.array([1 + ulp, -(1 + ulp), 1.0, 1 + 2 * ulp, np.inf, -np.inf, np.inf, -np.inf, np.nan, 0.0, -0.0,
                         subnormal, 1.0], np.float32)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(round_to_tf32(x), expected)
    assert np.signbit(out[10])


# -- planted: misaligned tiles and divergent warps


def test_misaligned_tile_pointer_fails(runner) -> None:
    a = np.ones((16, 16), np.float16)
    with pytest.raises(KernelError, match=re.escape("is not 256-bit (32-byte) aligned")):
        run_gemm(runner, GEMMS[1], a, a, np.zeros((16, 16), np.float32), a_row=True, b_row=False, a_offset=8)


def test_leading_dimension_not_a_multiple_of_16_bytes_fails(runner) -> None:
    a = np.ones((16, 16), np.float16)
    with pytest.raises(KernelError, match=re.escape("leading dimension 20 elements (40 bytes) is not a multiple of 16")):
        run_gemm(runner, GEMMS[1], a, a, np.zeros((16, 16), np.float32), a_row=True, b_row=False, lda=20)


@pytest.mark.parametrize("mode, threads, message", [
    (0, 32, "lane 16 passes pointer"),
    (1, 32, "lanes 0x0000ffff wait in wmma::load_matrix_sync(matrix_a 16x16 __half)"),
    (2, 32, "meets wmma::load_matrix_sync(matrix_"),
    (3, 48, "only lanes 0x0000ffff of the warp exist"),
], ids=["different-pointers", "half-warp-returns", "two-fragment-kinds", "partial-warp"])
def test_divergent_warp_fails(runner, mode: int, threads: int, message: str) -> None:
    a = aligned(np.ones(512, np.float16))
    with pytest.raises(KernelError, match=re.escape(message)):
        runner.launch(SOURCE, "wmma_divergent", (1,), (threads,), 0, [a, np.zeros(threads, np.float32), np.int32(mode)])


def test_converged_warp_passes(runner) -> None:
    """The same kernel with every lane on one pointer (mode 3 in a full warp) runs."""
    a = aligned(np.full(512, 2.0, np.float16))
    d = np.zeros(32, np.float32)
    runner.launch(SOURCE, "wmma_divergent", (1,), (32,), 0, [a, d, np.int32(3)])
    np.testing.assert_array_equal(d, 2.0)


# -- cp.async


def _mirror_sum(runner, stages: int, bug: int, threads: int = 64, tiles: int = 7) -> tuple[np.ndarray, np.ndarray]:
    n = 4 * threads
    x = aligned(np.random.default_rng(8).integers(-9, 10, (tiles, n)).astype(np.float32))
    out = np.zeros(threads, np.float32)
    runner.launch(SOURCE, f"pipelined_mirror_sum<{stages}, {bug}>", (1,), (threads,), stages * n * 4,
                  [x, out, np.int32(tiles)])
    return out, x.sum(axis=0)[::-1][:threads]


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_delivers_every_tile(runner, reversed_runner, stages: int) -> None:
    for r in (runner, reversed_runner):
        out, expected = _mirror_sum(r, stages, bug=0)
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("stages", [2, 3])
def test_missing_wait_in_a_steady_state_iteration_is_caught(runner, reversed_runner, stages: int) -> None:
    """The wait is skipped only for k-tiles past the number of stages: their buffers were used
    before, and the poison written at each issue makes the stale contents unreadable."""
    for r in (runner, reversed_runner):
        out, _ = _mirror_sum(r, stages, bug=1)
        assert np.isnan(out).all()


@pytest.mark.parametrize("stages", [2, 3])
def test_missing_barrier_after_the_wait_is_caught(runner, reversed_runner, stages: int) -> None:
    for r in (runner, reversed_runner):
        out, expected = _mirror_sum(r, stages, bug=2)
        assert np.isnan(out).any() and not np.array_equal(out, expected)


def test_destination_reads_nan_until_the_wait_in_every_iteration(runner) -> None:
    threads, tiles = 32, 5
    x = aligned(np.arange(tiles * threads, dtype=np.float32))
    before = np.zeros(tiles * threads, np.float32)
    after = np.zeros(tiles * threads, np.float32)
    runner.launch(SOURCE, "read_before_wait", (1,), (threads,), threads * 4, [x, before, after, np.int32(tiles)])
    assert np.isnan(before).all()
    np.testing.assert_array_equal(after, x)


def _rules(runner, *, size=16, src_size=16, src_off=0, dst_off=0, cg=True, mode=0) -> np.ndarray:
    src = aligned(np.arange(1, 65, dtype=np.uint8))
    out = aligned(np.zeros(64, np.uint8))
    runner.launch(SOURCE, "cp_async_rules", (1,), (32,), 64,
                  [src, out, np.int32(size), np.int32(src_size), np.int32(src_off), np.int32(dst_off), np.int32(cg),
                   np.int32(mode)])
    return out


def test_cp_async_copies_and_zero_fills(runner) -> None:
    out = _rules(runner, src_off=16, dst_off=32)
    np.testing.assert_array_equal(out[32:48], np.arange(17, 33))
    assert (out[:32] == 0xAB).all() and (out[48:] == 0xAB).all()
    # The zero-fill form reads nothing and writes zeros; a short source zero-fills the rest.
    assert (_rules(runner, src_size=0)[:16] == 0).all()
    partial = _rules(runner, size=8, src_size=3, cg=False, dst_off=8)
    np.testing.assert_array_equal(partial[8:16], [1, 2, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(_rules(runner, size=4, src_size=4, cg=False, src_off=4)[:4], [5, 6, 7, 8])


@pytest.mark.parametrize("operands, message", [
    (dict(size=12, src_size=12, cg=False), "copy size 12 bytes; it must be 4, 8 or 16"),
    (dict(size=8, src_size=8, cg=True), ".cg copies exactly 16 bytes"),
    (dict(size=8, src_size=9, cg=False), "source size 9 exceeds the copy size 8"),
    (dict(dst_off=8), "is not aligned to the copy size 16"),
    (dict(src_off=4), "global source"),
    (dict(size=4, src_size=4, cg=False, src_off=2), "is not aligned to the copy size 4"),
    (dict(dst_off=64), "outside the launch's 64 bytes of dynamic shared memory"),
    (dict(mode=1), "outside the launch's 64 bytes of dynamic shared memory"),
])
def test_cp_async_operand_rules(runner, operands: dict, message: str) -> None:
    with pytest.raises(KernelError, match=re.escape(message)):
        _rules(runner, **operands)
