"""Where the CUDA C kernels live and how every runner compiles them.

The kernels are plain ``.cu``/``.cuh`` files in ``kernels/`` (DESIGN §2, §5).  They are found,
in this order, in

1. the directory named by the environment variable ``CONVGRAD_KERNEL_DIR``;
2. ``convgrad/kernels`` next to this module (the installed wheel ships them there);
3. ``<repository>/kernels`` of a source checkout (``src/convgrad/..`` twice up).

Every runner compiles them as C++17 with the kernel directory on the include path; NVRTC
additionally needs ``cuda_fp16.h``/``cuda_bf16.h`` and what they include, which come from the
pip wheels ``nvidia-cuda-runtime`` and ``nvidia-cuda-cccl`` (``site-packages/nvidia/cu13/include``
and ``.../include/cccl``, or the ``cu12`` layout ``nvidia/cuda_runtime/include`` and
``nvidia/cuda_cccl/include``), so no system CUDA toolkit is needed.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from dataclasses import dataclass

KERNEL_DIR_ENV = "CONVGRAD_KERNEL_DIR"
#: Options every runner passes when compiling kernels/ (the include paths are added per runner).
CXX_STANDARD = "-std=c++17"


def kernel_dir() -> pathlib.Path:
    """The directory holding the kernel sources (see the module docstring for the search order).

    Raises
    ------
    FileNotFoundError
        If ``CONVGRAD_KERNEL_DIR`` names a missing directory, or no kernel directory is found.
    """
    override = os.environ.get(KERNEL_DIR_ENV)
    if override:
        path = pathlib.Path(override).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{KERNEL_DIR_ENV}={override!r} is not a directory")
        return path.resolve()
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent.parent / "kernels"):
        if (candidate / "conv_params.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"convgrad's CUDA kernels were not found next to the package ({here / 'kernels'}) nor in a source "
        f"checkout ({here.parent.parent / 'kernels'}); set {KERNEL_DIR_ENV}"
    )


def read_source(name: str) -> str:
    """The text of ``kernels/<name>``."""
    return (kernel_dir() / name).read_text(encoding="utf-8")


def source_files() -> list[str]:
    """Names of every ``.cu``/``.cuh`` file in the kernel directory."""
    root = kernel_dir()
    return sorted(p.name for p in root.iterdir() if p.suffix in (".cu", ".cuh"))


def _nvidia_roots() -> list[pathlib.Path]:
    """Every directory of the ``nvidia`` namespace package (the pip CUDA wheels install there)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    roots = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for entry in sys.path:
        candidate = pathlib.Path(entry) / "nvidia"
        if candidate.is_dir() and candidate not in roots:
            roots.append(candidate)
    return roots


def cuda_include_dirs(major: int | None = None) -> list[pathlib.Path]:
    """Include directories with ``cuda_fp16.h`` (and CCCL) from the pip wheels.

    Parameters
    ----------
    major : int, optional
        CUDA major version of the NVRTC that will compile (12 or 13); by default the newest found.

    Returns
    -------
    list of paths, possibly empty (then only a system toolkit, or none, provides the headers).
    """
    layouts = {
        13: [("cu13", "include"), ("cu13", "include", "cccl")],
        12: [("cuda_runtime", "include"), ("cuda_cccl", "include"), ("cu12", "include"), ("cu12", "include", "cccl")],
    }
    majors = [major] if major is not None else sorted(layouts, reverse=True)
    for version in majors:
        found: list[pathlib.Path] = []
        for root in _nvidia_roots():
            for parts in layouts.get(version, []):
                candidate = root.joinpath(*parts)
                if candidate.is_dir() and candidate not in found:
                    found.append(candidate)
        if any((d / "cuda_fp16.h").is_file() for d in found):
            return found
    return []


def compile_options(nvrtc_major: int | None = None, *, include_cuda: bool = True) -> tuple[str, ...]:
    """The options every runner compiles the kernels with: C++17 and the include paths."""
    options = [CXX_STANDARD, f"-I{kernel_dir()}"]
    if include_cuda:
        options += [f"-I{d}" for d in cuda_include_dirs(nvrtc_major)]
    return tuple(options)


@dataclass(frozen=True)
class KernelSpec:
    """One launchable instantiation: which source, its name expression, what it may use.

    The SASS report (:mod:`convgrad.sass_report`) reads the rest: ``threads`` per block (for
    the occupancy), ``gemm`` (a GEMM kernel must have no stack frame and no local-memory
    instruction, and has a main loop whose instruction mix is reported), ``math_per_step``
    (multiply-add instructions one thread issues per reduction step, to turn an unrolled
    main loop into per-step figures) and ``required_ops`` (SASS opcodes that must appear,
    e.g. ``("HMMA", "LDGSTS")`` for a tensor-core kernel) and ``min_blocks_per_sm`` (the
    occupancy the planner counts on; the report fails a kernel that does not reach it).
    """

    source: str
    name: str
    dynamic_shared_bytes: int
    may_spill: bool = False
    threads: int = 0
    gemm: bool = False
    math_per_step: int | None = None
    required_ops: tuple[str, ...] = ()
    min_blocks_per_sm: int = 0
