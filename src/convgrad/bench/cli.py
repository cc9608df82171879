"""``convgrad bench``: the subcommand's arguments, and the run from arguments to table, JSON and plot.

``convgrad.cli`` adds :func:`add_arguments` to its ``bench`` parser and calls :func:`run`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import sys
from typing import Any, Callable, Iterator

from .. import backends as backend_registry
from ..problem import PASSES
from .report import print_table, require_matplotlib, write_json, write_plot
from .runner import Bench, Options
from .suites import SUITES
from .training import MODEL_NAMES

DTYPES = ("float32", "float16", "bfloat16", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="layer suite (repeatable; default quick): " +
                        "; ".join(f"{s.name}: {s.description}" for s in SUITES.values()))
    parser.add_argument("--backend", action="append",
                        help="backend to time (repeatable, or 'all'); default every available real backend")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--pass", dest="passes", default="all", choices=(*PASSES, "all"))
    parser.add_argument("--batch", type=int, help="batch size (default per suite: larger on a GPU than on the CPU)")
    parser.add_argument("--layout", default="nchw", choices=("nchw", "nhwc"),
                        help="nhwc: channels-last arrays on both sides (NWC / NDHWC for 1-D / 3-D)")
    parser.add_argument("--reference", choices=("torch", "none"),
                        help="library timed beside convgrad (default torch when installed)")
    parser.add_argument("--allow-tf32", action="store_true", help="TF32 on GPU, for convgrad and cuDNN alike")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 1 CPU, 3 GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write every record and the machine description as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a plot of TFLOP/s per layer (PNG, SVG, PDF)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    models = parser.add_argument_group("whole training steps (instead of the layer suites)")
    models.add_argument("--model", action="append", choices=MODEL_NAMES,
                        help="time a training step of this network patched with convgrad.torch.patch against native "
                             "PyTorch, after checking their float64 gradients agree (repeatable); default batch 4")
    models.add_argument("--size", type=int, default=64, help="--model: input height and width (default 64)")
    models.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="--model: where the models run")
    models.add_argument("--thread-budget", action="store_true",
                        help="measure how much a convgrad call slows the PyTorch operator after it, with "
                             "convgrad.torch's thread budget on and off")
    models.add_argument("--no-thread-budget", action="store_true",
                        help="--model: time the patched model with convgrad.torch's thread budget off (for comparison)")


def _resolve_backends(requested: list[str] | None) -> list[str]:
    real = backend_registry.available(include_emulated=False)
    if not requested or "all" in requested:
        return real
    chosen = []
    for name in requested:
        backend = backend_registry.get(name)  # ValueError for unknown names
        if backend.emulated:
            raise ValueError(f"backend {name!r} is emulated (runs GPU code on the CPU) and is never benchmarked")
        if not backend.available():
            raise ValueError(f"backend {name!r} is not available on this machine; available: {', '.join(real)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def options_from_args(args: argparse.Namespace) -> Options:
    reference = args.reference or ("torch" if importlib.util.find_spec("torch") is not None else "none")
    if reference == "torch" and importlib.util.find_spec("torch") is None:
        raise ValueError("--reference torch needs PyTorch installed")
    for name in ("batch", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be non-negative, got {args.warmup}")
    return Options(
        suites=list(dict.fromkeys(args.suite or ["quick"])),
        backends=_resolve_backends(args.backend),
        passes=list(PASSES) if args.passes == "all" else [args.passes],
        dtype=args.dtype,
        channels_last=args.layout == "nhwc",
        reference=reference,
        batch=args.batch,
        allow_tf32=bool(args.allow_tf32),
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
    )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``timeout``) into KeyboardInterrupt so the partial results still get written."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda description: None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        yield lambda description: None
        return
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("bench", total=total)
        started = [False]

        def advance(description: str) -> None:
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=description)

        yield advance
        progress.update(task, completed=total)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) or getattr(args, "thread_budget", False):
        from .model_run import run_models

        return run_models(args)
    try:
        opts = options_from_args(args)
    except ValueError as error:
        print(f"convgrad bench: {error}", file=sys.stderr)
        return 2
    if not opts.backends:
        print("convgrad bench: no real backend is available", file=sys.stderr)
        return 2
    if args.plot:
        try:
            require_matplotlib()
        except ImportError as error:
            print(f"convgrad bench: {error}", file=sys.stderr)
            return 2
    bench = Bench(opts)
    interrupted = False
    with _terminate_as_interrupt():
        try:
            try:
                bench.setup()
            except (RuntimeError, ImportError) as error:
                print(f"convgrad bench: cannot set up: {error}", file=sys.stderr)
                return 2
            with _progress(bench.count(), not args.no_progress) as advance:
                for suite, layer, device, batch in bench.tasks():
                    bench.run_layer(suite, layer, device, batch, advance)
        except KeyboardInterrupt:
            interrupted = True
            print("convgrad bench: interrupted; writing what was measured", file=sys.stderr)
        finally:
            if args.json:
                write_json(bench, args.json, interrupted)
    print_table(bench)
    if args.plot and bench.records:
        write_plot(bench, args.plot)
    if interrupted:
        return 130
    failed = [r for r in bench.records if r["status"] in ("mismatch", "error")]
    for r in failed:
        print(f"convgrad bench: {r['status']}: {r['problem']} on {r['backend']}: "
              f"{r['error'] or r['check']} (max |error| {r['max_abs_error']}, {r['error_over_tolerance']} x tolerance)",
              file=sys.stderr)
    return 1 if failed else 0
