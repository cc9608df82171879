"""What ptxas makes of the ``numba`` backend's dense kernels: registers, stack frame, spills.

PTX has only virtual registers, so the resources a kernel really uses are known only once
ptxas has assembled it.  :func:`dense_kernel_resources` compiles a dense kernel with
``numba.cuda.compile_ptx`` (libNVVM from the ``nvidia-nvvm`` wheel; no GPU needed) and
assembles the PTX with ``ptxas -v`` from the ``nvidia-cuda-nvcc`` wheel.

Run as a script it prints one JSON line per (kernel, tile, dtype, arch), for every dense
kernel the backend can launch::

    python tests/numba_ptx_resources.py [--arch sm_80,sm_90] [--tile large] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from convgrad.sass_report import find_tool

_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
ARCHES = ("sm_80", "sm_90")


def ptxas() -> Path | None:
    """``ptxas`` from the NVIDIA wheels (nvidia-cuda-nvcc), else from ``PATH``."""
    return find_tool("ptxas")


def parse_ptxas_verbose(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes of the one entry function in ``ptxas -v``'s log."""
    spill = _SPILL.findall(log)
    registers = _REGISTERS.findall(log)
    if len(spill) != 1 or len(registers) != 1:
        raise ValueError(f"expected the report of one entry function, got:\n{log}")
    stack, stores, loads = (int(v) for v in spill[0])
    return {"registers": int(registers[0]), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def assemble(ptx: str, arch: str) -> dict[str, int]:
    """``ptxas -arch=<arch> -v`` of one kernel's PTX; its resource report."""
    tool = ptxas()
    if tool is None:
        raise RuntimeError("ptxas not found; install it with: pip install nvidia-cuda-nvcc")
    with tempfile.TemporaryDirectory(prefix="convgrad-ptxas-") as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([str(tool), f"-arch={arch}", "-v", "-o", str(Path(tmp) / "kernel.cubin"), str(source)],
                                capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas -arch={arch} failed:\n{result.stderr[-4000:]}")
    return parse_ptxas_verbose(result.stdout + result.stderr)


def kernel_ptx(kernel: str, tile: str | None, dtype: str, cc: tuple[int, int] = (8, 0)) -> str:
    """PTX of one launchable kernel for compute capability ``cc`` (PTX for 8.0 assembles for 9.0 too)."""
    from numba import cuda

    from convgrad.backends.numba_kernels import KernelSpec

    spec = KernelSpec(kernel, tile, dtype)
    ptx, _ = cuda.compile_ptx(spec.python_function(), spec.signature, cc=cc)
    return ptx


def dense_kernel_resources(kernel: str, tile: str, dtype: str, arches=ARCHES) -> dict[str, dict[str, int]]:
    """Per architecture: the ptxas resource report of a dense kernel (one PTX, assembled for each)."""
    ptx = kernel_ptx(kernel, tile, dtype)
    return {arch: assemble(ptx, arch) for arch in arches}


def main(argv: list[str] | None = None) -> int:
    from convgrad.backends import numba_kernels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(ARCHES))
    parser.add_argument("--tile", action="append", help="a tile name (default: every tile)")
    parser.add_argument("--dtype", action="append", help="a dtype (default: every dtype)")
    args = parser.parse_args(argv)
    arches = tuple(args.arch.split(","))
    for dtype in args.dtype or numba_kernels.DTYPES:
        for tile in args.tile or [t.name for t in numba_kernels.TILES]:
            for kernel in numba_kernels.DENSE_KERNELS:
                for arch, report in dense_kernel_resources(kernel, tile, dtype, arches).items():
                    print(json.dumps({"kernel": kernel, "tile": tile, "dtype": dtype, "arch": arch, **report}),
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
