"""What the CUDA C kernels of ``kernels/`` can be launched as: every named instantiation.

The ``cupy`` planner chooses among these instantiations, and the compile check
(:mod:`convgrad.compile_check`) compiles exactly this list, so that neither has to import
the other or a backend.  A name expression is what ``cupy.RawModule(name_expressions=...)``
and the host emulator take, e.g. ``convgrad::fprop_gemm<float, 32, 32, 8, 4, 4>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernel_source import KernelSpec
from .tensor_core_catalog import tensor_core_kernels

#: C++ type of each dtype in the kernels, and the accumulator dtype.
CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
ACCUMULATOR = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
DTYPES = tuple(CTYPES)

SOURCE_GEMM = "implicit_gemm.cu"
SOURCE_PACK = "weight_pack.cu"
SOURCE_DEPTHWISE = "depthwise.cu"
SOURCE_REDUCE = "splitk_reduce.cu"
SOURCE_BIAS = "bias.cu"

#: Shared memory per thread of the gathered GEMMs' record (GATHER_RECORD_BYTES in gemm_tile.cuh).
GATHER_RECORD_BYTES = 48

#: Threads per block of the elementwise kernels (depthwise, bias, split-K reduction, weight packing).
ELEMENTWISE_THREADS = 256


@dataclass(frozen=True)
class Tile:
    """A block tile of the implicit GEMM: BM x BN outputs, BK reduction per step, TM x TN per thread.

    ``packed_b``: fprop and dgrad read B from the packed weight (``weight_pack.cu``), dense
    and zero-padded, instead of the weight at its strides.  ``ctas_per_sm``: blocks per SM the
    planner counts on (the theoretical occupancy; tests/test_compile_check.py checks the
    SASS report meets it on sm_80 and sm_90).
    """

    BM: int
    BN: int
    BK: int
    TM: int
    TN: int
    packed_b: bool = False
    ctas_per_sm: int = 1

    @property
    def threads(self) -> int:
        return (self.BM // self.TM) * (self.BN // self.TN)

    @property
    def a_per_thread(self) -> int:
        return self.BM * self.BK // self.threads

    @property
    def b_per_thread(self) -> int:
        return self.BK * self.BN // self.threads

    def shared_bytes(self, dtype: str) -> int:
        """Dynamic shared memory (mirrors TileShape::SMEM_BYTES): two stages of BK x (BM + BN)
        accumulators (or the epilogue's padded pass, if larger), then BM + 1 row offsets and a
        record per thread."""
        acc = np.dtype(ACCUMULATOR[dtype]).itemsize
        stages = 2 * self.BK * (self.BM + self.BN) * acc
        rows, cols = (self.BM // self.TM) * 4, (self.BN // self.TN) * 4
        pass_bytes = (rows * cols + max(rows, cols)) * acc
        table_at = -(-max(stages, pass_bytes) // 8) * 8
        return table_at + (self.BM + 1) * 8 + self.threads * GATHER_RECORD_BYTES

    @property
    def template_args(self) -> str:
        return f"{self.BM}, {self.BN}, {self.BK}, {self.TM}, {self.TN}"


#: Small problems (and the emulator's CI cases) use SMALL_TILE: 64 threads, 4x4 per thread,
#: the weight read at its strides (no packing launch, no workspace).
SMALL_TILE = Tile(32, 32, 8, 4, 4, packed_b=False, ctas_per_sm=7)
#: GEMMs 64 wide (K/G or C/G = 64, ResNet's first stage): 64 threads with 8x8 per thread.
NARROW_TILES = {
    "float16": Tile(64, 64, 8, 8, 8, packed_b=True, ctas_per_sm=6),
    "bfloat16": Tile(64, 64, 8, 8, 8, packed_b=True, ctas_per_sm=6),
    "float32": Tile(64, 64, 8, 8, 8, packed_b=True, ctas_per_sm=6),
}
#: Large problems: 256 threads with 8x8 per thread (fp32 and 16-bit), 4x4 for fp64; two blocks per SM.
LARGE_TILES = {
    "float16": Tile(128, 128, 8, 8, 8, packed_b=True, ctas_per_sm=2),
    "bfloat16": Tile(128, 128, 8, 8, 8, packed_b=True, ctas_per_sm=2),
    "float32": Tile(128, 128, 8, 8, 8, packed_b=True, ctas_per_sm=2),
    "float64": Tile(64, 64, 8, 4, 4, packed_b=True, ctas_per_sm=2),
}


def gemm_tiles(dtype: str) -> tuple[Tile, ...]:
    """Every implicit-GEMM tile of a dtype, smallest first."""
    narrow = (NARROW_TILES[dtype],) if dtype in NARROW_TILES else ()
    return (SMALL_TILE, *narrow, LARGE_TILES[dtype])


def wgrad_stagings(tile: Tile) -> tuple[bool, ...]:
    """The wgrad stagings instantiated for a tile: reduction-fastest (True) and channel-fastest
    (False); the small tile, for small problems, has only the first."""
    return (True,) if tile == SMALL_TILE else (True, False)


def ctas_per_sm(tile: Tile, pass_: str, kfast: bool = True) -> int:
    """Blocks per SM of an instantiation: the tile's, but one for the channel-fastest wgrad
    staging of the 256-thread tiles (its launch bounds ask for one; see implicit_gemm.cu)."""
    if pass_ == "wgrad" and not kfast and tile.threads >= 256:
        return 1
    return tile.ctas_per_sm


def gemm_kernel(pass_: str, dtype: str, tile: Tile, kfast: bool = True) -> str:
    """Name expression of an implicit-GEMM instantiation, e.g. ``convgrad::fprop_gemm<float, 32, 32, 8, 4, 4, false>``.

    The last template argument is ``PACKED_B`` for fprop and dgrad, the staging ``KFAST``
    (reduction-fastest) for wgrad.
    """
    flag = kfast if pass_ == "wgrad" else tile.packed_b
    return f"convgrad::{pass_}_gemm<{CTYPES[dtype]}, {tile.template_args}, {str(flag).lower()}>"


def pack_kernel(pass_: str, dtype: str) -> str:
    """The weight-packing kernel for a fprop or dgrad GEMM."""
    return f"convgrad::pack_weight<{CTYPES[dtype]}, {str(pass_ == 'dgrad').lower()}>"


def depthwise_kernel(pass_: str, dtype: str) -> str:
    return f"convgrad::depthwise_{pass_}<{CTYPES[dtype]}>"


def reduce_kernel(dtype: str) -> str:
    return f"convgrad::splitk_reduce<{CTYPES[dtype]}>"


def bias_kernel(dtype: str) -> str:
    return f"convgrad::add_bias<{CTYPES[dtype]}>"


def depthwise_wgrad_shared_bytes(threads: int, dtype: str) -> int:
    """One accumulator per warp."""
    return (threads // 32) * np.dtype(ACCUMULATOR[dtype]).itemsize


def _gemm_spec(pass_: str, dtype: str, tile: Tile, kfast: bool = True) -> KernelSpec:
    return KernelSpec(SOURCE_GEMM, gemm_kernel(pass_, dtype, tile, kfast), tile.shared_bytes(dtype),
                      threads=tile.threads, gemm=True, math_per_step=tile.TM * tile.TN * tile.BK,
                      min_blocks_per_sm=ctas_per_sm(tile, pass_, kfast))


def launchable_kernels() -> list[KernelSpec]:
    """Every instantiation the planner can launch (what ``compile_check`` compiles)."""
    specs = tensor_core_kernels()  # tensor_core_catalog lists its own
    for dtype in DTYPES:
        for tile in gemm_tiles(dtype):
            specs.append(_gemm_spec("fprop", dtype, tile))
            specs.append(_gemm_spec("dgrad", dtype, tile))
            for kfast in wgrad_stagings(tile):
                specs.append(_gemm_spec("wgrad", dtype, tile, kfast))
        for pass_ in ("fprop", "dgrad"):
            specs.append(KernelSpec(SOURCE_PACK, pack_kernel(pass_, dtype), 0, threads=ELEMENTWISE_THREADS))
        for pass_ in ("fprop", "dgrad", "wgrad"):
            shared = depthwise_wgrad_shared_bytes(ELEMENTWISE_THREADS, dtype) if pass_ == "wgrad" else 0
            specs.append(KernelSpec(SOURCE_DEPTHWISE, depthwise_kernel(pass_, dtype), shared,
                                    threads=ELEMENTWISE_THREADS))
        specs.append(KernelSpec(SOURCE_REDUCE, reduce_kernel(dtype), 0, threads=ELEMENTWISE_THREADS))
        specs.append(KernelSpec(SOURCE_BIAS, bias_kernel(dtype), 0, threads=ELEMENTWISE_THREADS))
    return specs


def compile_cost(name: str) -> int:
    """A rough relative cost of compiling an instantiation, to start the longest first.

    Measured with NVRTC for sm_90: a wgrad GEMM takes several times its fprop, and a 128x128
    tile several times a 32x32 one; elementwise kernels take well under a second.
    """
    if "_gemm<" not in name:
        return 1
    tile_args = [int(v) for v in name.split("<", 1)[1].rstrip(">").split(",")[1:3] if v.strip().isdigit()]
    area = tile_args[0] * tile_args[1] if len(tile_args) == 2 else 1024
    return (4 if "wgrad" in name else 1) * max(1, int((area / 1024) ** 0.5)) * 2
