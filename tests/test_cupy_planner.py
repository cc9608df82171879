"""The ``cupy``/``cupy-host`` planner, in pure Python: grids, tiles, phases and split-K slices.

The kernels decode ``blockIdx.x`` into (tile along M, tile along N, phase, group, slice)
and each thread takes a register block of the tile; ``describe_block`` and
``dgrad_phase_axis`` mirror that decode, and these tests check over many geometries that
the launches write every output exactly once, that dgrad's stride phases visit exactly the
(input position, tap) pairs of the definition, and that split-K slices cover the reduction
exactly once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

import convgrad
from convgrad.backends.cupy_backend import matmul_1x1
from convgrad.backends.cupy_planner import (
    EPILOGUE_ATOMIC,
    EPILOGUE_STORE,
    EPILOGUE_WORKSPACE,
    MAX_GRID,
    PARAM_DTYPE,
    Planner,
    describe_block,
    dgrad_phase_axis,
    fast_divisor,
    phase_digits,
    wave_efficiency,
)
from convgrad.kernel_catalog import LARGE_TILES, NARROW_TILES, SMALL_TILE, gemm_tiles
from convgrad.problem import conv_problem, transposed_problem
from convgrad.testing import reference_forward


def _problem(ndim, N, C, K, spatial, kernel, stride=1, padding=0, dilation=1, groups=1, dtype="float32"):
    return conv_problem("conv", ndim, (N, C, *spatial), (K, C // groups, *kernel), stride, padding, dilation, groups,
                        dtype=dtype)


HAND_PICKED = [
    _problem(2, 2, 3, 8, (7, 9), (5, 5), 2, 1),
    _problem(2, 2, 5, 7, (6, 6), (1, 1)),
    _problem(2, 1, 2, 3, (11, 10), (6, 5), padding=((1, 2), (0, 3))),
    _problem(2, 2, 3, 4, (13, 11), (3, 3), 3, 2, 2),
    _problem(2, 2, 3, 2, (8, 7), (3, 2), (2, 3), (1, 0), (1, 2)),
    _problem(2, 2, 6, 4, (8, 8), (3, 3), padding=1, groups=2),
    _problem(2, 2, 3, 4, (9, 9), (1, 1), stride=3),
    _problem(2, 2, 3, 4, (9, 10), (3, 3), stride=2, dilation=2, padding=2),
    _problem(2, 2, 17, 33, (9, 9), (3, 3), padding=1),
    _problem(2, 2, 5, 72, (16, 16), (3, 3), padding=1),
    _problem(2, 2, 64, 72, (12, 12), (3, 3), padding=1),
    _problem(1, 2, 4, 4, (19,), (3,), padding=((3, 1),), dilation=3, groups=2),
    _problem(3, 2, 4, 4, (6, 5, 4), (2, 3, 3), (1, 2, 1), (0, 1, 1), (2, 1, 1), 2),
    _problem(3, 1, 2, 3, (5, 5, 3), (3, 3, 2), padding=1, dtype="float64"),
    _problem(2, 2, 4, 4, (32, 32), (3, 3), padding=1),
    _problem(2, 3, 6, 4, (5, 7), (2, 2), stride=(3, 2), dilation=(2, 3), padding=((2, 0), (1, 3)), groups=2),
    transposed_problem("conv_transpose2d", 2, (2, 4, 5, 5), (4, 3, 3, 3), 2, 1, 1, 1, 1, dtype="float32"),
    transposed_problem("conv_transpose2d", 2, (2, 4, 4, 5), (4, 3, 4, 3), (2, 3), (1, 0), (0, 2), 2, 1,
                       dtype="float32"),
    transposed_problem("conv_transpose1d", 1, (2, 4, 7), (4, 1, 3), 3, 1, 2, 2, 2, dtype="float16"),
]


def _random_problems(count: int, seed: int = 7) -> list:
    rng = np.random.default_rng(seed)
    problems = []
    while len(problems) < count:
        ndim = int(rng.integers(1, 4))
        groups = int(rng.integers(1, 4))
        C, K = groups * int(rng.integers(1, 5)), groups * int(rng.integers(1, 5))
        kernel = tuple(int(k) for k in rng.integers(1, 5, ndim))
        stride = tuple(int(s) for s in rng.integers(1, 4, ndim))
        dilation = tuple(int(d) for d in rng.integers(1, 4, ndim))
        padding = tuple((int(a), int(b)) for a, b in rng.integers(0, 3, (ndim, 2)))
        spatial = tuple(int(n) for n in rng.integers(1, 12, ndim))
        try:
            problems.append(_problem(ndim, int(rng.integers(1, 3)), C, K, spatial, kernel, stride, padding,
                                     dilation, groups))
        except ValueError:  # a kernel wider than the padded input: draw again
            continue
    return problems


PROBLEMS = HAND_PICKED + _random_problems(60)
GEMM_PROBLEMS = [p for p in PROBLEMS if not p.is_depthwise]


def _ids(problems):
    return [f"{p.name('fprop').replace('_fprop', '')}_{i}" for i, p in enumerate(problems)]


def _decode(m: int, extents) -> tuple[int, ...]:
    """m -> (n, i0, i1, i2) with i2 fastest, as the kernels decode a GEMM row."""
    coords = []
    for extent in reversed(extents):
        coords.append(m % extent)
        m //= extent
    return (m, *reversed(coords))


def fragment_index(extent: int, per_thread: int, coord: int, i: int) -> int:
    """Mirror of fragment_index in kernels/gemm_tile.cuh."""
    return (i // 4) * (extent // (per_thread // 4)) + coord * 4 + i % 4


ALL_TILES = sorted({tile for dtype in ("float32", "float64") for tile in gemm_tiles(dtype)}, key=str)


@pytest.mark.parametrize("tile", ALL_TILES, ids=str)
def test_register_blocks_cover_the_tile_once(tile) -> None:
    counts = np.zeros((tile.BM, tile.BN), int)
    threads_n = tile.BN // tile.TN
    for tid in range(tile.threads):
        ty, tx = tid // threads_n, tid % threads_n
        for i, j in itertools.product(range(tile.TM), range(tile.TN)):
            counts[fragment_index(tile.BM, tile.TM, ty, i), fragment_index(tile.BN, tile.TN, tx, j)] += 1
    assert (counts == 1).all()


def _gather_a_slots(tile, blocked: bool):
    """(lane, row) of each A element each thread stages (mirrors GatherLoader)."""
    per_row = tile.threads // tile.BM
    ea = tile.a_per_thread
    for tid in range(tile.threads):
        if blocked:
            row, first, step = tid // per_row, (tid % per_row) * ea, 1
        else:
            row, first, step = tid % tile.BM, tid // tile.BM, per_row
        for i in range(ea):
            yield first + i * step, row


def _gather_b_slots(tile):
    """(lane, column) of each B element (mirrors GatherLoader: packed or direct)."""
    eb = tile.b_per_thread
    for tid in range(tile.threads):
        if tile.packed_b:
            lane, col = tid // (tile.BN // eb), (tid % (tile.BN // eb)) * eb
            yield from ((lane, col + j) for j in range(eb))
        else:
            per_col = tile.threads // tile.BN
            yield from ((tid // tile.BN + i * per_col, tid % tile.BN) for i in range(eb))


def _wgrad_slots(tile, kfast: bool):
    """(lane, row) of each A element, which is also B's (lane, column) (mirrors WgradLoader)."""
    for tid in range(tile.threads):
        for i in range(tile.a_per_thread):
            if kfast:
                yield tid % tile.BK, tid // tile.BK + i * (tile.threads // tile.BK)
            else:
                yield (tid // tile.BM) * tile.a_per_thread + i, tid % tile.BM


@pytest.mark.parametrize("tile", ALL_TILES, ids=str)
def test_staging_fills_every_shared_slot_once(tile) -> None:
    """Each step, the threads' staged A and B elements fill both shared-memory tiles exactly once."""
    layouts = [(tile.BM, list(_gather_a_slots(tile, blocked))) for blocked in (False, True)]
    layouts.append((tile.BN, list(_gather_b_slots(tile))))
    layouts += [(tile.BM, list(_wgrad_slots(tile, kfast))) for kfast in (True, False)]
    for rows, slots in layouts:
        counts = np.zeros((tile.BK, rows), int)
        for lane, row in slots:
            counts[lane, row] += 1
        assert (counts == 1).all()


@pytest.mark.parametrize("split", (False, True), ids=("whole", "split"))
@pytest.mark.parametrize("problem", GEMM_PROBLEMS, ids=_ids(GEMM_PROBLEMS))
def test_fprop_grid_writes_every_output_once(problem, split: bool) -> None:
    plan = (Planner(splits=3) if split else Planner()).plan(problem, "fprop")
    launch = plan.main
    tile = plan.tile
    assert launch.block == (tile.threads, 1, 1) and launch.shared_mem == tile.shared_bytes(problem.dtype)
    counts = np.zeros((plan.splits, problem.N, problem.K, *problem.output_size), int)
    rows, Kg = problem.N * math.prod(problem.output_size), problem.K_per_group
    for block in range(launch.grid[0]):
        d = describe_block(launch, block)
        assert d["phase"] == 0 and d["group"] < problem.G and d["slice"] < plan.splits
        for m in range(d["tile_m"] * tile.BM, min(rows, (d["tile_m"] + 1) * tile.BM)):
            n, z, p, q = _decode(m, problem.output_size)
            for col in range(d["tile_n"] * tile.BN, min(Kg, (d["tile_n"] + 1) * tile.BN)):
                counts[d["slice"], n, d["group"] * Kg + col, z, p, q] += 1
    assert (counts == 1).all()
    _check_split_epilogue(plan, problem, "fprop")


def _check_split_epilogue(plan, problem, pass_: str) -> None:
    """A split fprop/dgrad writes slices to the workspace and adds them into the output in order."""
    p = plan.main.params
    if plan.splits == 1:
        assert int(p["epilogue"]) == EPILOGUE_STORE and plan.workspace is None
        assert plan.launches[-1] is plan.main
        return
    outputs = problem.N * (problem.K * math.prod(problem.output_size) if pass_ == "fprop"
                           else problem.C * math.prod(problem.input_size))
    assert int(p["epilogue"]) == EPILOGUE_WORKSPACE and int(p["ws_slice_stride"]) == outputs
    assert plan.workspace.elements == plan.splits * outputs and not plan.workspace.zeroed
    reduce = plan.launches[-1]
    assert "splitk_reduce" in reduce.kernel and int(reduce.params["splits"]) == plan.splits
    assert reduce.args == ("workspace", "bias", "y" if pass_ == "fprop" else "x")
    assert int(reduce.params["total"]) == outputs == math.prod(reduce.params["out_shape"])


def _slices_cover_steps(launch, steps_per_phase) -> None:
    """Slices [s*split_len, (s+1)*split_len) clipped to each phase's steps cover them once."""
    p = launch.params
    split_len, splits = int(p["split_len"]), int(p["splits"])
    for steps in steps_per_phase:
        covered = np.zeros(steps, int)
        for s in range(splits):
            covered[s * split_len:min(steps, (s + 1) * split_len)] += 1
        assert (covered == 1).all()


@pytest.mark.parametrize("split", (False, True), ids=("whole", "split"))
@pytest.mark.parametrize("problem", GEMM_PROBLEMS, ids=_ids(GEMM_PROBLEMS))
def test_dgrad_phases_write_every_input_position_once(problem, split: bool) -> None:
    plan = (Planner(splits=3) if split else Planner()).plan(problem, "dgrad")
    launch = plan.main
    tile = plan.tile
    assert int(launch.params["phases"]) == math.prod(problem.stride)
    counts = np.zeros((plan.splits, problem.N, problem.C, *problem.input_size), int)
    Cg = problem.C_per_group
    steps_per_phase = []
    for phase in range(int(launch.params["phases"])):
        axes = [dgrad_phase_axis(problem, a, phi) for a, phi in enumerate(phase_digits(problem, phase))]
        taps = math.prod(ax["tap_count"] for ax in axes)
        steps_per_phase.append(taps * -(-problem.K_per_group // tile.BK) if not int(launch.params["red_packed"])
                               else -(-taps * problem.K_per_group // tile.BK))
    _slices_cover_steps(launch, steps_per_phase)
    for block in range(launch.grid[0]):
        d = describe_block(launch, block)
        axes = [dgrad_phase_axis(problem, a, phi) for a, phi in enumerate(phase_digits(problem, d["phase"]))]
        extents = [ax["rows"] for ax in axes]
        rows = problem.N * math.prod(extents)
        for m in range(d["tile_m"] * tile.BM, min(rows, (d["tile_m"] + 1) * tile.BM)):
            n, *index = _decode(m, extents)
            position = [ax["d0"] + i * s for ax, i, s in zip(axes, index, problem.stride)]
            for col in range(d["tile_n"] * tile.BN, min(Cg, (d["tile_n"] + 1) * tile.BN)):
                counts[(d["slice"], n, d["group"] * Cg + col, *position)] += 1
    assert (counts == 1).all()
    _check_split_epilogue(plan, problem, "dgrad")


@pytest.mark.parametrize("problem", PROBLEMS, ids=_ids(PROBLEMS))
def test_dgrad_phases_visit_exactly_the_contributing_taps(problem) -> None:
    """Per axis: the (input position, tap) pairs a phase visits, with the output index the kernel
    computes (i + off_first + u*off_step), are exactly those with d = z*s - pad + t*dil, 0 <= z < Z."""
    for axis in range(3):
        s, dil, pad = problem.stride[axis], problem.dilation[axis], problem.pad_before[axis]
        Z, T = problem.output_size[axis], problem.kernel_size[axis]
        expected = {(z * s - pad + t * dil, t, z) for z in range(Z) for t in range(T)
                    if 0 <= z * s - pad + t * dil < problem.input_size[axis]}
        visited = []
        for phi in range(s):
            ax = dgrad_phase_axis(problem, axis, phi)
            off_first = (ax["d0"] + pad - ax["tap_first"] * dil) // s
            assert (ax["d0"] + pad - ax["tap_first"] * dil) % s == 0 or ax["tap_count"] == 0
            off_step = -(ax["tap_step"] * dil) // s
            assert (ax["tap_step"] * dil) % s == 0
            for i in range(ax["rows"]):
                d = ax["d0"] + i * s
                assert (d + pad) % s == phi
                for u in range(ax["tap_count"]):
                    t = ax["tap_first"] + u * ax["tap_step"]
                    z = i + off_first + u * off_step
                    if 0 <= z < Z:
                        visited.append((d, t, z))
            taps = {ax["tap_first"] + u * ax["tap_step"] for u in range(ax["tap_count"])}
            assert taps == {t for t in range(T) if (t * dil - phi) % s == 0}
        assert len(visited) == len(set(visited)) and set(visited) == expected


#: With deterministic=False a split wgrad adds its slices atomically instead.
WGRAD_PROBLEMS = GEMM_PROBLEMS + [p.with_options(deterministic=False) for p in GEMM_PROBLEMS[:20]]


@pytest.mark.parametrize("min_split_len", (8, 512))  # 8 splits nearly everything
@pytest.mark.parametrize("problem", WGRAD_PROBLEMS, ids=_ids(WGRAD_PROBLEMS))
def test_wgrad_slices_cover_the_reduction_once_and_tiles_cover_dw(problem, min_split_len: int) -> None:
    planner = Planner(min_split_len=min_split_len)
    plan = planner.plan(problem, "wgrad")
    launch = plan.launches[0]
    tile = plan.tile
    p = launch.params
    reduction = problem.gemm_reduction["wgrad"]
    splits, split_len = int(p["splits"]), int(p["split_len"])
    assert splits == plan.splits >= 1 and split_len % tile.BK == 0
    covered = np.zeros(reduction, int)
    for s in range(splits):
        begin, end = s * split_len, min(reduction, (s + 1) * split_len)
        assert begin < end, "every slice has work"
        covered[begin:end] += 1
    assert (covered == 1).all()

    cols = problem.C_per_group * math.prod(problem.kernel_size)
    counts = np.zeros((splits, problem.K, cols), int)
    for block in range(launch.grid[0]):
        d = describe_block(launch, block)
        for k in range(d["tile_m"] * tile.BM, min(problem.K_per_group, (d["tile_m"] + 1) * tile.BM)):
            for col in range(d["tile_n"] * tile.BN, min(cols, (d["tile_n"] + 1) * tile.BN)):
                counts[d["slice"], d["group"] * problem.K_per_group + k, col] += 1
    assert (counts == 1).all()

    if splits == 1:
        assert int(p["epilogue"]) == EPILOGUE_STORE and plan.workspace is None and len(plan.launches) == 1
    else:
        reduce = plan.launches[1]
        assert reduce.args == ("workspace", "bias", "w")
        assert int(reduce.params["total"]) == problem.K * cols
        assert tuple(reduce.params["out_shape"]) == (problem.K, problem.C_per_group, *problem.kernel_size)
        if problem.deterministic:
            assert int(p["epilogue"]) == EPILOGUE_WORKSPACE
            assert plan.workspace.elements == splits * problem.K * cols and not plan.workspace.zeroed
            assert int(reduce.params["splits"]) == splits
        else:
            assert int(p["epilogue"]) == EPILOGUE_ATOMIC
            assert plan.workspace.elements == problem.K * cols and plan.workspace.zeroed
            assert int(reduce.params["splits"]) == 1


def test_split_k_really_splits_long_reductions() -> None:
    problem = _problem(2, 2, 4, 4, (32, 32), (3, 3), padding=1)
    plan = Planner().plan(problem, "wgrad")
    assert plan.splits > 1
    with convgrad.config(workspace_mb=1):
        capped = Planner(min_split_len=8, max_splits=10**6).plan(problem, "wgrad")
    assert capped.workspace.elements * 4 <= 2**20


def _elementwise_visits(launch, total: int) -> np.ndarray:
    """Flat indices a grid-stride loop visits (mirrors the elementwise kernels)."""
    threads = launch.grid[0] * launch.block[0]
    counts = np.zeros(total, int)
    for start in range(threads):
        counts[start:total:threads] += 1
    return counts


DEPTHWISE = [
    _problem(2, 2, 4, 4, (7, 7), (3, 3), padding=1, groups=4),
    _problem(2, 2, 3, 9, (10, 11), (3, 3), stride=(2, 3), dilation=2, padding=2, groups=3),
    _problem(1, 3, 5, 10, (40,), (5,), stride=2, groups=5),
    _problem(2, 2, 3, 3, (64, 64), (3, 3), padding=1, groups=3),
    _problem(3, 1, 2, 4, (4, 5, 6), (2, 2, 3), groups=2),
]


@pytest.mark.parametrize("problem", DEPTHWISE, ids=_ids(DEPTHWISE))
def test_depthwise_plans_cover_every_output(problem) -> None:
    planner = Planner(depthwise_min_split_len=256)
    fprop = planner.plan(problem, "fprop").launches[0]
    assert "depthwise_fprop" in fprop.kernel
    total = problem.N * problem.K * math.prod(problem.output_size)
    assert int(fprop.params["total"]) == total and (_elementwise_visits(fprop, total) == 1).all()
    dgrad = planner.plan(problem, "dgrad").launches[0]
    total = problem.N * problem.C * math.prod(problem.input_size)
    assert int(dgrad.params["total"]) == total and (_elementwise_visits(dgrad, total) == 1).all()
    plan = planner.plan(problem, "wgrad")
    wgrad = plan.launches[0]
    outputs = problem.K * math.prod(problem.kernel_size)
    assert wgrad.grid[0] == outputs * plan.splits and wgrad.block[0] % 32 == 0
    assert wgrad.shared_mem == wgrad.block[0] // 32 * 4
    reduction = problem.gemm_reduction["wgrad"]
    split_len = int(wgrad.params["split_len"])
    covered = np.zeros(reduction, int)
    for s in range(plan.splits):
        covered[s * split_len:min(reduction, (s + 1) * split_len)] += 1
    assert (covered == 1).all()


def test_params_carry_the_problem() -> None:
    problem = _problem(2, 2, 6, 4, (8, 7), (3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2), 2)
    problem = problem.with_strides((336, 56, 0, 7, 1), (6, 6, 0, 2, 1), (100, 25, 0, 5, 1))
    launch = Planner().plan(problem, "fprop").launches[0]
    p = launch.params
    assert isinstance(p, np.void) and p.dtype == PARAM_DTYPE
    assert (int(p["N"]), int(p["C"]), int(p["K"]), int(p["G"]), int(p["Cg"]), int(p["Kg"])) == (2, 6, 4, 2, 3, 2)
    assert tuple(p["in_size"]) == (1, 8, 7) and tuple(p["kernel_size"]) == (1, 3, 2)
    assert tuple(p["out_size"]) == problem.output_size
    assert tuple(p["stride"]) == (1, 2, 1) and tuple(p["dilation"]) == (1, 1, 2) and tuple(p["pad"]) == (0, 1, 2)
    assert tuple(p["x_stride"]) == (336, 56, 0, 7, 1) and tuple(p["y_stride"]) == (100, 25, 0, 5, 1)
    assert tuple(p["tap_step"]) == (1, 2, 1)


def test_tile_choice() -> None:
    """The small tile for small GEMMs, the 64-wide tile where the GEMM is 64 wide, the large one otherwise."""
    planner = Planner()
    assert planner.plan(_problem(2, 2, 3, 4, (7, 9), (3, 3)), "fprop").tile == SMALL_TILE
    # K = 64: a 128-wide tile would spend half its multiply-adds on padding.
    narrow = _problem(2, 32, 64, 64, (56, 56), (3, 3), padding=1)
    assert planner.plan(narrow, "fprop").tile == NARROW_TILES["float32"]
    # K = 192: 128-wide tiles would pad a quarter of the columns; 64 divides it.
    odd = _problem(2, 32, 192, 192, (28, 28), (3, 3), padding=1)
    assert planner.plan(odd, "fprop").tile == NARROW_TILES["float32"]
    wide = _problem(2, 32, 256, 256, (28, 28), (3, 3), padding=1)
    assert planner.plan(wide, "fprop").tile != SMALL_TILE
    big64 = _problem(2, 32, 256, 256, (28, 28), (3, 3), padding=1, dtype="float64")
    assert planner.plan(big64, "fprop").tile == LARGE_TILES["float64"]


def test_limits_are_reported() -> None:
    planner = Planner()
    problem = _problem(2, 2, 3, 4, (7, 9), (3, 3))
    assert planner.unsupported(problem) is None
    huge = dataclasses.replace(problem, input_size=(1, 7, 2**30), output_size=(1, 5, 2**30 - 2))
    assert "2^30" in planner.unsupported(huge)
    with pytest.raises(ValueError, match="2\\^30"):
        planner.plan(huge, "fprop")
    many = dataclasses.replace(problem, N=2**33)
    assert "grid" in planner.unsupported(many)
    assert planner._grid_blocks(problem, "fprop") <= MAX_GRID


def test_matmul_1x1_matches_reference_and_declines_other_layouts() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)  # N, H, W, C
    w = rng.standard_normal((3, 1, 1, 7)).astype(np.float32)  # K, R, S, C
    bias = rng.standard_normal(3).astype(np.float32)
    problem = conv_problem("conv2d", 2, x.shape, w.shape, 1, 0, 1, 1, dtype="float32", channels_last=True)
    from convgrad import arrays

    xv = arrays.logical_view(x, "numpy", "x", problem)
    wv = arrays.logical_view(w, "numpy", "w", problem)
    out = np.full((2, 5, 6, 3), np.nan, np.float32)
    yv = arrays.logical_view(out, "numpy", "y", problem)
    assert matmul_1x1(np, xv, wv, bias, problem, yv)
    expected = reference_forward(np.asarray(xv, np.float64), np.asarray(wv, np.float64), problem, bias)
    np.testing.assert_allclose(np.asarray(yv, np.float64), expected, rtol=1e-5, atol=1e-5)

    nchw = conv_problem("conv2d", 2, (2, 7, 5, 6), (3, 7, 1, 1), 1, 0, 1, 1, dtype="float32")
    xn = np.zeros((2, 7, 5, 6), np.float32)[:, :, None]
    assert not matmul_1x1(np, xn, np.zeros((3, 7, 1, 1, 1), np.float32), None, nchw,
                          np.zeros((2, 3, 5, 6), np.float32)[:, :, None])
    strided = conv_problem("conv2d", 2, x.shape, w.shape, 2, 0, 1, 1, dtype="float32", channels_last=True)
    assert not matmul_1x1(np, xv, wv, None, strided, yv)


class _RecordingRunner:
    """A KernelRunner stand-in that records launches instead of running them."""

    kind = "record"

    def __init__(self) -> None:
        self.launches = []

    def compile(self, source, name_expressions) -> None:
        pass

    def launch(self, source, name_expression, grid, block, shared_mem, args) -> None:
        self.launches.append((name_expression, args))


def _channels_last_fprop_params(x: np.ndarray, channels: int):
    """Run fprop planning and launching (recorded, not executed) on a channels-last input."""
    from convgrad.backends.cupy_backend import CupyHostBackend

    runner = _RecordingRunner()
    backend = CupyHostBackend(runner=runner)
    w = np.zeros((4, 3, 3, channels), np.float32)
    convgrad.conv2d(x, w, padding=1, channels_last=True, backend=backend)
    ((name, args),) = [(name, args) for name, args in runner.launches if "fprop_gemm" in name]
    return name, args[0]


def test_vector_path_needs_contiguous_aligned_channels() -> None:
    base = np.zeros((2, 5, 6, 12), np.float32)
    _, params = _channels_last_fprop_params(base[..., :8], 8)
    assert int(params["a_vec"]) == 1
    # The same layout starting one element in: strides allow vectors but the pointer is misaligned.
    _, params = _channels_last_fprop_params(base[..., 1:9], 8)
    assert int(params["a_vec"]) == 0
    # Channels not a multiple of the vector width.
    _, params = _channels_last_fprop_params(np.zeros((2, 5, 6, 6), np.float32), 6)
    assert int(params["a_vec"]) == 0
    # NCHW input: channels are not contiguous.
    problem = _problem(2, 2, 8, 4, (5, 6), (3, 3), padding=1).with_strides((240, 30, 0, 6, 1), (72, 9, 0, 3, 1),
                                                                          (120, 30, 0, 6, 1))
    assert Planner().plan(problem, "fprop").launches[0].vector_operand is None


def test_vector_width_mirrors_the_kernel() -> None:
    from convgrad.backends.cupy_planner import vector_width

    assert vector_width("float32", SMALL_TILE) == 4
    assert vector_width("float16", SMALL_TILE) == 4  # 8 bytes: a thread stages 4 elements per step
    assert vector_width("float64", SMALL_TILE) == 2
    assert vector_width("float64", LARGE_TILES["float64"]) == 2
    assert vector_width("float32", LARGE_TILES["float32"]) == 4


def test_wgrad_staging_follows_the_layout() -> None:
    """Reduction-fastest staging for NCHW, channel-fastest (tap-major columns) for channels-last;
    the small tile has only the first."""
    planner = Planner(tiles=(LARGE_TILES["float32"],))
    nchw = _problem(2, 2, 8, 4, (5, 6), (3, 3), padding=1).with_strides((240, 30, 0, 6, 1), (72, 9, 0, 3, 1),
                                                                       (120, 30, 0, 6, 1))
    assert planner.plan(nchw, "wgrad").main.kernel.endswith(", true>")
    nhwc = nchw.with_strides((240, 1, 0, 48, 8), (72, 1, 0, 24, 8), (120, 1, 0, 24, 4))
    assert planner.plan(nhwc, "wgrad").main.kernel.endswith(", false>")
    assert Planner(tiles=(SMALL_TILE,)).plan(nhwc, "wgrad").main.kernel.endswith(", true>")


def test_fast_divisor_divides() -> None:
    rng = np.random.default_rng(3)
    divisors = [1, 2, 3, 5, 7, 9, 49, 64, 147, 1000, 2**20 + 1, 2**30 - 1]
    numbers = np.concatenate([np.arange(0, 2000), rng.integers(0, 2**31, 2000), [2**31 - 1]]).astype(object)
    for d in divisors:
        mul, shift = fast_divisor(d)
        assert mul < 2**33
        assert all((n * mul) >> shift == n // d for n in numbers), d
    with pytest.raises(ValueError, match="divisor"):
        fast_divisor(0)


def test_small_channel_counts_pack_taps_into_each_step() -> None:
    """C = 3 (the stem): the (tap, channel) pairs are flattened, 147 of them in 19 steps, not 49."""
    stem = _problem(2, 32, 3, 64, (224, 224), (7, 7), stride=2, padding=3)
    plan = Planner().plan(stem, "fprop")
    assert plan.tile.packed_b and int(plan.main.params["red_packed"]) == 1
    assert int(plan.main.params["b_chunk"]) == 3
    steps = int(plan.main.params["split_len"]) * plan.splits
    assert -(-147 // 8) <= steps < 49
    mul, shift = fast_divisor(3)
    assert (int(plan.main.params["div_mul"][0]), int(plan.main.params["div_shift"][0])) == (mul, shift)
    # dgrad with a stride has several phases: it keeps channel chunks per tap.
    assert int(Planner().plan(stem, "dgrad").main.params["red_packed"]) == 0


def test_packed_weight_launch_and_size() -> None:
    problem = _problem(2, 32, 256, 256, (28, 28), (3, 3), padding=1)
    plan = Planner().plan(problem, "fprop")
    pack, gemm = plan.launches[0], plan.main
    assert "pack_weight" in pack.kernel and pack.args == ("w", "packed") and "packed" in gemm.args
    rows = 9 * -(-256 // plan.tile.BK) * plan.tile.BK
    assert plan.packed.elements == int(pack.params["total"]) == rows * int(gemm.params["b_ld"])
    assert int(gemm.params["b_ld"]) % plan.tile.BN == 0 and int(gemm.params["b_ld"]) >= 256


def test_workspaces_stay_under_the_cap() -> None:
    """The packed weight and the split-K partial sums together fit workspace_mb; with too little
    room the small tile reads the weight directly and nothing is split."""
    problem = _problem(2, 32, 512, 512, (7, 7), (3, 3), padding=1)
    for mb in (1, 4, 16, 256):
        with convgrad.config(workspace_mb=mb):
            for pass_ in ("fprop", "dgrad", "wgrad"):
                plan = Planner().plan(problem, pass_)
                used = (plan.packed.elements * 4 if plan.packed else 0) + (
                    plan.workspace.elements * 4 if plan.workspace else 0)
                assert used <= mb * 2**20, (mb, pass_, used)
    with convgrad.config(workspace_mb=1):
        plan = Planner().plan(problem, "fprop")
        assert plan.tile == SMALL_TILE and plan.packed is None and plan.splits == 1


def _resnet50_problems():
    from convgrad.bench import SUITES

    suite = SUITES["resnet50"]
    return [pytest.param(layer, channels_last, id=f"{layer.name}-{'nhwc' if channels_last else 'nchw'}")
            for layer in suite.layers for channels_last in (False, True)]


@pytest.mark.parametrize("sm_count", (108, 132))
@pytest.mark.parametrize(("layer", "channels_last"), _resnet50_problems())
def test_resnet50_main_gemms_fill_their_waves(layer, channels_last: bool, sm_count: int) -> None:
    """Every ResNet-50 convolution at batch 32: each pass's GEMM launch at >= 90% wave efficiency."""
    problem = layer.problem(32, "float32", channels_last)
    planner = Planner(sm_count=sm_count)
    for pass_ in ("fprop", "dgrad", "wgrad"):
        plan = planner.plan(problem, pass_)
        choice = planner.choose_gemm(problem, pass_)
        ctas = plan.main.grid[0]
        assert ctas == choice.ctas
        efficiency = wave_efficiency(ctas, sm_count, choice.ctas_per_sm)
        assert efficiency >= 0.9, (pass_, plan.tile, plan.splits, ctas, efficiency)


def test_plans_follow_the_sm_count() -> None:
    """The same layer is split differently for 108 and 132 SMs, each filling its own waves."""
    problem = _problem(2, 32, 512, 512, (7, 7), (3, 3), padding=1)
    small, large = Planner(sm_count=108), Planner(sm_count=132)
    a, b = small.choose_gemm(problem, "fprop"), large.choose_gemm(problem, "fprop")
    assert (a.splits, a.tile) != (b.splits, b.tile) or a.ctas != b.ctas
    assert wave_efficiency(a.ctas, 108, a.ctas_per_sm) >= 0.9 and wave_efficiency(b.ctas, 132, b.ctas_per_sm) >= 0.9
    # A per-call count overrides the planner's own.
    assert large.choose_gemm(problem, "fprop", sm_count=108) == a
    with pytest.raises(ValueError, match="sm_count"):
        Planner(sm_count=0)


def test_kernel_backend_asks_its_device_for_the_sm_count() -> None:
    """The backend passes the SM count of the device holding the arrays to the planner."""
    from convgrad.backends.cupy_backend import CupyHostBackend
    from convgrad.backends.tensor_core_planner import DeviceModel

    seen = []

    class Counting(CupyHostBackend):
        def _device_model(self, like):
            return DeviceModel(sm_count=108, capability=80)

    class Recording(Planner):
        def plan(self, problem, pass_, *, has_bias=False, sm_count=None, device=None):
            seen.append(sm_count)
            return super().plan(problem, pass_, has_bias=has_bias, sm_count=sm_count, device=device)

    backend = Counting(runner=_RecordingRunner(), planner=Recording())
    convgrad.conv2d(np.zeros((1, 2, 5, 5), np.float32), np.zeros((3, 2, 3, 3), np.float32), backend=backend)
    assert seen == [108]
