"""A stand-in for CuPy on a machine without a GPU: host memory, and a log of the device work.

Tests install it as ``sys.modules["cupy"]`` (:func:`install`) to see what convgrad asks of
CuPy: every allocation, kernel, copy, synchronisation and compile is appended to
:attr:`StandIn.events` with the stream that was current (or that was passed), so a test can
assert that argument checking does no device work, or that every launch went to the
caller's stream.  Arrays hold host memory (a NumPy array underneath), so their addresses,
shapes and strides are real and views alias as CuPy views do; kernels are recorded, not run.

Like the CuPy 14 wheels it has no ``cupy.bfloat16``, and its ``from_dlpack`` refuses a
bfloat16 tensor.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np


@dataclass
class Event:
    """One piece of device work: ``kind`` is alloc, kernel, copy, sync, shares_memory, compile, launch or record."""

    kind: str
    name: str
    stream: int
    allocator: Any = None
    detail: dict = field(default_factory=dict)


class _Interface:
    """An array interface over host memory at a given address (the stand-in's device memory)."""

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...] | None, dtype: np.dtype) -> None:
        self.__array_interface__ = {"shape": tuple(shape), "strides": None if strides is None else tuple(strides),
                                    "typestr": dtype.str, "descr": dtype.descr, "data": (address, False),
                                    "version": 3}


class StandIn:
    """The state behind one installed stand-in: the event log, the current device, stream and allocator."""

    def __init__(self, devices: int = 1) -> None:
        self.events: list[Event] = []
        self.devices = devices
        self.options_seen: list[tuple[str, ...]] = []
        self._local = threading.local()
        self.module = _build_module(self)

    # -- what is current, per thread as in CuPy
    @property
    def stream(self) -> "Stream":
        return getattr(self._local, "stream", None) or self.module.cuda.Stream.null

    @stream.setter
    def stream(self, value: "Stream") -> None:
        self._local.stream = value

    @property
    def allocator(self) -> Any:
        return getattr(self._local, "allocator", None)

    @allocator.setter
    def allocator(self, value: Any) -> None:
        self._local.allocator = value

    def record(self, kind: str, name: str, stream: Any = None, **detail: Any) -> None:
        ptr = self.stream.ptr if stream is None else int(getattr(stream, "ptr", stream))
        self.events.append(Event(kind, name, ptr, self.allocator, detail))

    def of_kind(self, *kinds: str) -> list[Event]:
        return [e for e in self.events if e.kind in kinds]


class Stream:
    """A CUDA stream handle; ``ptr`` 0 is the legacy default stream."""

    def __init__(self, state: StandIn, ptr: int) -> None:
        self._state, self.ptr = state, int(ptr)
        self._previous: list[Stream] = []

    def __enter__(self) -> "Stream":
        self._previous.append(self._state.stream)
        self._state.stream = self
        return self

    def __exit__(self, *exc: Any) -> None:
        self._state.stream = self._previous.pop()

    def synchronize(self) -> None:
        self._state.record("sync", "Stream.synchronize", self)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return hash(self.ptr)


def _numeric(dtype: Any) -> np.dtype:
    """The dtype, if this CuPy has it: booleans, integers, floats and complex only (no bfloat16)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biufc":
        raise TypeError(f"Unsupported dtype {dtype}")
    return dtype


_DEVICE_ATTRIBUTES = {
    "ComputeCapabilityMajor": 9, "ComputeCapabilityMinor": 0, "MultiProcessorCount": 132,
    "MaxSharedMemoryPerMultiprocessor": 233472, "MaxSharedMemoryPerBlockOptin": 232448,
    "MaxThreadsPerMultiProcessor": 2048, "MaxRegistersPerMultiprocessor": 65536,
}


def _build_module(state: StandIn) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    runtime = types.ModuleType("cupy.cuda.runtime")
    nvrtc = types.ModuleType("cupy.cuda.nvrtc")
    cupy.cuda, cuda.runtime, cuda.nvrtc = cuda, runtime, nvrtc
    cupy.__version__ = "14.0.0-stand-in"
    for name in ("float16", "float32", "float64", "int16", "uint16", "int32", "uint32", "int64", "uint64", "uint8"):
        setattr(cupy, name, getattr(np, name))

    class Device:
        def __init__(self, device: int | None = None) -> None:
            self.id = 0 if device is None else int(device)

        def __enter__(self) -> "Device":
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

        def synchronize(self) -> None:
            state.record("sync", "Device.synchronize")

        @property
        def attributes(self) -> dict[str, int]:
            # An H100-class device: what the planners read (SM count, capability, limits).
            return dict(_DEVICE_ATTRIBUTES)

    class MemoryPointer:
        def __init__(self, mem: Any, offset: int) -> None:
            self.mem, self.offset = mem, int(offset)
            self.ptr = int(mem.ptr) + int(offset)

    class UnownedMemory:
        def __init__(self, ptr: int, size: int, owner: Any, device_id: int | None = None) -> None:
            self.ptr, self.size, self.owner = int(ptr), int(size), owner

    class ndarray:
        """Host memory with CuPy's array attributes; element-wise work is logged, then done on the host."""

        __module__ = "cupy._core.core"

        def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None) -> None:
            dtype = _numeric(dtype)
            if memptr is None:
                raise TypeError("the stand-in's ndarray needs memptr (allocate with cupy.empty)")
            self._host = np.asarray(_Interface(memptr.ptr, tuple(shape), strides, dtype)).view(dtype)
            self._owner = memptr
            self.data = memptr
            self.device = Device(0)

        @classmethod
        def _wrap(cls, host: np.ndarray, owner: Any) -> "ndarray":
            array = cls.__new__(cls)
            array._host, array._owner = host, owner
            array.data = MemoryPointer(UnownedMemory(host.__array_interface__["data"][0], host.nbytes, owner), 0)
            array.device = Device(0)
            return array

        # metadata
        shape = property(lambda self: self._host.shape)
        strides = property(lambda self: self._host.strides)
        dtype = property(lambda self: self._host.dtype)
        size = property(lambda self: self._host.size)
        ndim = property(lambda self: self._host.ndim)
        nbytes = property(lambda self: self._host.nbytes)
        itemsize = property(lambda self: self._host.itemsize)
        flags = property(lambda self: self._host.flags)

        @property
        def __cuda_array_interface__(self) -> dict:
            return {"shape": self.shape, "strides": self.strides, "typestr": self.dtype.str,
                    "data": (self.data.ptr, False), "version": 3}

        # views: no device work
        def __getitem__(self, index: Any) -> "ndarray":
            return ndarray._wrap(self._host[index], self._owner)

        def view(self, dtype: Any) -> "ndarray":
            return ndarray._wrap(self._host.view(_numeric(dtype)), self._owner)

        def reshape(self, *shape: Any) -> "ndarray":
            return ndarray._wrap(self._host.reshape(*shape), self._owner)

        def transpose(self, *axes: Any) -> "ndarray":
            return ndarray._wrap(self._host.transpose(*axes), self._owner)

        @property
        def T(self) -> "ndarray":
            return self.transpose()

        # device work: logged on the current stream
        def __setitem__(self, index: Any, value: Any) -> None:
            state.record("kernel", "setitem")
            self._host[index] = value._host if isinstance(value, ndarray) else value

        def fill(self, value: Any) -> None:
            state.record("kernel", "fill")
            self._host.fill(value)

        def astype(self, dtype: Any, copy: bool = True) -> "ndarray":
            return _new_from_host(self._host.astype(dtype), "astype")

        def copy(self) -> "ndarray":
            return _new_from_host(self._host.copy(), "copy")

        def sum(self, axis: Any = None, dtype: Any = None) -> "ndarray":
            return _new_from_host(np.asarray(self._host.sum(axis=axis, dtype=dtype)), "sum")

        def _binary(self, other: Any, op: Any, name: str) -> "ndarray":
            other = other._host if isinstance(other, ndarray) else other
            return _new_from_host(np.asarray(op(self._host, other)), name)

        __add__ = lambda self, o: self._binary(o, np.add, "add")  # noqa: E731
        __mul__ = lambda self, o: self._binary(o, np.multiply, "multiply")  # noqa: E731
        __lshift__ = lambda self, o: self._binary(o, np.left_shift, "left_shift")  # noqa: E731
        __rshift__ = lambda self, o: self._binary(o, np.right_shift, "right_shift")  # noqa: E731
        __and__ = lambda self, o: self._binary(o, np.bitwise_and, "bitwise_and")  # noqa: E731
        __or__ = lambda self, o: self._binary(o, np.bitwise_or, "bitwise_or")  # noqa: E731
        __sub__ = lambda self, o: self._binary(o, np.subtract, "subtract")  # noqa: E731
        __rsub__ = lambda self, o: self._binary(o, lambda a, b: np.subtract(b, a), "subtract")  # noqa: E731
        __ne__ = lambda self, o: self._binary(o, np.not_equal, "not_equal")  # noqa: E731
        __hash__ = None

        def __iadd__(self, other: Any) -> "ndarray":
            state.record("kernel", "iadd")
            self._host += other._host if isinstance(other, ndarray) else other
            return self

        def get(self) -> np.ndarray:
            state.record("copy", "get")
            state.record("sync", "get")
            return self._host.copy()

    def _allocate(nbytes: int, dtype: Any, shape: Any, name: str) -> ndarray:
        state.record("alloc", name, nbytes=nbytes)
        host = np.empty(shape, dtype)
        return ndarray._wrap(host, host)

    def _new_from_host(host: np.ndarray, name: str) -> ndarray:
        result = _allocate(host.nbytes, host.dtype, host.shape, name)
        state.record("kernel", name)
        result._host[...] = host
        return result

    def empty(shape: Any, dtype: Any = float) -> ndarray:
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        return _allocate(int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype, shape, "empty")

    def zeros(shape: Any, dtype: Any = float) -> ndarray:
        array = empty(shape, dtype)
        array.fill(0)
        return array

    def asarray(value: Any, dtype: Any = None) -> ndarray:
        if isinstance(value, ndarray):
            return value if dtype is None else value.astype(dtype)
        host = np.asarray(value, dtype)
        _numeric(host.dtype)
        array = _allocate(host.nbytes, host.dtype, host.shape, "asarray")
        state.record("copy", "host_to_device")
        array._host[...] = host
        return array

    def asnumpy(array: ndarray) -> np.ndarray:
        return array.get()

    def shares_memory(a: Any, b: Any, max_work: Any = None) -> bool:
        state.record("shares_memory", "shares_memory")
        raise AssertionError("cupy.shares_memory was called: it allocates, sorts and synchronises on the device")

    def from_dlpack(tensor: Any) -> ndarray:
        if str(getattr(tensor, "dtype", "")) == "torch.bfloat16":
            raise NotImplementedError("CuPy does not support bfloat16. Please install ml_dtypes to use bfloat16.")
        host = tensor.numpy() if hasattr(tensor, "numpy") else np.from_dlpack(tensor)
        return ndarray._wrap(host, tensor)

    def matmul(a: ndarray, b: ndarray, out: ndarray | None = None) -> ndarray:
        result = np.matmul(a._host, b._host)
        if out is None:
            return _new_from_host(result, "matmul")
        state.record("kernel", "matmul")
        out._host[...] = result
        return out

    class RawModule:
        def __init__(self, code: str | None = None, options: tuple = (), name_expressions: Any = None,
                     **kwargs: Any) -> None:
            self.code, self.options = code, tuple(options)
            self.name_expressions = tuple(name_expressions or ())
            state.options_seen.append(self.options)
            state.record("compile", ",".join(self.name_expressions), options=self.options)

        def get_function(self, name: str) -> "Function":
            return Function(name)

        def compile(self, log_stream: Any = None) -> None:
            return None

    class Function:
        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0, stream: Any = None) -> None:
            pointers = [a.data.ptr for a in args if isinstance(a, ndarray)]
            state.record("launch", self.name, state.stream if stream is None else stream, grid=tuple(grid),
                         block=tuple(block), shared_mem=shared_mem, pointers=pointers,
                         dtypes=[str(a.dtype) for a in args if isinstance(a, ndarray)],
                         scalars=[a for a in args if isinstance(a, np.generic)])

    class Event:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record(self, stream: Any = None) -> None:
            state.record("record", "event", stream)

        def synchronize(self) -> None:
            state.record("sync", "Event.synchronize")

    def get_elapsed_time(start: Event, end: Event) -> float:
        return 1.0  # milliseconds

    def get_current_stream(device: Any = None) -> Stream:
        return state.stream

    def ExternalStream(ptr: int, device_id: int = -1) -> Stream:
        return Stream(state, ptr)

    @contextlib.contextmanager
    def using_allocator(allocator: Any = None) -> Iterator[None]:
        previous = state.allocator
        state.allocator = allocator
        try:
            yield
        finally:
            state.allocator = previous

    def getDeviceCount() -> int:
        return state.devices

    def deviceSynchronize() -> None:
        state.record("sync", "deviceSynchronize")

    Stream.null = Stream(state, 0)
    cuda.Stream, cuda.Device, cuda.MemoryPointer, cuda.UnownedMemory = Stream, Device, MemoryPointer, UnownedMemory
    cuda.get_current_stream, cuda.ExternalStream, cuda.using_allocator = get_current_stream, ExternalStream, using_allocator
    cuda.Event, cuda.get_elapsed_time = Event, get_elapsed_time
    def getDeviceProperties(device: int) -> dict[str, Any]:
        return {"name": b"stand-in H100"}

    runtime.getDeviceCount, runtime.deviceSynchronize = getDeviceCount, deviceSynchronize
    runtime.getDeviceProperties = getDeviceProperties
    nvrtc.getVersion = lambda: (13, 0)
    cupy.ndarray, cupy.empty, cupy.zeros, cupy.asarray, cupy.asnumpy = ndarray, empty, zeros, asarray, asnumpy
    cupy.shares_memory, cupy.from_dlpack, cupy.matmul, cupy.RawModule = shares_memory, from_dlpack, matmul, RawModule
    return cupy


def install(monkeypatch: Any, devices: int = 1) -> StandIn:
    """Make ``import cupy`` give a fresh stand-in for the rest of the test; forget convgrad's cached CuPy state."""
    state = StandIn(devices)
    monkeypatch.setitem(sys.modules, "cupy", state.module)
    monkeypatch.setitem(sys.modules, "cupy.cuda", state.module.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.runtime", state.module.cuda.runtime)
    from convgrad import backends
    from convgrad.backends import cupy_backend

    # Fresh caches for the test (restored after it): device presence, and backend instances
    # whose runners would otherwise keep what they made with another CuPy.
    fresh = functools.lru_cache(maxsize=None)(cupy_backend._cupy_device_present.__wrapped__)
    monkeypatch.setattr(cupy_backend, "_cupy_device_present", fresh)
    monkeypatch.setattr(backends, "_INSTANCES", {})
    return state


def device_array(state: StandIn, host: np.ndarray) -> Any:
    """A stand-in CuPy array holding a copy of ``host``, made without logging (test set-up)."""
    copy = np.array(host)
    return state.module.ndarray._wrap(copy, copy)
