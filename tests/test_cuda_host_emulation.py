"""Tests of the CUDA-on-CPU emulation (convgrad.cuda_host) with planted kernels.

The kernels live in tests/cuda_host_kernels/.  Each test states what it would catch: a test
of the emulator has to be able to fail, and the planted-bug tests show that the emulator
turns each class of kernel bug (out of bounds, missing barrier, wrong index) into a failure.
"""

from __future__ import annotations

import re
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from convgrad import cuda_host
from convgrad.cuda_host import HostRunner, KernelError

pytestmark = pytest.mark.skipif(
    not cuda_host.compiler_available(),
    reason="the CUDA host emulation needs g++ or clang++ >= 11, and none is installed",
)

KERNELS = Path(__file__).parent / "cuda_host_kernels"

BASICS = [
    "barrier_mirror",
    "dump_then_scribble",
    "planted::two_views",
    "static_tile_sum",
    "grid_coverage<long long>",
    "block_square",
    "block_ticket",
    "params_kernel",
    "four_barriers",
    "shuffle_deadlock",
    "traps",
    "early_exit_barrier",
    "barrier_reductions",
    "planted::reverse_in_shared<double>",
    "planted::reverse_in_shared<int>",
]
WARP = ["warp_ops", "activemask_after_return", "lane_not_in_mask", "mismatched_masks"]
FP16 = ["from_float", "from_double", "to_float", "arithmetic<__half>", "arithmetic<__nv_bfloat16>"]
BUGS = [
    "fill_correct",
    "fill_off_by_one",
    "fill_strided_off_by_one",
    "shared_off_by_one",
    "rotate_with_barrier",
    "rotate_missing_barrier",
    "rotate_right_missing_barrier",
    "correlate_correct",
    "correlate_flipped_index",
]


def make_runner(**kwargs) -> HostRunner:
    runner = HostRunner(KERNELS, **kwargs)
    # One library per file, built (or found in the disk cache) once per runner.
    for source, names in (("basics.cu", BASICS), ("warp.cu", WARP), ("fp16.cu", FP16), ("bugs.cu", BUGS)):
        runner.compile(source, names)
    return runner


@pytest.fixture(scope="module")
def runner() -> HostRunner:
    """Sequential: blocks strictly in order on one OS thread."""
    return make_runner(num_threads=1)


@pytest.fixture(scope="module")
def reversed_runner() -> HostRunner:
    return make_runner(num_threads=1, block_order="reversed", thread_order="reversed")


@pytest.fixture(scope="module")
def parallel_runner() -> HostRunner:
    return make_runner(num_threads=2)


# --- barriers and shared memory -----------------------------------------------------------


@pytest.mark.parametrize("rounds", [1, 4])
def test_barrier_across_1024_threads(runner, reversed_runner, rounds):
    expected = np.arange(1024)
    for _ in range(rounds):
        expected = expected[::-1] + 1
    for r in (runner, reversed_runner):
        out = np.full(1024, -1, np.int32)
        r.launch("basics.cu", "barrier_mirror", (1, 1, 1), (1024, 1, 1), 1024 * 4, [out, np.int32(rounds)])
        np.testing.assert_array_equal(out, expected)


def test_dynamic_shared_memory_is_poisoned_for_every_block(runner):
    nbytes, blocks = 1000, 3
    out = np.zeros(blocks * nbytes, np.uint8)
    runner.launch("basics.cu", "dump_then_scribble", (blocks,), (128,), nbytes, [out, np.int32(nbytes)])
    # Every block, not only the first, starts from 0xFF although the previous one zeroed it.
    assert (out == 0xFF).all()
    assert np.isnan(out.view(np.float32)).all()
    assert np.isnan(out[:992].view(np.float64)).all()


def test_extern_shared_arrays_of_any_name_and_type_share_the_buffer(runner):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    runner.launch("basics.cu", "planted::two_views", (1,), (64,), 64 * 8, [x, out])
    np.testing.assert_array_equal(out, 3 * x[::-1])


@pytest.mark.parametrize("dtype", [np.float64, np.int32])
def test_extern_shared_array_in_templates(runner, dtype):
    x = np.arange(100).astype(dtype)
    out = np.zeros_like(x)
    name = f"planted::reverse_in_shared<{'double' if dtype == np.float64 else 'int'}>"
    runner.launch("basics.cu", name, (1,), (100,), x.nbytes, [x, out])
    np.testing.assert_array_equal(out, x[::-1])


@pytest.mark.parametrize("which", ["sequential", "parallel"])
def test_static_shared_memory_is_block_private(runner, parallel_runner, which):
    r = runner if which == "sequential" else parallel_runner
    rng = np.random.default_rng(1)
    x = rng.integers(-50, 50, size=(16, 128)).astype(np.float32)
    out = np.zeros(16, np.float32)
    r.launch("basics.cu", "static_tile_sum", (16,), (128,), 0, [x, out])
    np.testing.assert_array_equal(out, x.sum(axis=1))


@pytest.mark.parametrize(
    "grid, block", [((1, 1, 1), (8, 4, 2)), ((1, 1, 1), (32, 32, 1)), ((3, 2, 2), (8, 4, 2)), ((5, 1, 1), (7, 1, 1))]
)
def test_grid_coverage(runner, parallel_runner, grid, block):
    nblocks, nthreads = int(np.prod(grid)), int(np.prod(block))
    for r in (runner, parallel_runner):
        ids = np.full(nblocks * nthreads, -1, np.int64)
        coords = np.full((nblocks * nthreads, 6), -1, np.int32)
        r.launch("basics.cu", "grid_coverage<long long>", grid, block, 0, [ids, coords])
        np.testing.assert_array_equal(ids, np.arange(nblocks * nthreads))
        b = np.arange(nblocks).repeat(nthreads)
        t = np.tile(np.arange(nthreads), nblocks)
        expected = np.stack(
            [
                b % grid[0], b // grid[0] % grid[1], b // (grid[0] * grid[1]),
                t % block[0], t // block[0] % block[1], t // (block[0] * block[1]),
            ],
            axis=1,
        )
        np.testing.assert_array_equal(coords, expected)


def test_block_order_changes_only_order_dependent_results(runner, reversed_runner, parallel_runner):
    x = np.arange(32 * 64, dtype=np.float32)
    results = []
    for r in (runner, reversed_runner, parallel_runner):
        out = np.zeros_like(x)
        r.launch("basics.cu", "block_square", (32,), (64,), 0, [x, out])
        results.append(out)
    for out in results:
        assert out.tobytes() == (x * x).tobytes()  # bit-identical in every order

    def tickets(r):
        counter, out = np.zeros(1, np.uint32), np.zeros(32, np.uint32)
        r.launch("basics.cu", "block_ticket", (32,), (64,), 0, [counter, out])
        return out

    np.testing.assert_array_equal(tickets(runner), np.arange(32))
    np.testing.assert_array_equal(tickets(reversed_runner), np.arange(32)[::-1])


def test_early_returning_threads_leave_the_barrier(runner):
    out = np.full(64, -1, np.int32)
    runner.launch("basics.cu", "early_exit_barrier", (1,), (64,), 64 * 4, [out])
    np.testing.assert_array_equal(out[:40], 10 * np.arange(40)[::-1])
    assert (out[40:] == -1).all()


def test_barrier_reductions(runner):
    pred = (np.arange(100) % 3 == 0).astype(np.int32)
    out = np.zeros(3, np.int32)
    runner.launch("basics.cu", "barrier_reductions", (1,), (100,), 0, [pred, out])
    np.testing.assert_array_equal(out, [pred.sum(), 0, 1])
    runner.launch("basics.cu", "barrier_reductions", (1,), (100,), 0, [np.ones(100, np.int32), out])
    np.testing.assert_array_equal(out, [100, 1, 1])


# --- warp intrinsics ------------------------------------------------------------------------


def expected_warp_ops(v: np.ndarray) -> np.ndarray:
    """The results of warp.cu:warp_ops per thread, from the CUDA documentation's semantics."""
    n = len(v)
    poison = -1  # 0xFFFFFFFF: a lane that does not exist

    def value(warp, lane):
        t = warp * 32 + lane
        return int(v[t]) if t < n else poison

    rows = []
    for t in range(n):
        warp, lane = divmod(t, 32)
        lanes = min(32, n - warp * 32)
        row = []
        for m in (1, 2, 4, 8, 16):
            row.append(value(warp, lane ^ m))
        for d in (1, 3, 5):
            row.append(value(warp, lane - d) if lane >= d else int(v[t]))
        for d in (1, 3, 5):
            row.append(value(warp, lane + d) if lane + d < 32 else int(v[t]))
        row.append(value(warp, (lane * 7 + 3) % 32))
        row.append(value(warp, (lane // 16) * 16 + (lane * 7 + 3) % 16))  # width 16 wraps
        row.append(value(warp, lane - 3) if lane % 8 >= 3 else int(v[t]))
        row.append(value(warp, lane + 3) if lane % 8 + 3 < 8 else int(v[t]))
        src = lane ^ 5  # width 4: a later segment reads the own value, an earlier one is fine
        row.append(value(warp, src) if src // 4 <= lane // 4 else int(v[t]))
        ws = v[warp * 32 : warp * 32 + lanes]
        ballot = sum(1 << i for i in range(lanes) if ws[i] % 3 == 0)
        row.append(int(np.uint32(ballot).view(np.int32)))
        row.append(int(bool((ws == 7).any())))
        row.append(int(bool((ws >= 0).all())))
        row.append(int(bool((ws % 2 == 0).all())))
        src_f = value(warp, lane ^ 1)
        row.append(-2 if src_f == poison else src_f * 4 + 1)
        src_d = value(warp, lane + 1) if lane + 1 < 32 else int(v[t])
        row.append(-2 if src_d == poison else src_d * 2 + 1)
        row.append(value(warp, lane ^ 8))
        row.append(int(np.int32(np.uint32(ws.sum() % 2**32))))
        same = sum(1 << i for i in range(lanes) if ws[i] % 4 == v[t] % 4)
        row.append(int(np.int32(np.uint32(same))))
        row.append(int(np.int32(np.uint32((1 << lanes) - 1))))
        rows.append(row)
    return np.array(rows, dtype=np.int64).astype(np.int32)


@pytest.mark.parametrize("threads", [96, 80])
def test_warp_intrinsics_match_the_documented_semantics(runner, reversed_runner, threads):
    rng = np.random.default_rng(threads)
    v = rng.integers(0, 1000, size=threads).astype(np.int32)
    v[5] = 7
    expected = expected_warp_ops(v)
    for r in (runner, reversed_runner):
        out = np.zeros((threads, 26), np.int32)
        r.launch("warp.cu", "warp_ops", (1,), (threads,), 0, [v, out])
        np.testing.assert_array_equal(out, expected)


def test_activemask_after_early_return(runner, reversed_runner):
    v = np.arange(64, dtype=np.int32) * 3
    for r in (runner, reversed_runner):
        out = np.full((64, 2), -7, np.int32)
        r.launch("warp.cu", "activemask_after_return", (1,), (64,), 0, [v, out, np.int32(40)])
        np.testing.assert_array_equal(out[:32], [[-1, v[:32].sum()]] * 32)
        np.testing.assert_array_equal(out[32:40], [[0xFF, v[32:40].sum()]] * 8)
        assert (out[40:] == -7).all()


@pytest.mark.parametrize(
    "source, kernel, block, message",
    [
        ("warp.cu", "lane_not_in_mask", 32, "not in mask"),
        ("warp.cu", "mismatched_masks", 32, "uses mask"),
        ("basics.cu", "shuffle_deadlock", 64, "deadlock"),
        ("basics.cu", "traps", 32, "__trap()"),
    ],
)
def test_misused_intrinsics_fail_the_launch(runner, source, kernel, block, message):
    out = np.zeros(block, np.int32)
    with pytest.raises(KernelError, match=re.escape(message)):
        runner.launch(source, kernel, (2,), (block,), 0, [out])
    # The runner recovers: the next launch on the same fibers works.
    ids = np.zeros(block, np.int64)
    runner.launch("basics.cu", "grid_coverage<long long>", (1,), (block,), 0, [ids, np.zeros((block, 6), np.int32)])
    np.testing.assert_array_equal(ids, np.arange(block))


# --- __half and __nv_bfloat16 ---------------------------------------------------------------


def float32_cases() -> np.ndarray:
    """Random bit patterns plus every half/bfloat16 tie, subnormal and overflow boundary."""
    rng = np.random.default_rng(16)
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)].astype(np.float32)
    bf16 = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
    bf16 = bf16[np.isfinite(bf16)]
    # Midpoints between neighbours of each format (exact in float32) and their neighbours.
    h_sorted = np.unique(halves)
    mid_h = (h_sorted[:-1].astype(np.float64) + h_sorted[1:]) / 2
    b_sorted = np.unique(bf16)
    mid_b = ((b_sorted[:-1].astype(np.float64) + b_sorted[1:]) / 2).astype(np.float32)
    mids = np.concatenate([mid_h.astype(np.float32), mid_b])
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504, 65519.996, 65520, 65536, 1e9,
         2**-24, 2**-25, 2**-25 * 1.0000001, 2**-26, 1e-40, -1e-45, 3.4e38],
        dtype=np.float32,
    )
    return np.concatenate([random_bits.view(np.float32), halves, bf16, mids, near, special])


def assert_same_bits(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Bit-identical where the expectation is a number; any NaN where it is NaN."""
    nan = np.isnan(expected.astype(np.float32))
    assert np.isnan(actual[nan].astype(np.float32)).all(), f"{what}: NaN did not stay NaN"
    bad = np.flatnonzero(actual.view(np.uint16)[~nan] != expected.view(np.uint16)[~nan])
    assert bad.size == 0, f"{what}: {bad.size} values differ, first at {bad[:5]}"


def launch_1d(runner, source, name, args, n):
    runner.launch(source, name, (min(64, (n + 255) // 256),), (256,), 0, [*args, np.int64(n)])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns on inf/NaN casts
def test_float_to_half_and_bfloat16_bit_exact(runner):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = float32_cases()
    out = np.zeros((6, x.size), np.uint16)
    launch_1d(runner, "fp16.cu", "from_float", [x, out], x.size)
    half, bf16 = x.astype(np.float16), x.astype(ml_dtypes.bfloat16)
    for row, name in enumerate(["__float2half", "__float2half_rn", "implicit __half"]):
        assert_same_bits(out[row].view(np.float16), half, name)
    for row, name in enumerate(["__float2bfloat16", "__float2bfloat16_rn", "implicit bf16"], 3):
        assert_same_bits(out[row].view(ml_dtypes.bfloat16), bf16, name)


def round_once_to_bfloat16(x: np.ndarray, ml_dtypes) -> np.ndarray:
    """float64 -> bfloat16 rounded once (ml_dtypes goes through float32, rounding twice).

    Rounding to float32 with round-to-odd keeps a sticky bit, after which the second
    rounding (24 >= 2*8+2 bits) gives the correctly rounded result.
    """
    f = x.astype(np.float32)
    with np.errstate(invalid="ignore"):
        inexact = f.astype(np.float64) != x
    even = (f.view(np.uint32) & 1) == 0
    toward = np.nextafter(f, np.where(x > f, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    f = np.where(inexact & even & ~np.isnan(x), toward, f)
    return f.astype(ml_dtypes.bfloat16)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns on inf/NaN casts
def test_double_to_half_and_bfloat16_round_once(runner):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x32 = float32_cases().astype(np.float64)
    # Nudging a tie by far less than a float32 ulp separates single from double rounding.
    x = np.concatenate([x32, x32 + np.abs(x32) * 2**-40, x32 - np.abs(x32) * 2**-40])
    out = np.zeros((2, x.size), np.uint16)
    launch_1d(runner, "fp16.cu", "from_double", [x, out], x.size)
    assert_same_bits(out[0].view(np.float16), x.astype(np.float16), "__double2half")
    assert_same_bits(out[1].view(ml_dtypes.bfloat16), round_once_to_bfloat16(x, ml_dtypes), "__double2bfloat16")
    tie = np.array([1.0 + 2**-8 + 2**-40])  # just above a bfloat16 tie
    assert round_once_to_bfloat16(tie, ml_dtypes).view(np.uint16)[0] == 0x3F81


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns on inf/NaN casts
def test_half_and_bfloat16_to_float_all_patterns(runner):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.arange(2**16, dtype=np.uint16)
    out = np.zeros((4, bits.size), np.float32)
    launch_1d(runner, "fp16.cu", "to_float", [bits, out], bits.size)
    expected_h = bits.view(np.float16).astype(np.float32)
    expected_b = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    for row, expected in ((0, expected_h), (1, expected_h), (2, expected_b), (3, expected_b)):
        assert out[row].tobytes() == expected.tobytes(), f"row {row}"  # NaN payloads included


def correctly_rounded(values: list[Fraction], dtype) -> np.ndarray:
    """Bit patterns of `values` rounded to nearest-even in a 2-byte `dtype`, exactly."""
    bits = np.arange(2**16, dtype=np.uint16)
    numbers = bits.view(dtype).astype(np.float64)
    finite = np.isfinite(numbers)
    order = np.argsort(numbers[finite], kind="stable")
    sorted_numbers, sorted_bits = numbers[finite][order], bits[finite][order]
    result = []
    for value in values:
        i = int(np.searchsorted(sorted_numbers, float(value)))
        nearby = range(max(i - 2, 0), min(i + 2, sorted_numbers.size))
        best = min(nearby, key=lambda j: (abs(Fraction(sorted_numbers[j]) - value), int(sorted_bits[j]) & 1))
        result.append(sorted_bits[best])
    return np.array(result, np.uint16)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("type_name", ["__half", "__nv_bfloat16"])
def test_half_and_bfloat16_arithmetic(runner, type_name):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.float16 if type_name == "__half" else ml_dtypes.bfloat16
    rng = np.random.default_rng(2)
    n = 4000
    scale = 64.0 if type_name == "__half" else 1e10
    a, b = (rng.standard_normal(n) * scale).astype(dtype), (rng.standard_normal(n) * 4).astype(dtype)
    # c spans tiny to large so that a*b+c exercises sticky bits far below a*b's last place.
    c = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 8, n))).astype(dtype)
    out = np.zeros((5, n), dtype)
    launch_1d(runner, "fp16.cu", f"arithmetic<{type_name}>", [a, b, c, out], n)
    # NumPy and ml_dtypes compute in float32 and round once: correctly rounded, like the GPU.
    for row, expected in enumerate([a + b, a - b, a * b, a / b]):
        assert_same_bits(out[row], expected.astype(dtype), f"{type_name} op {row}")
    picked = np.arange(0, n, 4)
    exact = [Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i])) for i in picked]
    nonzero = np.array([value != 0 for value in exact])  # the sign of an exact zero is no test
    expected = correctly_rounded([v for v, keep in zip(exact, nonzero) if keep], dtype)
    np.testing.assert_array_equal(out[4, picked[nonzero]].view(np.uint16), expected)


# --- planted bugs ---------------------------------------------------------------------------

SANITIZED_CHILD = textwrap.dedent(
    """
    import ctypes
    import sys
    import numpy as np
    from convgrad.cuda_host import HostRunner, asan_runtime_loaded, place_tight

    kernel_dir, mode = sys.argv[1], sys.argv[2]
    assert asan_runtime_loaded()
    runner = HostRunner(kernel_dir)  # sanitize comes from CONVGRAD_CUDA_HOST_SANITIZE
    assert runner.sanitize
    runner.compile("bugs.cu", {names!r})
    n = 1000
    out = place_tight(np.zeros(n, np.float32))
    runner.launch("bugs.cu", "fill_correct", (4,), (256,), 0, [out, np.int32(n)])
    assert (out == np.arange(n)).all()
    # Blocks of growing size remap the fiber stacks; what was mapped there before must leave
    # no stale ASan state behind for the memory that takes its place (the churn below).
    for threads in (32, 256, 1024):
        x = place_tight(np.arange(2 * threads, dtype=np.float32))
        y = place_tight(np.zeros(2 * threads, np.float32))
        runner.launch("bugs.cu", "rotate_with_barrier", (2,), (threads,), threads * 4, [x, y])
        assert (y.reshape(2, -1) == np.roll(x.reshape(2, -1), -1, axis=1)).all()
    churn = []
    for i in range(12):
        churn.append(np.ones(1 << 20, np.uint8))
        ctypes.memset(churn[-1].ctypes.data, 0, churn[-1].nbytes)
        churn.append([dict(key=j) for j in range(20000)])
    del churn
    print("CORRECT KERNELS PASSED", flush=True)
    if mode == "contiguous":
        runner.launch("bugs.cu", "fill_off_by_one", (4,), (256,), 0, [out, np.int32(n)])
    elif mode == "view":
        view = place_tight(np.zeros(40, np.float32)[::3][:10])
        runner.launch("bugs.cu", "fill_strided_off_by_one", (1,), (32,), 0, [view, np.int64(10), np.int64(3)])
    elif mode == "shared":
        runner.launch("bugs.cu", "shared_off_by_one", (1,), (64,), 64 * 4, [np.zeros(64, np.float32)])
    print("BUG NOT DETECTED", flush=True)
    """
).format(names=BUGS)


@pytest.mark.parametrize("mode", ["contiguous", "view", "shared"])
def test_sanitizer_reports_out_of_bounds_access(tmp_path, mode):
    try:
        cuda_host.sanitizer_env()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    script = tmp_path / "child.py"
    script.write_text(SANITIZED_CHILD)
    result = cuda_host.run_sanitized([sys.executable, str(script), str(KERNELS), mode], timeout=300)
    # The correct kernels ran clean under the sanitizer: the check is not vacuous...
    assert "CORRECT KERNELS PASSED" in result.stdout, result.stderr[-4000:]
    # ...and the planted one-past-the-end access stopped the child with an ASan report.
    assert "BUG NOT DETECTED" not in result.stdout
    assert result.returncode != 0
    assert "AddressSanitizer" in result.stderr, result.stderr[-4000:]
    expected = "use-after-poison" if mode == "shared" else "heap-buffer-overflow"
    assert expected in result.stderr, result.stderr[-4000:]


def test_missing_barrier_reads_nan_every_time(runner, reversed_runner):
    g, n = 4, 128
    x = np.arange(g * n, dtype=np.float32).reshape(g, n)
    good = np.zeros_like(x)
    runner.launch("bugs.cu", "rotate_with_barrier", (g,), (n,), n * 4, [x, good])
    np.testing.assert_array_equal(good, np.roll(x, -1, axis=1))
    for _ in range(5):
        bad = np.zeros_like(x)
        runner.launch("bugs.cu", "rotate_missing_barrier", (g,), (n,), n * 4, [x, bad])
        # Thread t reads slot t+1 before thread t+1 has run: NaN, except the wrap-around read.
        assert np.isnan(bad[:, :-1]).all()
        np.testing.assert_array_equal(bad[:, -1], x[:, 0])
    # Reading behind (slot t-1) is caught in reversed thread order, and at t = 0 in forward.
    fwd, rev = np.zeros_like(x), np.zeros_like(x)
    runner.launch("bugs.cu", "rotate_right_missing_barrier", (g,), (n,), n * 4, [x, fwd])
    reversed_runner.launch("bugs.cu", "rotate_right_missing_barrier", (g,), (n,), n * 4, [x, rev])
    assert np.isnan(fwd[:, 0]).all() and not np.isnan(fwd[:, 1:]).any()
    assert np.isnan(rev[:, 1:]).all()


def test_wrong_index_differs_from_reference(runner):
    rng = np.random.default_rng(3)
    x = rng.integers(-8, 8, 300).astype(np.float32)
    w = rng.integers(-4, 4, 7).astype(np.float32)
    m = x.size - w.size + 1
    args = lambda y: [x, w, y, np.int32(x.size), np.int32(w.size)]  # noqa: E731
    good, bad = np.zeros(m, np.float32), np.zeros(m, np.float32)
    runner.launch("bugs.cu", "correlate_correct", (2,), (256,), 0, args(good))
    runner.launch("bugs.cu", "correlate_flipped_index", (2,), (256,), 0, args(bad))
    reference = np.correlate(x, w, mode="valid")
    np.testing.assert_array_equal(good, reference)
    assert not np.array_equal(bad, reference)
    np.testing.assert_array_equal(bad, np.convolve(x, w, mode="valid"))  # exactly the planted bug


# --- arguments, configuration, cache, speed -----------------------------------------------------


def test_arguments_are_passed_exactly(runner):
    params_dtype = np.dtype([("n", np.int64), ("scale", np.int32), ("offset", np.float32), ("weight", np.float64)], align=True)
    assert params_dtype.itemsize == 24
    params = np.zeros((), params_dtype)
    params["n"], params["scale"], params["offset"], params["weight"] = 20, 3, 0.5, 0.25
    base = np.arange(40, dtype=np.float32)
    x = base[::2]  # a view is passed as a pointer to its first element; strides are not passed
    for maybe, extra in ((None, 0.0), (np.zeros(1, np.float32), 1000.0)):
        out = np.zeros(32, np.float32)
        runner.launch(
            "basics.cu", "params_kernel", (1,), (32,), 0,
            [params[()], x, maybe, out, np.int16(-7), np.uint8(200)],
        )
        np.testing.assert_array_equal(out[:20], base[:20] * 3 + 0.5 + 0.25 - 7 + 200 + extra)
        assert (out[20:] == 0).all()


def test_bad_launches_are_rejected(runner):
    out = np.zeros(64, np.float32)
    args = [out, np.int32(64)]
    for grid, block in [((0,), (32,)), ((1,), (1025,)), ((1,), (32, 32, 2)), ((1,), (0,)), ((1, 70000), (32,))]:
        with pytest.raises(ValueError):
            runner.launch("bugs.cu", "fill_correct", grid, block, 0, args)
    with pytest.raises(ValueError, match="shared_mem"):
        runner.launch("bugs.cu", "fill_correct", (1,), (32,), 300 * 1024, args)
    with pytest.raises(TypeError, match="NumPy scalar"):
        runner.launch("bugs.cu", "fill_correct", (1,), (32,), 0, [out, 64])
    with pytest.raises(TypeError, match="4 bytes, the argument 8"):
        runner.launch("bugs.cu", "fill_correct", (1,), (32,), 0, [out, np.int64(64)])
    with pytest.raises(TypeError, match="takes 2 arguments, 1 given"):
        runner.launch("bugs.cu", "fill_correct", (1,), (32,), 0, [out])
    with pytest.raises(TypeError, match="is a value, but an array"):
        runner.launch("bugs.cu", "fill_correct", (1,), (32,), 0, [out, out])
    with pytest.raises(ValueError, match="name expression"):
        runner.launch("bugs.cu", "fill_correct; int x", (1,), (32,), 0, args)
    assert (out == 0).all()  # nothing ran


def test_compile_errors_and_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVGRAD_CACHE_DIR", str(tmp_path / "cache"))
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "k.cuh").write_text("#define SCALE 2\n")
    (kernels / "k.cu").write_text('#include "k.cuh"\n__global__ void scale(int* p) { p[threadIdx.x] *= SCALE; }\n')
    (kernels / "broken.cu").write_text("__global__ void broken(int* p) { p[threadIdx.x] = undeclared; }\n")
    with pytest.raises(cuda_host.CompileError, match="undeclared"):
        HostRunner(kernels).compile("broken.cu", ["broken"])
    with pytest.raises(cuda_host.CompileError, match="no_such_kernel"):
        HostRunner(kernels).compile("k.cu", ["no_such_kernel"])

    def run() -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        r = HostRunner(kernels)
        r.compile("k.cu", ["scale"])
        elapsed = time.perf_counter() - start
        p = np.arange(8, dtype=np.int32)
        r.launch("k.cu", "scale", (1,), (8,), 0, [p])
        return p, elapsed

    first, _ = run()
    libraries = sorted((tmp_path / "cache" / "cuda_host").glob("*.so"))
    assert len(libraries) == 1
    again, cached_time = run()
    assert sorted((tmp_path / "cache" / "cuda_host").glob("*.so")) == libraries  # a cache hit
    assert cached_time < 0.5
    np.testing.assert_array_equal(first, 2 * np.arange(8))
    np.testing.assert_array_equal(again, first)
    # Editing an included header is a different build.
    (kernels / "k.cuh").write_text("#define SCALE 3\n")
    changed, _ = run()
    np.testing.assert_array_equal(changed, 3 * np.arange(8))
    assert len(list((tmp_path / "cache" / "cuda_host").glob("*.so"))) == 2


def test_launch_speed(runner, parallel_runner):
    """64 blocks x 256 threads x 4 barriers: the emulator's per-switch cost stays small."""
    out = np.zeros(64 * 256, np.float32)
    timings = {}
    for name, r in (("1 thread", runner), ("2 threads", parallel_runner)):
        r.launch("basics.cu", "four_barriers", (64,), (256,), 256 * 4, [out])  # warm
        start = time.perf_counter()
        for _ in range(5):
            r.launch("basics.cu", "four_barriers", (64,), (256,), 256 * 4, [out])
        timings[name] = (time.perf_counter() - start) / 5
    t = np.arange(256)
    v = (t[None, :] + np.arange(64)[:, None]).astype(np.float32)
    for _ in range(2):
        v = v + np.roll(v, -1, axis=1)
    np.testing.assert_array_equal(out, v.ravel())
    print(f"four_barriers 64x256: {timings}")
    assert timings["1 thread"] < 1.0


def test_place_tight_keeps_layout_and_values():
    base = np.arange(60, dtype=np.float64).reshape(6, 10)
    for view in (base, base[1:5, ::3], base[::-1, 2:7], base.T, base[:0]):
        copy = cuda_host.place_tight(view)
        np.testing.assert_array_equal(copy, view)
        assert copy.dtype == view.dtype
        if view.size:
            assert copy.strides == view.strides
            span = copy.base.nbytes if copy.base is not None else copy.nbytes
            low = sum((n - 1) * s for n, s in zip(view.shape, view.strides) if s < 0)
            high = sum((n - 1) * s for n, s in zip(view.shape, view.strides) if s > 0)
            assert span == high - low + view.itemsize  # no slack on either side
