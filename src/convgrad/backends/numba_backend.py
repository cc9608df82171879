"""The ``numba`` backend: the three passes as Numba CUDA kernels (DESIGN §4).

Dense convolutions run tiled shared-memory implicit GEMMs with register blocking; depthwise
convolutions (``groups == C``) run direct kernels; the weight gradient splits its long
reduction across blocks into a workspace that a second kernel sums in a fixed order.  The
kernels themselves are in :mod:`convgrad.backends.numba_kernels`; this module plans
(tile, grid, split count), turns arrays into what the kernels take, and launches.

Arrays and streams: every launch, copy and allocation goes to the caller's stream.  For
Numba device arrays that is the stream the output array is bound to (``array.bind(stream)``;
0, Numba's default stream, when unbound); CuPy arrays are wrapped without a copy
(``cuda.as_cuda_array``) and run on CuPy's current stream, on the device that holds them.
Scratch memory (split-K workspaces, the bias gradient) comes from :func:`using_allocator`'s
allocator when one is set (``convgrad.torch`` sets PyTorch's, which is stream-ordered and
legal under CUDA-graph capture), else from Numba, bound to the call's stream.  NumPy arrays
are copied to the device and back when the backend is named.

Kernels compile on first launch, one signature per (kernel, tile, dtype), and stay cached
in the backend and on disk (``cache=True``: Numba's cache directory, beside the module or
``NUMBA_CACHE_DIR``); :func:`convgrad.precompile` builds them ahead of time.  Under Numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same kernels run on the CPU, one OS thread
per CUDA thread; the backend is then ``emulated``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import threading
import warnings
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .. import arrays, options
from ..problem import ConvProblem
from .base import Backend

_SUPPORTED = ("float16", "float32", "float64")
#: Multiprocessor count assumed under the simulator, which has none; it sizes grids and splits.
SIMULATED_SM_COUNT = 8
#: Python's thread switch interval while a simulated kernel runs (see ``_simulator_pacing``).
SIMULATED_SWITCH_INTERVAL_S = 5e-4
_MAX_GRID_YZ = 65535


def _cuda() -> Any:
    from numba import cuda

    return cuda


#: ``allocate(shape, dtype, stream) -> Numba device array`` for scratch memory, or None for Numba's own.
_ALLOCATOR: contextvars.ContextVar[Callable[[tuple[int, ...], Any, Any], Any] | None] = contextvars.ContextVar(
    "convgrad_numba_allocator", default=None)


@contextlib.contextmanager
def using_allocator(allocate: Callable[[tuple[int, ...], Any, Any], Any] | None) -> Iterator[None]:
    """Take the backend's scratch memory from ``allocate(shape, dtype, stream)`` inside the block.

    The array it returns must be bound to ``stream`` and stay valid while it is referenced.
    """
    token = _ALLOCATOR.set(allocate)
    try:
        yield
    finally:
        _ALLOCATOR.reset(token)


def device_array(shape: tuple[int, ...], dtype: Any, stream: Any) -> Any:
    """Uninitialised device memory for scratch use, bound to ``stream`` (0: the default stream)."""
    allocate = _ALLOCATOR.get()
    if allocate is not None:
        return allocate(tuple(shape), np.dtype(dtype), stream)
    return _cuda().device_array(shape, dtype, stream=stream)


def simulator_enabled() -> bool:
    """Whether Numba's CUDA simulator is active (decided when ``numba.cuda`` is first imported)."""
    try:
        from numba.cuda.core import config
    except ImportError:
        return False
    return bool(config.ENABLE_CUDASIM)


def _kernels() -> Any:
    from . import numba_kernels

    return numba_kernels


def _span(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int]:
    """(lowest, highest) element offset of a strided view relative to its first element."""
    low = sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    high = sum(max(0, (n - 1) * s) for n, s in zip(shape, strides))
    return low, high


class NumbaBackend(Backend):
    """Numba CUDA kernels; runs under the CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1``."""

    name = "numba"
    array_kinds = ("numba", "cupy")
    stages_numpy = True

    def __init__(self) -> None:
        self._available: bool | None = None
        self._compiled: dict[Any, Any] = {}
        self._lock = threading.Lock()
        #: Planning overrides for tests: ``{"tile": "medium", "splits": 3}``.
        self.overrides: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------
    # Interface

    def available(self) -> bool:
        """A CUDA device is present, or the simulator is on; cached, compiles nothing, creates no context."""
        if self._available is None:
            try:
                cuda = _cuda()
                self._available = True if simulator_enabled() else bool(cuda.is_available())
            except Exception:
                self._available = False
        return self._available

    @property  # type: ignore[override]
    def emulated(self) -> bool:
        """True under Numba's CUDA simulator only."""
        try:
            return self.available() and simulator_enabled()
        except Exception:
            return False

    def unsupported(self, problem: ConvProblem) -> str | None:
        if problem.dtype not in _SUPPORTED:
            return f"Numba has no {problem.dtype} type; supported dtypes are {', '.join(_SUPPORTED)}"
        try:
            largest = _kernels().TILES[-1]
        except ImportError as error:
            return f"Numba CUDA cannot be imported ({error})"
        reduction_columns = problem.C_per_group * math.prod(problem.kernel_size)
        if max(problem.K_per_group, problem.C_per_group, reduction_columns) > _MAX_GRID_YZ * largest.BN:
            return (f"a group has too many channels for the kernels' grid (K/G={problem.K_per_group}, "
                    f"C/G·T·R·S={reduction_columns}; at most {_MAX_GRID_YZ * largest.BN})")
        return None

    def forward(self, x: Any, w: Any, bias: Any, problem: ConvProblem, out: Any) -> None:
        kind = arrays.array_kind(out)
        problem = _with_strides(problem, x, w, out)
        with self._device_of(kind, out):
            stream = self._stream(kind, out)
            (xf, xo), (wf, wo), (yf, yo) = (self._flat(a, kind) for a in (x, w, out))
            geometry = _geometry(problem, xo, wo, yo)
            if bias is not None:
                bf, bo = self._flat(bias, kind)
                bias_args = (bf, 1, int(bias.strides[0] // bias.dtype.itemsize), bo)
            else:
                bias_args = (yf, 0, 0, 0)  # never read
            if problem.is_depthwise:
                total = problem.N * problem.K * math.prod(problem.output_size)
                self._launch("fprop_depthwise", None, problem.dtype, *self._elementwise(total), stream,
                             xf, wf, yf, bias_args[0], geometry, *bias_args[1:])
                return
            M = problem.N * math.prod(problem.output_size)
            tile = self._tile(M, problem.K_per_group, problem.G)
            grid = (_ceil(M, tile.BM), _ceil(problem.K_per_group, tile.BN), min(problem.G, _MAX_GRID_YZ))
            self._launch("fprop_dense", tile.name, problem.dtype, grid, tile.threads, stream,
                         xf, wf, yf, bias_args[0], geometry, *bias_args[1:],
                         shared=_kernels().dense_shared_bytes(tile, problem.dtype))

    def grad_input(self, dy: Any, w: Any, problem: ConvProblem, out: Any) -> None:
        kind = arrays.array_kind(out)
        problem = _with_strides(problem, out, w, dy)
        with self._device_of(kind, out):
            stream = self._stream(kind, out)
            (yf, yo), (wf, wo), (xf, xo) = (self._flat(a, kind) for a in (dy, w, out))
            geometry = _geometry(problem, xo, wo, yo)
            if problem.is_depthwise:
                total = problem.N * problem.C * math.prod(problem.input_size)
                self._launch("dgrad_depthwise", None, problem.dtype, *self._elementwise(total), stream,
                             yf, wf, xf, geometry)
                return
            phases = math.prod(problem.stride)
            rows = problem.N * math.prod(_ceil(n, s) for n, s in zip(problem.input_size, problem.stride))
            tile = self._tile(rows, problem.C_per_group, problem.G * phases)
            grid = (_ceil(rows, tile.BM), _ceil(problem.C_per_group, tile.BN), min(problem.G * phases, _MAX_GRID_YZ))
            self._launch("dgrad_dense", tile.name, problem.dtype, grid, tile.threads, stream, yf, wf, xf, geometry,
                         shared=_kernels().dense_shared_bytes(tile, problem.dtype))

    def grad_weight(self, x: Any, dy: Any, problem: ConvProblem, out: Any) -> None:
        kernels = _kernels()
        kind = arrays.array_kind(out)
        problem = _with_strides(problem, x, out, dy)
        with self._device_of(kind, out):
            stream = self._stream(kind, out)
            (xf, xo), (yf, yo), (wf, wo) = (self._flat(a, kind) for a in (x, dy, out))
            geometry = _geometry(problem, xo, wo, yo)
            npq = problem.N * math.prod(problem.output_size)
            columns = problem.C_per_group * math.prod(problem.kernel_size)
            total = problem.K * columns
            acc_bytes = 8 if problem.dtype == "float64" else 4
            if problem.is_depthwise:
                splits = self._splits(npq, problem.K, kernels.REDUCTION_THREADS, total * acc_bytes,
                                      granule=kernels.REDUCTION_THREADS)
                chunk = _ceil(npq, splits)
                workspace = self._workspace(kind, splits * total, problem.dtype, out)
                threads = kernels.next_power_of_two(chunk, 16, kernels.REDUCTION_THREADS)
                grid = (problem.K, splits)
                self._launch("wgrad_depthwise", None, problem.dtype, grid, threads, stream,
                             xf, yf, workspace, geometry, splits, chunk,
                             shared=kernels.depthwise_wgrad_shared_bytes(threads, problem.dtype))
            else:
                tile = self._tile(problem.K_per_group, columns, problem.G, reduction=npq)
                blocks = _ceil(problem.K_per_group, tile.BM) * _ceil(columns, tile.BN) * problem.G
                splits = self._splits(npq, blocks, tile.threads, total * acc_bytes, granule=4 * tile.BK)
                chunk = _ceil(_ceil(npq, splits), tile.BK) * tile.BK
                splits = _ceil(npq, chunk)
                workspace = self._workspace(kind, splits * total, problem.dtype, out)
                grid = (_ceil(problem.K_per_group, tile.BM), _ceil(columns, tile.BN),
                        min(problem.G * splits, _MAX_GRID_YZ))
                self._launch("wgrad_dense", tile.name, problem.dtype, grid, tile.threads, stream,
                             xf, yf, workspace, geometry, splits, chunk,
                             shared=kernels.dense_shared_bytes(tile, problem.dtype))
            self._launch("wgrad_reduce", None, problem.dtype, *self._elementwise(total), stream,
                         workspace, wf, geometry, splits)

    def add_bias(self, out: Any, bias: Any, problem: ConvProblem) -> None:
        """``out[:, c] += bias[c]`` on a logical 5-D view; a kernel for Numba arrays."""
        if bias is None:
            return
        kind = arrays.array_kind(out)
        if kind != "numba":
            super().add_bias(out, bias, problem)
            return
        with self._device_of(kind, out):
            of, oo = self._flat(out, kind)
            bf, bo = self._flat(bias, kind)
            layout = (*map(int, out.shape), *arrays.element_strides(out), oo)
            self._launch("add_bias", None, _dtype(out), *self._elementwise(math.prod(out.shape)),
                         self._stream(kind, out), of, bf, layout, int(bias.strides[0] // bias.dtype.itemsize), bo)

    def grad_bias(self, dy: Any, channel_axis: int, accumulate: Any) -> Any:
        """``dy`` summed over every axis but ``channel_axis``; a kernel for Numba arrays, on ``dy``'s stream."""
        if arrays.array_kind(dy) != "numba" or len(dy.shape) > 5:
            if arrays.array_kind(dy) == "numba":
                host = super().grad_bias(dy.copy_to_host(), channel_axis, accumulate)
                result = device_array(host.shape, host.dtype, dy.stream)
                result.copy_to_device(host)
                return result
            return super().grad_bias(dy, channel_axis, accumulate)
        kernels = _kernels()
        K = int(dy.shape[channel_axis])
        stream = self._stream("numba", dy)
        db = device_array((K,), dy.dtype, dy.stream)
        if K == 0:
            return db
        strides = arrays.element_strides(dy)
        others = [(int(n), s) for axis, (n, s) in enumerate(zip(dy.shape, strides)) if axis != channel_axis]
        others = [(1, 0)] * (4 - len(others)) + others
        count = math.prod(n for n, _ in others)
        with self._device_of("numba", dy):
            flat, offset = self._flat(dy, "numba")
            layout = (K, *(n for n, _ in others), strides[channel_axis], *(s for _, s in others), offset)
            threads = kernels.next_power_of_two(count, 16, kernels.REDUCTION_THREADS)
            self._launch("grad_bias", None, _dtype(dy), min(K, self._sm_count() * 32), threads, stream, flat, db,
                         layout, shared=kernels.grad_bias_shared_bytes(threads, _dtype(dy)))
        return db

    # Staging of NumPy arrays (backend named explicitly).
    def to_device(self, array: Any) -> Any:
        """A device copy of a NumPy array; strided views keep their strides when that costs little."""
        cuda = _cuda()
        host = np.asarray(array)
        if host.flags.c_contiguous or host.flags.f_contiguous or host.size == 0:
            return cuda.to_device(host)
        element = host.dtype.itemsize
        low, high = _span(host.shape, host.strides)
        if low == 0 and high + element <= 2 * host.nbytes:
            # Copy the memory the view spans and rebuild the same view on the device.
            span = np.lib.stride_tricks.as_strided(host, shape=((high + element) // element,), strides=(element,))
            device = cuda.to_device(np.ascontiguousarray(span))
            return _strided_like(device, host.shape, host.strides)
        return cuda.to_device(np.ascontiguousarray(host))

    def to_host(self, array: Any) -> Any:
        return array.copy_to_host()

    # ------------------------------------------------------------------------------------
    # Planning

    def _sm_count(self) -> int:
        if simulator_enabled():
            return SIMULATED_SM_COUNT
        return int(_cuda().get_current_device().MULTIPROCESSOR_COUNT)

    def _elementwise(self, total: int) -> tuple[int, int]:
        """(blocks, threads) of a grid-stride kernel over ``total`` elements.

        Under the simulator, where every CUDA thread is an OS thread that takes longer to
        start than to run, 32-thread blocks, one per simulated multiprocessor.
        """
        if simulator_enabled():
            return max(1, min(_ceil(total, 32), SIMULATED_SM_COUNT)), 32
        threads = _kernels().ELEMENTWISE_THREADS
        return max(1, min(_ceil(total, threads), self._sm_count() * 32)), threads

    def _tile(self, rows: int, columns: int, batches: int, reduction: int | None = None) -> Any:
        """The tile of a dense pass: ``batches`` GEMMs of ``rows x columns`` (groups, phases).

        Problems of at most four 16x16 tiles per multiprocessor get the 16-thread tile (the
        simulator's case too, where every thread costs an OS thread).  Larger ones get the
        largest tile that wastes at most half of itself and still makes a wave of blocks
        (for wgrad, ``reduction`` is the split-K length whose chunks also make blocks),
        else the 64-thread tile.
        """
        kernels = _kernels()
        if "tile" in self.overrides:
            return kernels.TILES_BY_NAME[self.overrides["tile"]]
        sms = self._sm_count()
        fits = [tile for tile in kernels.TILES if _ceil(columns, tile.BN) <= _MAX_GRID_YZ]
        tiny = kernels.TILES_BY_NAME["tiny"]
        if tiny in fits and rows * columns * batches <= 4 * tiny.BM * tiny.BN * sms:
            return tiny
        for tile in reversed(fits):
            used = rows * columns
            padded = _ceil(rows, tile.BM) * tile.BM * _ceil(columns, tile.BN) * tile.BN
            blocks = _ceil(rows, tile.BM) * _ceil(columns, tile.BN) * batches
            if reduction is not None:
                blocks *= max(1, reduction // (8 * tile.BK))
            if tile is not tiny and 2 * used >= padded and blocks >= sms:
                return tile
        return next(tile for tile in fits if tile is not tiny)

    def _splits(self, reduction: int, blocks: int, threads: int, bytes_per_split: int, granule: int) -> int:
        """How many chunks the wgrad reduction is split into.

        Enough that ``blocks`` blocks of ``threads`` threads per chunk make about two waves
        of 256-thread blocks, chunks of at least ``granule``, the workspace under
        ``workspace_mb``.
        """
        if "splits" in self.overrides:
            return max(1, min(int(self.overrides["splits"]), reduction))
        cap = max(1, int(options.get("workspace_mb")) * 2**20 // max(bytes_per_split, 1))
        wanted = _ceil(2 * self._sm_count() * max(1, 256 // threads), max(blocks, 1))
        return max(1, min(wanted, _ceil(reduction, granule), cap, _MAX_GRID_YZ))

    # ------------------------------------------------------------------------------------
    # Arrays, streams, launches

    def _flat(self, array: Any, kind: str) -> tuple[Any, int]:
        """A 1-D device array from the lowest address ``array`` touches, and the offset of its first element."""
        cuda = _cuda()
        if kind == "cupy":
            array = cuda.as_cuda_array(array, sync=False)
        shape = tuple(int(n) for n in array.shape)
        strides = arrays.element_strides(array)
        low, high = _span(shape, strides)
        length = high - low + 1
        if simulator_enabled():
            host = array._ary
            lowest = host[tuple(slice(n - 1, n) if s < 0 else slice(0, 1) for n, s in zip(shape, strides))]
            flat = np.lib.stride_tricks.as_strided(lowest, shape=(length,), strides=(host.dtype.itemsize,))
            return type(array)(flat), -low
        interface = array.__cuda_array_interface__
        desc = {
            "shape": (length,),
            "strides": None,
            "typestr": array.dtype.str,
            "data": (interface["data"][0] + low * array.dtype.itemsize, False),
            "version": 3,
        }
        return cuda.from_cuda_array_interface(desc, owner=array, sync=False), -low

    @staticmethod
    def _workspace(kind: str, size: int, dtype: str, like: Any) -> Any:
        """Split-K partial sums in the accumulator type, on ``like``'s device and the call's stream."""
        acc = np.float64 if dtype == "float64" else np.float32
        if kind == "cupy":
            import cupy

            # CuPy's pool orders the allocation on its current stream, where the kernels run.
            with like.device:
                return _cuda().as_cuda_array(cupy.empty(size, acc), sync=False)
        return device_array((size,), acc, like.stream)

    @staticmethod
    def _stream(kind: str, array: Any) -> Any:
        """The caller's stream: CuPy's current one for CuPy arrays, the one ``array`` is bound to for Numba arrays.

        None stands for Numba's default stream (an unbound array's, and CuPy's null stream).
        """
        if kind != "cupy":
            stream = getattr(array, "stream", 0)
            return None if not stream else stream
        import cupy

        cuda = _cuda()
        ptr = cupy.cuda.get_current_stream().ptr
        return cuda.external_stream(ptr) if ptr else cuda.legacy_default_stream()

    @staticmethod
    def _device_of(kind: str, array: Any) -> Any:
        """Make the device holding a CuPy array current for both CuPy and Numba.

        Numba arrays live in Numba's current context already.
        """
        scope = contextlib.ExitStack()
        if kind == "cupy":
            scope.enter_context(array.device)
            scope.enter_context(_cuda().gpus[int(array.device.id)])
        return scope

    def _kernel(self, kernel: str, tile: str | None, dtype: str) -> Any:
        """The compiled kernel, built on first use; ``cache=True`` keeps the build on disk for the next process."""
        spec = _kernels().KernelSpec(kernel, tile, dtype)
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is None:
                compiled = _cuda().jit(spec.signature, cache=True)(spec.python_function())
                self._compiled[spec] = compiled
        return compiled

    def precompile(self, dtypes: Iterable[str]) -> list[str]:
        """Build every kernel the backend can launch for ``dtypes`` (each is then on disk too); their labels."""
        built = []
        for spec in _kernels().launchable_kernels():
            if spec.dtype in dtypes and spec.dtype in _SUPPORTED:
                self._kernel(spec.kernel, spec.tile, spec.dtype)
                built.append(spec.label)
        return built

    def _launch(self, kernel: str, tile: str | None, dtype: str, grid: Any, block: int, stream: Any, *args: Any,
                shared: int = 0) -> None:
        """Launch on ``stream`` (None: the default stream) with ``shared`` bytes of dynamic shared memory."""
        compiled = self._kernel(kernel, tile, dtype)
        with warnings.catch_warnings():
            # The plan sizes the grid to the problem: a small grid for a small problem is intended.
            warnings.filterwarnings("ignore", message="Grid size .* under-utilization")
            configured = compiled[grid, block, 0 if stream is None else stream, shared]
        with _simulator_pacing():
            configured(*args)


@contextlib.contextmanager
def _simulator_pacing() -> Any:
    """Under the simulator, hand the GIL between threads more often while a kernel runs.

    The simulator runs each CUDA thread as an OS thread and releases a barrier only once
    every thread of the block has reached it; with Python's default 5 ms switch interval
    most of a barrier-heavy kernel's time is spent waiting for the GIL.
    """
    if not simulator_enabled():
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, SIMULATED_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


# ----------------------------------------------------------------------------------------
# Helpers


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _dtype(array: Any) -> str:
    return str(np.dtype(array.dtype))


def _geometry(problem: ConvProblem, x0: int, w0: int, y0: int) -> tuple[int, ...]:
    """The kernels' geometry tuple (``numba_kernels.GEOMETRY_FIELDS``)."""
    values = (
        problem.N, problem.C, problem.K, problem.G, problem.C_per_group, problem.K_per_group,
        *problem.input_size, *problem.kernel_size, *problem.output_size,
        *problem.stride, *problem.dilation, *problem.pad_before,
        *problem.x_strides, x0, *problem.w_strides, w0, *problem.y_strides, y0,  # type: ignore[misc]
    )
    return tuple(int(v) for v in values)


def _with_strides(problem: ConvProblem, x: Any, w: Any, y: Any) -> ConvProblem:
    """The problem with the views' element strides, when the caller has not recorded them."""
    if problem.x_strides is not None and problem.w_strides is not None and problem.y_strides is not None:
        return problem
    return problem.with_strides(arrays.element_strides(x), arrays.element_strides(w), arrays.element_strides(y))


def _strided_like(device: Any, shape: tuple[int, ...], byte_strides: tuple[int, ...]) -> Any:
    """A view of the 1-D device array ``device`` with the given shape and byte strides."""
    if simulator_enabled():
        view = np.lib.stride_tricks.as_strided(device._ary, shape=shape, strides=byte_strides)
        return type(device)(view)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, byte_strides, device.dtype, gpu_data=device.gpu_data)


def launchable_kernels() -> list[tuple[str, Any, Any]]:
    """Every kernel the backend can launch as ``(label, Python function, Numba signature)``.

    One entry per (kernel, tile, dtype); CI compiles each with ``numba.cuda.compile_ptx``.
    """
    return [(spec.label, spec.python_function(), spec.signature) for spec in _kernels().launchable_kernels()]
