"""Planning of the tensor-core kernels (``kernels/tensor_core_gemm.cu``) for ``cupy`` and ``cupy-host``.

:class:`TensorCorePlanner` is consulted by :meth:`Planner.plan <convgrad.backends.cupy_planner.Planner.plan>`
before the SIMT kernels: it returns a :class:`~convgrad.backends.cupy_planner.Plan` for a
problem the tensor cores can run, else None and the SIMT plan follows.  Tensor cores run

* float16 and bfloat16 (WMMA m16n16k16, float accumulation);
* float32 only with ``allow_tf32=True`` (m16n16k8 TF32); float32 without it and float64 stay
  on the exact SIMT kernels;

for every non-depthwise problem within the kernels' limits, on sm_80 or newer.  The fast
path (16-byte ``cp.async`` tiles) needs channels-last tensors whose channel counts are
multiples of 8 (16-bit) or 4 (TF32); everything else takes the kernels' general path.

The heuristic (:meth:`TensorCorePlanner.choose`) estimates, for each configuration of
:data:`~convgrad.tensor_core_catalog.TC_CONFIGS`, the time as the number of blocks the busiest
SM runs times the work of one block (its tile, padding included, over its reduction),
divided by a per-configuration efficiency (small tiles reread their operands more often),
and takes the cheapest.  wgrad splits its reduction (split-K) until the device holds one
full wave of resident blocks, within the ``workspace_mb`` cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import options
from ..problem import ConvProblem
from ..tensor_core_catalog import (
    REDUCE_THREADS,
    SOURCE_TENSOR_CORE,
    TC_PASSES,
    TcConfig,
    configs_for,
    tc_kernel,
    tc_reduce_kernel,
)
from .cupy_planner import EPILOGUE_ATOMIC, EPILOGUE_STORE, EPILOGUE_WORKSPACE, MAX_GRID, Launch, Plan, Workspace

#: The kernels index pixels of one image with 32-bit integers.
MAX_PIXELS = 2**31 - 1
#: Most blocks of the split-K reduction's grid-stride loop.
MAX_REDUCE_BLOCKS = 2**16
#: Relative throughput of a block of each tile size once the device is full: small tiles
#: reload their operands from shared memory more often per multiply.
_EFFICIENCY = {(128, 128): 1.0, (128, 64): 0.85, (64, 64): 0.7}
#: Registers a thread of these kernels is assumed to use, for the occupancy estimate; the
#: compile check's ptxas report gives the real figures (96 to 252 for sm_80/sm_90).
_ASSUMED_REGISTERS = 224


@dataclass(frozen=True)
class DeviceModel:
    """What the heuristic knows of a GPU.  The default is an H100/H200 (sm_90, 132 SMs)."""

    sm_count: int = 132
    capability: int = 90
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024
    threads_per_sm: int = 2048
    registers_per_sm: int = 65536
    name: str = "assumed H100/H200"

    def blocks_per_sm(self, config: TcConfig, dtype: str) -> int:
        """Resident blocks of ``config`` per SM, limited by threads, shared memory and registers."""
        by_threads = self.threads_per_sm // config.threads
        by_shared = self.shared_per_sm // (config.shared_bytes(dtype) + 1024)  # 1 KiB reserved per block
        by_registers = self.registers_per_sm // (config.threads * _ASSUMED_REGISTERS)
        return max(0, min(by_threads, by_shared, by_registers, 32))


DEFAULT_DEVICE = DeviceModel()


def tensor_core_dtype(problem: ConvProblem) -> str | None:
    """The tensor-core element type for ``problem``'s dtype, or None when it stays on SIMT kernels."""
    if problem.dtype in ("float16", "bfloat16"):
        return problem.dtype
    if problem.dtype == "float32" and problem.allow_tf32:
        return "float32"
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def dgrad_phase_rows(problem: ConvProblem) -> int:
    """GEMM rows of the largest dgrad stride phase: N * prod(ceil(input / stride))."""
    return problem.N * math.prod(_ceil_div(n, s) for n, s in zip(problem.input_size, problem.stride))


def gemm_extent(problem: ConvProblem, pass_: str) -> tuple[int, int, int, int]:
    """(rows per GEMM, columns, reduction, independent GEMMs) of a pass: groups, times stride phases for dgrad."""
    taps = math.prod(problem.kernel_size)
    if pass_ == "fprop":
        return problem.N * math.prod(problem.output_size), problem.K_per_group, problem.C_per_group * taps, problem.G
    if pass_ == "dgrad":
        return (dgrad_phase_rows(problem), problem.C_per_group, problem.K_per_group * taps,
                problem.G * math.prod(problem.stride))
    return problem.K_per_group, problem.C_per_group * taps, problem.gemm_reduction["wgrad"], problem.G


def vector_path(strides: Sequence[int] | None, channel_axis: int, channels: int, width: int) -> bool:
    """Whether a tensor's tiles can arrive as ``width``-element vectors of contiguous channels:
    unit channel stride, a channel count and every other stride multiples of the width (the
    pointer's 16-byte alignment is checked by the kernel)."""
    if strides is None or strides[channel_axis] != 1 or channels % width:
        return False
    return all(s % width == 0 for axis, s in enumerate(strides) if axis != channel_axis)


def _row_step(strides: Sequence[int], extents: Sequence[int]) -> int:
    """Memory distance between neighbouring GEMM rows: the innermost spatial axis with extent > 1."""
    for axis in (2, 1, 0):
        if extents[axis] > 1:
            return abs(strides[2 + axis])
    return 2**62


def channels_fastest(strides: Sequence[int] | None, extents: Sequence[int]) -> bool:
    """The channel axis is the closest-packed (channels-last): the epilogue then writes along GEMM N."""
    return strides is not None and abs(strides[1]) < _row_step(strides, extents)


class TensorCorePlanner:
    """Plans tensor-core launches; hooked into :class:`~convgrad.backends.cupy_planner.Planner`.

    Parameters
    ----------
    min_split_len : int
        Shortest split-K slice of wgrad's reduction (a multiple of BK is used).
    max_splits : int
        Most split-K slices.
    """

    def __init__(self, *, min_split_len: int = 256, max_splits: int = 64) -> None:
        self.min_split_len = min_split_len
        self.max_splits = max_splits

    # -- what runs on tensor cores

    def unsupported(self, problem: ConvProblem, device: DeviceModel = DEFAULT_DEVICE) -> str | None:
        """Why the tensor-core kernels will not run ``problem`` (the SIMT kernels then do), or None."""
        if tensor_core_dtype(problem) is None:
            return f"{problem.dtype} runs on tensor cores only as float16, bfloat16 or float32 with allow_tf32"
        if problem.is_depthwise:
            return "depthwise convolutions have their own kernels"
        if problem.is_empty:
            return "an empty problem launches nothing"
        if device.capability < 80:
            return f"tensor-core kernels need sm_80 or newer (the device is sm_{device.capability})"
        for what, extents in (("input", problem.input_size), ("output", problem.output_size)):
            if math.prod(extents) > MAX_PIXELS:
                return f"the {what} has more than 2^31 - 1 pixels per image"
        if problem.gemm_reduction["wgrad"] >= MAX_PIXELS * 16:
            return "wgrad's reduction N*Z*P*Q is too long for 32-bit k-tile counts"
        return None

    def configs(self, problem: ConvProblem, pass_: str,
                device: DeviceModel = DEFAULT_DEVICE) -> tuple[TcConfig, ...]:
        """The configurations of ``pass_`` that fit the device (shared memory per block), largest first."""
        dtype = tensor_core_dtype(problem)
        if dtype is None:
            return ()
        return tuple(c for c in configs_for(dtype, pass_) if c.shared_bytes(dtype) <= device.shared_per_block
                     and device.blocks_per_sm(c, dtype) > 0)

    # -- the heuristic

    def splits(self, problem: ConvProblem, config: TcConfig, device: DeviceModel = DEFAULT_DEVICE) -> int:
        """wgrad split-K slices: enough blocks for one full wave, slices of at least
        ``min_split_len``, the workspace under the ``workspace_mb`` cap."""
        rows, cols, reduction, parallel = gemm_extent(problem, "wgrad")
        dtype = tensor_core_dtype(problem) or "float32"
        base = _ceil_div(rows, config.BM) * _ceil_div(cols, config.BN) * parallel
        resident = device.sm_count * max(device.blocks_per_sm(config, dtype), 1)
        if base >= resident or reduction < 2 * self.min_split_len:
            return 1
        wanted = _ceil_div(resident, base)
        cap = (int(options.get("workspace_mb")) * 2**20) // max(problem.K * cols * 4, 1)
        most = min(wanted, reduction // self.min_split_len, self.max_splits, cap, MAX_GRID // base)
        return max(1, most)

    def estimate(self, problem: ConvProblem, pass_: str, config: TcConfig,
                 device: DeviceModel = DEFAULT_DEVICE) -> float:
        """Relative time of ``pass_`` with ``config``: the blocks the busiest SM runs, times the work
        of one block (its whole tile over its reduction, padding included), over the tile's efficiency."""
        rows, cols, reduction, parallel = gemm_extent(problem, pass_)
        blocks = _ceil_div(rows, config.BM) * _ceil_div(cols, config.BN) * parallel
        if pass_ == "wgrad":
            splits = self.splits(problem, config, device)
            per_block = _ceil_div(_ceil_div(reduction, splits), config.BK) * config.BK
            blocks *= splits
        else:
            taps = math.prod(problem.kernel_size)
            per_block = taps * _ceil_div(reduction // taps, config.BK) * config.BK
        per_sm = _ceil_div(blocks, device.sm_count)
        return per_sm * config.BM * config.BN * per_block / _EFFICIENCY[(config.BM, config.BN)]

    def choose(self, problem: ConvProblem, pass_: str, device: DeviceModel = DEFAULT_DEVICE) -> TcConfig:
        """The heuristic's configuration for ``pass_`` (the cheapest estimate; ties go to the larger tile)."""
        candidates = self.configs(problem, pass_, device)
        if not candidates:
            raise ValueError(f"no tensor-core configuration fits {device.name}")
        return min(candidates, key=lambda c: (self.estimate(problem, pass_, c, device), -c.BM * c.BN))

    # -- plans

    def plan(self, planner, problem: ConvProblem, pass_: str, has_bias: bool = False,
             device: DeviceModel | None = None, config: TcConfig | None = None) -> Plan | None:
        """The tensor-core launches for ``pass_``, or None when the problem stays on SIMT kernels.

        ``planner`` (the :class:`~convgrad.backends.cupy_planner.Planner`) fills the problem's
        fields of the parameter struct; ``config`` overrides the heuristic (autotuning, tests).
        """
        device = device or DEFAULT_DEVICE
        if pass_ not in TC_PASSES:
            raise ValueError(f"pass must be fprop, dgrad or wgrad, got {pass_!r}")
        if self.unsupported(problem, device) is not None:
            return None
        dtype = tensor_core_dtype(problem)
        assert dtype is not None
        if config is None:
            config = self.choose(problem, pass_, device)
        elif config not in configs_for(dtype, pass_):
            raise ValueError(f"{config.name} is not a tensor-core configuration for {dtype} {pass_}")
        rows, cols, reduction, parallel = gemm_extent(problem, pass_)
        p = planner.base_params(problem)
        p["tiles_m"], p["tiles_n"] = _ceil_div(rows, config.BM), _ceil_div(cols, config.BN)
        width = config.vector(dtype)
        x_fast = vector_path(problem.x_strides, 1, problem.C_per_group, width)
        y_fast = vector_path(problem.y_strides, 1, problem.K_per_group, width)
        w_fast = vector_path(problem.w_strides, 1, problem.C_per_group, width)
        batch = tuple(tc_kernel(other, dtype, config) for other in TC_PASSES if config in configs_for(dtype, other))
        batch += (tc_reduce_kernel(dtype),)
        workspace, launches = None, []
        if pass_ == "fprop":
            p["has_bias"] = int(has_bias)
            p["a_vec"], p["b_vec"] = int(x_fast), int(w_fast)
            p["out_nfast"] = int(channels_fastest(problem.y_strides, problem.output_size))
            args: tuple[str, ...] = ("x", "w", "bias", "y")
        elif pass_ == "dgrad":
            p["phases"] = math.prod(problem.stride)
            p["a_vec"], p["b_vec"] = int(y_fast), int(w_fast)
            p["out_nfast"] = int(channels_fastest(problem.x_strides, problem.input_size))
            args = ("y", "w", "x")
        else:
            p["a_vec"], p["b_vec"] = int(y_fast), int(x_fast)
            p["out_nfast"] = 1
            splits = self.splits(problem, config, device)
            split_len = _ceil_div(_ceil_div(reduction, splits), config.BK) * config.BK
            splits = _ceil_div(reduction, split_len)
            p["splits"], p["split_len"] = splits, split_len
            workspace, reduce = self._wgrad_epilogue(planner, problem, dtype, p, splits, problem.K * cols)
            parallel *= splits
            if reduce is not None:
                launches.append(reduce)
            args = ("x", "y", "w", "workspace")
        blocks = int(p["tiles_m"] * p["tiles_n"]) * parallel
        if blocks > MAX_GRID:
            return None
        launch = Launch(SOURCE_TENSOR_CORE, tc_kernel(pass_, dtype, config), (blocks, 1, 1), (config.threads, 1, 1),
                        config.shared_bytes(dtype), p[()], args, batch)
        return Plan(pass_, "tensor-core", (launch, *launches), workspace, None, int(p["splits"]), tensor_core=config)

    @staticmethod
    def _wgrad_epilogue(planner, problem: ConvProblem, dtype: str, p: np.ndarray, splits: int,
                        outputs: int) -> tuple[Workspace | None, Launch | None]:
        """Set wgrad's epilogue for ``splits`` slices; the float workspace and reduction launch it needs."""
        if splits == 1:
            p["epilogue"] = EPILOGUE_STORE
            return None, None
        reduce = planner.base_params(problem)
        reduce["total"] = outputs
        if problem.deterministic:
            p["epilogue"], p["ws_slice_stride"] = EPILOGUE_WORKSPACE, outputs
            reduce["splits"], reduce["ws_slice_stride"] = splits, outputs
            workspace = Workspace(splits * outputs, "float32", zeroed=False)
        else:
            p["epilogue"] = EPILOGUE_ATOMIC
            reduce["splits"], reduce["ws_slice_stride"] = 1, outputs
            workspace = Workspace(outputs, "float32", zeroed=True)
        blocks = max(1, min(_ceil_div(outputs, REDUCE_THREADS), MAX_REDUCE_BLOCKS))
        launch = Launch(SOURCE_TENSOR_CORE, tc_reduce_kernel(dtype), (blocks, 1, 1), (REDUCE_THREADS, 1, 1), 0,
                        reduce[()], ("workspace", "w"), (tc_reduce_kernel(dtype),))
        return workspace, launch
