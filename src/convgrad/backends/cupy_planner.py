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
    NARROW_TILES,
    SMALL_TILE,
    SOURCE_BIAS,
    SOURCE_DEPTHWISE,
    SOURCE_GEMM,
    SOURCE_PACK,
    SOURCE_REDUCE,
    Tile,
    bias_kernel,
    ctas_per_sm,
    depthwise_kernel,
    depthwise_wgrad_shared_bytes,
    gemm_kernel,
    gemm_tiles,
    pack_kernel,
    reduce_kernel,
    wgrad_stagings,
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
    ("epilogue", 1), ("has_bias", 1), ("a_blocked", 1), ("a_vec", 1), ("out_cfast", 1), ("red_packed", 1),
    ("b_ld", 1), ("b_chunk", 1), ("div_mul", 3), ("div_shift", 3),
    ("channels_fastest", 1), ("total", 1), ("b_vec", 1), ("out_nfast", 1), ("out_shape", 5), ("out_stride", 5),
)
PARAM_DTYPE = np.dtype(
    [(name, "<i8") if count == 1 else (name, "<i8", (count,)) for name, count in PARAM_FIELDS], align=True
)

EPILOGUE_STORE, EPILOGUE_WORKSPACE, EPILOGUE_ATOMIC = 0, 1, 2
#: Limits the kernels rely on (see the headers of kernels/*.cu).
MAX_EXTENT = 2**30
MAX_GRID = 2**31 - 1
MAX_ELEMENTWISE_BLOCKS = 2**16
#: The longest wgrad reduction slice (its kernel counts it in 32 bits).
MAX_WGRAD_SLICE = 2**31 - 2**10

#: SMs assumed where the device cannot be asked (``cupy-host``): an H100 SXM's count.
DEFAULT_SM_COUNT = 132

# The static cost model the planner ranks (tile, split-K) choices with, in SM cycles.  The
# figures are rough and static (no GPU has timed them): SIMT FP32 multiply-adds an SM
# issues per cycle, and global-memory bytes the whole device moves per cycle.
FMA_PER_SM_CYCLE = 64
BYTES_PER_CYCLE = 1000
#: Bytes the L2 cache serves the whole device per cycle (every CTA's tile loads pass through it).
L2_BYTES_PER_CYCLE = 4000
#: What one more kernel launch (the weight packing, the split-K reduction) costs, in cycles (a few microseconds).
LAUNCH_CYCLES = 10000
#: Wave efficiency the planner holds a GEMM launch to when some configuration reaches it.
WAVE_TARGET = 0.9
#: Multiply-add throughput of each tile's main loop relative to the large tile's: the SASS
#: report's steady-state FFMA shares of the fp32 fprop main loops on sm_80 (small 49.6%,
#: narrow 78.2%, large 83.0%).
TILE_SPEED = {"small": 0.6, "narrow": 0.94, "large": 1.0}
#: Shortest split-K slice of fprop and dgrad, in reduction steps.
MIN_SPLIT_STEPS = 8


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
    """Everything needed to run one pass: launches in order, and the workspaces.

    ``workspace``: split-K partial sums (accumulator dtype); ``packed``: the packed weight
    (the weight's dtype; ``elements`` of it), read by the GEMM as ``"packed"``.
    """

    pass_: str
    algorithm: str  # "gemm" or "depthwise"
    launches: tuple[Launch, ...]
    workspace: Workspace | None
    tile: Tile | None = None
    splits: int = 1
    #: The tile configuration of a tensor-core plan (``algorithm == "tensor-core"``).
    tensor_core: TcConfig | None = None
    packed: Workspace | None = None

    @property
    def main(self) -> Launch:
        """The launch that does the pass's arithmetic (the GEMM, or the depthwise kernel)."""
        return next(launch for launch in self.launches
                    if launch.source in (SOURCE_GEMM, SOURCE_DEPTHWISE))


@dataclass(frozen=True)
class GemmChoice:
    """A tile and a split-K count for one GEMM, with what the cost model says of them."""

    tile: Tile
    kfast: bool
    splits: int
    split_len: int
    ctas: int
    waves: int
    wave_efficiency: float
    ctas_per_sm: int
    cycles: float
    packed_elements: int
    workspace_elements: int


def vector_width(dtype: str, tile: Tile) -> int:
    """Channels per fast-path vector load (mirrors GatherLoader::VEC): 16 bytes, at most the
    A lanes a thread stages per step."""
    return min(16 // ITEMSIZE[dtype], tile.a_per_thread)


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
    phase = block % int(p["phases"])
    block //= int(p["phases"])
    return {"tile_m": tile_m, "tile_n": tile_n, "phase": phase, "group": block % int(p["G"]), "slice": block // int(p["G"])}


def fast_divisor(d: int) -> tuple[int, int]:
    """``(mul, shift)`` with ``n // d == (n * mul) >> shift`` for ``0 <= n < 2**31`` (mirrors fast_divide
    in implicit_gemm.cu): with ``l = ceil(log2 d)``, ``mul = 2**(31+l) // d + 1``, ``shift = 31 + l``."""
    if d < 1:
        raise ValueError(f"divisor must be at least 1, got {d}")
    shift = 31 + (d - 1).bit_length()
    return (1 << shift) // d + 1, shift


def wave_efficiency(ctas: int, sm_count: int, ctas_per_sm: int) -> float:
    """CTAs / (waves x SMs x CTAs per SM), waves = ceil(CTAs / (SMs x CTAs per SM))."""
    slots = sm_count * ctas_per_sm
    return ctas / (_ceil_div(ctas, slots) * slots) if ctas else 0.0


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
    sm_count : int
        SMs of the device (the ``cupy`` backend passes the device's own count per call).
    target_blocks : int
        Blocks a split depthwise wgrad aims for.
    min_split_len : int
        Shortest reduction slice of a split-K implicit-GEMM wgrad.
    depthwise_min_split_len : int
        Shortest reduction slice of a split depthwise wgrad.
    max_splits : int
        Most split-K slices.
    tiles : sequence of Tile, optional
        Restrict the implicit-GEMM tiles to these (for tests that force a configuration).
    splits : int, optional
        Force this many split-K slices where the reduction allows (for tests).
    tensor_cores : TensorCorePlanner, optional
        Consulted first for every non-depthwise problem (``backends.tensor_core_planner``);
        None plans SIMT kernels only.
    """

    def __init__(self, *, sm_count: int = DEFAULT_SM_COUNT, target_blocks: int = 512, min_split_len: int = 128,
                 depthwise_min_split_len: int = 4096, max_splits: int = 512, tiles: Sequence[Tile] | None = None,
                 splits: int | None = None, tensor_cores=None) -> None:
        if sm_count < 1:
            raise ValueError(f"sm_count must be at least 1, got {sm_count}")
        self.sm_count = sm_count
        self.target_blocks = target_blocks
        self.min_split_len = min_split_len
        self.depthwise_min_split_len = depthwise_min_split_len
        self.max_splits = max_splits
        self.tiles = tuple(tiles) if tiles is not None else None
        self.forced_splits = splits
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
        """The fewest blocks a pass can be launched with (the largest tile, no split-K)."""
        if problem.is_depthwise:
            return math.prod(problem.kernel_size) * problem.K if pass_ == "wgrad" else 1
        shape = self._gemm_geometry(problem, pass_)
        tile = LARGE_TILES[problem.dtype]
        return _ceil_div(shape["rows"], tile.BM) * _ceil_div(shape["cols"], tile.BN) * shape["phases"] * problem.G

    # -- choices

    def _gemm_geometry(self, problem: ConvProblem, pass_: str) -> dict[str, int]:
        """The GEMM of a pass: rows (the largest phase's), columns, reduction channels, taps
        (the most any phase has) and phases; for wgrad the reduction length."""
        taps = math.prod(problem.kernel_size)
        if pass_ == "fprop":
            return {"rows": problem.N * math.prod(problem.output_size), "cols": problem.K_per_group,
                    "red": problem.C_per_group, "taps": taps, "phases": 1}
        if pass_ == "dgrad":
            per_phase = [_ceil_div(n, s) for n, s in zip(problem.input_size, problem.stride)]
            steps = tap_steps(problem)
            most_taps = math.prod(_ceil_div(t, step) for t, step in zip(problem.kernel_size, steps))
            return {"rows": problem.N * math.prod(per_phase), "cols": problem.C_per_group, "red": problem.K_per_group,
                    "taps": most_taps, "phases": math.prod(problem.stride)}
        return {"rows": problem.K_per_group, "cols": problem.C_per_group * taps,
                "red": problem.N * math.prod(problem.output_size), "taps": 1, "phases": 1}

    def _tile_kind(self, tile: Tile, dtype: str) -> str:
        if tile == SMALL_TILE:
            return "small"
        return "narrow" if NARROW_TILES.get(dtype) == tile else "large"

    def _candidate_tiles(self, dtype: str) -> tuple[Tile, ...]:
        tiles = gemm_tiles(dtype)
        if self.tiles is not None:
            tiles = tuple(t for t in tiles if t in self.tiles) or tiles
        return tiles

    @staticmethod
    def packed_red(problem: ConvProblem, pass_: str, tile: Tile, red: int, taps: int) -> bool:
        """Whether the (tap, channel) pairs are flattened into the reduction: only with the packed
        weight, fewer steps than channel chunks per tap, and (dgrad) a single stride phase."""
        if not tile.packed_b or red >= tile.BK:
            return False
        if pass_ == "dgrad" and math.prod(problem.stride) != 1:
            return False
        return _ceil_div(taps * red, tile.BK) < taps * _ceil_div(red, tile.BK)

    def _gemm_steps(self, problem: ConvProblem, pass_: str, tile: Tile, shape: dict[str, int]) -> int:
        if pass_ == "wgrad":
            return _ceil_div(shape["red"], tile.BK)
        if self.packed_red(problem, pass_, tile, shape["red"], shape["taps"]):
            return _ceil_div(shape["taps"] * shape["red"], tile.BK)
        return shape["taps"] * _ceil_div(shape["red"], tile.BK)

    def packed_weight_elements(self, problem: ConvProblem, pass_: str, tile: Tile) -> int:
        """Elements of the packed weight a fprop/dgrad GEMM with ``tile`` reads (0 if it reads the weight)."""
        if pass_ == "wgrad" or not tile.packed_b:
            return 0
        shape = self._gemm_geometry(problem, pass_)
        taps = math.prod(problem.kernel_size)
        chunk = self._b_chunk(problem, pass_, tile, shape)
        rows = _ceil_div(taps * chunk, tile.BK) * tile.BK
        return problem.G * rows * _ceil_div(shape["cols"], tile.BN) * tile.BN

    def _b_chunk(self, problem: ConvProblem, pass_: str, tile: Tile, shape: dict[str, int]) -> int:
        if self.packed_red(problem, pass_, tile, shape["red"], shape["taps"]):
            return shape["red"]
        return _ceil_div(shape["red"], tile.BK) * tile.BK

    def choose_gemm(self, problem: ConvProblem, pass_: str, sm_count: int | None = None) -> GemmChoice:
        """The tile and split-K count for a pass's GEMM, by the static cost model.

        For every tile and split count that fits the workspace cap (``workspace_mb``, holding
        the packed weight and the split-K partial sums together): CTAs, waves of
        ``sm_count`` x CTAs-per-SM, and cycles = the larger of waves x (multiply-adds per CTA
        x CTAs per SM) / (FMA_PER_SM_CYCLE x the tile's relative speed) and the tiles' loads
        through L2 / L2_BYTES_PER_CYCLE, plus the bytes split-K and weight packing add / BYTES_PER_CYCLE
        and LAUNCH_CYCLES for each launch they add.
        The choice: the fewest cycles among configurations whose wave efficiency reaches
        WAVE_TARGET (a partly empty last wave is time the model cannot see being lost to
        stragglers and launch skew), or among all when none does; ties go to fewer slices,
        then the larger tile.
        """
        sms = sm_count or self.sm_count
        shape = self._gemm_geometry(problem, pass_)
        cap = int(options.get("workspace_mb")) * 2**20
        acc = np.dtype(ACCUMULATOR[problem.dtype]).itemsize
        outputs = self._outputs(problem, pass_)
        best: GemmChoice | None = None
        for tile in self._candidate_tiles(problem.dtype):
            tiles = _ceil_div(shape["rows"], tile.BM) * _ceil_div(shape["cols"], tile.BN) * shape["phases"] * problem.G
            steps = self._gemm_steps(problem, pass_, tile, shape)
            packed = self.packed_weight_elements(problem, pass_, tile)
            packed_bytes = packed * ITEMSIZE[problem.dtype]
            if packed_bytes > cap:
                continue
            kfast = self._kfast(problem, pass_) if self._kfast(problem, pass_) in wgrad_stagings(tile) else True
            per_sm = ctas_per_sm(tile, pass_, kfast)
            for splits in self._split_options(problem, pass_, tile, steps, tiles, outputs * acc, cap - packed_bytes,
                                              sms * per_sm):
                per_slice = _ceil_div(steps, splits)
                splits = _ceil_div(steps, per_slice)
                ctas = tiles * splits
                if ctas > MAX_GRID:
                    continue
                slots = sms * per_sm
                waves = _ceil_div(ctas, slots)
                work = tile.BM * tile.BN * tile.BK * per_slice
                speed = TILE_SPEED[self._tile_kind(tile, problem.dtype)]
                cycles = waves * work * per_sm / (FMA_PER_SM_CYCLE * speed)
                tile_loads = ctas * per_slice * tile.BK * (tile.BM + tile.BN) * ITEMSIZE[problem.dtype]
                cycles = max(cycles, tile_loads / L2_BYTES_PER_CYCLE)
                extra = 2 * splits * outputs * acc if splits > 1 else 0
                cycles += (extra + 2 * packed_bytes) / BYTES_PER_CYCLE
                cycles += LAUNCH_CYCLES * ((splits > 1) + (packed > 0))
                workspace = (splits if problem.deterministic or pass_ != "wgrad" else 1) * outputs if splits > 1 else 0
                choice = GemmChoice(tile, kfast, splits, per_slice * (tile.BK if pass_ == "wgrad" else 1), ctas, waves,
                                    wave_efficiency(ctas, sms, per_sm), per_sm, cycles, packed, workspace)
                if best is None or self._rank(choice) < self._rank(best):
                    best = choice
        if best is None:
            raise ValueError(f"no implicit-GEMM configuration of {pass_} fits the workspace cap "
                             f"(workspace_mb={options.get('workspace_mb')})")
        return best

    @staticmethod
    def _rank(choice: GemmChoice) -> tuple:
        """Configurations that fill their waves to WAVE_TARGET first, then the fewest cycles,
        the fewest slices, the larger tile."""
        return (choice.wave_efficiency < WAVE_TARGET, choice.cycles, choice.splits,
                -choice.tile.BM * choice.tile.BN)

    def _split_options(self, problem: ConvProblem, pass_: str, tile: Tile, steps: int, tiles: int,
                       bytes_per_split: int, room: int, slots: int) -> list[int]:
        """Split counts to consider: 1, and up to enough to fill the device's ``slots`` (SMs x
        CTAs per SM) four times over, with slices no shorter than the minimum and the partial
        sums under ``room`` bytes."""
        if pass_ == "wgrad":
            min_steps = max(1, _ceil_div(self.min_split_len, tile.BK))
            # A wgrad slice is counted in 32 bits.
            least = _ceil_div(steps * tile.BK, MAX_WGRAD_SLICE)
            per_split = bytes_per_split if problem.deterministic else 0
            fixed = 0 if problem.deterministic else bytes_per_split
        else:
            min_steps, least, per_split, fixed = MIN_SPLIT_STEPS, 1, bytes_per_split, 0
        most = min(self.max_splits, max(1, steps // min_steps))
        if most > 1 and per_split:
            most = min(most, max(1, (room - fixed) // per_split))
        if most > 1 and fixed > room:
            most = 1
        if self.forced_splits is not None:
            forced = max(least, min(self.forced_splits, steps))
            return [forced]
        enough = max(1, _ceil_div(4 * slots, max(tiles, 1)))
        return list(range(least, max(least, min(most, enough)) + 1))

    @staticmethod
    def _outputs(problem: ConvProblem, pass_: str) -> int:
        """Elements of the pass's result (the split-K partial sums of one slice)."""
        if pass_ == "fprop":
            return problem.N * problem.K * math.prod(problem.output_size)
        if pass_ == "dgrad":
            return problem.N * problem.C * math.prod(problem.input_size)
        return problem.K * problem.C_per_group * math.prod(problem.kernel_size)

    @staticmethod
    def _kfast(problem: ConvProblem, pass_: str) -> bool:
        """wgrad: reduction-fastest staging unless x's channels are closer-packed than its pixels
        (channels-last), where channel-fastest staging (tap-major columns) coalesces."""
        if pass_ != "wgrad":
            return True
        xs = _abs_strides(problem.x_strides)
        return not (xs[1] < _row_step(xs, problem.stride, problem.output_size))

    def split_count(self, base_blocks: int, reduction: int, min_len: int, bytes_per_split: int) -> int:
        """Depthwise split-K slices: enough blocks to fill the device, slices no shorter than
        ``min_len``, the workspace under the configured cap (``workspace_mb``)."""
        if reduction < 2 * min_len:
            return 1
        wanted = _ceil_div(self.target_blocks, max(base_blocks, 1))
        cap = (int(options.get("workspace_mb")) * 2**20) // max(bytes_per_split, 1)
        return max(1, min(wanted, reduction // min_len, self.max_splits, cap))

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
        p["out_shape"] = 1
        return p

    def plan(self, problem: ConvProblem, pass_: str, *, has_bias: bool = False, sm_count: int | None = None,
             device=None) -> Plan:
        """The launches for ``pass_`` (``"fprop"``, ``"dgrad"`` or ``"wgrad"``) of ``problem``.

        ``has_bias`` (fprop only) fuses the bias into the output; ``device`` (a
        ``tensor_core_planner.DeviceModel``) is what the tensor-core planner plans for, and
        ``sm_count`` the SIMT planner's multiprocessors (default: the planner's).
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
        choice = self.choose_gemm(problem, pass_, sm_count)
        if pass_ == "wgrad":
            return self._gemm_wgrad(problem, choice)
        return self._gemm_gather(problem, pass_, choice, has_bias)

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

    def _gemm_launch(self, problem: ConvProblem, pass_: str, tile: Tile, kfast: bool, p: np.ndarray, blocks: int,
                     args: tuple[str, ...]) -> Launch:
        # One library for the three passes of a tile; the channel-fastest wgrad on its own, so
        # that fprop and dgrad (the same for either staging) are never built twice.
        batch = tuple(gemm_kernel(other, problem.dtype, tile) for other in ("fprop", "dgrad", "wgrad"))
        if pass_ == "wgrad" and not kfast:
            batch = (gemm_kernel("wgrad", problem.dtype, tile, kfast),)
        return Launch(SOURCE_GEMM, gemm_kernel(pass_, problem.dtype, tile, kfast), (blocks, 1, 1),
                      (tile.threads, 1, 1), tile.shared_bytes(problem.dtype), p[()], args, batch)

    def _reduce_launch(self, problem: ConvProblem, splits: int, outputs: int, shape: Sequence[int],
                       strides: Sequence[int] | None, out_role: str, has_bias: bool = False,
                       slice_stride: int | None = None) -> Launch:
        """The fixed-order sum of ``splits`` slices of partial sums into the output (logical
        ``shape`` at ``strides``), rounded once; with ``has_bias``, plus the bias of axis 1."""
        reduce = self.base_params(problem)
        reduce["total"] = outputs
        reduce["splits"] = splits
        reduce["ws_slice_stride"] = outputs if slice_stride is None else slice_stride
        reduce["out_shape"] = tuple(shape)
        if strides is not None:
            reduce["out_stride"] = tuple(strides)
        reduce["has_bias"] = int(has_bias)
        return self._elementwise(SOURCE_REDUCE, reduce_kernel(problem.dtype), reduce, outputs,
                                 ("workspace", "bias", out_role))

    def _gemm_gather(self, problem: ConvProblem, pass_: str, choice: GemmChoice, has_bias: bool) -> Plan:
        """fprop or dgrad: (pack the weight,) the GEMM, (the split-K reduction)."""
        dgrad = pass_ == "dgrad"
        tile = choice.tile
        shape = self._gemm_geometry(problem, pass_)
        p = self.base_params(problem)
        p["tiles_m"], p["tiles_n"] = _ceil_div(shape["rows"], tile.BM), _ceil_div(shape["cols"], tile.BN)
        p["phases"] = shape["phases"]
        steps = self._gemm_steps(problem, pass_, tile, shape)
        p["splits"], p["split_len"] = choice.splits, choice.split_len if choice.splits > 1 else steps
        a_strides = problem.y_strides if dgrad else problem.x_strides
        o_strides = problem.x_strides if dgrad else problem.y_strides
        a_extent = problem.output_size if dgrad else problem.output_size
        a_abs, o_abs = _abs_strides(a_strides), _abs_strides(o_strides)
        # Consecutive lanes per thread (and the vector path) when the gathered activation is
        # channels-last; the epilogue stores channel-fastest when the output is.
        p["a_blocked"] = a_abs[1] < _row_step(a_abs, (1, 1, 1) if dgrad else problem.stride, a_extent)
        o_extent = problem.input_size if dgrad else problem.output_size
        p["out_cfast"] = o_abs[1] < _row_step(o_abs, problem.stride if dgrad else (1, 1, 1), o_extent)
        packed_red = self.packed_red(problem, pass_, tile, shape["red"], shape["taps"])
        p["red_packed"] = int(packed_red)
        if packed_red:
            sizes = problem.kernel_size
            for i, d in enumerate((shape["red"], sizes[1] * sizes[2], sizes[2])):
                p["div_mul"][i], p["div_shift"][i] = fast_divisor(d)
        launches: list[Launch] = []
        packed = None
        if tile.packed_b:
            p["b_ld"] = int(p["tiles_n"]) * tile.BN
            p["b_chunk"] = self._b_chunk(problem, pass_, tile, shape)
            packed = Workspace(choice.packed_elements, problem.dtype, zeroed=False)
            pack = self.base_params(problem)
            pack["b_ld"], pack["b_chunk"], pack["total"] = p["b_ld"], p["b_chunk"], choice.packed_elements
            launch = self._elementwise(SOURCE_PACK, pack_kernel(pass_, problem.dtype), pack, choice.packed_elements,
                                       ("w", "packed"))
            # Both packing kernels of a dtype in one library.
            launches.append(replace(launch, batch=tuple(pack_kernel(other, problem.dtype)
                                                        for other in ("fprop", "dgrad"))))
        outputs = self._outputs(problem, pass_)
        workspace = None
        if choice.splits > 1:
            p["epilogue"] = EPILOGUE_WORKSPACE
            p["ws_slice_stride"] = outputs
            workspace = Workspace(choice.splits * outputs, ACCUMULATOR[problem.dtype], zeroed=False)
        else:
            p["has_bias"] = int(has_bias)
        b_role = "packed" if tile.packed_b else "w"
        args = ("y", b_role, "x", "workspace") if dgrad else ("x", b_role, "bias", "y", "workspace")
        blocks = int(p["tiles_m"] * p["tiles_n"] * p["phases"]) * problem.G * choice.splits
        launch = self._gemm_launch(problem, pass_, tile, True, p, blocks, args)
        if p["a_blocked"]:
            launch = self._with_vector_path(launch, problem, tile, "y" if dgrad else "x", a_strides, shape["red"])
        launches.append(launch)
        if choice.splits > 1:
            out_shape = (problem.N, problem.C, *problem.input_size) if dgrad else (problem.N, problem.K,
                                                                                   *problem.output_size)
            launches.append(self._reduce_launch(problem, choice.splits, outputs, out_shape, o_strides,
                                                "x" if dgrad else "y", has_bias and not dgrad))
        return Plan(pass_, "gemm", tuple(launches), workspace, tile, choice.splits, packed=packed)

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
                        outputs: int, shape: Sequence[int]) -> tuple[Workspace | None, Launch | None]:
        """Set the wgrad epilogue for ``splits`` slices; the workspace and the reduction launch it needs."""
        acc = ACCUMULATOR[problem.dtype]
        p["splits"], p["split_len"] = splits, split_len
        if splits == 1:
            p["epilogue"] = EPILOGUE_STORE
            return None, None
        if problem.deterministic:
            p["epilogue"] = EPILOGUE_WORKSPACE
            p["ws_slice_stride"] = outputs
            workspace = Workspace(splits * outputs, acc, zeroed=False)
            reduce = self._reduce_launch(problem, splits, outputs, shape, problem.w_strides, "w")
        else:
            p["epilogue"] = EPILOGUE_ATOMIC
            workspace = Workspace(outputs, acc, zeroed=True)
            reduce = self._reduce_launch(problem, 1, outputs, shape, problem.w_strides, "w")
        return workspace, reduce

    def _gemm_wgrad(self, problem: ConvProblem, choice: GemmChoice) -> Plan:
        tile = choice.tile
        shape = self._gemm_geometry(problem, "wgrad")
        p = self.base_params(problem)
        p["tiles_m"], p["tiles_n"] = _ceil_div(shape["rows"], tile.BM), _ceil_div(shape["cols"], tile.BN)
        kfast = choice.kfast
        base_blocks = int(p["tiles_m"] * p["tiles_n"]) * problem.G
        outputs = self._outputs(problem, "wgrad")
        split_len = choice.split_len if choice.splits > 1 else _ceil_div(shape["red"], tile.BK) * tile.BK
        workspace, reduce = self._wgrad_epilogue(problem, p, choice.splits, split_len, outputs,
                                                 (problem.K, problem.C_per_group, *problem.kernel_size))
        launch = self._gemm_launch(problem, "wgrad", tile, kfast, p, base_blocks * choice.splits,
                                   ("x", "y", "w", "workspace"))
        launches = (launch,) if reduce is None else (launch, reduce)
        return Plan("wgrad", "gemm", launches, workspace, tile, choice.splits)

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
        workspace, reduce = self._wgrad_epilogue(problem, p, splits, split_len, outputs,
                                                 (problem.K, 1, *problem.kernel_size))
        launch = Launch(SOURCE_DEPTHWISE, depthwise_kernel("wgrad", problem.dtype), (outputs * splits, 1, 1),
                        (threads, 1, 1), depthwise_wgrad_shared_bytes(threads, problem.dtype), p[()],
                        ("x", "y", "w", "workspace"), _depthwise_batch(problem.dtype))
        launches = (launch,) if reduce is None else (launch, reduce)
        return Plan("wgrad", "depthwise", launches, workspace, None, splits)
