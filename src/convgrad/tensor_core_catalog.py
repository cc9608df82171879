"""The tensor-core instantiations of ``kernels/tensor_core_gemm.cu``: tile configurations and names.

A :class:`TcConfig` is one block tile (BM x BN, BK per k-tile), warp tile (WM x WN) and
pipeline depth (STAGES); the kernels are instantiated per dtype, pass and configuration,
e.g. ``convgrad::tc_fprop<__half, 128, 128, 32, 64, 32, 3>``.  The planner
(:mod:`convgrad.backends.tensor_core_planner`) chooses among :func:`configs_for`; the compile
check compiles :func:`tensor_core_kernels`, which :func:`convgrad.kernel_catalog.launchable_kernels`
includes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kernel_source import KernelSpec

SOURCE_TENSOR_CORE = "tensor_core_gemm.cu"

#: C++ element type per dtype.  float32 runs on tensor cores only as TF32 (``allow_tf32=True``).
TC_CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
TC_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
TC_PASSES = ("fprop", "dgrad", "wgrad")
#: Bytes of one cp.async vector, and of the padding at the end of every shared-memory row.
VECTOR_BYTES = 16
#: Threads per block of the split-K reduction.
REDUCE_THREADS = 256


@dataclass(frozen=True)
class TcConfig:
    """A tensor-core tile configuration (mirrors ``TcShape`` in kernels/wmma_tile.cuh)."""

    BM: int
    BN: int
    BK: int
    WM: int
    WN: int
    STAGES: int

    @property
    def name(self) -> str:
        return f"{self.BM}x{self.BN}x{self.BK}_w{self.WM}x{self.WN}_s{self.STAGES}"

    @property
    def threads(self) -> int:
        return (self.BM // self.WM) * (self.BN // self.WN) * 32

    @property
    def template_args(self) -> str:
        return f"{self.BM}, {self.BN}, {self.BK}, {self.WM}, {self.WN}, {self.STAGES}"

    def vector(self, dtype: str) -> int:
        """Elements per 16-byte copy: the channel-count multiple the fast path needs."""
        return VECTOR_BYTES // TC_ITEMSIZE[dtype]

    def shared_bytes(self, dtype: str) -> int:
        """Dynamic shared memory: the larger of the pipeline's stages and the epilogue's float tile."""
        pad = self.vector(dtype)
        pipeline = self.STAGES * (self.BM + self.BN) * (self.BK + pad) * TC_ITEMSIZE[dtype]
        epilogue = 4 * max(self.BM * (self.BN + 4), self.BN * (self.BM + 4))
        return max(pipeline, epilogue)


def _configs(bk: int) -> tuple[TcConfig, ...]:
    return (
        TcConfig(128, 128, bk, 64, 32, 3),  # 8 warps: large GEMMs
        TcConfig(128, 64, bk, 64, 32, 4),   # 4 warps: narrow N (64 channels), or to fill the device
        TcConfig(64, 64, bk, 32, 32, 3),    # 4 warps: small GEMMs, many blocks
    )


#: The configurations per dtype, largest first.  BK is 32 elements (64 bytes) for 16-bit
#: types and 16 for TF32 (also 64 bytes), so a k-tile row is four 16-byte vectors either way.
TC_CONFIGS: dict[str, tuple[TcConfig, ...]] = {
    "float16": _configs(32),
    "bfloat16": _configs(32),
    "float32": _configs(16),
}


def configs_for(dtype: str, pass_: str) -> tuple[TcConfig, ...]:
    """The configurations instantiated for a pass.  wgrad takes square tiles only: its M is
    K/G, rarely above 128, and its A and B vector slots then share their reduction lanes
    (fewer registers); narrow GEMMs are filled by split-K instead."""
    configs = TC_CONFIGS[dtype]
    return tuple(c for c in configs if c.BM == c.BN) if pass_ == "wgrad" else configs


def tc_kernel(pass_: str, dtype: str, config: TcConfig) -> str:
    """Name expression, e.g. ``convgrad::tc_fprop<__half, 128, 128, 32, 64, 32, 3>``."""
    return f"convgrad::tc_{pass_}<{TC_CTYPES[dtype]}, {config.template_args}>"


def tc_reduce_kernel(dtype: str) -> str:
    return f"convgrad::tc_splitk_reduce<{TC_CTYPES[dtype]}>"


#: WMMA k-extent per dtype (m16n16k16 for 16-bit inputs, m16n16k8 for TF32), and the HMMA
#: instructions one such WMMA multiply becomes in the sm_80/sm_90 SASS (m16n8k16 and m16n8k8 halves).
_WMMA_K = {"float16": 16, "bfloat16": 16, "float32": 8}
_HMMA_PER_WMMA = {"float16": 2, "bfloat16": 2, "float32": 4}


def hmma_per_step(dtype: str, config: TcConfig) -> int:
    """HMMA instructions a warp issues per k-tile: its WM x WN fragments times BK / k, each a few HMMA."""
    fragments = (config.WM // 16) * (config.WN // 16) * (config.BK // _WMMA_K[dtype])
    return fragments * _HMMA_PER_WMMA[dtype]


def tensor_core_kernels() -> list[KernelSpec]:
    """Every tensor-core instantiation the planner can launch, with what the SASS report must find:
    HMMA and LDGSTS instructions, no stack frame and no local memory."""
    specs = []
    for dtype in TC_CONFIGS:
        for pass_ in TC_PASSES:
            for config in configs_for(dtype, pass_):
                specs.append(KernelSpec(SOURCE_TENSOR_CORE, tc_kernel(pass_, dtype, config), config.shared_bytes(dtype),
                                        threads=config.threads, gemm=True, math_per_step=hmma_per_step(dtype, config),
                                        required_ops=("HMMA", "LDGSTS")))
        specs.append(KernelSpec(SOURCE_TENSOR_CORE, tc_reduce_kernel(dtype), 0, threads=REDUCE_THREADS))
    return specs
