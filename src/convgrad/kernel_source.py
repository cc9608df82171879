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
    """The options every runner compiles the kernels with: C++17 and the include paths.

    This is what ``CupyRunner`` gives ``cupy.RawModule``; NVRTC receives more, see :func:`nvrtc_options`.
    """
    options = [CXX_STANDARD, f"-I{kernel_dir()}"]
    if include_cuda:
        options += [f"-I{d}" for d in cuda_include_dirs(nvrtc_major)]
    return tuple(options)


#: The one option CuPy adds that changes arithmetic: float32 subnormal inputs and results of
#: every instruction flush to zero.  The ``cupy-host`` emulator keeps subnormals (README).
CUPY_FLUSH_TO_ZERO = "-ftz=true"


def nvrtc_options(arch: str, nvrtc_major: int | None = None) -> tuple[str, ...]:
    """Every option NVRTC receives when the ``cupy`` backend compiles ``kernels/`` for ``arch`` ("sm_90").

    ``cupy.RawModule(options=compile_options(...))`` does not pass its options through as they
    are.  CuPy 14 (``assemble_cupy_compiler_options`` in ``cupy/_core/core.pyx``) puts its
    bundled CCCL include directories first, adds ``--std=c++17`` unless a standard is given,
    then its own include directory and the CUDA runtime headers' directory; then
    (``_compile_with_cache_cuda`` and ``_compile_using_nvrtc_no_warning`` in
    ``cupy/cuda/compiler.py``) ``-ftz=true``, the debug options when
    ``CUPY_CUDA_COMPILE_WITH_DEBUG`` is set, ``-arch=sm_XX`` for the device, and
    ``--device-as-default-execution-space``, and ``--pch`` when ``CUPY_NVRTC_USE_PCH`` is set
    (NVRTC 12.8 or newer).  The compile check compiles with exactly this list, so what it
    reports is what the runner builds.  CuPy's include directories are used when CuPy is
    importable (it imports without a GPU); without CuPy they are left out, as nothing could
    be found there.
    """
    ours = compile_options(nvrtc_major)
    before, after = _cupy_include_options()
    options = [*before, *ours]
    if not any("-std=" in option for option in ours):
        options.append("--std=c++17")
    options += [*after, CUPY_FLUSH_TO_ZERO]
    if _env_flag("CUPY_CUDA_COMPILE_WITH_DEBUG"):
        options += ["--device-debug", "--generate-line-info"]
    options += [f"-arch={arch}", "--device-as-default-execution-space"]
    if _env_flag("CUPY_NVRTC_USE_PCH") and (nvrtc_major is None or nvrtc_major >= 13):
        options.append("--pch")
    return tuple(options)


def _env_flag(name: str) -> bool:
    """CuPy's reading of a boolean environment variable: set and not "0"."""
    return os.environ.get(name, "0") != "0"


def _cupy_include_options() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """CuPy's include options before ours (its CCCL) and after ours (its headers, then the CUDA runtime's)."""
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    try:
        from cupy._core import core  # type: ignore[import-not-found]

        before = tuple(core._get_cccl_include_options())
        after = (f"-I{core._get_header_dir_path()}",)
    except Exception:  # no CuPy, or one that lays out its headers differently: nothing of it to include
        pass
    try:
        from cuda.pathfinder import find_nvidia_header_directory  # what CuPy 14 uses to find them

        cudart = find_nvidia_header_directory("cudart")
    except Exception:  # cuda-pathfinder missing or unable to look
        cudart = None
    if cudart:
        after += (f"-I{cudart}",)
    return before, after


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
