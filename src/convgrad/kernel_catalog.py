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

#: C++ type of each dtype in the kernels, and the accumulator dtype.
CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
ACCUMULATOR = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
DTYPES = tuple(CTYPES)

SOURCE_GEMM = "implicit_gemm.cu"
SOURCE_DEPTHWISE = "depthwise.cu"
SOURCE_REDUCE = "splitk_reduce.cu"
SOURCE_BIAS = "bias.cu"

#: Threads per block of the elementwise kernels (depthwise, bias, split-K reduction).
ELEMENTWISE_THREADS = 256


@dataclass(frozen=True)
class Tile:
    """A block tile of the implicit GEMM: BM x BN outputs, BK reduction per step, TM x TN per thread."""

    BM: int
    BN: int
    BK: int
    TM: int
    TN: int

    @property
    def threads(self) -> int:
        return (self.BM // self.TM) * (self.BN // self.TN)

    def shared_bytes(self, dtype: str) -> int:
        """Dynamic shared memory: two stages of BK x (BM + BN) accumulators."""
        return 2 * self.BK * (self.BM + self.BN) * np.dtype(ACCUMULATOR[dtype]).itemsize

    @property
    def template_args(self) -> str:
        return f"{self.BM}, {self.BN}, {self.BK}, {self.TM}, {self.TN}"


#: Small problems (and the emulator's CI cases) use SMALL_TILE: 64 threads, 4x4 per thread.
SMALL_TILE = Tile(32, 32, 8, 4, 4)
#: Large problems: 256 threads with 8x8 per thread (fp32 and 16-bit), 4x4 for fp64.
LARGE_TILES = {
    "float16": Tile(128, 128, 8, 8, 8),
    "bfloat16": Tile(128, 128, 8, 8, 8),
    "float32": Tile(128, 128, 8, 8, 8),
    "float64": Tile(64, 64, 8, 4, 4),
}


def gemm_kernel(pass_: str, dtype: str, tile: Tile) -> str:
    """Name expression of an implicit-GEMM instantiation, e.g. ``convgrad::fprop_gemm<float, 32, 32, 8, 4, 4>``."""
    return f"convgrad::{pass_}_gemm<{CTYPES[dtype]}, {tile.template_args}>"


def depthwise_kernel(pass_: str, dtype: str) -> str:
    return f"convgrad::depthwise_{pass_}<{CTYPES[dtype]}>"


def reduce_kernel(dtype: str) -> str:
    return f"convgrad::splitk_reduce<{CTYPES[dtype]}>"


def bias_kernel(dtype: str) -> str:
    return f"convgrad::add_bias<{CTYPES[dtype]}>"


def depthwise_wgrad_shared_bytes(threads: int, dtype: str) -> int:
    """One accumulator per warp."""
    return (threads // 32) * np.dtype(ACCUMULATOR[dtype]).itemsize


def launchable_kernels() -> list[KernelSpec]:
    """Every instantiation the planner can launch (what ``compile_check`` compiles)."""
    specs = []
    for dtype in DTYPES:
        for tile in dict.fromkeys((SMALL_TILE, LARGE_TILES[dtype])):
            for pass_ in ("fprop", "dgrad", "wgrad"):
                specs.append(KernelSpec(SOURCE_GEMM, gemm_kernel(pass_, dtype, tile), tile.shared_bytes(dtype),
                                        threads=tile.threads, gemm=True,
                                        math_per_step=tile.TM * tile.TN * tile.BK))
        for pass_ in ("fprop", "dgrad", "wgrad"):
            shared = depthwise_wgrad_shared_bytes(ELEMENTWISE_THREADS, dtype) if pass_ == "wgrad" else 0
            specs.append(KernelSpec(SOURCE_DEPTHWISE, depthwise_kernel(pass_, dtype), shared,
                                    threads=ELEMENTWISE_THREADS))
        specs.append(KernelSpec(SOURCE_REDUCE, reduce_kernel(dtype), 0, threads=ELEMENTWISE_THREADS))
        specs.append(KernelSpec(SOURCE_BIAS, bias_kernel(dtype), 0, threads=ELEMENTWISE_THREADS))
    return specs
