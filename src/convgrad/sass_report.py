"""What the GPU will execute: resources, occupancy and the main loop, read from the SASS.

No GPU is needed.  :mod:`convgrad.compile_check` compiles every launchable instantiation to
a cubin with NVRTC; this module reads each cubin with the CUDA binary utilities from pip
(``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm``, which install ``cuobjdump`` and
``nvdisasm``) and reports per kernel and architecture:

* registers, the stack frame, and the count of local-memory instructions (LDL/STL): a
  stack frame can be non-zero while ptxas reports no spill (a struct whose address is taken,
  an array indexed at run time), and every local access is a trip to L1/L2;
* static and dynamic shared memory, and the theoretical occupancy (:func:`occupancy`);
* the main loop's instruction mix (:func:`find_main_loop`, :func:`loop_mix`): the share of
  FFMA/DFMA/HMMA among the issued instructions, and the LDS, LDG/LDGSTS, integer and
  branch instructions per reduction step.

Everything here is static: it counts instructions, it does not time them.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

# ----------------------------------------------------------------------------------------
# The tools


def _nvidia_bin_dirs() -> list[pathlib.Path]:
    from .kernel_source import _nvidia_roots

    dirs = []
    for root in _nvidia_roots():
        for parts in (("cu13", "bin"), ("cu12", "bin"), ("cuda_cuobjdump", "bin"), ("cuda_nvdisasm", "bin")):
            candidate = root.joinpath(*parts)
            if candidate.is_dir():
                dirs.append(candidate)
    return dirs


def find_tool(name: str) -> pathlib.Path | None:
    """``cuobjdump`` or ``nvdisasm``: from the pip wheels first, else from ``PATH``."""
    for directory in _nvidia_bin_dirs():
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return pathlib.Path(found) if found else None


def tools_available() -> str | None:
    """None when both ``cuobjdump`` and ``nvdisasm`` are found, else what to install."""
    missing = [name for name in ("cuobjdump", "nvdisasm") if find_tool(name) is None]
    if missing:
        wheels = " ".join(f"nvidia-cuda-{name}" for name in missing)
        return f"{', '.join(missing)} not found; install them with: pip install {wheels}"
    return None


def _run_tool(name: str, *args: str) -> str:
    tool = find_tool(name)
    if tool is None:
        raise RuntimeError(tools_available() or f"{name} not found")
    result = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed: {result.stderr.strip()[:500]}")
    return result.stdout


def disassemble(cubin: bytes) -> tuple[str, str]:
    """``(cuobjdump -res-usage, nvdisasm -c -ndf)`` of one cubin."""
    with tempfile.TemporaryDirectory(prefix="convgrad-sass-") as tmp:
        path = pathlib.Path(tmp) / "kernels.cubin"
        path.write_bytes(cubin)
        # -ndf: no dataflow annotations (the same instructions, disassembled faster).
        return _run_tool("cuobjdump", "-res-usage", str(path)), _run_tool("nvdisasm", "-c", "-ndf", str(path))


# ----------------------------------------------------------------------------------------
# Parsing

_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RES_FIELD = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` output -> per mangled name: ``registers``, ``stack``, ``static_shared``, ``local``."""
    report: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in text.splitlines():
        function = _RES_FUNCTION.match(line)
        if function:
            current = function.group(1)
            continue
        if current is None or "REG:" not in line:
            continue
        fields = dict(_RES_FIELD.findall(line))
        report[current] = {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
                           "static_shared": int(fields.get("SHARED", 0)), "local": int(fields.get("LOCAL", 0))}
        current = None
    return report


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: its address, guard predicate (``""``, ``"@P0"``, ``"@!P1"``...), opcode
    with modifiers (``"LDG.E.128.CONSTANT"``), operands, and the label a branch or call names."""

    address: int
    predicate: str
    opcode: str
    operands: str
    target: str | None = None

    @property
    def op(self) -> str:
        """The opcode without modifiers: ``"LDG"`` for ``"LDG.E.128.CONSTANT"``."""
        return self.opcode.split(".", 1)[0]


_FUNCTION_HEADER = re.compile(r"^\.text\.(\S+):\s*$")
_LABEL = re.compile(r"^(\.L_[\w$.]+):\s*$")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclass
class Function:
    """The instructions of one kernel, in address order, and its labels' addresses."""

    name: str
    instructions: list[Instruction] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def target_address(self, instruction: Instruction) -> int | None:
        """Address a branch or call goes to, when it is a label of this function."""
        return self.labels.get(instruction.target) if instruction.target else None


def parse_sass(text: str) -> dict[str, Function]:
    """``nvdisasm -c`` output -> per mangled kernel name, its :class:`Function`."""
    functions: dict[str, Function] = {}
    current: Function | None = None
    pending: list[str] = []
    for line in text.splitlines():
        header = _FUNCTION_HEADER.match(line)
        if header:
            current = functions.setdefault(header.group(1), Function(header.group(1)))
            pending = []
            continue
        if line.startswith("//----") or line.lstrip().startswith(".section"):
            current = None
            continue
        if current is None:
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            current.labels[name] = address
        pending = []
        operands = match.group(4)
        target = _TARGET.search(operands)
        current.instructions.append(Instruction(address, (match.group(2) or "").strip(), match.group(3), operands,
                                                target.group(1) if target else None))
    return functions


# ----------------------------------------------------------------------------------------
# Classifying instructions

#: The multiply-adds a GEMM exists for (SIMT fp32/fp64, and tensor cores).
MATH_OPS = frozenset({"FFMA", "DFMA", "HMMA", "DMMA"})
SHARED_LOAD_OPS = frozenset({"LDS", "LDSM"})
GLOBAL_LOAD_OPS = frozenset({"LDG", "LDGSTS"})
LOCAL_OPS = frozenset({"LDL", "STL"})
#: Loads and stores through a generic address, resolved to shared or global memory at run
#: time: what WMMA's load_matrix_sync from shared memory becomes (it takes a generic pointer).
GENERIC_OPS = frozenset({"LD", "ST"})
BRANCH_OPS = frozenset({"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BREAK", "BSSY", "BSYNC", "WARPSYNC"})
_INTEGER_BASE = frozenset({
    "IMAD", "IADD", "IADD3", "IMUL", "ISETP", "IMNMX", "IABS", "ISCADD", "LEA", "LOP", "LOP3", "SHF", "SHL", "SHR",
    "SEL", "PRMT", "POPC", "FLO", "BMSK", "BREV", "SGXT", "PLOP3", "P2R", "R2P", "VIADD", "VIMNMX",
})
INTEGER_OPS = _INTEGER_BASE | frozenset("U" + op for op in _INTEGER_BASE)


def category(instruction: Instruction) -> str:
    """``math``, ``lds``, ``sts``, ``ldg``, ``stg``, ``local``, ``generic``, ``integer``, ``branch``,
    ``barrier`` or ``other``."""
    op = instruction.op
    if op in MATH_OPS:
        return "math"
    if op in SHARED_LOAD_OPS:
        return "lds"
    if op == "STS":
        return "sts"
    if op in GLOBAL_LOAD_OPS:
        return "ldg"
    if op in ("STG", "RED", "ATOM", "ATOMG"):
        return "stg"
    if op in LOCAL_OPS:
        return "local"
    if op in GENERIC_OPS:
        return "generic"
    if op in INTEGER_OPS:
        # IMAD.MOV and IMAD.SHL are how the compiler spells moves and shifts: integer work all the same.
        return "integer"
    if op in BRANCH_OPS:
        return "branch"
    if op == "BAR":
        return "barrier"
    return "other"


CATEGORIES = ("math", "lds", "sts", "ldg", "stg", "local", "generic", "integer", "branch", "barrier", "other")


def local_memory_instructions(function: Function) -> int:
    """LDL/STL anywhere in the kernel."""
    return sum(1 for ins in function.instructions if ins.op in LOCAL_OPS)


# ----------------------------------------------------------------------------------------
# The main loop


@dataclass(frozen=True)
class Loop:
    """Instructions ``[head, latch]`` by address: a backward branch at ``latch`` to ``head``."""

    head: int
    latch: int

    def contains(self, other: "Loop") -> bool:
        return self.head <= other.head and other.latch <= self.latch and self != other


def backward_branches(function: Function) -> list[Loop]:
    """Every loop the control flow shows: a branch to a label at or before itself."""
    loops = []
    for ins in function.instructions:
        if ins.op in ("BRA", "JMP"):
            target = function.target_address(ins)
            if target is not None and target <= ins.address:
                loops.append(Loop(target, ins.address))
    return sorted(set(loops), key=lambda loop: (loop.head, loop.latch))


def _body(function: Function, loop: Loop) -> list[Instruction]:
    return [ins for ins in function.instructions if loop.head <= ins.address <= loop.latch]


def find_main_loop(function: Function) -> Loop | None:
    """The GEMM's main loop: the innermost loop that holds the most multiply-adds.

    Heuristic, on the control flow alone (no line counts, no names):

    1. every backward branch (a ``BRA`` to a label at or before it) closes a loop whose body is
       the instructions from that label to the branch;
    2. keep the loops that contain a multiply-add (FFMA, DFMA, HMMA, DMMA);
    3. of those, keep the innermost ones: no other kept loop lies strictly inside them (a loop
       around the main loop, or one that a cold block jumping back into the body makes look
       larger, is discarded; a loop inside the main loop with no math, such as a carry loop,
       does not disqualify it);
    4. take the one with the most multiply-adds (the hot one: the reduction step, not an
       epilogue or a remainder loop), the shorter on a tie.

    Returns None when no loop holds a multiply-add.
    """
    counted = []
    for loop in backward_branches(function):
        math_count = sum(1 for ins in _body(function, loop) if ins.op in MATH_OPS)
        if math_count:
            counted.append((loop, math_count))
    innermost = [(loop, n) for loop, n in counted if not any(loop.contains(other) for other, _ in counted)]
    if not innermost:
        return None
    return max(innermost, key=lambda item: (item[1], -(item[0].latch - item[0].head)))[0]


def _successors(function: Function, loop: Loop, index: int, body: Sequence[Instruction],
                position: Mapping[int, int]) -> list[int]:
    """Where control goes from ``body[index]`` within one iteration (indices into ``body``;
    ``len(body)`` stands for the latch having been passed, i.e. the next iteration)."""
    ins = body[index]
    after = index + 1
    guarded = bool(ins.predicate) and ins.predicate not in ("@PT", "@UPT")
    if ins.op in ("BRA", "JMP"):
        target = function.target_address(ins)
        if ins.address == loop.latch and target == loop.head:
            return [len(body)] + ([after] if guarded and after < len(body) else [])
        taken: list[int] = []
        if target is not None and ins.address < target <= loop.latch:
            taken = [position[target]]  # a forward branch inside the body
        # A branch out of the body leaves the loop; a branch back into it (a nested loop)
        # is taken as run once, i.e. its fall-through.
        if target is not None and loop.head <= target <= ins.address:
            return [after]
        return taken + ([after] if guarded else [])
    if ins.op in ("EXIT", "RET", "BREAK", "BRX", "JMX"):
        return [after] if guarded else []
    if ins.op == "CALL" and function.target_address(ins) is not None:
        # A call to a label of the kernel is how ptxas leaves some loops: it does not return here.
        return [after] if guarded else []
    return [after]


@dataclass(frozen=True)
class LoopMix:
    """Instructions issued on one path through the main loop's body, per category."""

    issued: int
    counts: dict[str, int]

    @property
    def math_share(self) -> float:
        return self.counts.get("math", 0) / self.issued if self.issued else 0.0


def loop_paths(function: Function, loop: Loop) -> tuple[LoopMix, LoopMix] | None:
    """The steady-state reduction step and the costliest one: two paths through the loop body.

    Forward branches inside the body make alternatives: a vector or a scalar load, a load
    skipped because it falls in the padding, the rare step that moves on to the next filter
    tap, the last step that loads nothing.  Each instruction on a path issues once,
    predicated or not; a nested loop without math counts as run once.

    * The steady-state step is the path with the most global loads (LDG, LDGSTS) that also
      writes shared memory (an STS or LDGSTS: it stages the next step), and of those the
      fewest instructions.  So it is not the last step or a tile edge, which would flatter
      the mix; it takes the scalar staging where the kernel also has a vector one (the
      layout with the most loads per step); and it skips the rare blocks.  If no path
      writes shared memory, the condition is dropped.
    * The costliest step is the path with the most instructions: every optional block taken.
    """
    body = _body(function, loop)
    if not body:
        return None
    end = len(body)
    position = {ins.address: k for k, ins in enumerate(body)}
    successors = [[s for s in _successors(function, loop, k, body, position) if s > k] for k in range(end)]
    # steady[need][k]: the best continuation from k to the latch, as (-global loads, issued),
    # minimised; `need` (0 or 1) says whether it must still write shared memory.
    steady: list[list[tuple[int, int] | None]] = [[None] * (end + 1) for _ in range(2)]
    steady_next = [[end] * (end + 1) for _ in range(2)]
    steady[0][end] = (0, 0)
    most: list[int | None] = [None] * (end + 1)
    most[end] = 0
    most_next: list[int] = [end] * (end + 1)
    for k in range(end - 1, -1, -1):
        op = body[k].op
        loads = 1 if op in GLOBAL_LOAD_OPS else 0
        writes_shared = op in ("STS", "LDGSTS")
        for need in (0, 1):
            rest = 0 if writes_shared else need
            for s in successors[k]:
                after = steady[rest][s]
                if after is None:
                    continue
                candidate = (after[0] - loads, after[1] + 1)
                if steady[need][k] is None or candidate < steady[need][k]:
                    steady[need][k], steady_next[need][k] = candidate, s
        for s in successors[k]:
            longest = most[s]
            if longest is not None and (most[k] is None or longest + 1 > most[k]):
                most[k], most_next[k] = longest + 1, s
    if steady[0][0] is None:
        return None
    need = 1 if steady[1][0] is not None else 0

    def walk_steady() -> LoopMix:
        counts = dict.fromkeys(CATEGORIES, 0)
        issued, k, state = 0, 0, need
        while k < end:
            counts[category(body[k])] += 1
            issued += 1
            following = steady_next[state][k]
            if body[k].op in ("STS", "LDGSTS"):
                state = 0
            k = following
        return LoopMix(issued, counts)

    def walk_costliest() -> LoopMix:
        counts = dict.fromkeys(CATEGORIES, 0)
        issued, k = 0, 0
        while k < end:
            counts[category(body[k])] += 1
            issued += 1
            k = most_next[k]
        return LoopMix(issued, counts)

    return walk_steady(), walk_costliest()


# ----------------------------------------------------------------------------------------
# Occupancy


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one architecture (CUDA C++ Programming Guide, compute capabilities table)."""

    registers: int = 65536
    threads: int = 2048
    blocks: int = 32
    shared_bytes: int = 164 * 1024
    #: Registers are allocated per warp in units of this many.
    register_unit: int = 256
    #: The runtime reserves this much shared memory per block (CUDA 11+).
    reserved_shared_per_block: int = 1024
    shared_unit: int = 128
    max_registers_per_thread: int = 255


ARCH_LIMITS = {
    "sm_80": ArchLimits(shared_bytes=164 * 1024),
    "sm_86": ArchLimits(threads=1536, blocks=16, shared_bytes=100 * 1024),
    "sm_89": ArchLimits(threads=1536, blocks=24, shared_bytes=100 * 1024),
    "sm_90": ArchLimits(shared_bytes=228 * 1024),
}


def occupancy(arch: str, registers: int, threads: int, shared_bytes: int) -> dict[str, object]:
    """Theoretical blocks and warps per SM of a kernel, and what limits them.

    Parameters
    ----------
    arch : str
        ``"sm_80"`` or ``"sm_90"`` (others in :data:`ARCH_LIMITS`).
    registers : int
        Registers per thread (from the cubin).
    threads : int
        Threads per block.
    shared_bytes : int
        Static plus dynamic shared memory per block.

    Returns
    -------
    dict with ``blocks`` and ``warps`` per SM, ``limit`` (``"registers"``, ``"threads"``,
    ``"blocks"`` or ``"shared"``: the tightest), and the block count each limit allows.
    """
    limits = ARCH_LIMITS.get(arch)
    if limits is None:
        raise ValueError(f"arch: no occupancy limits for {arch!r} (known: {', '.join(ARCH_LIMITS)})")
    if threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / limits.register_unit) * limits.register_unit
    by = {
        "registers": (limits.registers // per_warp) // warps,
        "threads": limits.threads // (warps * 32),
        "blocks": limits.blocks,
    }
    block_shared = math.ceil(shared_bytes / limits.shared_unit) * limits.shared_unit + limits.reserved_shared_per_block
    by["shared"] = limits.shared_bytes // block_shared
    limit = min(by, key=lambda k: by[k])
    blocks = by[limit]
    return {"blocks": blocks, "warps": blocks * warps, "limit": limit, "by": by}


# ----------------------------------------------------------------------------------------
# The report


@dataclass
class SassRow:
    """What one instantiation compiles to on one architecture."""

    kernel: str
    arch: str
    gemm: bool
    registers: int
    stack: int
    spill: int
    local_instructions: int
    static_shared: int
    dynamic_shared: int
    threads: int
    blocks_per_sm: int
    warps_per_sm: int
    occupancy_limit: str
    math_per_step: int | None = None
    steps_per_iteration: int = 1
    #: The fewest-issue path through the main loop (None when the kernel has no math loop).
    loop: dict | None = None
    #: The most-issue path.
    loop_max: dict | None = None
    #: Multiply-adds (FFMA/DFMA/HMMA/DMMA) in the whole kernel, and in the main loop's body: a
    #: tensor-core kernel whose HMMA are not all in the main loop computes outside its pipeline.
    math_total: int = 0
    math_in_loop: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _mix_per_step(mix: LoopMix, steps: int) -> dict[str, float]:
    out: dict[str, float] = {"issued": mix.issued / steps, "math_share": round(mix.math_share, 4)}
    for name, count in mix.counts.items():
        out[name] = count / steps
    return out


def analyse(function: Function, resources: Mapping[str, int], *, kernel: str, arch: str, threads: int,
            dynamic_shared: int, spill: int, gemm: bool, math_per_step: int | None = None,
            required_ops: Iterable[str] = (), static_shared: int | None = None,
            min_blocks_per_sm: int = 0) -> SassRow:
    """One :class:`SassRow` from a disassembled kernel and its ``cuobjdump -res-usage`` line.

    ``math_per_step`` is the multiply-adds one thread issues per reduction step (e.g.
    TM·TN·BK for the SIMT GEMM); it turns a main loop that the compiler unrolled into
    per-step figures.  ``problems`` lists what fails the check: for a GEMM kernel, any stack
    frame or local-memory instruction, or a main loop that cannot be found; for any kernel,
    an opcode in ``required_ops`` (e.g. ``HMMA``) that does not appear, or fewer blocks per SM
    than ``min_blocks_per_sm`` (what the planner counts on).
    """
    local = local_memory_instructions(function)
    # The kernel's own static shared memory (ptxas's figure when given): sm_90 cubins also
    # list the 1 KiB per block that the runtime reserves, which occupancy() adds itself.
    static = resources["static_shared"] if static_shared is None else static_shared
    occ = occupancy(arch, resources["registers"], threads, static + dynamic_shared)
    row = SassRow(kernel=kernel, arch=arch, gemm=gemm, registers=resources["registers"], stack=resources["stack"],
                  spill=spill, local_instructions=local, static_shared=static,
                  dynamic_shared=dynamic_shared, threads=threads, blocks_per_sm=int(occ["blocks"]),  # type: ignore[arg-type]
                  warps_per_sm=int(occ["warps"]), occupancy_limit=str(occ["limit"]),  # type: ignore[arg-type]
                  math_per_step=math_per_step,
                  math_total=sum(1 for ins in function.instructions if ins.op in MATH_OPS))
    present = {ins.op for ins in function.instructions}
    for op in required_ops:
        if op not in present:
            row.problems.append(f"no {op} instruction")
    if row.blocks_per_sm < min_blocks_per_sm:
        row.problems.append(f"{row.blocks_per_sm} blocks per SM, the planner counts on {min_blocks_per_sm}")
    if not gemm:
        return row
    if row.stack:
        row.problems.append(f"{row.stack}-byte stack frame")
    if local:
        row.problems.append(f"{local} local-memory instructions (LDL/STL)")
    loop = find_main_loop(function)
    paths = loop_paths(function, loop) if loop is not None else None
    if paths is None:
        row.problems.append("no main loop with multiply-adds found")
        return row
    low, high = paths
    row.math_in_loop = sum(1 for ins in _body(function, loop) if ins.op in MATH_OPS)
    if math_per_step:
        row.steps_per_iteration = max(1, round(low.counts["math"] / math_per_step))
    row.loop = _mix_per_step(low, row.steps_per_iteration)
    row.loop_max = _mix_per_step(high, row.steps_per_iteration)
    return row


def analyse_cubin(cubin: bytes, kernels: Sequence[dict], arch: str) -> list[SassRow]:
    """Rows for the kernels of one cubin.

    ``kernels``: one dict per instantiation with ``kernel`` (name expression), ``mangled``,
    ``threads``, ``dynamic_shared``, ``spill``, ``gemm``, ``math_per_step``,
    ``required_ops`` and optionally ``static_shared`` (ptxas's figure) and ``min_blocks_per_sm``.
    """
    usage_text, sass_text = disassemble(cubin)
    usage = parse_resource_usage(usage_text)
    functions = parse_sass(sass_text)
    rows = []
    for k in kernels:
        function = functions.get(k["mangled"])
        resources = usage.get(k["mangled"])
        if function is None or resources is None:
            row = SassRow(k["kernel"], arch, k["gemm"], 0, 0, k["spill"], 0, 0, k["dynamic_shared"], k["threads"], 0,
                          0, "", problems=["kernel not found in the cubin"])
            rows.append(row)
            continue
        rows.append(analyse(function, resources, kernel=k["kernel"], arch=arch, threads=k["threads"],
                            dynamic_shared=k["dynamic_shared"], spill=k["spill"], gemm=k["gemm"],
                            math_per_step=k.get("math_per_step"), required_ops=k.get("required_ops", ()),
                            static_shared=k.get("static_shared"), min_blocks_per_sm=k.get("min_blocks_per_sm", 0)))
    return rows


def format_sass_table(rows: Sequence[SassRow | Mapping]) -> str:
    """The SASS rows (or their dicts) as an aligned text table; per step: the steady-state path."""
    header = ("kernel", "arch", "regs", "stack", "LDL/STL", "smem B", "CTA/SM", "warps/SM", "FMA%", "FMA% max-path",
              "LDS", "LDG", "int", "branch", "issued", "status")
    lines = [header]
    for row in (r if isinstance(r, SassRow) else SassRow(**r) for r in rows):
        loop, high = row.loop, row.loop_max
        cells = [row.kernel, row.arch, str(row.registers), str(row.stack), str(row.local_instructions),
                 str(row.static_shared + row.dynamic_shared), f"{row.blocks_per_sm} ({row.occupancy_limit})",
                 str(row.warps_per_sm)]
        if loop and high:
            cells += [f"{100 * loop['math_share']:.1f}", f"{100 * high['math_share']:.1f}", _num(loop["lds"]),
                      _num(loop["ldg"]), _num(loop["integer"]), _num(loop["branch"]), _num(loop["issued"])]
        else:
            cells += ["-"] * 7
        cells.append("ok" if not row.problems else "ERROR: " + "; ".join(row.problems))
        lines.append(tuple(cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def _num(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
