"""AddressSanitizer mode: the child-process environment, and tight allocations.

A sanitized kernel library can only be loaded into a process that has the ASan runtime
loaded first, which a running Python cannot arrange for itself.  `sanitizer_env` builds the
environment of a child process that has it (``LD_PRELOAD``), and `run_sanitized` runs a
command (typically ``python -m pytest ...``) in it.  In that child, ``HostRunner`` builds
sanitized libraries by default (``CONVGRAD_CUDA_HOST_SANITIZE=address``).

ASan reports an access just past the end of an allocation.  `place_tight` copies an array
into an allocation that ends exactly where the array's last element does, so that a kernel
reading or writing one element too far is caught; the backend applies it to every tensor.
GCC only: clang's ASan runtime is linked differently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .toolchain import find_compiler, runtime_library

ASAN_OPTIONS = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"

# The directory that holds the `convgrad` package this module was imported from.
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]


def sanitizer_env(base: Mapping[str, str] | None = None, *, cxx: str | None = None) -> dict[str, str]:
    """Environment for a child process that runs kernels under AddressSanitizer and UBSan.

    Parameters
    ----------
    base : mapping, optional
        Environment to start from; default ``os.environ``.
    cxx : str, optional
        The compiler whose runtimes to preload; default as `find_compiler`.

    Returns
    -------
    dict
        ``base`` plus ``LD_PRELOAD`` (libasan and libubsan, ahead of any existing entries),
        ``ASAN_OPTIONS``, ``UBSAN_OPTIONS``, ``CONVGRAD_CUDA_HOST_SANITIZE=address``, and
        this package's root on ``PYTHONPATH``.
    """
    env = dict(os.environ if base is None else base)
    compiler = find_compiler(cxx)
    if compiler is None or compiler.family != "gcc":
        raise RuntimeError("the sanitizer mode needs g++ (version 11 or newer)")
    libraries = [runtime_library(compiler, name) for name in ("libasan.so", "libubsan.so")]
    if None in libraries:
        raise RuntimeError(f"{compiler.path} has no shared libasan/libubsan runtime")
    preload = [*libraries, *env.get("LD_PRELOAD", "").split()]
    env["LD_PRELOAD"] = " ".join(dict.fromkeys(p for p in preload if p))  # nested children
    env["ASAN_OPTIONS"] = ASAN_OPTIONS
    env["UBSAN_OPTIONS"] = UBSAN_OPTIONS
    env["CONVGRAD_CUDA_HOST_SANITIZE"] = "address"
    paths = [str(_PACKAGE_ROOT), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def run_sanitized(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a child process with the environment of `sanitizer_env`.

    Output is captured as text; the caller checks ``returncode`` (ASan and UBSan make the
    child exit non-zero on the first error and describe it on stderr).
    """
    return subprocess.run(
        list(argv),
        cwd=cwd,
        env=sanitizer_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_pytest_sanitized(
    pytest_args: Sequence[str], **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """``python -m pytest *pytest_args`` under the sanitizers (see `run_sanitized`)."""
    return run_sanitized([sys.executable, "-m", "pytest", *pytest_args], **kwargs)  # type: ignore[arg-type]


def place_tight(arr: np.ndarray) -> np.ndarray:
    """Copy ``arr`` into a fresh allocation that ends exactly after its last element.

    The copy has the same shape, dtype and strides, so a kernel indexes it as it would the
    original.  For a strided view the allocation spans exactly the bytes the view spans,
    from its lowest to its highest element; the gaps between elements hold 0xFF bytes (NaN).
    NumPy allocates array memory with ``malloc`` of exactly the requested size, which ASan
    tracks, so one element past either end is outside the allocation.

    Parameters
    ----------
    arr : numpy.ndarray
        Any array, contiguous or not.

    Returns
    -------
    numpy.ndarray
        The copy; write results back to the original with ``np.copyto(arr, copy)``.
    """
    arr = np.asarray(arr)
    if arr.size == 0:
        return np.empty(arr.shape, dtype=arr.dtype)
    low = sum((n - 1) * s for n, s in zip(arr.shape, arr.strides) if s < 0)
    high = sum((n - 1) * s for n, s in zip(arr.shape, arr.strides) if s > 0) + arr.itemsize
    buffer = np.full(high - low, 0xFF, dtype=np.uint8)
    copy = np.ndarray(arr.shape, dtype=arr.dtype, buffer=buffer, offset=-low, strides=arr.strides)
    np.copyto(copy, arr)
    return copy
