"""What a run produced: the table on the terminal, the JSON document and the plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from .runner import RATIO_DEFINITION, Bench

#: What ``--plot`` needs and where it comes from (the ``bench`` extra has matplotlib).
PLOT_REQUIREMENT = '--plot needs matplotlib, which cannot be imported here: pip install "convgrad[bench]"'


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(bench: Bench, file: Any = None) -> None:
    """The per-layer table and the geometric means, with rich when it is installed."""
    gpu = "gpu" in bench.devices_used()
    columns = ["layer", "pass", "backend", "ms", "TFLOP/s", "GB/s", "roofline", "ref ms", "ratio", "check"]
    if gpu:
        columns.insert(4, "overhead ms")
    rows = []
    for r in bench.records:
        status = r["status"]
        check = {"ok": "ok", "mismatch": "MISMATCH", "unsupported": "unsupported", "error": "ERROR"}.get(status, status)
        row = [r["layer"], r["pass"], r["backend"], _fmt(r["time_s"], ".3f", 1e3), _fmt(r["tflops"], ".3g"),
               _fmt(r["gbs"], ".1f"), _fmt(r["roofline_fraction"], ".0%"), _fmt(r["reference_time_s"], ".3f", 1e3),
               _fmt(r["ratio"], ".2f"), check]
        if gpu:
            row.insert(4, _fmt(r["launch_overhead_s"], ".3f", 1e3))
        rows.append(row)
    summary_rows = [[name, pass_, str(s["layers"]), _fmt(s["geomean_tflops"], ".3g"), _fmt(s["geomean_ratio"], ".2f"),
                     str(s["mismatches"])]
                    for name, passes in bench.summary().items() for pass_, s in passes.items()]
    summary_columns = ["backend", "pass", "layers", "geomean TFLOP/s", "geomean ratio", "mismatches/errors"]
    title = (f"convgrad bench: {', '.join(bench.options.suites)}, {bench.options.dtype}, "
             f"{'nhwc' if bench.options.channels_last else 'nchw'}, allow_tf32={bench.options.allow_tf32}")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        out = file or sys.stdout
        print(title, file=out)
        for table_columns, table_rows in ((columns, rows), (summary_columns, summary_rows)):
            widths = [max(len(c), *(len(r[i]) for r in table_rows)) if table_rows else len(c)
                      for i, c in enumerate(table_columns)]
            print("  ".join(c.ljust(w) for c, w in zip(table_columns, widths)), file=out)
            for row in table_rows:
                print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=out)
            print(file=out)
        print(RATIO_DEFINITION, file=out)
        return
    console = Console(file=file, width=None if file is None and sys.stdout.isatty() else 160)
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("layer", "pass", "backend", "check") else "right")
    for row in rows:
        style = "red" if row[-1] in ("MISMATCH", "ERROR") else ("dim" if row[-1] == "unsupported" else None)
        table.add_row(*row, style=style)
    console.print(table)
    summary = Table(title="geometric means over the layers")
    for c in summary_columns:
        summary.add_column(c, justify="left" if c in ("backend", "pass") else "right")
    for row in summary_rows:
        summary.add_row(*row)
    console.print(summary)
    console.print(RATIO_DEFINITION)


def write_json(bench: Bench, path: str, interrupted: bool) -> None:
    """Every record, the summary per backend and pass, and ``meta``: the machine and the run."""
    document = {"meta": {**bench.meta(), "interrupted": interrupted}, "records": bench.records,
                "summary": bench.summary()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=1, default=str) + "\n")


def require_matplotlib() -> None:
    """Raise ImportError naming the extra to install when :func:`write_plot` could not run.

    Called before the benchmark starts, so that a missing matplotlib does not waste the run.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as error:
        raise ImportError(PLOT_REQUIREMENT) from error


def write_plot(bench: Bench, path: str) -> None:
    """TFLOP/s per layer, one panel per pass, a bar per backend and per reference device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = bench.options.passes
    layers = list(dict.fromkeys(r["layer"] for r in bench.records))
    series: dict[str, dict[tuple[str, str], float]] = {}
    for r in bench.records:
        if r["tflops"]:
            series.setdefault(r["backend"], {})[(r["layer"], r["pass"])] = r["tflops"]
        if r["reference_tflops"]:
            series.setdefault(f"torch ({r['device']})", {})[(r["layer"], r["pass"])] = r["reference_tflops"]
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(8.0, 0.45 * len(layers) * max(len(series), 1)), 3.2 * len(passes)),
                             squeeze=False)
    width = 0.8 / max(len(series), 1)
    for ax, pass_ in zip(axes[:, 0], passes):
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(layers))]
            ax.bar(xs, [values.get((layer, pass_), math.nan) for layer in layers], width, label=label)
        ax.set_title(pass_)
        ax.set_yscale("log")  # depthwise and dense layers differ by orders of magnitude
        ax.set_ylabel("TFLOP/s")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"convgrad bench ({bench.options.dtype}, {', '.join(bench.options.suites)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
