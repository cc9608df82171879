"""Planning for the ``cupy`` and ``cupy-host`` backends: which kernels, tiles, grids and workspaces.

:class:`Planner` turns a :class:`~convgrad.problem.ConvProblem` into a :class:`Plan`: the
launches in order (kernel instantiation from :mod:`convgrad.kernel_catalog`, grid, block,
dynamic shared memory, the packed parameter struct of ``kernels/conv_params.cuh``, mirrored
here field by field as :data:`PARAM_DTYPE`) and the workspace they need.  A
:class:`~convgrad.kernel_runner.KernelRunner` then compiles and launches the plan; the
planner itself touches no array and no GPU, so it is tested on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .. import options
from ..kernel_catalog import (
    ACCUMULATOR,
    CTYPES,
    ELEMENTWISE_THREADS,
    ITEMSIZE,
    LARGE_TILES,
    SMALL_TILE,
    SOURCE_BIAS,
    SOURCE_DEPTHWISE,
    SOURCE_GEMM,
    SOURCE_REDUCE,
    Tile,
    bias_kernel,
    depthwise_kernel,
    depthwise_wgrad_shared_bytes,
    gemm_kernel,
    reduce_kernel,
)
from ..problem import ConvProblem
from ..tensor_core_catalog import TcConfig

# ----------------------------------------------------------------------------------------
# The parameter struct (kernels/conv_params.cuh), field by field: (name, count of int64).

PARAM_FIELDS: tuple[tuple[str, int], ...] = (
    ("N", 1), ("C", 1), ("K", 1), ("G", 1),
    ("Cg", 1), ("Kg", 1),
    ("in_size", 3), ("kernel_size", 3), ("out_size", 3),
    ("stride", 3), ("dilation", 3), ("pad", 3), ("tap_step", 3),
    ("x_stride", 5), ("w_stride", 5), ("y_stride", 5),
    ("tiles_m", 1), ("tiles_n", 1), ("phases", 1), ("splits", 1), ("split_len", 1), ("ws_slice_stride", 1),
    ("epilogue", 1), ("has_bias", 1), ("a_kfast", 1), ("b_kfast", 1), ("a_vec", 1), ("channels_fastest", 1),
    ("total", 1), ("b_vec", 1), ("out_nfast", 1),
)
PARAM_DTYPE = np.dtype(
    [(name, "<i8") if count == 1 else (name, "<i8", (count,)) for name, count in PARAM_FIELDS], align=True
)

EPILOGUE_STORE, EPILOGUE_WORKSPACE, EPILOGUE_ATOMIC = 0, 1, 2
#: Limits the kernels rely on (see the headers of kernels/*.cu).
MAX_EXTENT = 2**30
MAX_GRID = 2**31 - 1
MAX_ELEMENTWISE_BLOCKS = 2**16


# ----------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class Launch:
    """One kernel launch.  ``args`` names the tensors passed after the parameter struct:
    ``"x"``, ``"w"``, ``"y"`` (the logical 5-D views), ``"bias"`` and ``"workspace"``."""

    source: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    params: np.void
    args: tuple[str, ...]
    #: Instantiations worth compiling together with this one (the other passes of its dtype
    #: and tile): one compiler run builds them all, for runners where runs are costly.
    batch: tuple[str, ...] = ()
    #: The tensor whose channel vectors the fast path may load (``a_vec``), if its layout
    #: allows, and the byte alignment its pointer needs for it; checked at launch.
    vector_operand: str | None = None
    vector_alignment: int = 0


@dataclass(frozen=True)
class Workspace:
    """Scratch memory a plan needs, in the accumulator dtype."""

    elements: int
    dtype: str
    zeroed: bool


@dataclass(frozen=True)
class Plan:
    """Everything needed to run one pass: launches in order, and the workspace."""

    pass_: str
    algorithm: str  # "gemm" or "depthwise"
    launches: tuple[Launch, ...]
    workspace: Workspace | None
    tile: Tile | None = None
    splits: int = 1
    #: The tile configuration of a tensor-core plan (``algorithm == "tensor-core"``).
    tensor_core: TcConfig | None = None


def vector_width(dtype: str, tile: Tile) -> int:
    """Channels per fast-path vector load (mirrors GatherLoader::VEC): 16 bytes, at most the
    elements a thread stages per step and at most BK."""
    staged = tile.BM * tile.BK // tile.threads
    return min(16 // ITEMSIZE[dtype], staged, tile.BK)


def _depthwise_batch(dtype: str) -> tuple[str, ...]:
    return tuple(depthwise_kernel(pass_, dtype) for pass_ in ("fprop", "dgrad", "wgrad"))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tap_steps(problem: ConvProblem) -> tuple[int, int, int]:
    """Per axis, the distance between two taps of one dgrad stride phase: stride / gcd(stride, dilation)."""
    return tuple(s // math.gcd(s, d) for s, d in zip(problem.stride, problem.dilation))  # type: ignore[return-value]


def dgrad_phase_axis(problem: ConvProblem, axis: int, phi: int) -> dict[str, int]:
    """One axis of dgrad stride phase ``phi`` (mirrors ``dgrad_axis`` in implicit_gemm.cu).

    Input positions ``d = d0 + i*stride`` (``i < rows``) are those with ``(d + pad) % stride == phi``;
    they receive exactly the taps ``tap_first + u*tap_step`` (``u < tap_count``).
    """
    s, dil, pad = problem.stride[axis], problem.dilation[axis], problem.pad_before[axis]
    size, taps = problem.input_size[axis], problem.kernel_size[axis]
    step = tap_steps(problem)[axis]
    d0 = (phi - pad) % s
    rows = (size - 1 - d0) // s + 1 if d0 < size else 0
    first = next((t for t in range(step) if (t * dil - phi) % s == 0), step)
    count = (taps - 1 - first) // step + 1 if first < step and first < taps else 0
    return {"rows": rows, "d0": d0, "tap_first": first, "tap_step": step, "tap_count": count}


def phase_digits(problem: ConvProblem, phase: int) -> tuple[int, int, int]:
    """``phase = (phi_d * sh + phi_h) * sw + phi_w``, as the kernel decodes it."""
    digits = [0, 0, 0]
    for axis in (2, 1, 0):
        digits[axis] = phase % problem.stride[axis]
        phase //= problem.stride[axis]
    return tuple(digits)  # type: ignore[return-value]


def describe_block(launch: Launch, block: int) -> dict[str, int]:
    """Which tile a block of an implicit-GEMM launch computes (mirrors the kernels' decode)."""
    p = launch.params
    tile_m = block % int(p["tiles_m"])
    block //= int(p["tiles_m"])
    tile_n = block % int(p["tiles_n"])
    block //= int(p["tiles_n"])
    if "wgrad" in launch.kernel:
        return {"tile_m": tile_m, "tile_n": tile_n, "phase": 0, "group": block % int(p["G"]), "slice": block // int(p["G"])}
    return {"tile_m": tile_m, "tile_n": tile_n, "phase": block % int(p["phases"]), "group": block // int(p["phases"]),
            "slice": 0}


def _abs_strides(strides: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(abs(int(s)) for s in strides) if strides is not None else (0,) * 5


def _row_step(strides: Sequence[int], steps: Sequence[int], extents: Sequence[int]) -> int:
    """Memory distance between consecutive GEMM rows: along the innermost spatial axis with extent > 1."""
    for axis in (2, 1, 0):
        if extents[axis] > 1:
            return abs(strides[2 + axis] * steps[axis])
    return 2**62


def _channels_fastest(strides: Sequence[int], extents: Sequence[int]) -> bool:
    """Whether the channel axis is the closest-packed one (channels-last): elementwise kernels then run channel fastest."""
    return abs(strides[1]) < _row_step(strides, (1, 1, 1), extents)


class Planner:
    """Plans the launches of one pass; shared by ``cupy`` and ``cupy-host``.

    Parameters
    ----------
    target_blocks : int
        Blocks a split-K launch aims for (enough to fill a large GPU a few times over).
    min_split_len : int
        Shortest reduction slice of a split-K implicit-GEMM wgrad.
    depthwise_min_split_len : int
        Shortest reduction slice of a split depthwise wgrad.
    max_splits : int
        Most split-K slices.
    tensor_cores : TensorCorePlanner, optional
        Consulted first for every non-depthwise problem (``backends.tensor_core_planner``);
        None plans SIMT kernels only.
    """

    def __init__(self, *, target_blocks: int = 512, min_split_len: int = 512, depthwise_min_split_len: int = 4096,
                 max_splits: int = 128, tensor_cores=None) -> None:
        self.target_blocks = target_blocks
        self.min_split_len = min_split_len
        self.depthwise_min_split_len = depthwise_min_split_len
        self.max_splits = max_splits
        self.tensor_cores = tensor_cores

    # -- what can run

    def unsupported(self, problem: ConvProblem) -> str | None:
        """Why these kernels cannot run ``problem`` (their index limits), or None."""
        if problem.dtype not in CTYPES:
            return f"dtype {problem.dtype} is not supported (supported: {', '.join(CTYPES)})"
        for axis in range(3):
            padded = problem.input_size[axis] + problem.pad_before[axis] + problem.pad_after[axis]
            reach = problem.dilation[axis] * (problem.kernel_size[axis] - 1) + 1
            biggest = max(padded, reach, problem.output_size[axis] * problem.stride[axis], problem.kernel_size[axis])
            if biggest >= MAX_EXTENT:
                return f"spatial extents must stay below 2^30 (axis {axis} reaches {biggest})"
        taps = math.prod(problem.kernel_size)
        if problem.C_per_group * taps >= MAX_EXTENT or problem.K_per_group >= MAX_EXTENT:
            return "C/groups x kernel taps and K/groups must stay below 2^30"
        if problem.is_empty:
            return None
        for pass_ in ("fprop", "dgrad", "wgrad"):
            blocks = self._grid_blocks(problem, pass_)
            if blocks > MAX_GRID:
                return f"{pass_} would need {blocks} blocks, more than a CUDA grid holds ({MAX_GRID})"
        if problem.N >= 2**31:
            return f"the batch N={problem.N} must stay below 2^31"
        return None

    def _grid_blocks(self, problem: ConvProblem, pass_: str) -> int:
        """The largest 1-D grid a pass launches (without split-K, which only ever fits under the cap)."""
        if problem.is_depthwise:
            return math.prod(problem.kernel_size) * problem.K if pass_ == "wgrad" else 1
        rows, cols, tile = self._gemm_shape(problem, pass_)
        phases = math.prod(problem.stride) if pass_ == "dgrad" else 1
        return _ceil_div(rows, tile.BM) * _ceil_div(cols, tile.BN) * phases * problem.G

    # -- choices

    def choose_tile(self, dtype: str, rows: int, cols: int) -> Tile:
        """The large tile when the GEMM is big in both directions, else the small one."""
        large = LARGE_TILES[dtype]
        if rows >= large.BM // 2 and cols >= large.BN // 2 and rows * cols >= 2 * large.BM * large.BN:
            return large
        return SMALL_TILE

    def split_count(self, base_blocks: int, reduction: int, min_len: int, bytes_per_split: int) -> int:
        """Split-K slices: enough blocks to fill the device, slices no shorter than ``min_len``,
        the workspace under the configured cap (``workspace_mb``)."""
        if reduction < 2 * min_len:
            return 1
        wanted = _ceil_div(self.target_blocks, max(base_blocks, 1))
        cap = (int(options.get("workspace_mb")) * 2**20) // max(bytes_per_split, 1)
        return max(1, min(wanted, reduction // min_len, self.max_splits, cap))

    def _gemm_shape(self, problem: ConvProblem, pass_: str) -> tuple[int, int, Tile]:
        taps = math.prod(problem.kernel_size)
        if pass_ == "fprop":
            rows, cols = problem.N * math.prod(problem.output_size), problem.K_per_group
        elif pass_ == "dgrad":
            per_phase = [_ceil_div(n, s) for n, s in zip(problem.input_size, problem.stride)]
            rows, cols = problem.N * math.prod(per_phase), problem.C_per_group
        else:
            rows, cols = problem.K_per_group, problem.C_per_group * taps
        return rows, cols, self.choose_tile(problem.dtype, rows, cols)

    # -- plans

    def base_params(self, problem: ConvProblem) -> np.ndarray:
        """A 0-d parameter struct with the problem's fields filled in and the plan's at neutral values."""
        p = np.zeros((), PARAM_DTYPE)
        p["N"], p["C"], p["K"], p["G"] = problem.N, problem.C, problem.K, problem.G
        p["Cg"], p["Kg"] = problem.C_per_group, problem.K_per_group
        p["in_size"], p["kernel_size"], p["out_size"] = problem.input_size, problem.kernel_size, problem.output_size
        p["stride"], p["dilation"], p["pad"] = problem.stride, problem.dilation, problem.pad_before
        p["tap_step"] = tap_steps(problem)
        for name, strides in (("x_stride", problem.x_strides), ("w_stride", problem.w_strides),
                              ("y_stride", problem.y_strides)):
            if strides is not None:
                p[name] = strides
        p["tiles_m"] = p["tiles_n"] = p["phases"] = p["splits"] = 1
        p["epilogue"] = EPILOGUE_STORE
        return p

    def plan(self, problem: ConvProblem, pass_: str, *, has_bias: bool = False, device=None) -> Plan:
        """The launches for ``pass_`` (``"fprop"``, ``"dgrad"`` or ``"wgrad"``) of ``problem``.

        ``has_bias`` (fprop only) fuses the bias into the output; ``device`` (a
        ``tensor_core_planner.DeviceModel``) is what the tensor-core planner plans for.
        """
        reason = self.unsupported(problem)
        if reason:
            raise ValueError(reason)
        if pass_ not in ("fprop", "dgrad", "wgrad"):
            raise ValueError(f"pass must be fprop, dgrad or wgrad, got {pass_!r}")
        if problem.is_depthwise:
            return getattr(self, f"_depthwise_{pass_}")(problem, has_bias)
        if self.tensor_cores is not None:
            plan = self.tensor_cores.plan(self, problem, pass_, has_bias, device)
            if plan is not None:
                return plan
        return getattr(self, f"_gemm_{pass_}")(problem, has_bias)

    def bias_plan(self, problem: ConvProblem, x_strides: Sequence[int], x_shape: Sequence[int]) -> Plan:
        """Add a bias of C channels in place to an activation view of logical shape ``x_shape``."""
        p = self.base_params(problem)
        p["N"], p["C"] = x_shape[0], x_shape[1]
        p["in_size"] = tuple(x_shape[2:])
        p["x_stride"] = tuple(x_strides)
        total = math.prod(x_shape)
        p["total"] = total
        p["channels_fastest"] = _channels_fastest(x_strides, x_shape[2:])
        launch = self._elementwise(SOURCE_BIAS, bias_kernel(problem.dtype), p, total, ("bias", "x"))
        return Plan("bias", "elementwise", (launch,), None)

    def _elementwise(self, source: str, kernel: str, p: np.ndarray, total: int, args: tuple[str, ...]) -> Launch:
        blocks = max(1, min(_ceil_div(total, ELEMENTWISE_THREADS), MAX_ELEMENTWISE_BLOCKS))
        return Launch(source, kernel, (blocks, 1, 1), (ELEMENTWISE_THREADS, 1, 1), 0, p[()], args, (kernel,))

    def _gemm_launch(self, problem: ConvProblem, pass_: str, tile: Tile, p: np.ndarray, blocks: int,
                     args: tuple[str, ...]) -> Launch:
        batch = tuple(gemm_kernel(other, problem.dtype, tile) for other in ("fprop", "dgrad", "wgrad"))
        return Launch(SOURCE_GEMM, gemm_kernel(pass_, problem.dtype, tile), (blocks, 1, 1), (tile.threads, 1, 1),
                      tile.shared_bytes(problem.dtype), p[()], args, batch)

    def _gemm_fprop(self, problem: ConvProblem, has_bias: bool) -> Plan:
        rows, cols, tile = self._gemm_shape(problem, "fprop")
        p = self.base_params(problem)
        p["tiles_m"], p["tiles_n"] = _ceil_div(rows, tile.BM), _ceil_div(cols, tile.BN)
        p["has_bias"] = int(has_bias)
        xs, ws = _abs_strides(problem.x_strides), _abs_strides(problem.w_strides)
        p["a_kfast"] = xs[1] < _row_step(xs, problem.stride, problem.output_size)
        p["b_kfast"] = ws[1] <= ws[0]
        blocks = int(p["tiles_m"] * p["tiles_n"]) * problem.G
        launch = self._gemm_launch(problem, "fprop", tile, p, blocks, ("x", "w", "bias", "y"))
        launch = self._with_vector_path(launch, problem, tile, "x", problem.x_strides, problem.C_per_group)
        return Plan("fprop", "gemm", (launch,), None, tile)

    def _gemm_dgrad(self, problem: ConvProblem, has_bias: bool) -> Plan:
        rows, cols, tile = self._gemm_shape(problem, "dgrad")
        p = self.base_params(problem)
        p["tiles_m"], p["tiles_n"] = _ceil_div(rows, tile.BM), _ceil_div(cols, tile.BN)
        p["phases"] = math.prod(problem.stride)
        ys, ws = _abs_strides(problem.y_strides), _abs_strides(problem.w_strides)
        p["a_kfast"] = ys[1] < _row_step(ys, (1, 1, 1), problem.output_size)
        p["b_kfast"] = ws[0] < ws[1]
        blocks = int(p["tiles_m"] * p["tiles_n"] * p["phases"]) * problem.G
        launch = self._gemm_launch(problem, "dgrad", tile, p, blocks, ("y", "w", "x"))
        launch = self._with_vector_path(launch, problem, tile, "y", problem.y_strides, problem.K_per_group)
        return Plan("dgrad", "gemm", (launch,), None, tile)

    @staticmethod
    def _with_vector_path(launch: Launch, problem: ConvProblem, tile: Tile, role: str,
                          strides: Sequence[int] | None, channels: int) -> Launch:
        """Offer the fast path when the gathered operand's channels are contiguous and every
        vector of them starts on a vector boundary (the pointer is checked at launch)."""
        width = vector_width(problem.dtype, tile)
        if strides is None or width < 2 or strides[1] != 1 or channels % width:
            return launch
        if any(s % width for axis, s in enumerate(strides) if axis != 1):
            return launch
        return replace(launch, vector_operand=role, vector_alignment=width * ITEMSIZE[problem.dtype])

    def _wgrad_epilogue(self, problem: ConvProblem, p: np.ndarray, splits: int, split_len: int,
                        outputs: int) -> tuple[Workspace | None, Launch | None]:
        """Set the wgrad epilogue for ``splits`` slices; the workspace and the reduction launch it needs."""
        acc = ACCUMULATOR[problem.dtype]
        p["splits"], p["split_len"] = splits, split_len
        if splits == 1:
            p["epilogue"] = EPILOGUE_STORE
            return None, None
        reduce = self.base_params(problem)
        reduce["total"] = outputs
        if problem.deterministic:
            p["epilogue"] = EPILOGUE_WORKSPACE
            p["ws_slice_stride"] = outputs
            reduce["splits"], reduce["ws_slice_stride"] = splits, outputs
            workspace = Workspace(splits * outputs, acc, zeroed=False)
        else:
            p["epilogue"] = EPILOGUE_ATOMIC
            reduce["splits"], reduce["ws_slice_stride"] = 1, outputs
            workspace = Workspace(outputs, acc, zeroed=True)
        return workspace, self._elementwise(SOURCE_REDUCE, reduce_kernel(problem.dtype), reduce, outputs,
                                            ("workspace", "w"))

    def _gemm_wgrad(self, problem: ConvProblem, has_bias: bool) -> Plan:
        rows, cols, tile = self._gemm_shape(problem, "wgrad")
        reduction = problem.gemm_reduction["wgrad"]
        p = self.base_params(problem)
        p["tiles_m"], p["tiles_n"] = _ceil_div(rows, tile.BM), _ceil_div(cols, tile.BN)
        # Reduction-fastest staging unless x's channels are closer-packed than its pixels
        # (channels-last), where channel-fastest staging (tap-major columns) coalesces.
        xs = _abs_strides(problem.x_strides)
        p["a_kfast"] = p["b_kfast"] = not (xs[1] < _row_step(xs, problem.stride, problem.output_size))
        base_blocks = int(p["tiles_m"] * p["tiles_n"]) * problem.G
        outputs = problem.K * cols
        acc_size = np.dtype(ACCUMULATOR[problem.dtype]).itemsize
        splits = self.split_count(base_blocks, reduction, self.min_split_len, outputs * acc_size)
        split_len = _ceil_div(_ceil_div(reduction, splits), tile.BK) * tile.BK
        splits = _ceil_div(reduction, split_len)
        workspace, reduce = self._wgrad_epilogue(problem, p, splits, split_len, outputs)
        launch = self._gemm_launch(problem, "wgrad", tile, p, base_blocks * splits, ("x", "y", "w", "workspace"))
        launches = (launch,) if reduce is None else (launch, reduce)
        return Plan("wgrad", "gemm", launches, workspace, tile, splits)

    def _depthwise_launch(self, problem: ConvProblem, pass_: str, p: np.ndarray, total: int,
                          args: tuple[str, ...]) -> Launch:
        launch = self._elementwise(SOURCE_DEPTHWISE, depthwise_kernel(pass_, problem.dtype), p, total, args)
        return replace(launch, batch=_depthwise_batch(problem.dtype))

    def _depthwise_fprop(self, problem: ConvProblem, has_bias: bool) -> Plan:
        p = self.base_params(problem)
        total = problem.N * problem.K * math.prod(problem.output_size)
        p["total"], p["has_bias"] = total, int(has_bias)
        p["channels_fastest"] = _channels_fastest(_abs_strides(problem.y_strides), problem.output_size)
        launch = self._depthwise_launch(problem, "fprop", p, total, ("x", "w", "bias", "y"))
        return Plan("fprop", "depthwise", (launch,), None)

    def _depthwise_dgrad(self, problem: ConvProblem, has_bias: bool) -> Plan:
        p = self.base_params(problem)
        total = problem.N * problem.C * math.prod(problem.input_size)
        p["total"] = total
        p["channels_fastest"] = _channels_fastest(_abs_strides(problem.x_strides), problem.input_size)
        launch = self._depthwise_launch(problem, "dgrad", p, total, ("y", "w", "x"))
        return Plan("dgrad", "depthwise", (launch,), None)

    def _depthwise_wgrad(self, problem: ConvProblem, has_bias: bool) -> Plan:
        outputs = problem.K * math.prod(problem.kernel_size)
        reduction = problem.gemm_reduction["wgrad"]
        threads = ELEMENTWISE_THREADS if reduction >= 16 * ELEMENTWISE_THREADS else 64
        acc_size = np.dtype(ACCUMULATOR[problem.dtype]).itemsize
        splits = self.split_count(outputs, reduction, self.depthwise_min_split_len, outputs * acc_size)
        splits = min(splits, MAX_GRID // outputs)
        split_len = _ceil_div(reduction, splits)
        splits = _ceil_div(reduction, split_len)
        p = self.base_params(problem)
        workspace, reduce = self._wgrad_epilogue(problem, p, splits, split_len, outputs)
        launch = Launch(SOURCE_DEPTHWISE, depthwise_kernel("wgrad", problem.dtype), (outputs * splits, 1, 1),
                        (threads, 1, 1), depthwise_wgrad_shared_bytes(threads, problem.dtype), p[()],
                        ("x", "y", "w", "workspace"), _depthwise_batch(problem.dtype))
        launches = (launch,) if reduce is None else (launch, reduce)
        return Plan("wgrad", "depthwise", launches, workspace, None, splits)
