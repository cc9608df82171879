"""``CupyRunner``: the :class:`~convgrad.kernel_runner.KernelRunner` for a real GPU, through ``cupy.RawModule``."""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Sequence

import numpy as np

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


class CupyRunner(KernelRunner):
    """Compiles named instantiations with ``cupy.RawModule`` and launches them on CuPy's current stream.

    One module per (source, name expression), compiled on first use and kept per device
    (CuPy's disk cache keeps the binaries across processes).  Thread-safe.
    """

    kind = "cupy"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modules: dict[tuple[str, str], Any] = {}
        self._functions: dict[tuple[int, str, str], Any] = {}
        self._options: tuple[str, ...] | None = None

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

    def _function(self, source: str, name: str) -> Any:
        import cupy

        key = (cupy.cuda.Device().id, source, name)
        function = self._functions.get(key)
        if function is not None:
            return function
        with self._lock:
            function = self._functions.get(key)
            if function is None:
                module = self._modules.get((source, name))
                if module is None:
                    code = f"// convgrad kernels {_kernels_fingerprint()}\n" + read_source(source)
                    module = cupy.RawModule(code=code, options=self._compile_options(), name_expressions=[name])
                    self._modules[(source, name)] = module
                function = module.get_function(name)
                self._functions[key] = function
        return function

    def compile(self, source: str, name_expressions: Sequence[str]) -> None:
        for name in name_expressions:
            self._function(source, name)

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
