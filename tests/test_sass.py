"""The SASS reader (convgrad.sass_report) on planted inputs whose answers are counted by hand.

The report on the real kernels is checked in tests/test_compile_check.py, which compiles
every instantiation once and reads both the ptxas report and the SASS from that one cubin.
"""

from __future__ import annotations

import pytest

from convgrad import sass_report
from convgrad.sass_report import Loop

# A kernel in nvdisasm's format.  Its shape, by address:
#   0000-0030  prologue
#   0040       outer loop head (.L_x_1), closed by the BRA at 0220
#   0050       main loop head (.L_x_2), closed by the BRA at 01e0
#   0060-0080  the scalar staging: two LDG and an STS, or (forward branch at 0060) ...
#   0090-00a0  ... the vector staging: one LDG.128 and an STS
#   00b0-00e0  a carry loop with no math (.L_x_5, closed at 00e0)
#   00f0-0160  the math: 4 FFMA, 2 LDS, one IMAD
#   0170       "last step": skip the staging store (forward branch to 0190)
#   0180       STS
#   0190-01d0  BAR, ISETP, IADD3, LOP3, a local load
#   01e0       the main loop's backward branch
#   01f0-0210  an epilogue loop with one FFMA (closed at 0210)
#   0220       the outer loop's backward branch
#   0230       EXIT
PLANTED = """
//--------------------- .text._Z6kernelv --------------------------
\t.section\t.text._Z6kernelv,"ax",@progbits
\t.sectioninfo\t@"SHI_REGISTERS=40"
_Z6kernelv:
.text._Z6kernelv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   IMAD R2, R0, 0x4, RZ ;
        /*0030*/                   STL [R1], R2 ;
.L_x_1:
        /*0040*/                   IADD3 R3, R3, 0x1, RZ ;
.L_x_2:
        /*0050*/                   ISETP.NE.AND P0, PT, R4, RZ, PT ;
        /*0060*/               @P0 BRA `(.L_x_3) ;
        /*0070*/                   LDG.E R5, [R6.64] ;
        /*0080*/                   LDG.E R7, [R8.64] ;
        /*0085*/                   STS [R9], R5 ;
        /*0088*/                   BRA `(.L_x_4) ;
.L_x_3:
        /*0090*/                   LDG.E.128 R12, [R6.64] ;
        /*00a0*/                   STS.128 [R9], R12 ;
.L_x_4:
        /*00b0*/                   IADD3 R10, R10, 0x8, RZ ;
.L_x_5:
        /*00c0*/                   ISETP.GE.AND P1, PT, R10, R11, PT ;
        /*00d0*/              @P1 IADD3 R10, R10, -R11, RZ ;
        /*00e0*/              @P1 BRA `(.L_x_5) ;
        /*00f0*/                   LDS.128 R16, [R20] ;
        /*0100*/                   FFMA R24, R16, R17, R24 ;
        /*0110*/                   FFMA R25, R16, R18, R25 ;
        /*0120*/                   LDS.128 R16, [R20+0x10] ;
        /*0130*/                   FFMA R26, R16, R17, R26 ;
        /*0140*/                   FFMA R27, R16, R18, R27 ;
        /*0160*/                   IMAD R21, R21, 0x2, RZ ;
        /*0170*/               @P2 BRA `(.L_x_6) ;
        /*0180*/                   STS [R22], R7 ;
.L_x_6:
        /*0190*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*01a0*/                   ISETP.NE.AND P3, PT, R4, 0x10, PT ;
        /*01b0*/                   IADD3 R4, R4, 0x1, RZ ;
        /*01c0*/                   LOP3.LUT R9, R9, 0x1000, RZ, 0x3c, !PT ;
        /*01d0*/                   LDL R2, [R1] ;
        /*01e0*/               @P3 BRA `(.L_x_2) ;
.L_x_7:
        /*01f0*/                   FFMA R30, R24, R25, R30 ;
        /*0200*/                   ISETP.NE.AND P4, PT, R3, 0x4, PT ;
        /*0210*/               @P4 BRA `(.L_x_7) ;
        /*0220*/               @P5 BRA `(.L_x_1) ;
        /*0230*/                   EXIT ;
.L_x_8:
        /*0240*/                   BRA `(.L_x_8) ;
        /*0250*/                   NOP ;
//--------------------- .text._Z5otherv --------------------------
\t.section\t.text._Z5otherv,"ax",@progbits
_Z5otherv:
.text._Z5otherv:
        /*0000*/                   EXIT ;
"""

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:88 CONSTANT[4]:176
 Function _Z6kernelv:
  REG:40 STACK:16 SHARED:2048 LOCAL:0 CONSTANT[0]:824 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5otherv:
  REG:8 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:352 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


@pytest.fixture(scope="module")
def function() -> sass_report.Function:
    functions = sass_report.parse_sass(PLANTED)
    assert set(functions) == {"_Z6kernelv", "_Z5otherv"}
    return functions["_Z6kernelv"]


def test_parse_sass_reads_instructions_labels_and_targets(function) -> None:
    assert len(function.instructions) == 39
    first = function.instructions[0]
    assert (first.address, first.predicate, first.opcode, first.op) == (0, "", "MOV", "MOV")
    branch = next(ins for ins in function.instructions if ins.address == 0x60)
    assert (branch.predicate, branch.op, branch.target) == ("@P0", "BRA", ".L_x_3")
    assert function.labels[".L_x_3"] == 0x90 and function.labels[".L_x_2"] == 0x50
    wide = next(ins for ins in function.instructions if ins.address == 0x90)
    assert wide.opcode == "LDG.E.128" and wide.op == "LDG"


def test_resource_usage_parsing() -> None:
    usage = sass_report.parse_resource_usage(RES_USAGE)
    assert usage["_Z6kernelv"] == {"registers": 40, "stack": 16, "static_shared": 2048, "local": 0}
    assert usage["_Z5otherv"]["registers"] == 8


def test_loops_are_backward_branches(function) -> None:
    assert sass_report.backward_branches(function) == [
        Loop(0x40, 0x220), Loop(0x50, 0x1E0), Loop(0xC0, 0xE0), Loop(0x1F0, 0x210), Loop(0x240, 0x240)]


def test_main_loop_is_the_innermost_loop_with_the_most_math(function) -> None:
    # The outer loop holds the main loop; the carry loop has no math; the epilogue loop has
    # one FFMA against the main loop's four.
    assert sass_report.find_main_loop(function) == Loop(0x50, 0x1E0)


def test_steady_path_loads_the_most_and_issues_the_least(function) -> None:
    steady, costliest = sass_report.loop_paths(function, Loop(0x50, 0x1E0))
    # Steady: 0050, 0060, the scalar staging (0070-0088: 2 LDG + STS + BRA, more loads than
    # the vector pair), 00b0, the carry loop once (00c0-00e0), 00f0-0170, not the optional
    # STS at 0180 (the path already writes shared memory), 0190-01e0.
    assert steady.issued == 2 + 4 + 1 + 3 + 8 + 6
    assert steady.counts["math"] == 4 and steady.counts["ldg"] == 2 and steady.counts["sts"] == 1
    assert steady.counts["lds"] == 2 and steady.counts["local"] == 1 and steady.counts["barrier"] == 1
    # Branches: 0060, 0088, 00e0, 0170, 01e0.  Integer: ISETP 0050, IADD3 00b0, ISETP/IADD3 00c0/00d0,
    # IMAD 0160, ISETP/IADD3/LOP3 01a0-01c0.
    assert steady.counts["branch"] == 5 and steady.counts["integer"] == 8
    assert steady.math_share == pytest.approx(4 / 24)
    # Costliest: every optional instruction, the STS at 0180 too.
    assert costliest.issued == 25 and costliest.counts["sts"] == 2


def test_steady_path_must_write_shared_memory() -> None:
    """A path that loads but skips every shared-memory store (the last step) is not the steady one."""
    text = """
.text._Z1kv:
.L_x_1:
        /*0000*/                   LDG.E R5, [R6.64] ;
        /*0010*/                   FFMA R7, R8, R9, R7 ;
        /*0020*/               @P0 BRA `(.L_x_2) ;
        /*0030*/                   STS [R9], R5 ;
.L_x_2:
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/               @P1 BRA `(.L_x_1) ;
        /*0060*/                   EXIT ;
"""
    function = sass_report.parse_sass(text)["_Z1kv"]
    steady, costliest = sass_report.loop_paths(function, sass_report.find_main_loop(function))
    assert steady.issued == 6 and steady.counts["sts"] == 1
    assert costliest.issued == 6


def test_steady_path_skips_a_longer_rare_block() -> None:
    """A block taken on a rare step (no staging in it) is left out of the steady path but not the costliest."""
    text = """
.text._Z1kv:
        /*0000*/                   LDG.E R5, [R6.64] ;
.L_x_1:
        /*0010*/                   STS [R9], R5 ;
        /*0020*/                   LDG.E R5, [R6.64] ;
        /*0030*/               @P0 BRA `(.L_x_2) ;
        /*0040*/                   IMAD R1, R1, R2, RZ ;
        /*0050*/                   IMAD R3, R3, R2, RZ ;
        /*0060*/                   IMAD R4, R4, R2, RZ ;
.L_x_2:
        /*0070*/                   FFMA R7, R8, R9, R7 ;
        /*0080*/               @P1 BRA `(.L_x_1) ;
        /*0090*/                   EXIT ;
"""
    function = sass_report.parse_sass(text)["_Z1kv"]
    loop = sass_report.find_main_loop(function)
    assert loop == Loop(0x10, 0x80)
    steady, costliest = sass_report.loop_paths(function, loop)
    assert steady.issued == 5 and steady.counts["integer"] == 0
    assert costliest.issued == 8 and costliest.counts["integer"] == 3


def test_no_math_loop_means_no_main_loop() -> None:
    text = """
.text._Z1kv:
.L_x_1:
        /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0010*/               @P0 BRA `(.L_x_1) ;
        /*0020*/                   FFMA R2, R2, R2, R2 ;
        /*0030*/                   EXIT ;
"""
    assert sass_report.find_main_loop(sass_report.parse_sass(text)["_Z1kv"]) is None


@pytest.mark.parametrize(("arch", "registers", "threads", "shared", "blocks", "limit"), [
    # 168 registers -> 5376 per warp (21 units of 256) -> 12 warps -> one 8-warp block.
    ("sm_80", 168, 256, 16384, 1, "registers"),
    # 128 registers -> 4096 per warp -> 16 warps -> two 8-warp blocks.
    ("sm_80", 128, 256, 16384, 2, "registers"),
    # 127 registers round up to the same 4096 per warp.
    ("sm_90", 127, 256, 0, 2, "registers"),
    # 32 registers, 256 threads: 8 blocks by threads (2048 / 256) and by registers (64 warps / 8).
    ("sm_80", 32, 256, 0, 8, "registers"),
    # 32 blocks at most, whatever else allows.
    ("sm_90", 16, 32, 0, 32, "blocks"),
    # Shared memory: 48 KiB + 1 KiB reserved per block -> 3 blocks in 164 KiB, 4 in 228 KiB.
    ("sm_80", 32, 64, 48 * 1024, 3, "shared"),
    ("sm_90", 32, 64, 48 * 1024, 4, "shared"),
])
def test_occupancy_by_hand(arch, registers, threads, shared, blocks, limit) -> None:
    occ = sass_report.occupancy(arch, registers, threads, shared)
    assert occ["blocks"] == blocks and occ["warps"] == blocks * ((threads + 31) // 32)
    assert occ["by"][limit] == blocks


def test_occupancy_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="arch"):
        sass_report.occupancy("sm_10", 32, 256, 0)


def test_analyse_flags_local_memory_and_missing_opcodes(function) -> None:
    resources = sass_report.parse_resource_usage(RES_USAGE)["_Z6kernelv"]
    row = sass_report.analyse(function, resources, kernel="k", arch="sm_80", threads=128, dynamic_shared=0, spill=0,
                              gemm=True, math_per_step=4, required_ops=("HMMA",))
    assert row.stack == 16 and row.local_instructions == 2
    assert any("stack frame" in p for p in row.problems) and any("local-memory" in p for p in row.problems)
    assert "no HMMA instruction" in row.problems
    assert row.loop is not None and row.loop["math"] == 4 and row.loop["issued"] == 24
    assert row.steps_per_iteration == 1
    # Two reduction steps per iteration when a step is two multiply-adds.
    halved = sass_report.analyse(function, resources, kernel="k", arch="sm_80", threads=128, dynamic_shared=0,
                                 spill=0, gemm=True, math_per_step=2)
    assert halved.steps_per_iteration == 2 and halved.loop["issued"] == 12
    # Kernels that are not GEMMs are held only to their required opcodes.
    other = sass_report.analyse(function, resources, kernel="k", arch="sm_80", threads=128, dynamic_shared=0,
                                spill=0, gemm=False)
    assert other.problems == [] and other.loop is None
    table = sass_report.format_sass_table([row, other.as_dict()])
    assert "ERROR" in table and "16.7" in table
