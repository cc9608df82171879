"""What the GPU will execute for the tensor-core kernels, read from their SASS (no GPU needed).

Each instantiation of ``kernels/tensor_core_gemm.cu`` is compiled by NVRTC to a cubin for
sm_80 and sm_90; ``cuobjdump -res-usage`` and ``nvdisasm -c`` (pip wheels
``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm``) then give, per kernel:

* the HMMA (tensor-core multiply) and LDGSTS (``cp.async``) instruction counts, both of which
  must be non-zero: a kernel that lost its tensor cores or its asynchronous copies fails;
* the stack frame and the local-memory instructions (LDL/STL), which must be zero;
* registers, and the main loop's size and HMMA share: the innermost loop (backward branch)
  with the most HMMA instructions, counted over its whole body (fast and general paths
  alike, so a lower bound of the share on the path that runs).  Static counts, not timings.

:func:`check_tensor_core_kernels` compiles and reads every launchable tensor-core
instantiation (or the ones named); :meth:`TensorCoreSass.problems` says what is wrong with one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence

from .kernel_source import _nvidia_roots, compile_options
from .tensor_core_catalog import SOURCE_TENSOR_CORE, tensor_core_kernels

DEFAULT_ARCHS = ("sm_80", "sm_90")
#: Instructions every tensor-core GEMM kernel must contain.
REQUIRED_OPS = ("HMMA", "LDGSTS")


def find_tool(name: str) -> pathlib.Path | None:
    """``cuobjdump`` or ``nvdisasm`` from the pip wheels, else from ``PATH``."""
    for root in _nvidia_roots():
        for parts in (("cu13", "bin"), ("cu12", "bin"), ("cuda_cuobjdump", "bin"), ("cuda_nvdisasm", "bin")):
            candidate = root.joinpath(*parts, name)
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which(name)
    return pathlib.Path(found) if found else None


def tools_missing() -> str | None:
    """None when ``cuobjdump`` and ``nvdisasm`` are found, else what to install."""
    missing = [name for name in ("cuobjdump", "nvdisasm") if find_tool(name) is None]
    if missing:
        return f"{', '.join(missing)} not found; pip install " + " ".join(f"nvidia-cuda-{n}" for n in missing)
    return None


def _tool(name: str, path: pathlib.Path, *args: str) -> str:
    tool = find_tool(name)
    if tool is None:
        raise RuntimeError(tools_missing() or f"{name} not found")
    result = subprocess.run([str(tool), *args, str(path)], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed on {path.name}: {result.stderr.strip()[:400]}")
    return result.stdout


_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RES_FIELD = re.compile(r"([A-Z]+):(\d+)")
_FUNCTION = re.compile(r"^\.text\.(\S+):\s*$")
_LABEL = re.compile(r"^(\.L_[\w$.]+):\s*$")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")
_TARGET = re.compile(r"`\(([^)]+)\)")


def resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` -> per mangled kernel: ``registers``, ``stack``, ``local``."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        function = _RES_FUNCTION.match(line)
        if function:
            current = function.group(1)
        elif current is not None and "REG:" in line:
            fields = dict(_RES_FIELD.findall(line))
            usage[current] = {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
                              "local": int(fields.get("LOCAL", 0))}
            current = None
    return usage


@dataclass
class Listing:
    """One kernel's instructions: (address, opcode without modifiers, branch target label or None), and its labels."""

    instructions: list = None  # type: ignore[assignment]
    labels: dict = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.instructions = [] if self.instructions is None else self.instructions
        self.labels = {} if self.labels is None else self.labels

    def counts(self, first: int = 0, last: int | None = None) -> collections.Counter:
        """Opcode counts over the instructions at addresses first..last (all by default)."""
        return collections.Counter(op for address, op, _ in self.instructions
                                   if address >= first and (last is None or address <= last))

    def main_loop(self) -> tuple[int, int] | None:
        """(first, last address) of the innermost backward branch's body with the most HMMA, or None."""
        loops = []
        for address, op, target in self.instructions:
            start = self.labels.get(target) if target else None
            if op == "BRA" and start is not None and start <= address:
                loops.append((start, address))
        scored = [(self.counts(a, b)["HMMA"], -(b - a), (a, b)) for a, b in loops]
        scored = [item for item in scored if item[0] > 0]
        return max(scored)[2] if scored else None


def parse_listing(text: str) -> dict[str, Listing]:
    """``nvdisasm -c`` -> per mangled kernel, its :class:`Listing`."""
    listings: dict[str, Listing] = {}
    current: Listing | None = None
    pending: list[str] = []
    for line in text.splitlines():
        function = _FUNCTION.match(line)
        if function:
            current = listings.setdefault(function.group(1), Listing())
            pending = []
            continue
        if line.startswith("//----"):
            current = None
            continue
        if current is None:
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            address = int(instruction.group(1), 16)
            for name in pending:
                current.labels[name] = address
            pending = []
            target = _TARGET.search(instruction.group(3))
            current.instructions.append((address, instruction.group(2), target.group(1) if target else None))
    return listings


@dataclass(frozen=True)
class TensorCoreSass:
    """The static SASS facts of one tensor-core instantiation on one architecture."""

    kernel: str
    arch: str
    registers: int
    stack: int
    local_instructions: int
    hmma: int
    ldgsts: int
    loop_instructions: int  # in the main loop's body, both staging paths included
    loop_hmma: int

    @property
    def hmma_share(self) -> float:
        """HMMA instructions among the main loop's instructions (static, both staging paths counted)."""
        return self.loop_hmma / max(self.loop_instructions, 1)

    def problems(self) -> list[str]:
        """What makes this instantiation unfit: a missing required instruction, a stack frame, local memory."""
        found = []
        for op, count in (("HMMA", self.hmma), ("LDGSTS", self.ldgsts)):
            if count == 0:
                found.append(f"no {op} instruction")
        if self.stack:
            found.append(f"a {self.stack}-byte stack frame")
        if self.local_instructions:
            found.append(f"{self.local_instructions} local-memory instructions (LDL/STL)")
        if self.hmma and self.loop_hmma != self.hmma:
            found.append(f"{self.hmma - self.loop_hmma} HMMA outside the main loop")
        return found


def _cubin(names: Sequence[str], arch: str, source: str) -> tuple[bytes, dict[str, str]]:
    """NVRTC-compile ``names`` of ``kernels/<source>`` for ``arch``: the cubin and each mangled name."""
    from cuda.bindings import nvrtc

    from .compile_check import _nvrtc_major
    from .kernel_source import read_source

    _, program = nvrtc.nvrtcCreateProgram(read_source(source).encode(), source.encode(), 0, [], [])
    try:
        for name in names:
            nvrtc.nvrtcAddNameExpression(program, name.encode())
        options = [o.encode() for o in (*compile_options(_nvrtc_major()), f"--gpu-architecture={arch}")]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(program)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC failed for {arch}: {log.decode(errors='replace')[-2000:]}")
        mangled = {}
        for name in names:
            _, lowered = nvrtc.nvrtcGetLoweredName(program, name.encode())
            mangled[name] = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
        _, size = nvrtc.nvrtcGetCUBINSize(program)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(program, cubin)
        return bytes(cubin), mangled
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def analyse(names: Sequence[str], arch: str, source: str = SOURCE_TENSOR_CORE) -> list[TensorCoreSass]:
    """Compile ``names`` (of ``kernels/<source>``) for ``arch`` in one NVRTC program and read their SASS."""
    cubin, mangled = _cubin(names, arch, source)
    with tempfile.TemporaryDirectory(prefix="convgrad-tc-sass-") as tmp:
        path = pathlib.Path(tmp) / "kernels.cubin"
        path.write_bytes(cubin)
        usage = resource_usage(_tool("cuobjdump", path, "-res-usage"))
        listings = parse_listing(_tool("nvdisasm", path, "-c"))
    rows = []
    for name in names:
        listing = listings.get(mangled[name], Listing())
        ops = listing.counts()
        loop = listing.main_loop()
        body = listing.counts(*loop) if loop else collections.Counter()
        res = usage.get(mangled[name], {"registers": 0, "stack": 0, "local": 0})
        rows.append(TensorCoreSass(name, arch, res["registers"], res["stack"], ops["LDL"] + ops["STL"],
                                   ops["HMMA"], ops["LDGSTS"], sum(body.values()), body["HMMA"]))
    return rows


def _analyse_job(job: tuple[tuple[str, ...], str]) -> list[TensorCoreSass]:
    return analyse(*job)


def check_tensor_core_kernels(archs: Iterable[str] = DEFAULT_ARCHS, names: Sequence[str] | None = None,
                              workers: int | None = None) -> list[TensorCoreSass]:
    """Read the SASS of every launchable tensor-core GEMM instantiation (or of ``names``), per architecture.

    Programs of one dtype each are compiled in separate processes (NVRTC holds the GIL).
    """
    missing = tools_missing()
    if missing:
        raise RuntimeError(missing)
    if names is None:
        names = [spec.name for spec in tensor_core_kernels() if "splitk_reduce" not in spec.name]
    by_type: dict[str, list[str]] = collections.defaultdict(list)
    for name in names:
        by_type[name.split("<")[1].split(",")[0]].append(name)
    jobs = [(tuple(group), arch) for arch in archs for group in by_type.values()]
    count = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    if count == 1:
        results = [_analyse_job(job) for job in jobs]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=count, mp_context=context) as pool:
            results = list(pool.map(_analyse_job, jobs))
    return [row for rows in results for row in rows]


def format_table(rows: Sequence[TensorCoreSass]) -> str:
    """The rows as an aligned text table (static counts)."""
    lines = [("kernel", "arch", "regs", "stack", "LDL/STL", "HMMA", "LDGSTS", "loop", "loop HMMA%", "status")]
    for r in rows:
        status = "; ".join(r.problems()) or "ok"
        lines.append((r.kernel, r.arch, str(r.registers), str(r.stack), str(r.local_instructions), str(r.hmma),
                       str(r.ldgsts), str(r.loop_instructions), f"{100 * r.hmma_share:.1f}", status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def main() -> int:
    """``python -m convgrad.tensor_core_sass``: print the table; non-zero if any instantiation fails."""
    rows = check_tensor_core_kernels()
    print(format_table(rows))
    print("\n(static counts from the SASS; 'loop' is the main loop's body with both staging paths)")
    return 1 if any(row.problems() for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
