"""``convgrad bench --model`` and ``--thread-budget``: from arguments to the table and the JSON document.

The layer suites' run lives in :mod:`.cli`; this is the run of whole training steps
(:mod:`.training`) and of the thread-budget measurement (:mod:`.thread_budget`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any

from .environment import cpu_identity, cpu_software, git_commit, library_versions, load_average
from .timing import CPU_SETTLE_S, Contention
from .training import MODEL_RATIO_DEFINITION, GradientMismatch, ModelOptions, time_model


def _options(args: argparse.Namespace) -> ModelOptions:
    if importlib.util.find_spec("torch") is None:
        raise ValueError("--model and --thread-budget need PyTorch installed")
    if args.suite:
        raise ValueError("--suite times layers and --model whole training steps: choose one")
    for name in ("batch", "repeats", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be non-negative, got {args.warmup}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: PyTorch sees no CUDA device")
    return ModelOptions(models=list(dict.fromkeys(args.model or [])), batch=args.batch or 4, size=args.size,
                        dtype=args.dtype, device=args.device, repeats=args.repeats, warmup=args.warmup,
                        seed=args.seed, thread_budget=not args.no_thread_budget)


def _meta(opts: ModelOptions, load_at_start: Any, contention: Contention) -> dict[str, Any]:
    devices: dict[str, Any] = {"cpu": {**cpu_identity(), **cpu_software(True)}}
    if opts.device == "cuda":
        import torch

        devices["gpu"] = {"name": torch.cuda.get_device_name(), "cudnn": torch.backends.cudnn.version()}
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["convgrad", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv,
        "host": platform.node(),
        "load_average": {"start": load_at_start, "end": load_average()},
        "contention": contention.report(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "git": git_commit(),
        "devices": devices,
        "ratio_definition": MODEL_RATIO_DEFINITION,
        "timing": ("CPU: median of time.perf_counter around each training step after warm-up, with a pause of "
                   f"{CPU_SETTLE_S} s before timing the other model; GPU: median CUDA-event time per step, L2 "
                   "flushed before each"),
    }


def _print_models(records: list[dict[str, Any]]) -> None:
    if not records:
        return
    columns = ["model", "device", "dtype", "batch", "size", "budget", "native ms", "patched ms", "ratio",
               "ratio of fastest", "gradients (float64)"]
    rows = [[r["model"], r["device"], r["dtype"], str(r["batch"]), f"{r['size']}x{r['size']}",
             "on" if r["thread_budget"] else "off", f"{r['native_time_s'] * 1e3:.1f}",
             f"{r['patched_time_s'] * 1e3:.1f}", f"{r['ratio']:.2f}",
             f"{r['native_time_min_s'] / r['patched_time_min_s']:.2f}", f"ok ({r['gradient_max_error']:.1e})"]
            for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print(MODEL_RATIO_DEFINITION)


def _print_thread_budget(results: list[dict[str, Any]]) -> None:
    from .thread_budget import THREAD_BUDGET_DEFINITION

    for result in results:
        state = "on" if result["thread_budget"] else "off"
        parts = [f"{name} {r['after_torch_s'] * 1e3:.3f} -> {r['after_convgrad_s'] * 1e3:.3f} ms ({r['slowdown']:.2f}x; "
                 f"fastest {r['slowdown_min']:.2f}x)" for name, r in result["operators"].items()]
        print(f"thread budget {state}: " + "; ".join(parts))
    if results:
        print(THREAD_BUDGET_DEFINITION)


def run_models(args: argparse.Namespace) -> int:
    try:
        opts = _options(args)
    except ValueError as error:
        print(f"convgrad bench: {error}", file=sys.stderr)
        return 2
    from .thread_budget import THREAD_BUDGET_DEFINITION, measure_thread_budget

    load_at_start, contention = load_average(), Contention()
    records: list[dict[str, Any]] = []
    budgets: list[dict[str, Any]] = []
    failure = None
    if args.thread_budget:
        budgets = [measure_thread_budget(True), measure_thread_budget(False)]
    elif opts.models and opts.device == "cpu":
        budgets = [measure_thread_budget(opts.thread_budget)]
    for name in opts.models:
        try:
            records.append(time_model(name, opts))
        except GradientMismatch as error:
            failure = str(error)
            print(f"convgrad bench: GRADIENT MISMATCH: {error}", file=sys.stderr)
            break
        except (ValueError, RuntimeError) as error:  # e.g. an input too small for the network's batch norms
            failure = f"{name}: {type(error).__name__}: {error}"
            print(f"convgrad bench: {failure}", file=sys.stderr)
            break
    _print_models(records)
    _print_thread_budget(budgets)
    if args.json:
        document = {"meta": {**_meta(opts, load_at_start, contention), "thread_budget_definition":
                             THREAD_BUDGET_DEFINITION, "gradient_failure": failure},
                    "models": records, "thread_budget": budgets}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(document, indent=1, default=str) + "\n")
    return 1 if failure else 0
