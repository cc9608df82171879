"""``convgrad check``: every pass on every available backend against the float64 reference.

Prints a table of the worst error per backend, pass and dtype, as a fraction of the
dtype's tolerance (1.0 is the limit), and exits non-zero on any failure.  With
``--compile-only`` it instead compiles every CUDA C instantiation through NVRTC.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import arrays, backends
from .compile_check import add_compile_arguments, run_compile_check
from .testing.cases import CASES, DTYPES, ConvCase, make_array
from .testing.reference import reference_forward, reference_grad_input, reference_grad_weight
from .testing.tolerance import tolerance

PASSES = ("fprop", "dgrad", "wgrad")


def _run_case(case: ConvCase, pass_: str, dtype: str, backend: str) -> float:
    """Worst |error| / (atol + rtol·|reference|) over the result; NaN counts as infinite."""
    import convgrad

    rng = np.random.default_rng(0)
    problem = case.problem(dtype)
    x = make_array(rng, case.x_shape(), dtype, integer=False, sliced=case.sliced)
    w = make_array(rng, case.w_shape(), dtype, integer=False)
    dy = make_array(rng, case.y_shape(), dtype, integer=False)
    n, kw = case.ndim, case.kwargs()
    view = lambda a, role: arrays.logical_view(a, "numpy", role, problem)  # noqa: E731
    if pass_ == "fprop":
        got = view(getattr(convgrad, f"conv{n}d")(x, w, backend=backend, **kw), "y")
        want = reference_forward(view(x, "x"), view(w, "w"), problem)
    elif pass_ == "dgrad":
        got = view(getattr(convgrad, f"conv{n}d_input")(x.shape, w, dy, backend=backend, **kw), "x")
        want = reference_grad_input(view(dy, "y"), view(w, "w"), problem)
    else:
        got = view(getattr(convgrad, f"conv{n}d_weight")(x, w.shape, dy, backend=backend, **kw), "w")
        want = reference_grad_weight(view(x, "x"), view(dy, "y"), problem)
    rtol, atol = tolerance(dtype, problem.gemm_reduction[pass_])
    error = np.abs(got.astype(np.float64) - want) / (atol + rtol * np.abs(want))
    return float("inf") if np.isnan(error).any() else float(error.max(initial=0.0))


def check(backend_names: list[str], cases: list[ConvCase] | None = None) -> list[dict[str, object]]:
    """Rows ``{backend, pass, dtype, worst, cases, ok}``; unsupported problems are counted as skipped."""
    cases = [c for c in CASES if c.small] if cases is None else cases
    rows = []
    for name in backend_names:
        backend = backends.get(name)
        for pass_ in PASSES:
            for dtype in DTYPES:
                runnable = [c for c in cases if backend.unsupported(c.problem(dtype)) is None]
                worst = max((_run_case(c, pass_, dtype, name) for c in runnable), default=float("nan"))
                rows.append({"backend": name, "pass": pass_, "dtype": dtype, "worst": worst,
                             "cases": len(runnable), "ok": not runnable or worst <= 1.0})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    add_compile_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.compile_only:
        return run_compile_check(args)
    names = args.backend or backends.available()
    rows = check(names)
    print(f"{'backend':<10} {'pass':<6} {'dtype':<9} {'cases':>5}  {'worst error / tolerance':>24}  result")
    for row in rows:
        worst = "-" if row["cases"] == 0 else f"{row['worst']:.3g}"
        print(f"{row['backend']:<10} {row['pass']:<6} {row['dtype']:<9} {row['cases']:>5}  {worst:>24}  "
              f"{'ok' if row['ok'] else 'FAIL'}")
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed on {', '.join(names)}")
    return 1 if failed else 0
