"""Find the C++ compiler that builds kernels for the host emulation.

The compiler is ``$CXX`` when set, else ``g++``, else ``clang++``; it must be version 11 or
newer (C++17 with ``__builtin_bit_cast``).  Looking it up runs ``--version`` once per
process and never compiles anything.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

MIN_MAJOR_VERSION = 11


@dataclass(frozen=True)
class Compiler:
    """A C++ compiler found on this machine.

    Attributes
    ----------
    path : str
        Absolute path of the executable.
    family : str
        ``"gcc"`` or ``"clang"``.
    version : tuple of int
        Major, minor (and patch) version.
    banner : str
        First line of ``--version``; part of every build's cache key.
    """

    path: str
    family: str
    version: tuple[int, ...]
    banner: str


def _candidates(cxx: str | None) -> list[str]:
    if cxx:
        return [cxx]
    env = os.environ.get("CXX")
    if env:
        return [env]
    return ["g++", "clang++"]


def _parse_version(banner: str, family: str) -> tuple[int, ...] | None:
    if family == "clang":
        match = re.search(r"version\s+(\d+)\.(\d+)(?:\.(\d+))?", banner)
        found = [match.groups()] if match else []
    else:
        # "g++ (Debian 12.2.0-14) 12.2.0": the release is the last dotted number.
        found = re.findall(r"(\d+)\.(\d+)(?:\.(\d+))?", banner)
    if not found:
        return None
    return tuple(int(part) for part in found[-1] if part)


@functools.lru_cache(maxsize=None)
def find_compiler(cxx: str | None = None) -> Compiler | None:
    """Return the compiler to use, or None when no suitable one is installed.

    Parameters
    ----------
    cxx : str, optional
        Compiler name or path; default ``$CXX``, else ``g++``, else ``clang++``.
    """
    for name in _candidates(cxx):
        path = shutil.which(name)
        if path is None:
            continue
        try:
            result = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode != 0 or not result.stdout.strip():
            continue
        banner = result.stdout.strip().splitlines()[0]
        family = "clang" if "clang" in banner.lower() else "gcc"
        version = _parse_version(banner, family)
        if version is None or version[0] < MIN_MAJOR_VERSION:
            continue
        return Compiler(path=os.path.realpath(path), family=family, version=version, banner=banner)
    return None


def compiler_available(cxx: str | None = None) -> bool:
    """True when a C++ compiler of version 11 or newer is installed (see `find_compiler`)."""
    return find_compiler(cxx) is not None


@functools.lru_cache(maxsize=None)
def runtime_library(compiler: Compiler, name: str) -> str | None:
    """Path of a compiler runtime library such as ``libasan.so``, or None if it has none."""
    result = subprocess.run(
        [compiler.path, f"-print-file-name={name}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    path = result.stdout.strip()
    # An unknown library is echoed back as the bare name.
    if result.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
        return None
    return path
