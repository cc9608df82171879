"""The tensor-core planner (``backends/tensor_core_planner.py``), in pure Python: what runs on
tensor cores, the fast path's conditions, grids that cover every output once, split-K slices,
the heuristic's choices, and the shared-memory size the kernels expect.

Execution on ``cupy-host`` is in test_cupy_host_tensor_cores.py and the shared suite.
"""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest

import convgrad
from convgrad import cuda_host
from convgrad.backends.cupy_backend import CupyHostBackend
from convgrad.backends.cupy_planner import (EPILOGUE_ATOMIC, EPILOGUE_STORE, EPILOGUE_WORKSPACE, Planner,
                                            describe_block, dgrad_phase_axis, phase_digits)
from convgrad.backends.tensor_core_planner import DEFAULT_DEVICE, DeviceModel, TensorCorePlanner
from convgrad.cuda_host.build import INCLUDE_DIR
from convgrad.kernel_catalog import launchable_kernels
from convgrad.kernel_source import kernel_dir
from convgrad.problem import conv_problem, transposed_problem
from convgrad.tensor_core_catalog import TC_CONFIGS, TcConfig, configs_for, tc_kernel, tensor_core_kernels

TC = TensorCorePlanner()
PLANNER = Planner(tensor_cores=TC)


def _problem(ndim, N, C, K, spatial, kernel, stride=1, padding=0, dilation=1, groups=1, dtype="float16",
             **options):
    problem = conv_problem("conv", ndim, (N, C, *spatial), (K, C // groups, *kernel), stride, padding, dilation,
                           groups, dtype=dtype)
    return problem.with_options(**options) if options else problem


def _nhwc(problem):
    """The problem with dense channels-last strides for x, w and y."""
    def strides(shape):  # logical (N, C, D, H, W) laid out as (N, D, H, W, C)
        n, c, d, h, w = shape
        return (d * h * w * c, 1, h * w * c, w * c, c)
    return problem.with_strides(strides(problem.x_shape), strides(problem.w_shape), strides(problem.y_shape))


PROBLEMS = [
    _problem(2, 2, 3, 8, (7, 9), (5, 5), 2, 1),
    _problem(2, 2, 16, 16, (7, 9), (3, 3), 2, 1, dtype="bfloat16"),
    _problem(2, 1, 40, 72, (5, 6), (3, 3), padding=1),
    _problem(2, 2, 6, 4, (8, 8), (3, 3), padding=1, groups=2, dtype="float32", allow_tf32=True),
    _problem(2, 2, 3, 4, (13, 11), (3, 3), 3, 2, 2),
    _problem(2, 2, 3, 2, (8, 7), (3, 2), (2, 3), (1, 0), (1, 2), dtype="bfloat16"),
    _problem(2, 3, 130, 140, (9, 9), (1, 1), dtype="float32", allow_tf32=True),
    _problem(1, 2, 4, 4, (19,), (3,), padding=((3, 1),), dilation=3, groups=2),
    _problem(3, 2, 4, 4, (6, 5, 4), (2, 3, 3), (1, 2, 1), (0, 1, 1), (2, 1, 1), 2),
    _problem(2, 2, 4, 4, (40, 40), (3, 3), padding=1),
    _problem(2, 3, 6, 4, (5, 7), (2, 2), stride=(3, 2), dilation=(2, 3), padding=((2, 0), (1, 3)), groups=2),
    transposed_problem("conv_transpose2d", 2, (2, 4, 5, 5), (4, 3, 3, 3), 2, 1, 1, 1, 1, dtype="float16"),
]
CONFIG_CASES = [(dtype, config) for dtype, configs in TC_CONFIGS.items() for config in configs]


def _ids(problems):
    return [f"{p.name('fprop').replace('_fprop', '')}_{i}" for i, p in enumerate(problems)]


def _decode(m: int, extents) -> tuple[int, ...]:
    coords = []
    for extent in reversed(extents):
        coords.append(m % extent)
        m //= extent
    return (m, *reversed(coords))


# -- what runs on tensor cores


def test_dtypes_and_tf32_choose_the_kernels() -> None:
    base = dict(ndim=2, N=2, C=16, K=16, spatial=(8, 8), kernel=(3, 3))
    for dtype in ("float16", "bfloat16"):
        assert PLANNER.plan(_problem(**base, dtype=dtype), "fprop").algorithm == "tensor-core"
    assert PLANNER.plan(_problem(**base, dtype="float32"), "fprop").algorithm == "gemm"
    assert PLANNER.plan(_problem(**base, dtype="float32", allow_tf32=True), "wgrad").algorithm == "tensor-core"
    assert PLANNER.plan(_problem(**base, dtype="float64", allow_tf32=True), "dgrad").algorithm == "gemm"
    depthwise = _problem(2, 2, 8, 8, (8, 8), (3, 3), groups=8)
    assert PLANNER.plan(depthwise, "fprop").algorithm == "depthwise"
    # Before sm_80 (no bf16/TF32 WMMA, no cp.async) the SIMT kernels run.
    turing = DeviceModel(capability=75)
    assert PLANNER.plan(_problem(**base), "fprop", device=turing).algorithm == "gemm"
    assert "sm_80" in TC.unsupported(_problem(**base), turing)
    # A planner without the hook plans SIMT kernels only.
    assert Planner().plan(_problem(**base), "fprop").algorithm == "gemm"


def test_backends_use_the_hooked_planner() -> None:
    assert isinstance(CupyHostBackend().planner.tensor_cores, TensorCorePlanner)
    backend = CupyHostBackend()
    tf32 = _problem(2, 2, 16, 16, (8, 8), (3, 3), dtype="float32", allow_tf32=True)
    assert backend.rounds_to_tf32(tf32, "fprop")
    assert not backend.rounds_to_tf32(tf32.with_options(allow_tf32=False), "fprop")
    assert not backend.rounds_to_tf32(_problem(2, 2, 16, 16, (8, 8), (3, 3)), "fprop")
    assert not convgrad.backends.get("numpy").rounds_to_tf32(tf32, "fprop")


def test_fast_path_needs_contiguous_channels_in_multiples_of_the_vector() -> None:
    nhwc = _nhwc(_problem(2, 2, 16, 24, (7, 9), (3, 3), padding=1))
    for pass_, expected in (("fprop", (1, 1)), ("dgrad", (1, 1)), ("wgrad", (1, 1))):
        p = PLANNER.plan(nhwc, pass_).launches[0].params
        assert (int(p["a_vec"]), int(p["b_vec"])) == expected, pass_
        assert int(p["out_nfast"]) == 1
    # 12 output channels: dy (A of dgrad and wgrad) cannot, x and w can.
    odd_k = _nhwc(_problem(2, 2, 16, 12, (7, 9), (3, 3), padding=1))
    assert int(PLANNER.plan(odd_k, "dgrad").launches[0].params["a_vec"]) == 0
    assert int(PLANNER.plan(odd_k, "dgrad").launches[0].params["b_vec"]) == 1
    assert int(PLANNER.plan(odd_k, "fprop").launches[0].params["a_vec"]) == 1
    # TF32 vectors are 4 floats: 12 channels qualify there.
    assert int(PLANNER.plan(odd_k.with_options(dtype="float32", allow_tf32=True), "dgrad").launches[0]
               .params["a_vec"]) == 1
    # NCHW: channels are not contiguous; the epilogue writes along M.
    nchw = _problem(2, 2, 16, 24, (7, 9), (3, 3), padding=1)
    nchw = nchw.with_strides((1008, 63, 0, 9, 1), (144, 9, 0, 3, 1), (1512, 63, 0, 9, 1))
    p = PLANNER.plan(nchw, "fprop").launches[0].params
    assert (int(p["a_vec"]), int(p["b_vec"]), int(p["out_nfast"])) == (0, 0, 0)


# -- grids, tiles and slices (mirroring the kernels' block decode)


@pytest.mark.parametrize("problem", PROBLEMS, ids=_ids(PROBLEMS))
def test_fprop_grid_writes_every_output_once(problem) -> None:
    plan = PLANNER.plan(problem, "fprop")
    (launch,) = plan.launches
    config = plan.tensor_core
    dtype = problem.dtype
    assert plan.algorithm == "tensor-core" and launch.kernel == tc_kernel("fprop", dtype, config)
    assert launch.block == (config.threads, 1, 1) and launch.shared_mem == config.shared_bytes(dtype)
    counts = np.zeros((problem.N, problem.K, *problem.output_size), int)
    rows, Kg = problem.N * math.prod(problem.output_size), problem.K_per_group
    for block in range(launch.grid[0]):
        d = describe_block(launch, block)
        for m in range(d["tile_m"] * config.BM, min(rows, (d["tile_m"] + 1) * config.BM)):
            n, z, p, q = _decode(m, problem.output_size)
            for col in range(d["tile_n"] * config.BN, min(Kg, (d["tile_n"] + 1) * config.BN)):
                counts[n, d["group"] * Kg + col, z, p, q] += 1
    assert (counts == 1).all()


@pytest.mark.parametrize("problem", PROBLEMS, ids=_ids(PROBLEMS))
def test_dgrad_phases_write_every_input_position_once(problem) -> None:
    plan = PLANNER.plan(problem, "dgrad")
    (launch,) = plan.launches
    config = plan.tensor_core
    assert int(launch.params["phases"]) == math.prod(problem.stride)
    counts = np.zeros((problem.N, problem.C, *problem.input_size), int)
    Cg = problem.C_per_group
    for block in range(launch.grid[0]):
        d = describe_block(launch, block)
        axes = [dgrad_phase_axis(problem, a, phi) for a, phi in enumerate(phase_digits(problem, d["phase"]))]
        extents = [ax["rows"] for ax in axes]
        rows = problem.N * math.prod(extents)
        for m in range(d["tile_m"] * config.BM, min(rows, (d["tile_m"] + 1) * config.BM)):
            n, *index = _decode(m, extents)
            position = [ax["d0"] + i * s for ax, i, s in zip(axes, index, problem.stride)]
            for col in range(d["tile_n"] * config.BN, min(Cg, (d["tile_n"] + 1) * config.BN)):
                counts[(n, d["group"] * Cg + col, *position)] += 1
    assert (counts == 1).all()


WGRAD_PROBLEMS = PROBLEMS + [p.with_options(deterministic=False) for p in PROBLEMS]


@pytest.mark.parametrize("problem", WGRAD_PROBLEMS, ids=_ids(WGRAD_PROBLEMS))
def test_wgrad_slices_cover_the_reduction_once_and_tiles_cover_dw(problem) -> None:
    plan = Planner(tensor_cores=TensorCorePlanner(min_split_len=32)).plan(problem, "wgrad")
    launch, config = plan.launches[0], plan.tensor_core
    p = launch.params
    reduction = problem.gemm_reduction["wgrad"]
    splits, split_len = int(p["splits"]), int(p["split_len"])
    assert splits == plan.splits >= 1 and split_len % config.BK == 0
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
        for k in range(d["tile_m"] * config.BM, min(problem.K_per_group, (d["tile_m"] + 1) * config.BM)):
            for col in range(d["tile_n"] * config.BN, min(cols, (d["tile_n"] + 1) * config.BN)):
                counts[d["slice"], d["group"] * problem.K_per_group + k, col] += 1
    assert (counts == 1).all()
    if splits == 1:
        assert int(p["epilogue"]) == EPILOGUE_STORE and plan.workspace is None and len(plan.launches) == 1
        return
    reduce = plan.launches[1]
    assert reduce.kernel.startswith("convgrad::tc_splitk_reduce<") and reduce.args == ("workspace", "w")
    assert int(reduce.params["total"]) == problem.K * cols
    assert plan.workspace.dtype == "float32"
    if problem.deterministic:
        assert int(p["epilogue"]) == EPILOGUE_WORKSPACE and int(reduce.params["splits"]) == splits
        assert plan.workspace.elements == splits * problem.K * cols and not plan.workspace.zeroed
    else:
        assert int(p["epilogue"]) == EPILOGUE_ATOMIC and int(reduce.params["splits"]) == 1
        assert plan.workspace.elements == problem.K * cols and plan.workspace.zeroed


# -- the kernels' shared-memory tiles (mirrors VectorSlot and TcShape in kernels/wmma_tile.cuh)


def _slot(layout: str, rows: int, bk: int, vec: int, e: int) -> tuple[int, int, int]:
    if layout == "k":
        row, red = e // (bk // vec), (e % (bk // vec)) * vec
        return row, red, row * (bk + vec) + red
    red, row = e // (rows // vec), (e % (rows // vec)) * vec
    return row, red, red * (rows + vec) + row


@pytest.mark.parametrize("dtype, config", CONFIG_CASES, ids=[f"{d}-{c.name}" for d, c in CONFIG_CASES])
def test_vector_slots_fill_each_tile_once_aligned(dtype: str, config: TcConfig) -> None:
    vec = config.vector(dtype)
    for rows in (config.BM, config.BN):
        assert rows * config.BK // vec % config.threads == 0
        for layout in ("k", "mn"):
            seen = np.zeros((rows, config.BK), int)
            for tid in range(config.threads):
                for i in range(rows * config.BK // vec // config.threads):
                    row, red, offset = _slot(layout, rows, config.BK, vec, tid + i * config.threads)
                    assert (offset * (16 // vec)) % 16 == 0, "every cp.async destination is 16-byte aligned"
                    if layout == "k":
                        seen[row, red:red + vec] += 1
                    else:
                        seen[row:row + vec, red] += 1
            assert (seen == 1).all()


@pytest.mark.skipif(not cuda_host.compiler_available(), reason="needs g++ to build the probe")
def test_shared_memory_size_matches_the_kernels(tmp_path) -> None:
    """config.shared_bytes (what the planner asks for) equals TcShape::SMEM_BYTES (what the kernel uses)."""
    lines = ["#include <cstdio>", '#include "wmma_tile.cuh"', "int main() {"]
    ctypes = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
    for dtype, config in CONFIG_CASES:
        shape = f"convgrad::TcShape<{ctypes[dtype]}, {config.template_args}>"
        lines.append(f'  std::printf("%d %d\\n", {shape}::SMEM_BYTES, {shape}::THREADS);')
    (tmp_path / "probe.cpp").write_text("\n".join(lines + ["}"]) + "\n")
    subprocess.run(["g++", "-std=c++17", f"-I{kernel_dir()}", f"-I{INCLUDE_DIR}", "-include", "cuda_host.h",
                    "-pthread", "probe.cpp", "-o", "probe"], cwd=tmp_path, check=True, capture_output=True)
    output = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout.split("\n")
    for (dtype, config), line in zip(CONFIG_CASES, output):
        assert line.split() == [str(config.shared_bytes(dtype)), str(config.threads)], config


def test_every_configuration_fits_every_sm80_class_device() -> None:
    """99 KiB of opt-in shared memory per block is the smallest limit among sm_80+ GPUs (sm_86/89)."""
    for dtype, config in CONFIG_CASES:
        assert config.shared_bytes(dtype) <= 99 * 1024
        assert config.threads <= 1024
    names = {spec.name for spec in launchable_kernels()}
    assert {spec.name for spec in tensor_core_kernels()} <= names
    # Per dtype: three configurations each for fprop and dgrad, the two square ones for wgrad, the reduction.
    assert len(tensor_core_kernels()) == 3 * (3 + 3 + 2 + 1)
    assert all(c.BM == c.BN for c in configs_for("float16", "wgrad"))


# -- the heuristic


def test_heuristic_picks_large_tiles_for_large_gemms_and_small_ones_to_fill_the_device() -> None:
    big = _problem(2, 32, 256, 256, (56, 56), (3, 3), padding=1)
    assert TC.choose(big, "fprop") == TC_CONFIGS["float16"][0]
    narrow = _problem(2, 32, 64, 64, (56, 56), (3, 3), padding=1)  # N = 64: half of a 128-wide tile is waste
    assert TC.choose(narrow, "fprop").BN == 64
    small = _problem(2, 2, 64, 64, (14, 14), (3, 3), padding=1)  # 392 rows: a handful of large tiles
    assert TC.choose(small, "fprop") == TC_CONFIGS["float16"][2]
    # Fewer SMs fill with fewer blocks: the large tile wins earlier.
    medium = _problem(2, 16, 128, 128, (28, 28), (3, 3), padding=1)
    assert TC.choose(medium, "fprop", DeviceModel(sm_count=8)) == TC_CONFIGS["float16"][0]
    for problem in (big, narrow, small, medium):
        for pass_ in ("fprop", "dgrad", "wgrad"):
            chosen = TC.choose(problem, pass_)
            estimates = [TC.estimate(problem, pass_, c) for c in TC.configs(problem, pass_)]
            assert TC.estimate(problem, pass_, chosen) == min(estimates)


def test_split_k_fills_the_device_within_the_workspace_cap() -> None:
    deep = _problem(2, 64, 64, 64, (28, 28), (3, 3), padding=1)  # dw is one or two tiles; N*P*Q = 50176
    config = TC.choose(deep, "wgrad")
    splits = TC.splits(deep, config)
    assert splits > 8
    plan = PLANNER.plan(deep, "wgrad")
    assert plan.splits == splits and plan.workspace.elements == splits * 64 * 64 * 9
    with convgrad.config(workspace_mb=1):
        capped = PLANNER.plan(deep, "wgrad")
    assert 1 < capped.splits < splits and capped.workspace.elements * 4 <= 2**20
    # Enough tiles already: no split.
    wide = _problem(2, 8, 512, 512, (8, 8), (3, 3), padding=1)
    assert PLANNER.plan(wide, "wgrad", device=DeviceModel(sm_count=4)).splits == 1


def test_configuration_override_and_limits() -> None:
    problem = _problem(2, 2, 16, 16, (8, 8), (3, 3), padding=1)
    for config in TC_CONFIGS["float16"]:
        assert TC.plan(PLANNER, problem, "dgrad", config=config).tensor_core == config
    with pytest.raises(ValueError, match="not a tensor-core configuration for float16 fprop"):
        TC.plan(PLANNER, problem, "fprop", config=TC_CONFIGS["float32"][0])
    with pytest.raises(ValueError, match="not a tensor-core configuration for float16 wgrad"):
        TC.plan(PLANNER, problem, "wgrad", config=TC_CONFIGS["float16"][1])
    small_shared = DeviceModel(shared_per_block=48 * 1024, shared_per_sm=100 * 1024)
    assert all(c.shared_bytes("float16") <= 48 * 1024 for c in TC.configs(problem, "fprop", small_shared))
    assert TC.configs(problem, "fprop", small_shared)
    assert TC.configs(problem, "fprop", DEFAULT_DEVICE) == TC_CONFIGS["float16"]
