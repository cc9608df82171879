"""What the machine and the software are: names, versions, thread pools, load, the git commit."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_identity() -> dict[str, Any]:
    """The CPU's name and how many logical CPUs it has and this process may use."""
    return {"name": cpu_name(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def cpu_software(torch_reference: bool) -> dict[str, Any]:
    """PyTorch's thread count, the thread pools loaded so far, and the environment that steers them."""
    info: dict[str, Any] = {}
    if torch_reference:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    info["threadpools"] = thread_pools()  # call after numpy and torch have loaded their pools
    info["environment"] = {name: os.environ.get(name) for name in ENV_RECORDED}
    return info


def gpu_name() -> str | None:
    with contextlib.suppress(Exception):
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    with contextlib.suppress(Exception):
        import torch

        return torch.cuda.get_device_name()
    with contextlib.suppress(Exception):
        from numba import cuda

        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    return None


def cuda_software(torch_reference: bool) -> dict[str, Any]:
    """CUDA runtime and driver versions (through CuPy); cuDNN's version and settings when PyTorch is the reference."""
    info: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        import cupy

        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    if torch_reference:
        import torch

        info["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
        info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        info["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        info["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def thread_pools() -> list[dict[str, Any]] | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return threadpool_info()


#: Environment variables that steer the BLAS, the thread pools or convgrad: recorded with each CPU run.
ENV_RECORDED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "CONVGRAD_BACKEND", "CONVGRAD_DETERMINISTIC", "CONVGRAD_ALLOW_TF32", "CONVGRAD_AUTOTUNE",
                "CONVGRAD_WORKSPACE_MB", "CUDA_VISIBLE_DEVICES", "NUMBA_ENABLE_CUDASIM")


def library_versions() -> dict[str, str | None]:
    from .. import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "convgrad": __version__,
                                       "numpy": np.__version__}
    for dist in ("torch", "cupy-cuda13x", "cupy-cuda12x", "cupy", "numba", "numba-cuda", "ml_dtypes", "threadpoolctl"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def git_commit() -> dict[str, Any] | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None
