"""``convgrad.precompile`` and ``convgrad precompile``: build the kernels a workload needs, ahead of time.

The GPU backends compile their kernels on first use: a training step's first iteration,
the first benchmark repeat, or a ``torch.cuda.graph`` capture (where compiling and loading
a module is not allowed) would otherwise pay for it.  ``precompile`` plans every pass of
every problem of a workload exactly as a call would, and builds what the plans launch:

* ``cupy``: each instantiation its own NVRTC program, concurrently, into CuPy's disk cache
  and loaded on the current device;
* ``numba``: every kernel of the requested dtypes, into Numba's disk cache (``cache=True``);
* ``cupy-host``: the emulator's libraries, as its launches would build them.

``compile_only=True`` compiles the ``cupy`` kernels with NVRTC alone, for an architecture
given by name, with exactly the runner's options; it needs no GPU, loads nothing and writes
no cache, and is how the cold compile time is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from . import backends
from .problem import ConvProblem

PASSES = ("fprop", "dgrad", "wgrad")
#: The backends ``precompile`` builds for when none is named, where available.
GPU_BACKENDS = ("cupy", "numba")


@dataclass
class PrecompileReport:
    """What one backend built: the kernels (name expressions or labels) and the wall time."""

    backend: str
    kernels: list[str] = field(default_factory=list)
    seconds: float = 0.0
    arch: str | None = None
    #: CPU time of this process over the build (all threads): on a shared machine, what the
    #: build itself cost, whatever else ran.
    cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "arch": self.arch, "kernels": len(self.kernels), "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds, "names": self.kernels}


def workload_problems(workload: Any, dtypes: Sequence[str] = ("float32",), *, batch: int | None = None,
                      layouts: Sequence[str] = ("nchw",), allow_tf32: bool = False) -> list[ConvProblem]:
    """The problems of a workload: suite names (``"resnet50"``), problems, or a list mixing both.

    A suite's layers are taken at ``batch`` (default: the suite's GPU batch) in every dtype and
    every layout (``"nchw"``, ``"nhwc"``).
    """
    for layout in layouts:
        if layout not in ("nchw", "nhwc"):
            raise ValueError(f"precompile: layouts are 'nchw' or 'nhwc', got {layout!r}")
    from .bench.suites import SUITES

    items = [workload] if isinstance(workload, (str, ConvProblem)) else list(workload)
    problems: list[ConvProblem] = []
    for item in items:
        if isinstance(item, ConvProblem):
            problems.append(item)
            continue
        if item not in SUITES:
            raise ValueError(f"precompile: unknown suite {item!r}; suites are {', '.join(sorted(SUITES))}")
        suite = SUITES[item]
        for layout in layouts:
            for dtype in dtypes:
                for layer in suite.layers:
                    problems.append(layer.problem(batch or suite.batch_gpu, dtype, layout == "nhwc", allow_tf32))
    return problems


def planned_kernels(problems: Iterable[ConvProblem], passes: Sequence[str] = PASSES,
                    backend: str = "cupy") -> list[tuple[str, str]]:
    """``(source, name_expression)`` of every launch the ``cupy`` planner makes for these problems, in order."""
    planner = backends.get(backend).planner  # type: ignore[attr-defined]
    kernels: dict[tuple[str, str], None] = {}
    for problem in problems:
        if planner.unsupported(problem) or problem.is_empty:
            continue
        for pass_ in passes:
            for launch in planner.plan(problem, pass_).launches:
                kernels[(launch.source, launch.kernel)] = None
    return list(kernels)


def precompile(workload: Any, *, dtypes: Sequence[str] = ("float32",), passes: Sequence[str] = PASSES,
               backend: str | Sequence[str] | None = None, batch: int | None = None, layouts: Sequence[str] = ("nchw",),
               allow_tf32: bool = False, compile_only: bool = False, arch: str = "sm_90",
               workers: int | None = None) -> list[PrecompileReport]:
    """Build every kernel a workload needs, so that its first call, the GPU check or a
    ``torch.cuda.graph`` capture find them ready.

    Call it once before capturing a CUDA graph: capture cannot compile or load modules.

    Parameters
    ----------
    workload : str, ConvProblem, or a sequence of them
        Suite names as ``convgrad bench --suite`` takes them (``"resnet50"``, ...), or problems.
    dtypes : sequence of str
        Dtypes of the suites' layers (problems carry their own).
    passes : sequence of str
        Of ``"fprop"``, ``"dgrad"``, ``"wgrad"``; a training step needs all three.
    backend : str or sequence of str, optional
        Default: every available GPU backend (``cupy``, ``numba``).
    batch, layouts, allow_tf32
        How the suites' layers are called (default batch: the suite's GPU batch; layouts among
        ``"nchw"`` and ``"nhwc"``, where kernels may differ).
    compile_only : bool
        Compile the ``cupy`` kernels with NVRTC for ``arch`` only (no GPU needed, nothing loaded).
    arch : str
        The architecture for ``compile_only``, e.g. ``"sm_90"``.
    workers : int, optional
        Concurrent NVRTC programs (default: the cores this process may use).

    Returns
    -------
    list of PrecompileReport, one per backend.
    """
    for pass_ in passes:
        if pass_ not in PASSES:
            raise ValueError(f"precompile: passes must be among {', '.join(PASSES)}, got {pass_!r}")
    problems = workload_problems(workload, dtypes, batch=batch, layouts=layouts, allow_tf32=allow_tf32)
    if compile_only:
        return [_compile_only(problems, passes, arch, workers)]
    names = [backend] if isinstance(backend, str) else list(backend or [])
    if not names:
        names = [n for n in GPU_BACKENDS if n in backends.registered() and backends.get(n).available()
                 and not backends.get(n).emulated]
        if not names:
            raise RuntimeError("precompile: no GPU backend (cupy, numba) is available here; "
                               "compile_only=True compiles the cupy kernels with NVRTC alone")
    reports = []
    for name in names:
        chosen = backends.get(name)
        if not chosen.available():
            raise RuntimeError(f"precompile: backend {name!r} is not available on this machine")
        started, cpu = time.perf_counter(), time.process_time()
        if hasattr(chosen, "planner"):
            plans = [chosen.planner.plan(p, pass_) for p in problems if not chosen.unsupported(p) and not p.is_empty
                     for pass_ in passes]
            runner = chosen.runner  # type: ignore[attr-defined]
            if workers and hasattr(runner, "workers"):
                runner.workers = workers
            chosen.compile_plans(plans)  # type: ignore[attr-defined]
            built = list(dict.fromkeys(launch.kernel for plan in plans for launch in plan.launches))
        elif hasattr(chosen, "precompile"):
            built = chosen.precompile({p.dtype for p in problems})
        else:
            raise ValueError(f"precompile: backend {name!r} compiles nothing ahead of time")
        reports.append(PrecompileReport(name, built, time.perf_counter() - started, None, time.process_time() - cpu))
    return reports


def _compile_only(problems: list[ConvProblem], passes: Sequence[str], arch: str,
                  workers: int | None) -> PrecompileReport:
    """The ``cupy`` kernels of the problems through NVRTC alone: one program each, concurrently."""
    from .backends.cupy_runner import compile_workers
    from .compile_check import compile_programs, nvrtc_available

    reason = nvrtc_available()
    if reason:
        raise RuntimeError(reason)
    kernels = planned_kernels(problems, passes)
    started, cpu = time.perf_counter(), time.process_time()
    rows = compile_programs(kernels, arch, workers or compile_workers())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    failed = [f"{row['kernel']}: {row['error']}" for row in rows if not row["ok"]]
    if failed:
        raise RuntimeError("precompile: NVRTC failed on\n" + "\n".join(failed))
    return PrecompileReport("cupy", [name for _, name in kernels], seconds, arch, cpu)


# ----------------------------------------------------------------------------------------
# The command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench.suites import SUITES

    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="a layer suite to build for (repeatable; default: resnet50)")
    parser.add_argument("--dtype", default="float32",
                        help="comma-separated dtypes, e.g. float32,bfloat16 (default: %(default)s)")
    parser.add_argument("--pass", dest="passes", default="all", choices=(*PASSES, "all"),
                        help="the passes to build for (default: all three, a training step)")
    parser.add_argument("--batch", type=int, help="batch size (default: the suite's GPU batch)")
    parser.add_argument("--layout", default="nchw", help="comma-separated layouts, nchw and/or nhwc (default: %(default)s)")
    parser.add_argument("--allow-tf32", action="store_true")
    parser.add_argument("--backend", action="append",
                        help="a backend to build for (repeatable; default: every available GPU backend)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the cupy kernels with NVRTC alone (no GPU needed) and report the wall time")
    parser.add_argument("--arch", default="sm_90", help="architecture for --compile-only (default: %(default)s)")
    parser.add_argument("--workers", type=int, help="concurrent NVRTC programs (default: the cores available)")
    parser.add_argument("--json", metavar="PATH", help="write what was built, and the times, as JSON")


def run(args: argparse.Namespace) -> int:
    """Build for each backend in turn, printing and (with ``--json``) recording each as it finishes,
    so a run stopped by a time limit keeps what it had built."""
    from .compile_check import parse_archs

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    passes = PASSES if args.passes == "all" else (args.passes,)
    suites = args.suite or ["resnet50"]
    document: dict[str, Any] = {"suites": suites, "dtypes": dtypes, "layouts": args.layout, "passes": list(passes),
                                "reports": []}
    try:
        archs = parse_archs(args.arch)
        if len(archs) != 1:
            raise ValueError(f"--arch takes one architecture, got {args.arch!r}")
        names = args.backend or [None]
        if not args.compile_only and args.backend is None:
            names = [n for n in GPU_BACKENDS if n in backends.registered() and backends.get(n).available()
                     and not backends.get(n).emulated] or [None]  # None: precompile() says why there is none
        for name in names:
            (report,) = precompile(suites, dtypes=dtypes, passes=passes, backend=name, batch=args.batch,
                                   layouts=[layout.strip() for layout in args.layout.split(",") if layout.strip()],
                                   allow_tf32=args.allow_tf32, compile_only=args.compile_only, arch=archs[0],
                                   workers=args.workers)
            where = f" for {report.arch} (NVRTC only)" if report.arch else ""
            print(f"{report.backend}{where}: {len(report.kernels)} kernels in {report.seconds:.1f} s "
                  f"({report.cpu_seconds:.1f} CPU-seconds)", flush=True)
            document["reports"].append(report.as_dict())
            if args.json:
                with open(args.json, "w", encoding="utf-8") as handle:
                    json.dump(document, handle, indent=1)
            if args.compile_only:
                break
    except (ValueError, RuntimeError) as error:
        print(f"convgrad precompile: {error}", file=sys.stderr)
        return 1
    return 0
