"""The benchmark's arrays: Gaussian host data, and its copies in each array library.

Host arrays are in the caller's layout; "logical" means (N or K, C, *spatial) whatever the layout.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np


def numpy_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(numpy_dtype(dtype))


def to_logical(array: np.ndarray, channels_last: bool) -> np.ndarray:
    """A caller-layout host array as (N or K, C, *spatial): channels-last moves its last axis to 1."""
    return np.moveaxis(array, -1, 1) if channels_last else array


def device_of(backend: Any) -> str:
    return "cpu" if "numpy" in backend.array_kinds else "gpu"


def array_kind(backend: Any) -> str:
    """The array library a benchmark of ``backend`` computes on."""
    kinds = backend.array_kinds
    if "numpy" in kinds:
        return "numpy"
    if "cupy" in kinds and importlib.util.find_spec("cupy") is not None:
        return "cupy"
    return kinds[0]


def to_kind(array: np.ndarray, kind: str) -> Any:
    if kind == "numpy":
        return array
    if kind == "cupy":
        import cupy

        if array.dtype == numpy_dtype("bfloat16"):
            return cupy.asarray(array.view(np.uint16))  # bfloat16 as its bits; calls pass dtype="bfloat16"
        return cupy.asarray(array)
    if kind == "numba":
        from numba import cuda

        return cuda.to_device(array)
    raise TypeError(f"cannot make {kind} arrays")


def to_host(array: Any, dtype: str | None = None) -> np.ndarray:
    """A host copy of a result; bfloat16 results given as bits come back as ``ml_dtypes.bfloat16``."""
    if isinstance(array, np.ndarray):
        host = array
    elif hasattr(array, "copy_to_host"):
        host = array.copy_to_host()
    else:
        host = array.get()
    if dtype == "bfloat16" and host.dtype in (np.uint16, np.int16):
        host = host.view(numpy_dtype("bfloat16"))
    return host


def to_torch(array: np.ndarray, channels_last: bool, device: str) -> Any:
    """A torch tensor with logical shape and the host array's strides (channels-last stays channels-last)."""
    import torch

    logical = to_logical(array, channels_last)
    if logical.dtype == numpy_dtype("bfloat16"):
        tensor = torch.from_numpy(logical.view(np.uint16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(logical)
    return tensor.to(device)
