"""The launch half of the CUDA C backends: compile named template instantiations, launch them.

Planning (tile choice, grid, split-K, the packed parameter struct) lives in
``cupy_backend``; it hands its decisions to a ``KernelRunner``.  Two runners implement
this interface:

* ``CupyRunner`` (``cupy_backend``): ``cupy.RawModule`` on a real GPU.
* ``HostRunner`` (``convgrad.cuda_host``): the same ``kernels/*.cu`` compiled with
  g++ against an emulation of the CUDA execution model, run on the CPU.

Launch arguments follow ``cuLaunchKernel``'s convention, one Python object per kernel
parameter, in order:

* an array (a CuPy array for ``CupyRunner``, a NumPy array for ``HostRunner``) is passed
  as a pointer to its first element (``arr.data.ptr`` / ``arr.ctypes.data``);
* a NumPy scalar (``np.int32(3)``, ``np.float32(1.0)``, ...) is passed by value with its
  exact width;
* a NumPy structured scalar (``np.void`` of a structured dtype) is passed by value as the
  raw bytes of a C struct with the same layout (the parameter struct of
  ``kernels/conv_params.cuh``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Sequence

Dim3 = tuple[int, int, int]


class KernelRunner(ABC):
    """Compile and launch template instantiations of the kernels in ``kernels/``."""

    #: ``"cupy"`` for a real GPU, ``"host"`` for the CPU emulation.
    kind: str = ""

    @abstractmethod
    def compile(self, source: str, name_expressions: Sequence[str]) -> None:
        """Make sure the named instantiations of ``kernels/<source>`` are built.

        Lazy and cached: a second call with the same names costs a dictionary look-up.
        Safe to call from several threads.
        """

    def compile_many(self, kernels: Iterable[tuple[str, str]]) -> None:
        """Build every ``(source, name_expression)`` given, e.g. all the launches of one call.

        A runner that can compile several at once overrides this; by default, one
        :meth:`compile` per source.
        """
        by_source: dict[str, list[str]] = {}
        for source, name in kernels:
            by_source.setdefault(source, []).append(name)
        for source, names in by_source.items():
            self.compile(source, list(dict.fromkeys(names)))

    @abstractmethod
    def launch(
        self,
        source: str,
        name_expression: str,
        grid: Dim3,
        block: Dim3,
        shared_mem: int,
        args: Sequence[Any],
    ) -> None:
        """Run ``name_expression`` from ``kernels/<source>`` over ``grid`` x ``block``.

        ``shared_mem`` is the dynamic shared memory per block in bytes; ``args`` follow the
        convention of the module docstring.  The instantiation is compiled first if needed.
        """
