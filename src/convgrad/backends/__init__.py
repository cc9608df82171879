"""The backend registry: backends are registered by name and imported on first use.

Importing ``convgrad`` imports neither CuPy, Numba nor PyTorch: a backend's module is
imported only when the backend is asked for.
"""

from __future__ import annotations

import importlib
import threading

from .base import Backend

# name -> "module:Class", in the order they are listed.
_REGISTERED: dict[str, str] = {}
_INSTANCES: dict[str, Backend] = {}
_LOCK = threading.Lock()


def register(name: str, target: str) -> None:
    """Register backend ``name`` as ``"package.module:ClassName"``, imported lazily."""
    _REGISTERED[name] = target
    _INSTANCES.pop(name, None)


def registered() -> list[str]:
    """Every registered backend name, available here or not."""
    return list(_REGISTERED)


def get(name: str) -> Backend:
    """The backend called ``name`` (created once).

    Raises
    ------
    ValueError
        If no backend of that name is registered.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a Backend, got {name!r}")
    with _LOCK:
        if name in _INSTANCES:
            return _INSTANCES[name]
        if name not in _REGISTERED:
            raise ValueError(f"unknown backend {name!r}; registered backends: {', '.join(_REGISTERED)}")
        module_name, class_name = _REGISTERED[name].split(":")
        backend = getattr(importlib.import_module(module_name), class_name)()
        _INSTANCES[name] = backend
        return backend


def available(*, include_emulated: bool = True) -> list[str]:
    """Names of the backends that can run on this machine."""
    names = []
    for name in _REGISTERED:
        backend = get(name)
        if backend.available() and (include_emulated or not backend.emulated):
            names.append(name)
    return names


register("numpy", "convgrad.backends.numpy_backend:NumpyBackend")
register("cupy", "convgrad.backends.cupy_backend:CupyBackend")
register("cupy-host", "convgrad.backends.cupy_backend:CupyHostBackend")
register("numba", "convgrad.backends.numba_backend:NumbaBackend")

__all__ = ["Backend", "available", "get", "register", "registered"]
