"""Random numbers through every backend's passes, compared with the symbolic results."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .chain import Chain
from .symbolic import Derivation, entries


def _functions(ndim: int) -> tuple[Callable, Callable, Callable]:
    import convgrad

    return (getattr(convgrad, f"conv{ndim}d"), getattr(convgrad, f"conv{ndim}d_input"),
            getattr(convgrad, f"conv{ndim}d_weight"))


def _evaluate(exprs: Sequence[Any], values: dict[Any, float]) -> np.ndarray:
    import sympy

    symbols = list(values)
    function = sympy.lambdify(symbols, list(exprs), modules="numpy")
    return np.asarray(function(*values.values()), dtype=np.float64)


def backend_names() -> list[str]:
    import convgrad

    names = convgrad.backends.available()
    return ["numpy"] + [n for n in names if n != "numpy"]


def _run_passes(d: Derivation, name: str, x: np.ndarray, w: np.ndarray, g: np.ndarray, dtype: Any) -> dict[str, np.ndarray]:
    conv, conv_input, conv_weight = _functions(d.ndim)
    args = dict(stride=d.stride, padding=d.padding, dilation=d.dilation, backend=name)
    x_, w_, g_ = (a.astype(dtype)[None, None] for a in (x, w, g))
    return {
        "output": np.asarray(conv(x_, w_, None, **args))[0, 0],
        "grad_input": np.asarray(conv_input((1, 1, *d.input_shape), w_, g_, **args))[0, 0],
        "grad_weight": np.asarray(conv_weight(x_, (1, 1, *d.kernel_shape), g_, **args))[0, 0],
    }


def check_backends(d: Derivation, seed: int = 0, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Random numbers through every backend's three passes, compared with the symbolic results.

    Each backend runs in float64 where it can, else float32 (with a float32 tolerance).

    Returns
    -------
    list of dict
        One per backend: ``backend``, ``emulated``, ``dtype``, ``max_error`` per pass,
        ``ok``, and ``error`` when the backend raised.
    """
    import convgrad

    rng = np.random.default_rng(seed)
    x_syms, w_syms, g_syms = d.symbols()
    x = rng.standard_normal(d.input_shape)
    w = rng.standard_normal(d.kernel_shape)
    g = rng.standard_normal(d.output_shape)
    values = dict(zip(x_syms, x.flat)) | dict(zip(w_syms, w.flat)) | dict(zip(g_syms, g.flat))
    expected = {
        "output": _evaluate(entries(d.output), values).reshape(d.output_shape),
        "grad_input": _evaluate(entries(d.grad_input), values).reshape(d.input_shape),
        "grad_weight": _evaluate(entries(d.grad_weight), values).reshape(d.kernel_shape),
    }
    results = []
    for name in names if names is not None else backend_names():
        backend = convgrad.backends.get(name)
        row: dict[str, Any] = {"backend": name, "emulated": bool(backend.emulated), "ok": False, "error": None}
        for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
            try:
                got = _run_passes(d, name, x, w, g, dtype)
            except (TypeError, ValueError) as error:
                row["error"] = f"{type(error).__name__}: {error}"
                continue
            except Exception as error:  # a backend failing at run time is reported, not fatal
                row["error"] = f"{type(error).__name__}: {error}"
                break
            errors = {key: float(np.max(np.abs(got[key] - expected[key]) / (1 + np.abs(expected[key]))))
                      for key in expected}
            row.update(dtype=np.dtype(dtype).name, max_error=errors, ok=all(e <= tol for e in errors.values()),
                       error=None)
            break
        results.append(row)
    return results


def check_chain_backends(chain: Chain, seed: int = 0, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The two-layer network's gradients through every backend, against the symbolic ∂C/∂w¹ and ∂C/∂w²."""
    import convgrad

    d = chain.first
    rng = np.random.default_rng(seed + 1)
    x_syms, w_syms, _ = d.symbols()
    x, w1 = rng.standard_normal(d.input_shape), rng.standard_normal(d.kernel_shape)
    w2, y = rng.standard_normal(d.output_shape), float(rng.standard_normal())
    values = dict(zip(x_syms, x.flat)) | dict(zip(w_syms, w1.flat)) | dict(zip(chain.second_kernel, w2.flat))
    values[chain.target] = y
    expected_w1 = _evaluate(chain.grad_first_weight, values).reshape(d.kernel_shape)
    expected_w2 = _evaluate(chain.grad_second_weight, values).reshape(d.output_shape)
    conv, conv_input, conv_weight = _functions(d.ndim)
    args = dict(stride=d.stride, padding=d.padding, dilation=d.dilation)
    results = []
    for name in names if names is not None else backend_names():
        backend = convgrad.backends.get(name)
        row: dict[str, Any] = {"backend": name, "emulated": bool(backend.emulated), "ok": False, "error": None}
        for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
            try:
                xb, w1b, w2b = (a.astype(dtype)[None, None] for a in (x, w1, w2))
                o1 = conv(xb, w1b, None, backend=name, **args)
                o2 = conv(o1, w2b, backend=name)
                grad_o2 = (2 * (np.asarray(o2) - y)).astype(dtype)
                grad_o1 = conv_input(o1.shape, w2b, grad_o2, backend=name)
                grad_w1 = np.asarray(conv_weight(xb, w1b.shape, grad_o1, backend=name, **args))[0, 0]
                grad_w2 = np.asarray(conv_weight(o1, w2b.shape, grad_o2, backend=name))[0, 0]
            except (TypeError, ValueError) as error:
                row["error"] = f"{type(error).__name__}: {error}"
                continue
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
                break
            errors = {"grad_w1": float(np.max(np.abs(grad_w1 - expected_w1) / (1 + np.abs(expected_w1)))),
                      "grad_w2": float(np.max(np.abs(grad_w2 - expected_w2) / (1 + np.abs(expected_w2))))}
            row.update(dtype=np.dtype(dtype).name, max_error=errors, ok=all(e <= tol for e in errors.values()),
                       error=None)
            break
        results.append(row)
    return results


def results_text(title: str, results: list[dict[str, Any]]) -> str:
    lines = [title]
    for row in results:
        label = row["backend"] + (" (emulated)" if row["emulated"] else "")
        if row.get("max_error") is None:
            lines.append(f"  {label}: could not run: {row['error']}")
            continue
        worst = max(row["max_error"].values())
        verdict = "match the symbolic results" if row["ok"] else "DO NOT match the symbolic results"
        parts = ", ".join(row["max_error"])
        lines.append(f"  {label}: {parts} {verdict} ({row['dtype']}, largest relative difference {worst:.1e})")
    return "\n".join(lines)

