"""Run the CUDA C kernels of ``kernels/`` on the CPU, for CI without a GPU.

The kernels are compiled with g++ against an emulation of the CUDA execution model
(``include/cuda_host.h``; its top comment is the model kernel authors should know) and
launched through ctypes.  The emulation is deterministic and built to expose bugs: threads of
a block run as fibers that switch only at barriers and warp intrinsics, shared memory starts
as NaN, and a sanitizer mode runs everything under AddressSanitizer and UBSan.

Public API
----------
HostRunner(kernel_dir=None, *, sanitize=None, block_order="forward", cxx=None,
           extra_include_dirs=(), thread_order="forward", num_threads=None, stack_kib=None)
    The ``KernelRunner`` of kind ``"host"``: ``compile(source, name_expressions)`` and
    ``launch(source, name_expression, grid, block, shared_mem, args)``.
KernelError
    Raised by ``launch`` when a kernel fails on the emulator (deadlock, misused intrinsic).
CompileError
    Raised when g++ rejects a kernel source.
compiler_available(cxx=None) -> bool
    A C++ compiler of version 11 or newer is installed (cached; never compiles).
default_kernel_dir() -> Path
    Where kernel sources are looked up by default.
sanitizer_env(base=None, *, cxx=None) -> dict
    Environment for a child process that runs kernels under ASan/UBSan.
run_sanitized(argv, *, cwd=None, timeout=None, env=None) -> CompletedProcess
    Run a command in such a child process; ``run_pytest_sanitized(pytest_args, ...)`` runs
    ``python -m pytest``.
asan_runtime_loaded() -> bool
    Whether this process has the ASan runtime (i.e. runs under `sanitizer_env`).
place_tight(arr) -> ndarray
    Copy of ``arr`` in an allocation with no slack after its last element, so that ASan sees
    a one-past-the-end access; used on every tensor in sanitizer mode.
"""

from .build import CompileError
from .runner import HostRunner, KernelError, asan_runtime_loaded, default_kernel_dir
from .sanitizer import place_tight, run_pytest_sanitized, run_sanitized, sanitizer_env
from .toolchain import compiler_available

__all__ = [
    "CompileError",
    "HostRunner",
    "KernelError",
    "asan_runtime_loaded",
    "compiler_available",
    "default_kernel_dir",
    "place_tight",
    "run_pytest_sanitized",
    "run_sanitized",
    "sanitizer_env",
]
