"""The compile-only check: every launchable instantiation through NVRTC, with no GPU.

:func:`compile_check` compiles every instantiation in :mod:`convgrad.kernel_catalog` (what
the ``cupy`` planner can launch) through NVRTC (``cuda.bindings.nvrtc``) for each requested
architecture, with the ptxas report.  ``convgrad check --compile-only --arch sm_80,sm_90``
runs it through :func:`run_compile_check`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import sys
from typing import Iterable, Sequence

from .kernel_catalog import compile_cost, launchable_kernels
from .kernel_source import KernelSpec, nvrtc_options, read_source

DEFAULT_ARCHS = ("sm_80", "sm_90")
_NAMES_PER_PROGRAM = 6


def nvrtc_available() -> str | None:
    """None when ``cuda.bindings.nvrtc`` loads and works, else the reason it does not."""
    try:
        from cuda.bindings import nvrtc
    except Exception as exc:  # ImportError, or the NVRTC library failing to load
        return f"cuda.bindings.nvrtc is not importable ({exc}); install cuda-bindings and nvidia-cuda-nvrtc"
    try:
        result, _major, _minor = nvrtc.nvrtcVersion()
    except Exception as exc:
        return f"the NVRTC library could not be loaded ({exc}); install nvidia-cuda-nvrtc"
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return f"nvrtcVersion failed: {result}"
    return None


def _nvrtc_major() -> int:
    from cuda.bindings import nvrtc

    _, major, _ = nvrtc.nvrtcVersion()
    return int(major)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_report(log: str) -> dict[str, dict[str, int]]:
    """Per mangled entry name: registers, static shared bytes, stack frame and spill bytes."""
    report: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in log.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            current = report.setdefault(entry.group(1), {"registers": 0, "static_shared": 0, "stack": 0, "spill": 0})
            continue
        if current is None:
            continue
        spill = _PTXAS_SPILL.search(line)
        if spill:
            current["stack"] = int(spill.group(1))
            current["spill"] = int(spill.group(2)) + int(spill.group(3))
        regs = _PTXAS_REGS.search(line)
        if regs:
            current["registers"] = int(regs.group(1))
            smem = _PTXAS_SMEM.search(line)
            if smem:
                current["static_shared"] = int(smem.group(1))
    return report


def _program_log(nvrtc, program) -> str:
    _, size = nvrtc.nvrtcGetProgramLogSize(program)
    buffer = b" " * size
    nvrtc.nvrtcGetProgramLog(program, buffer)
    return buffer.rstrip(b"\x00 ").decode(errors="replace")


def _compile_source(source: str, specs: Sequence[KernelSpec], arch: str, options: Sequence[str]) -> list[dict]:
    """Compile the instantiations ``specs`` of one source for one architecture; one row each."""
    from cuda.bindings import nvrtc

    rows = []
    code = read_source(source).encode()
    err, program = nvrtc.nvrtcCreateProgram(code, source.encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return [_row(spec, arch, error=f"nvrtcCreateProgram: {err}") for spec in specs]
    try:
        for spec in specs:
            nvrtc.nvrtcAddNameExpression(program, spec.name.encode())
        # The runner's options for this architecture, plus the resource report (which only prints).
        opts = [o.encode() for o in (*options, "-Xptxas=-v")]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(opts), opts)
        log = _program_log(nvrtc, program)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            first = "; ".join(line.strip() for line in log.splitlines() if "error" in line)[:500] or str(result)
            return [_row(spec, arch, error=f"compilation failed: {first}") for spec in specs]
        report = parse_ptxas_report(log)
        for spec in specs:
            err, lowered = nvrtc.nvrtcGetLoweredName(program, spec.name.encode())
            name = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
            info = report.get(name)
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or info is None:
                rows.append(_row(spec, arch, error="no ptxas report for this instantiation"))
                continue
            error = None
            if info["spill"] and not spec.may_spill:
                error = f"{info['spill']} bytes of register spills in a kernel that must not spill"
            rows.append(_row(spec, arch, registers=info["registers"],
                             shared=info["static_shared"] + spec.dynamic_shared_bytes,
                             spill=info["spill"], error=error))
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return rows


def _row(spec: KernelSpec, arch: str, *, registers: int = 0, shared: int = 0, spill: int = 0,
         error: str | None = None) -> dict:
    return {"kernel": spec.name, "source": spec.source, "arch": arch, "registers": registers,
            "shared_bytes": shared, "spill_bytes": spill, "ok": error is None, "error": error}


def compile_check(archs: Iterable[str] = DEFAULT_ARCHS) -> list[dict]:
    """Compile every instantiation the ``cupy`` backend can launch, for each architecture.

    Uses NVRTC through ``cuda.bindings.nvrtc`` with the same sources and exactly the option
    list NVRTC receives from the CuPy runner (:func:`~convgrad.kernel_source.nvrtc_options`,
    CuPy's own additions included), plus ``-Xptxas=-v`` for the resource report.  Needs no GPU.

    Parameters
    ----------
    archs : iterable of str
        Real architectures, e.g. ``("sm_80", "sm_90")``.

    Returns
    -------
    list of dict
        One row per kernel × architecture: ``kernel`` (name expression), ``source``, ``arch``,
        ``registers``, ``shared_bytes`` (static plus the largest dynamic amount the planner
        requests), ``spill_bytes``, ``ok`` and ``error`` (None, or why the row failed: a
        compilation error, or a spill in a kernel that must not spill).

    Raises
    ------
    RuntimeError
        If NVRTC is not available (see :func:`nvrtc_available`).
    """
    reason = nvrtc_available()
    if reason:
        raise RuntimeError(reason)
    major = _nvrtc_major()
    by_source: dict[str, list[KernelSpec]] = {}
    for spec in launchable_kernels():
        by_source.setdefault(spec.source, []).append(spec)
    # NVRTC programs of at most _NAMES_PER_PROGRAM instantiations each, per architecture,
    # compiled concurrently (NVRTC releases the GIL); rows come back in a fixed order.
    jobs = [(source, specs[i:i + _NAMES_PER_PROGRAM], arch) for arch in archs for source, specs in by_source.items()
            for i in range(0, len(specs), _NAMES_PER_PROGRAM)]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: _compile_source(job[0], job[1], job[2], nvrtc_options(job[2], major)),
                                jobs))
    return [row for rows in results for row in rows]


def compile_programs(kernels: Sequence[tuple[str, str]], arch: str, workers: int) -> list[dict]:
    """Compile each ``(source, name_expression)`` as its own NVRTC program, ``workers`` at a time.

    What the ``cupy`` runner does on first use (one program per instantiation, the costliest
    started first), with its exact options, minus loading: rows as :func:`compile_check`'s.
    """
    reason = nvrtc_available()
    if reason:
        raise RuntimeError(reason)
    options = nvrtc_options(arch, _nvrtc_major())
    specs = sorted((KernelSpec(source, name, 0) for source, name in kernels), key=lambda s: -compile_cost(s.name))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda spec: _compile_source(spec.source, [spec], arch, options), specs))
    return [row for rows in results for row in rows]


def format_table(rows: Sequence[dict]) -> str:
    """The compile-check rows as an aligned text table."""
    header = ("kernel", "arch", "regs", "shared B", "spill B", "status")
    lines = [header]
    for row in rows:
        status = "ok" if row["ok"] else f"ERROR: {row['error']}"
        lines.append((row["kernel"], row["arch"], str(row["registers"]), str(row["shared_bytes"]),
                      str(row["spill_bytes"]), status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    return "\n".join(out)


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--compile-only`` and ``--arch`` to a ``convgrad check`` argument parser."""
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every CUDA kernel instantiation through NVRTC (no GPU needed) and report resources")
    parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS),
                        help="comma-separated real architectures for --compile-only (default: %(default)s)")


def parse_archs(text: str) -> tuple[str, ...]:
    """``"sm_80,sm_90"`` -> ``("sm_80", "sm_90")``, checked."""
    archs = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in archs if not re.fullmatch(r"sm_\d+[a-z]?", a)]
    if not archs or bad:
        raise ValueError(f"--arch takes real architectures such as sm_80,sm_90; got {text!r}")
    return archs


def run_compile_check(args: argparse.Namespace) -> int:
    """Run :func:`compile_check` for ``args.arch``, print the table; non-zero on any error."""
    try:
        archs = parse_archs(getattr(args, "arch", None) or ",".join(DEFAULT_ARCHS))
    except ValueError as exc:
        print(f"convgrad check: {exc}", file=sys.stderr)
        return 2
    try:
        rows = compile_check(archs)
    except RuntimeError as exc:
        print(f"convgrad check --compile-only: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    failed = [row for row in rows if not row["ok"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} kernel x architecture builds passed"
          + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0
