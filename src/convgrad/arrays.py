"""Which library an array comes from, and the zero-copy views the backends compute on.

Only NumPy is imported here; CuPy and Numba arrays are recognised by their type's module,
so that importing convgrad never imports a GPU library.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .problem import ConvProblem


def array_kind(value: Any, op: str = "convgrad", arg: str = "input") -> str:
    """``"numpy"``, ``"cupy"`` or ``"numba"``; a TypeError for anything else."""
    if isinstance(value, np.ndarray):
        return "numpy"
    module = type(value).__module__ or ""
    if module.startswith("cupy"):
        return "cupy"
    if module.startswith("numba") and hasattr(value, "copy_to_host"):
        return "numba"
    if module.startswith("torch"):
        raise TypeError(
            f"{op}: {arg} is a torch.Tensor; use convgrad.torch (its functions and modules take tensors)"
        )
    got = "None" if value is None else type(value).__name__
    raise TypeError(f"{op}: {arg} must be a NumPy, CuPy or Numba device array, got {got}")


def device_of(value: Any, kind: str) -> int | None:
    """The CUDA device id holding a device array, None for host arrays."""
    if kind == "cupy":
        return int(value.device.id)
    if kind == "numba":
        try:
            from numba import cuda

            return int(cuda.get_current_device().id)
        except Exception:  # the simulator has a single fake device
            return 0
    return None


def check_same_library(op: str, /, *, optional: tuple[str, ...] = ("bias",), **arrays: Any) -> str:
    """The common array kind of the given arrays; TypeError if they mix libraries or devices.

    Arguments named in ``optional`` may be None; any other None is a TypeError naming it.
    """
    kinds = {arg: array_kind(a, op, arg) for arg, a in arrays.items() if a is not None or arg not in optional}
    first_arg, first = next(iter(kinds.items()))
    for arg, kind in kinds.items():
        if kind != first:
            raise TypeError(f"{op}: {arg} is a {kind} array but {first_arg} is a {first} array; they must match")
    devices = {arg: device_of(arrays[arg], kinds[arg]) for arg in kinds}
    first_device = devices[first_arg]
    for arg, device in devices.items():
        if device != first_device:
            raise ValueError(f"{op}: {arg} is on device {device} but {first_arg} is on device {first_device}")
    return first


def _xp(kind: str) -> Any:
    if kind == "cupy":
        import cupy

        return cupy
    return np


def array_module(kind: str, op: str = "convgrad") -> Any:
    """NumPy or CuPy, for arrays of ``kind``; a TypeError for Numba arrays, which have no array functions."""
    if kind in ("numpy", "cupy"):
        return _xp(kind)
    raise TypeError(f"{op}: bfloat16 needs NumPy or CuPy arrays; Numba has no bfloat16 type")


def empty(kind: str, shape: tuple[int, ...], dtype: Any, like: Any = None) -> Any:
    """An uninitialised C-contiguous array of ``kind`` (on ``like``'s device; a Numba array bound to ``like``'s stream)."""
    if kind == "numpy":
        return np.empty(shape, dtype)
    if kind == "cupy":
        import cupy

        with like.device if like is not None else cupy.cuda.Device():
            return cupy.empty(shape, dtype)
    if kind == "numba":
        from numba import cuda

        return cuda.device_array(shape, dtype, stream=getattr(like, "stream", 0))
    raise TypeError(f"cannot allocate a {kind} array")


def zeros(kind: str, shape: tuple[int, ...], dtype: Any, like: Any = None) -> Any:
    out = empty(kind, shape, dtype, like)
    fill(kind, out, 0)
    return out


def fill(kind: str, array: Any, value: float) -> None:
    if kind == "numba":
        # Numba device arrays have no fill; outputs allocated here are contiguous.  The copy goes
        # to the stream the array is bound to, as the kernels do.
        array.copy_to_device(np.full(array.shape, value, array.dtype), stream=getattr(array, "stream", 0))
    else:
        array[...] = value


#: Dtypes that may carry bfloat16 data: bfloat16 itself, or 16-bit integers holding its bit
#: patterns (the way CuPy users pass bfloat16, with ``dtype="bfloat16"``; CuPy has no such dtype).
BFLOAT16_CARRIERS = ("bfloat16", "uint16", "int16")


def bfloat16_to_float32(xp: Any, values: Any) -> Any:
    """float32 copies of bfloat16 values given as bits (or as bfloat16), exact, on ``xp``'s device."""
    return (values.view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32)


def float32_to_bfloat16_bits(xp: Any, values: Any) -> Any:
    """The bit patterns (uint16) of float32 ``values`` rounded to bfloat16, to nearest even; NaN stays NaN.

    Integer arithmetic only, so it runs as the same elementwise kernels on NumPy and CuPy.
    """
    bits = values.view(xp.uint32)
    high = bits >> 16
    # Round on the low half separately so no sum overflows 32 bits.
    rounded = high + (((bits & 0xFFFF) + (high & 1) + 0x7FFF) >> 16)
    nan = (values != values).astype(xp.uint32)
    return (rounded * (1 - nan) + (high | 0x40) * nan).astype(xp.uint16)


def element_strides(array: Any) -> tuple[int, ...]:
    itemsize = array.dtype.itemsize
    for s in array.strides:
        if s % itemsize:
            raise ValueError(f"array strides {array.strides} are not multiples of its itemsize {itemsize}")
    return tuple(s // itemsize for s in array.strides)


def _permuted(array: Any, kind: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    """A view of ``array`` with the given shape and byte strides (same memory)."""
    if kind == "numpy":
        return np.lib.stride_tricks.as_strided(array, shape=shape, strides=strides)
    if kind == "cupy":
        import cupy

        return cupy.ndarray(shape, array.dtype, array.data, strides=strides)
    if kind == "numba":
        if _is_simulated(array):
            # The simulator's arrays wrap a NumPy array; view that one and wrap it again.
            view = np.lib.stride_tricks.as_strided(array._ary, shape=shape, strides=strides)
            return type(array)(view, stream=getattr(array, "stream", 0))
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        return DeviceNDArray(shape, strides, array.dtype, stream=getattr(array, "stream", 0), gpu_data=array.gpu_data)
    raise TypeError(kind)


def logical_view(array: Any, kind: str, role: str, problem: ConvProblem) -> Any:
    """The 5-D logical-order view of an array given in the caller's layout (no copy).

    ``role`` is ``"x"`` / ``"y"`` (activations) or ``"w"`` (weights).  Unbatched
    activations get N = 1, and 1-D/2-D problems get leading spatial axes of extent 1;
    both new axes have stride 0, which no kernel ever steps along.
    """
    shape = tuple(array.shape)
    strides = tuple(array.strides)
    if role in ("x", "y") and not problem.batched:
        shape, strides = (1, *shape), (0, *strides)
    # Move channels to axis 1 for channels-last.
    if problem.channels_last:
        shape = (shape[0], shape[-1], *shape[1:-1])
        strides = (strides[0], strides[-1], *strides[1:-1])
    missing = 3 - problem.ndim
    shape = (shape[0], shape[1], *([1] * missing), *shape[2:])
    strides = (strides[0], strides[1], *([0] * missing), *strides[2:])
    return _permuted(array, kind, shape, strides)


def user_view_strides(view: Any) -> tuple[int, ...]:
    """Element strides of a logical view, recorded in the problem for the kernels."""
    return element_strides(view)


#: Work NumPy's overlap solver may spend on one pair of arrays before the answer counts as "may
#: overlap".  Views of one buffer with the same strides (interleaved slices, channel halves)
#: are decided in a few steps; only contrived stride patterns reach this bound.
OVERLAP_MAX_WORK = 10_000


def may_overlap(kind: str, a: Any, b: Any) -> bool:
    """Whether two arrays may share memory, decided from their metadata alone.

    Only each array's address, shape, strides and itemsize are read: no device memory is
    allocated, no kernel is launched, nothing is synchronised (this runs on every call that
    passes ``out=``, also inside CUDA-graph capture).  Disjoint address ranges answer False
    at once; otherwise NumPy's bounded solver for the overlap problem runs on the host, on
    element-free stand-ins with the same addresses and strides, and a problem too hard for
    :data:`OVERLAP_MAX_WORK` steps answers True (conservative).
    """
    if a.size == 0 or b.size == 0:
        return False
    first, second = _memory_layout(kind, a), _memory_layout(kind, b)
    (low_a, high_a), (low_b, high_b) = _address_range(*first), _address_range(*second)
    if high_a <= low_b or high_b <= low_a:
        return False
    try:
        return bool(np.shares_memory(_layout_only(*first), _layout_only(*second), max_work=OVERLAP_MAX_WORK))
    except np.exceptions.TooHardError:
        return True


def _memory_layout(kind: str, array: Any) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """(address of the first element, shape, byte strides, itemsize), without touching the data."""
    if kind == "numba" and _is_simulated(array):
        array = array._ary
    if isinstance(array, np.ndarray):
        address = int(array.__array_interface__["data"][0])
    elif kind == "cupy":
        address = int(array.data.ptr)
    else:
        address = int(array.__cuda_array_interface__["data"][0])
    shape = tuple(int(n) for n in array.shape)
    return address, shape, tuple(int(s) for s in array.strides), int(array.dtype.itemsize)


def _address_range(address: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """[lowest, one past the highest) byte address a strided array touches."""
    low = address + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    high = address + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + itemsize
    return low, high


class _LayoutOnly:
    """An array interface with a given address and strides, for NumPy's overlap solver.

    The solver only does arithmetic on addresses, so the address may be a GPU pointer: the
    NumPy array made from this is never read.
    """

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> None:
        self.__array_interface__ = {"shape": shape, "strides": strides, "typestr": f"|V{itemsize}",
                                    "data": (address, True), "version": 3}


def _layout_only(address: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> np.ndarray:
    return np.asarray(_LayoutOnly(address, shape, strides, itemsize))


def _is_simulated(array: Any) -> bool:
    """Whether a Numba array is one of the CUDA simulator's (a NumPy array in disguise)."""
    return type(array).__module__.startswith("numba.cuda.simulator")


def has_internal_overlap(array: Any) -> bool:
    """Whether two elements of the array share memory (e.g. a broadcast view)."""
    if array.size <= 1:
        return False
    dims = sorted((abs(s), n) for n, s in zip(array.shape, array.strides) if n > 1)
    span = array.dtype.itemsize
    for stride, n in dims:
        if stride < span:
            return True
        span = stride * (n - 1) + span
    return False
