"""The compile-only check: every launchable instantiation through NVRTC, with no GPU.

:func:`compile_check` compiles every instantiation in :mod:`convgrad.kernel_catalog` (what
the ``cupy`` planner can launch) through NVRTC (``cuda.bindings.nvrtc``) for each requested
architecture, with the ptxas report.  ``convgrad check --compile-only --arch sm_80,sm_90``
runs it through :func:`run_compile_check`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
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


def _cubin(nvrtc, program) -> bytes:
    _, size = nvrtc.nvrtcGetCUBINSize(program)
    buffer = b" " * size
    nvrtc.nvrtcGetCUBIN(program, buffer)
    return bytes(buffer)


def _compile_source(source: str, specs: Sequence[KernelSpec], arch: str, options: Sequence[str],
                    sass: bool = False) -> list[dict]:
    """Compile the instantiations ``specs`` of one source for one architecture; one row each.

    One NVRTC run gives both the ptxas report and, with ``sass``, the cubin that
    :mod:`convgrad.sass_report` reads: each instantiation is compiled once per architecture.
    """
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
        lowered_names = {}
        for spec in specs:
            err, lowered = nvrtc.nvrtcGetLoweredName(program, spec.name.encode())
            name = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
            info = report.get(name)
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or info is None:
                rows.append(_row(spec, arch, error="no ptxas report for this instantiation"))
                continue
            lowered_names[spec.name] = name
            error = None
            if info["spill"] and not spec.may_spill:
                error = f"{info['spill']} bytes of register spills in a kernel that must not spill"
            rows.append(_row(spec, arch, registers=info["registers"],
                             shared=info["static_shared"] + spec.dynamic_shared_bytes,
                             spill=info["spill"], stack=info["stack"], error=error))
        if sass:
            _attach_sass(rows, specs, arch, lowered_names, _cubin(nvrtc, program))
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return rows


def _attach_sass(rows: list[dict], specs: Sequence[KernelSpec], arch: str, lowered: dict[str, str],
                 cubin: bytes) -> None:
    """Add the SASS report of each compiled instantiation to its row (``row["sass"]``)."""
    from . import sass_report

    wanted = [{"kernel": spec.name, "mangled": lowered[spec.name], "threads": spec.threads,
               "dynamic_shared": spec.dynamic_shared_bytes, "gemm": spec.gemm, "math_per_step": spec.math_per_step,
               "required_ops": spec.required_ops, "min_blocks_per_sm": spec.min_blocks_per_sm, "spill": 0}
              for spec in specs if spec.name in lowered]
    by_name = {row["kernel"]: row for row in rows}
    for k in wanted:
        k["spill"] = by_name[k["kernel"]]["spill_bytes"]
        k["static_shared"] = by_name[k["kernel"]]["shared_bytes"] - k["dynamic_shared"]
    for sass_row in sass_report.analyse_cubin(cubin, wanted, arch):
        row = by_name[sass_row.kernel]
        row["sass"] = sass_row.as_dict()
        if sass_row.problems and row["ok"]:
            row["ok"] = False
            row["error"] = "SASS: " + "; ".join(sass_row.problems)


def _row(spec: KernelSpec, arch: str, *, registers: int = 0, shared: int = 0, spill: int = 0, stack: int = 0,
         error: str | None = None) -> dict:
    return {"kernel": spec.name, "source": spec.source, "arch": arch, "registers": registers,
            "shared_bytes": shared, "spill_bytes": spill, "stack_bytes": stack, "ok": error is None, "error": error}


def _compile_job(job: tuple) -> list[dict]:
    return _compile_source(*job)


def compile_check(archs: Iterable[str] = DEFAULT_ARCHS, *, sass: bool = False,
                  workers: int | None = None) -> list[dict]:
    """Compile every instantiation the ``cupy`` backend can launch, for each architecture.

    Uses NVRTC through ``cuda.bindings.nvrtc`` with the same sources and exactly the option
    list NVRTC receives from the CuPy runner (:func:`~convgrad.kernel_source.nvrtc_options`,
    CuPy's own additions included), plus ``-Xptxas=-v`` for the resource report.  Needs no GPU.

    Parameters
    ----------
    archs : iterable of str
        Real architectures, e.g. ``("sm_80", "sm_90")``.
    sass : bool
        Also read each cubin's SASS (:mod:`convgrad.sass_report`; needs ``cuobjdump`` and
        ``nvdisasm``): every row gets a ``sass`` entry, and a GEMM kernel with a stack frame
        or a local-memory instruction, or a kernel without its required opcodes, fails.
    workers : int, optional
        Worker processes (default: one per CPU).  Each compiles whole programs and reads
        their SASS itself, so the Python parsing of the disassembly runs in parallel too.

    Returns
    -------
    list of dict
        One row per kernel × architecture: ``kernel`` (name expression), ``source``, ``arch``,
        ``registers``, ``shared_bytes`` (static plus the largest dynamic amount the planner
        requests), ``spill_bytes``, ``stack_bytes``, ``ok`` and ``error`` (None, or why the
        row failed), and with ``sass`` the ``sass`` dict of a
        :class:`~convgrad.sass_report.SassRow`.

    Raises
    ------
    RuntimeError
        If NVRTC is not available (see :func:`nvrtc_available`), or with ``sass`` if the
        binary utilities are missing.
    """
    reason = nvrtc_available()
    if reason:
        raise RuntimeError(reason)
    if sass:
        from .sass_report import tools_available

        missing = tools_available()
        if missing:
            raise RuntimeError(missing)
    major = _nvrtc_major()
    by_source: dict[str, list[KernelSpec]] = {}
    for spec in launchable_kernels():
        by_source.setdefault(spec.source, []).append(spec)
    # NVRTC programs of at most _NAMES_PER_PROGRAM instantiations each, per architecture;
    # the GEMM programs (the slow ones) first so that the pool ends evenly.
    jobs = [(source, tuple(specs[i:i + _NAMES_PER_PROGRAM]), arch, nvrtc_options(arch, major), sass) for arch in archs
            for source, specs in by_source.items() for i in range(0, len(specs), _NAMES_PER_PROGRAM)]
    order = sorted(range(len(jobs)), key=lambda j: not any(spec.gemm for spec in jobs[j][1]))
    count = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    results: list[list[dict]] = [[] for _ in jobs]
    if count == 1:
        for j in order:
            results[j] = _compile_job(jobs[j])
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=count, mp_context=context) as pool:
            futures = {j: pool.submit(_compile_job, jobs[j]) for j in order}
            for j, future in futures.items():
                results[j] = future.result()
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
    """Add ``--compile-only``, ``--arch``, ``--sass`` and ``--json`` to a ``convgrad check`` argument parser."""
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every CUDA kernel instantiation through NVRTC (no GPU needed) and report resources")
    parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS),
                        help="comma-separated real architectures for --compile-only (default: %(default)s)")
    parser.add_argument("--sass", action="store_true",
                        help="with --compile-only: read the SASS (cuobjdump/nvdisasm) for stack frames, local memory, "
                             "occupancy and the main loop's instruction mix")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="with --compile-only: also write the rows as JSON to PATH")


def parse_archs(text: str) -> tuple[str, ...]:
    """``"sm_80,sm_90"`` -> ``("sm_80", "sm_90")``, checked."""
    archs = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in archs if not re.fullmatch(r"sm_\d+[a-z]?", a)]
    if not archs or bad:
        raise ValueError(f"--arch takes real architectures such as sm_80,sm_90; got {text!r}")
    return archs


def run_compile_check(args: argparse.Namespace) -> int:
    """Run :func:`compile_check` for ``args.arch``, print the table(s); non-zero on any error."""
    try:
        archs = parse_archs(getattr(args, "arch", None) or ",".join(DEFAULT_ARCHS))
    except ValueError as exc:
        print(f"convgrad check: {exc}", file=sys.stderr)
        return 2
    sass = bool(getattr(args, "sass", False))
    try:
        rows = compile_check(archs, sass=sass)
    except RuntimeError as exc:
        print(f"convgrad check --compile-only: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if sass:
        from .sass_report import format_sass_table

        print("\nSASS (static; per reduction step of the main loop's steady-state path):")
        print(format_sass_table([row["sass"] for row in rows if "sass" in row]))
    json_path = getattr(args, "json", None)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump({"archs": list(archs), "sass": sass, "rows": rows}, handle, indent=1)
        print(f"\nJSON written to {json_path}")
    failed = [row for row in rows if not row["ok"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} kernel x architecture builds passed"
          + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0
