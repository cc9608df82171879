"""The SASS of the tensor-core kernels (convgrad.tensor_core_sass), from NVRTC cubins, no GPU.

Every launchable tensor-core instantiation, for sm_80 and sm_90, contains HMMA (tensor-core)
and LDGSTS (cp.async) instructions, all its HMMA in the main loop, and no stack frame or
local-memory instruction.  The instantiation the planner picks for tensor-core problems is
one of those checked, so a silent fallback to the SIMT (FMA) kernels cannot pass; and the
check does fail on a real SIMT kernel.
"""

from __future__ import annotations

import pytest

from convgrad import compile_check, tensor_core_sass
from convgrad.backends.cupy_planner import Planner
from convgrad.backends.tensor_core_planner import DeviceModel, TensorCorePlanner
from convgrad.problem import conv_problem
from convgrad.tensor_core_catalog import tensor_core_kernels
from convgrad.tensor_core_sass import TensorCoreSass

_REASON = compile_check.nvrtc_available() or tensor_core_sass.tools_missing()
needs_tools = pytest.mark.skipif(_REASON is not None, reason=f"NVRTC or the CUDA binary utilities: {_REASON}")
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], TensorCoreSass]:
    return {(row.kernel, row.arch): row for row in tensor_core_sass.check_tensor_core_kernels(ARCHS)}


@needs_tools
def test_every_tensor_core_instantiation_has_hmma_and_ldgsts_and_no_local_memory(rows) -> None:
    expected = {(spec.name, arch) for spec in tensor_core_kernels() if "splitk_reduce" not in spec.name
                for arch in ARCHS}
    assert set(rows) == expected
    failures = [f"{row.kernel} {row.arch}: {'; '.join(row.problems())}" for row in rows.values() if row.problems()]
    assert not failures, "\n".join(failures)
    for row in rows.values():
        assert row.hmma > 0 and row.ldgsts > 0 and row.stack == 0 and row.local_instructions == 0
        assert 0 < row.registers <= 255 and row.loop_hmma == row.hmma and row.loop_instructions > row.loop_hmma


def _resnet_layers(dtype: str, **options):
    """A few ResNet-50 layers at batch 32, channels-last."""
    def nhwc(n, c, k, size, kernel, stride, padding):
        problem = conv_problem("conv2d", 2, (n, c, size, size), (k, c, kernel, kernel), stride, padding, 1, 1,
                               dtype=dtype, **options)
        d, h, w = problem.input_size
        z, p, q = problem.output_size
        return problem.with_strides((d * h * w * c, 1, h * w * c, w * c, c),
                                    (kernel * kernel * c, 1, kernel * kernel * c, kernel * c, c),
                                    (z * p * q * k, 1, p * q * k, q * k, k))
    return [nhwc(32, 64, 64, 56, 3, 1, 1), nhwc(32, 256, 512, 56, 1, 2, 0), nhwc(32, 512, 512, 7, 3, 1, 1),
            nhwc(32, 3, 64, 224, 7, 2, 3)]


@needs_tools
@pytest.mark.parametrize("device", [DeviceModel(), DeviceModel(name="A100", sm_count=108, capability=80,
                                                                  shared_per_sm=164 * 1024,
                                                                  shared_per_block=163 * 1024)],
                         ids=["h200", "a100"])
def test_the_planner_picks_checked_tensor_core_instantiations(rows, device) -> None:
    planner = Planner(tensor_cores=TensorCorePlanner())
    arch = f"sm_{device.capability}"
    picked = set()
    for problems in (_resnet_layers("float16"), _resnet_layers("bfloat16"),
                     _resnet_layers("float32", allow_tf32=True)):
        for problem in problems:
            for pass_ in ("fprop", "dgrad", "wgrad"):
                plan = planner.plan(problem, pass_, device=device)
                assert plan.algorithm == "tensor-core", (problem.name(pass_), plan.algorithm)
                kernel = plan.launches[0].kernel
                assert (kernel, arch) in rows, kernel
                assert rows[(kernel, arch)].hmma > 0 and not rows[(kernel, arch)].problems()
                picked.add(kernel)
    assert len(picked) >= 9, "the heuristic uses more than one configuration"


@needs_tools
def test_the_check_fails_on_a_simt_kernel() -> None:
    """The FMA kernel a silent fallback would run has neither HMMA nor LDGSTS: its row fails."""
    (row,) = tensor_core_sass.analyse(["convgrad::fprop_gemm<__half, 128, 128, 8, 8, 8>"], "sm_80",
                                      source="implicit_gemm.cu")
    assert row.hmma == 0 and row.ldgsts == 0
    assert row.problems()[:2] == ["no HMMA instruction", "no LDGSTS instruction"]


def test_problems_name_stack_frames_local_memory_and_stray_hmma() -> None:
    good = TensorCoreSass("k", "sm_80", 128, 0, 0, hmma=32, ldgsts=12, loop_instructions=400, loop_hmma=32)
    assert good.problems() == [] and good.hmma_share == pytest.approx(32 / 400)
    bad = TensorCoreSass("k", "sm_80", 255, 16, 3, hmma=32, ldgsts=12, loop_instructions=400, loop_hmma=16)
    assert bad.problems() == ["a 16-byte stack frame", "3 local-memory instructions (LDL/STL)",
                              "16 HMMA outside the main loop"]


LISTING = """
//--------------------- .text._Z1kv --------------------------
.text._Z1kv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   HMMA.16816.F32 R8, R12, R14, R8 ;
        /*0030*/                   HMMA.16816.F32 R16, R12, R18, R16 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0060*/               @P1 BRA `(.L_x_2) ;
        /*0070*/                   STL [R1], R3 ;
        /*0080*/                   EXIT ;
"""
RES_USAGE = """
 Function _Z1kv:
  REG:64 STACK:8 SHARED:0 LOCAL:8 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_listing_and_resource_parsers_on_a_planted_kernel() -> None:
    listing = tensor_core_sass.parse_listing(LISTING)["_Z1kv"]
    assert listing.counts()["HMMA"] == 2 and listing.counts()["STL"] == 1
    assert listing.main_loop() == (0x10, 0x40)  # the loop with HMMA, not the integer one
    assert tensor_core_sass.resource_usage(RES_USAGE)["_Z1kv"] == {"registers": 64, "stack": 8, "local": 8}
