"""``HostRunner``: the `KernelRunner` that runs ``kernels/*.cu`` on the CPU.

Compiles named instantiations with g++ against the emulation header (`build`), loads the
libraries with ctypes, and launches them with arguments marshalled as ``cuLaunchKernel``
expects them (`convgrad.kernel_runner`).
"""

from __future__ import annotations

import ctypes
import operator
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convgrad.kernel_runner import Dim3, KernelRunner

from .build import ABI_VERSION, MAX_DYNAMIC_SHARED_BYTES, build_library, check_name_expression
from .toolchain import Compiler, compiler_available, find_compiler

_ORDERS = ("forward", "reversed")
_STATUS_KERNEL_FAILED = 1
_STATUS_BAD_ARGUMENTS = 2
_STATUS_BAD_CONFIGURATION = 3
_MESSAGE_BYTES = 4096


class KernelError(RuntimeError):
    """A kernel failed on the emulator: a deadlock, a misused warp intrinsic, ``__trap()``."""


class _LaunchRequest(ctypes.Structure):
    # Mirrors cuda_host::LaunchRequest (include/cuda_host_launch.h) field by field.
    _fields_ = [
        ("args", ctypes.POINTER(ctypes.c_void_p)),
        ("arg_sizes", ctypes.POINTER(ctypes.c_uint64)),
        ("arg_is_pointer", ctypes.POINTER(ctypes.c_uint8)),
        ("nargs", ctypes.c_uint32),
        ("grid", ctypes.c_uint32 * 3),
        ("block", ctypes.c_uint32 * 3),
        ("shared_mem", ctypes.c_uint64),
        ("reversed_blocks", ctypes.c_int32),
        ("reversed_threads", ctypes.c_int32),
        ("num_threads", ctypes.c_uint32),
        ("stack_size", ctypes.c_uint64),
        ("message", ctypes.c_char_p),
        ("message_size", ctypes.c_uint64),
    ]


def default_kernel_dir() -> Path:
    """Where the kernel sources are: ``convgrad.kernel_source.kernel_dir()`` decides it."""
    from convgrad.kernel_source import kernel_dir

    return Path(kernel_dir())


def asan_runtime_loaded() -> bool:
    """True when AddressSanitizer's runtime is in this process (preloaded by `sanitizer_env`)."""
    return hasattr(ctypes.CDLL(None), "__asan_init")


def _resolve_sanitize(sanitize: str | bool | None) -> bool:
    if sanitize is None:
        sanitize = os.environ.get("CONVGRAD_CUDA_HOST_SANITIZE", "")
    if sanitize in (False, "", "0", "none", "off"):
        return False
    if sanitize in (True, "address"):
        return True
    raise ValueError(f"sanitize must be None, 'address' or 'none', not {sanitize!r}")


def _check_order(name: str, value: str) -> bool:
    if value not in _ORDERS:
        raise ValueError(f"{name} must be 'forward' or 'reversed', not {value!r}")
    return value == "reversed"


def _dim3(name: str, value: Any, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    dims = (value,) if np.ndim(value) == 0 else tuple(value)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{name} must have 1 to 3 dimensions, got {value!r}")
    try:
        dims = tuple(operator.index(d) for d in dims) + (1,) * (3 - len(dims))
    except TypeError:
        raise ValueError(f"{name} must be integers, got {value!r}") from None
    for d, limit in zip(dims, limits):
        if not 1 <= d <= limit:
            raise ValueError(f"{name} = {dims}: each extent must be in [1, {limit}]")
    return dims  # type: ignore[return-value]


class _Library:
    """A loaded kernel library; `kernel(i)` is the wrapper of the i-th name expression."""

    def __init__(self, path: Path):
        self.path = path
        self._cdll = ctypes.CDLL(str(path))
        abi = self._cdll.cuda_host_abi_version
        abi.restype = ctypes.c_int
        if abi() != ABI_VERSION:
            raise RuntimeError(f"{path}: ABI version {abi()}, expected {ABI_VERSION}")

    def kernel(self, index: int) -> Any:
        fn = getattr(self._cdll, f"cuda_host_kernel_{index}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(_LaunchRequest)]
        return fn


class HostRunner(KernelRunner):
    """Run CUDA C kernels on the CPU under an emulation of the CUDA execution model.

    Parameters
    ----------
    kernel_dir : str or Path, optional
        Directory of the ``.cu``/``.cuh`` sources; default `default_kernel_dir`.
    sanitize : {None, 'address', 'none'}
        ``'address'`` builds with AddressSanitizer and UBSan; the process must have the ASan
        runtime preloaded (run it through `run_sanitized`).  None: ``'address'`` if
        ``$CONVGRAD_CUDA_HOST_SANITIZE`` says so.
    block_order : {'forward', 'reversed'}
        Order in which blocks are taken (linear block id, x fastest).
    cxx : str, optional
        C++ compiler; default ``$CXX``, else g++, else clang++.
    extra_include_dirs : sequence of path
        Include directories searched after ``kernel_dir``.
    thread_order : {'forward', 'reversed'}
        Order in which a block's threads run between barriers.  A missing ``__syncthreads()``
        shows up where a reader runs before its writer; the two orders cover both directions.
    num_threads : int, optional
        OS threads sharing a grid's blocks; 0 means one per CPU.  Default
        ``$CONVGRAD_CUDA_HOST_THREADS``, else 0.  Blocks are taken strictly in
        ``block_order`` only with 1.
    stack_kib : int, optional
        Stack per emulated thread; default 64 KiB, 256 KiB with the sanitizer.
    """

    kind = "host"

    def __init__(
        self,
        kernel_dir: str | os.PathLike[str] | None = None,
        *,
        sanitize: str | None = None,
        block_order: str = "forward",
        cxx: str | None = None,
        extra_include_dirs: Sequence[str | os.PathLike[str]] = (),
        thread_order: str = "forward",
        num_threads: int | None = None,
        stack_kib: int | None = None,
    ):
        self.kernel_dir = Path(kernel_dir) if kernel_dir is not None else default_kernel_dir()
        self.sanitize = _resolve_sanitize(sanitize)
        self.block_order = block_order
        self.thread_order = thread_order
        self._reversed_blocks = _check_order("block_order", block_order)
        self._reversed_threads = _check_order("thread_order", thread_order)
        self.cxx = cxx
        self.extra_include_dirs = tuple(Path(d) for d in extra_include_dirs)
        if num_threads is None:
            num_threads = int(os.environ.get("CONVGRAD_CUDA_HOST_THREADS", "0") or 0)
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, not {num_threads}")
        self.num_threads = num_threads
        if stack_kib is None:
            stack_kib = 256 if self.sanitize else 64
        if stack_kib < 16:
            raise ValueError(f"stack_kib must be at least 16, not {stack_kib}")
        self.stack_kib = stack_kib
        self._lock = threading.Lock()
        self._kernels: dict[tuple[str, str], Any] = {}
        self._libraries: list[_Library] = []  # keeps every loaded library alive

    @staticmethod
    def available() -> bool:
        """True when a suitable C++ compiler is installed (cheap, cached; never compiles)."""
        return compiler_available()

    def _compiler(self) -> Compiler:
        compiler = find_compiler(self.cxx)
        if compiler is None:
            raise RuntimeError(
                "the host emulation needs a C++ compiler of version 11 or newer "
                "($CXX, g++ or clang++); none was found"
            )
        return compiler

    def compile(self, source: str, name_expressions: Sequence[str]) -> None:
        """Build the named instantiations of ``kernel_dir/source`` (lazily, cached, thread-safe).

        All names missing from this runner are built into one library.
        """
        if isinstance(name_expressions, str):
            name_expressions = [name_expressions]
        names = [check_name_expression(n) for n in name_expressions]
        if all((source, n) in self._kernels for n in names):
            return
        with self._lock:
            missing = list(dict.fromkeys(n for n in names if (source, n) not in self._kernels))
            if not missing:
                return
            if self.sanitize and not asan_runtime_loaded():
                raise RuntimeError(
                    "sanitize='address' needs the AddressSanitizer runtime preloaded in this "
                    "process; run it in a child process with "
                    "convgrad.cuda_host.run_sanitized (or the env of sanitizer_env())"
                )
            path = build_library(
                self._compiler(),
                self.kernel_dir,
                source,
                missing,
                sanitize=self.sanitize,
                include_dirs=self.extra_include_dirs,
            )
            library = _Library(path)
            self._libraries.append(library)
            for index, name in enumerate(missing):
                self._kernels[(source, name)] = library.kernel(index)

    def launch(
        self,
        source: str,
        name_expression: str,
        grid: Dim3,
        block: Dim3,
        shared_mem: int,
        args: Sequence[Any],
    ) -> None:
        """Run ``name_expression`` over ``grid`` x ``block`` (see `KernelRunner.launch`).

        Raises
        ------
        ValueError
            A grid or block extent below 1 or above CUDA's limits, a block of more than 1024
            threads, or ``shared_mem`` outside [0, 256 KiB].
        TypeError
            An argument that is not a NumPy array, NumPy scalar or None, or that does not
            match the kernel's parameter in size or pointer-ness.
        KernelError
            The kernel failed on the emulator (deadlock, misused intrinsic, ``__trap()``).
        """
        grid3 = _dim3("grid", grid, (2**31 - 1, 65535, 65535))
        block3 = _dim3("block", block, (1024, 1024, 64))
        if block3[0] * block3[1] * block3[2] > 1024:
            raise ValueError(f"block = {block3} has more than 1024 threads")
        shared_mem = operator.index(shared_mem)
        if not 0 <= shared_mem <= MAX_DYNAMIC_SHARED_BYTES:
            raise ValueError(
                f"shared_mem = {shared_mem} outside [0, {MAX_DYNAMIC_SHARED_BYTES}] bytes"
            )
        name = check_name_expression(name_expression)
        kernel = self._kernels.get((source, name))
        if kernel is None:
            self.compile(source, [name])
            kernel = self._kernels[(source, name)]

        cells, arg_ptrs, sizes, is_pointer = _marshal(args)
        message = ctypes.create_string_buffer(_MESSAGE_BYTES)
        request = _LaunchRequest(
            args=arg_ptrs,
            arg_sizes=sizes,
            arg_is_pointer=is_pointer,
            nargs=len(cells),
            grid=(ctypes.c_uint32 * 3)(*grid3),
            block=(ctypes.c_uint32 * 3)(*block3),
            shared_mem=shared_mem,
            reversed_blocks=self._reversed_blocks,
            reversed_threads=self._reversed_threads,
            num_threads=self.num_threads,
            stack_size=self.stack_kib * 1024,
            message=ctypes.cast(message, ctypes.c_char_p),
            message_size=_MESSAGE_BYTES,
        )
        status = kernel(ctypes.byref(request))
        del cells  # the argument storage had to outlive the call
        if status == 0:
            return
        text = f"{name_expression} from {source}: {message.value.decode(errors='replace')}"
        if status == _STATUS_BAD_ARGUMENTS:
            raise TypeError(text)
        if status == _STATUS_BAD_CONFIGURATION:
            raise ValueError(text)
        raise KernelError(text)


def _marshal(args: Sequence[Any]) -> tuple[list[Any], Any, Any, Any]:
    """Storage for each argument plus the pointer, size and pointer-flag arrays to it."""
    n = len(args)
    cells: list[Any] = []
    arg_ptrs = (ctypes.c_void_p * max(n, 1))()
    sizes = (ctypes.c_uint64 * max(n, 1))()
    is_pointer = (ctypes.c_uint8 * max(n, 1))()
    for i, value in enumerate(args):
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"argument {i}: arrays of Python objects cannot be passed")
            cell: Any = ctypes.c_void_p(value.ctypes.data)
            size, pointer = ctypes.sizeof(cell), True
        elif value is None:
            cell = ctypes.c_void_p(None)  # a null pointer, e.g. an absent bias
            size, pointer = ctypes.sizeof(cell), True
        elif isinstance(value, np.generic):
            # Exact width for scalars; raw struct bytes for a structured np.void.
            raw = value.tobytes()
            cell = ctypes.create_string_buffer(raw, max(len(raw), 1))
            size, pointer = len(raw), False
        else:
            raise TypeError(
                f"argument {i}: {type(value).__name__} is not a kernel argument; pass a NumPy "
                "array, a NumPy scalar of the parameter's exact width (np.int32(3)), a "
                "structured np.void, or None for a null pointer"
            )
        cells.append(cell)
        arg_ptrs[i] = ctypes.addressof(cell)
        sizes[i] = size
        is_pointer[i] = pointer
    return cells, arg_ptrs, sizes, is_pointer
