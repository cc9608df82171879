"""``convgrad cache``: where compiled kernels are kept on disk, their sizes, and clearing them.

Three caches can hold convgrad's compiled code:

==========================  ==============================================  ======================
cache                       location                                        written by
==========================  ==============================================  ======================
``cupy-host``               ``$CONVGRAD_CACHE_DIR/cuda_host``, else the     the ``cupy-host``
                            user cache directory (``~/.cache/convgrad/      emulator (g++), e.g.
                            cuda_host`` on Linux)                           ``convgrad check``, tests
``cupy``                    ``$CUPY_CACHE_DIR``, else ``~/.cupy/            CuPy, for the ``cupy``
                            kernel_cache``                                  backend's NVRTC builds
``numba``                   ``$NUMBA_CACHE_DIR``, else ``__pycache__``      Numba, for functions
                            next to convgrad's modules (``*.nbi``/``.nbc``) compiled with caching
==========================  ==============================================  ======================

``--clear`` deletes convgrad's own (``cupy-host``, and Numba's files for convgrad's modules);
CuPy's directory is shared with every CuPy program and is cleared only with
``--include-cupy``.  Everything is rebuilt on first use.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

_NUMBA_SUFFIXES = (".nbi", ".nbc")


@dataclass(frozen=True)
class Cache:
    """One on-disk cache: a name, where it is, what writes it, and the files that belong to convgrad."""

    name: str
    path: Path
    written_by: str
    #: Whether other programs' files live there too.
    shared: bool = False

    def files(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        if self.name == "numba":
            return sorted(p for p in self.path.rglob("*") if p.suffix in _NUMBA_SUFFIXES and p.is_file()
                          and (not self.shared or _from_convgrad(p.relative_to(self.path))))
        return sorted(p for p in self.path.rglob("*") if p.is_file())

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def clear(self) -> int:
        """Delete the cache's files (convgrad's, for Numba); returns the bytes freed."""
        freed = self.size()
        if self.name == "numba":
            for path in self.files():
                path.unlink(missing_ok=True)
        elif self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        return freed


def _from_convgrad(relative: Path) -> bool:
    """Whether a file in $NUMBA_CACHE_DIR is convgrad's: Numba names its directories after the source's path."""
    return any("convgrad" in part for part in relative.parts[:-1])


def caches() -> list[Cache]:
    """Every cache that can hold convgrad's compiled code, resolved from the current environment."""
    from .backends.tensor_core_autotune import cache_root as autotune_root
    from .cuda_host.build import cache_root

    cupy = os.environ.get("CUPY_CACHE_DIR") or str(Path.home() / ".cupy" / "kernel_cache")
    numba = os.environ.get("NUMBA_CACHE_DIR")
    return [
        Cache("cupy-host", cache_root(), "the cupy-host emulator (g++): convgrad check, the tests"),
        Cache("autotune", autotune_root(), "the cupy backend's tuned tensor-core tile choices (autotune=True)"),
        Cache("cupy", Path(cupy), "CuPy (NVRTC builds of kernels/*.cu for the cupy backend)", shared=True),
        # Numba's files sit in __pycache__ beside convgrad's modules, or in $NUMBA_CACHE_DIR beside
        # other programs' (only convgrad's are counted and cleared there).
        Cache("numba", Path(numba) if numba else Path(__file__).resolve().parent,
              "Numba (functions compiled with cache=True)", shared=bool(numba)),
    ]


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clear", action="store_true",
                        help="delete convgrad's compiled kernels (cupy-host, Numba) and tuning results; rebuilt on first use")
    parser.add_argument("--include-cupy", action="store_true",
                        help="with --clear, also CuPy's kernel cache (shared with every CuPy program)")


def run(args: argparse.Namespace) -> int:
    if args.include_cupy and not args.clear:
        print("convgrad cache: --include-cupy only goes with --clear")
        return 2
    for cache in caches():
        note = " (shared with every CuPy program)" if cache.name == "cupy" else ""
        if args.clear and (cache.name != "cupy" or args.include_cupy):
            print(f"{cache.name:<10} {cache.path}  cleared {_megabytes(cache.clear())}")
            continue
        files = cache.files()
        state = f"{_megabytes(cache.size())} in {len(files)} files" if files else "empty"
        print(f"{cache.name:<10} {cache.path}  {state}{note}")
        print(f"{'':<10} written by {cache.written_by}")
    return 0
