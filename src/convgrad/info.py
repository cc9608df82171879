"""``convgrad info``: backends, versions and devices on this machine."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

from . import __version__, backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gather() -> dict[str, object]:
    """What ``convgrad info`` prints, as a dictionary."""
    rows = []
    for name in backends.registered():
        backend = backends.get(name)
        try:
            available = backend.available()
        except Exception as error:  # a broken optional install must not break `info`
            available = False
            note = f"error: {error}"
        else:
            note = "emulated (testing only)" if backend.emulated else ""
        rows.append({"backend": name, "available": available, "note": note})
    packages = ["numpy", "ml_dtypes", "torch", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "cuda-bindings"]
    return {
        "convgrad": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "packages": {p: _version(p) for p in packages},
        "backends": rows,
        "devices": _devices(),
    }


def _devices() -> list[str]:
    """CUDA devices through whichever GPU library is installed (none imported otherwise)."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return []
    try:
        import cupy

        return [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(cupy.cuda.runtime.getDeviceCount())]
    except Exception:  # CuPy installed but no driver or device
        return []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    info = gather()
    print(f"convgrad {info['convgrad']}  (Python {info['python']}, {info['machine']})")
    print("packages:")
    for name, version in info["packages"].items():  # type: ignore[union-attr]
        print(f"  {name:<14} {version}")
    print("backends:")
    for row in info["backends"]:  # type: ignore[union-attr]
        mark = "yes" if row["available"] else "no"
        print(f"  {row['backend']:<10} available: {mark:<4} {row['note']}")
    devices = info["devices"] or ["none found"]
    print("CUDA devices: " + ", ".join(devices))  # type: ignore[arg-type]
    return 0
