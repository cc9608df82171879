"""``CupyRunner``: the :class:`~convgrad.kernel_runner.KernelRunner` for a real GPU, through ``cupy.RawModule``."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from ..kernel_catalog import compile_cost
from ..kernel_runner import KernelRunner
from ..kernel_source import compile_options, kernel_dir, read_source, source_files


def _kernels_fingerprint() -> str:
    """A hash of every kernel source, so a compile cache keyed on one file's text sees header edits too."""
    digest = hashlib.sha256()
    root = kernel_dir()
    for name in source_files():
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


#: Dynamic shared memory a kernel may use without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize).
_DEFAULT_SHARED_LIMIT = 48 * 1024


def compile_workers() -> int:
    """How many NVRTC programs to compile at once: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # platforms without affinity masks
        return max(1, os.cpu_count() or 1)


class CupyRunner(KernelRunner):
    """Compiles named instantiations with ``cupy.RawModule`` and launches them on CuPy's current stream.

    Each instantiation is its own NVRTC program, so CuPy's disk cache holds one entry per
    instantiation whichever call, or :func:`convgrad.precompile`, built it first.  The
    instantiations one call needs are compiled together, concurrently on up to ``workers``
    threads (NVRTC releases the GIL); each is built once per device, and a thread that needs
    one being built by another waits for it.  Thread-safe.

    Parameters
    ----------
    workers : int, optional
        Concurrent compilations; default :func:`compile_workers`.
    """

    kind = "cupy"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or compile_workers()
        # Reentrant: a build that finishes at once runs its done-callback in the submitting thread.
        self._lock = threading.RLock()
        self._functions: dict[tuple[int, str, str], Any] = {}
        self._building: dict[tuple[int, str, str], concurrent.futures.Future] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._options: tuple[str, ...] | None = None
        self._code: dict[str, str] = {}

    def _compile_options(self) -> tuple[str, ...]:
        if self._options is None:
            import cupy

            major = None
            try:
                major = int(cupy.cuda.nvrtc.getVersion()[0])
            except Exception:  # an NVRTC CuPy cannot report: let the include search pick the newest headers
                major = None
            self._options = compile_options(major)
        return self._options

    def _source_code(self, source: str) -> str:
        code = self._code.get(source)
        if code is None:
            code = f"// convgrad kernels {_kernels_fingerprint()}\n" + read_source(source)
            self._code[source] = code
        return code

    def _build(self, key: tuple[int, str, str]) -> Any:
        """Compile (or load from CuPy's disk cache) one instantiation and load it on its device."""
        import cupy

        device, source, name = key
        with cupy.cuda.Device(device):
            module = cupy.RawModule(code=self._source_code(source), options=self._compile_options(),
                                    name_expressions=[name])
            function = module.get_function(name)
        with self._lock:
            self._functions[key] = function
        return function

    def compile_many(self, kernels: Iterable[tuple[str, str]]) -> None:
        """Build every ``(source, name_expression)`` not built yet on the current device, concurrently."""
        import cupy

        device = cupy.cuda.Device().id
        keys = [k for k in dict.fromkeys((device, s, n) for s, n in kernels) if k not in self._functions]
        if not keys:
            return
        keys.sort(key=lambda key: -compile_cost(key[2]))  # the longest first, so the rest fill in around it
        waiting = []
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="convgrad-nvrtc")
            for key in keys:
                if key in self._functions:
                    continue
                future = self._building.get(key)
                if future is None:
                    future = self._pool.submit(self._build, key)
                    self._building[key] = future
                    future.add_done_callback(lambda done, key=key: self._forget(key, done))
                waiting.append(future)
        errors = [f.exception() for f in concurrent.futures.wait(waiting).done if f.exception() is not None]
        if errors:
            raise errors[0]

    def _forget(self, key: tuple[int, str, str], future: concurrent.futures.Future) -> None:
        """Drop a finished build (a failed one is tried again by the next call that needs it)."""
        with self._lock:
            if self._building.get(key) is future:
                del self._building[key]

    def compile(self, source: str, name_expressions: Sequence[str]) -> None:
        self.compile_many((source, name) for name in name_expressions)

    def _function(self, source: str, name: str) -> Any:
        import cupy

        key = (cupy.cuda.Device().id, source, name)
        function = self._functions.get(key)
        if function is None:
            self.compile_many([(source, name)])
            function = self._functions[key]
        return function

    def launch(self, source: str, name_expression: str, grid: tuple[int, int, int], block: tuple[int, int, int],
               shared_mem: int, args: Sequence[Any]) -> None:
        import cupy

        function = self._function(source, name_expression)
        if shared_mem > _DEFAULT_SHARED_LIMIT and function.max_dynamic_shared_size_bytes < shared_mem:
            # Above 48 KiB a kernel must opt in to more dynamic shared memory (the tensor-core
            # kernels' multi-stage pipelines do; the planner keeps within the device's limit).
            function.max_dynamic_shared_size_bytes = int(shared_mem)
        # CuPy passes a NumPy array of size one by value (its raw bytes), which is how a
        # structured scalar (the parameter struct) reaches the kernel.
        values = tuple(np.array(a).reshape(1) if isinstance(a, np.void) else a for a in args)
        function(tuple(grid), tuple(block), values, shared_mem=int(shared_mem), stream=cupy.cuda.get_current_stream())
