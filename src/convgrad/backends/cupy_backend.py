"""The ``cupy`` and ``cupy-host`` backends: the CUDA C kernels of ``kernels/``, planned once.

Planning is kept apart from launching (DESIGN §4).  :class:`~convgrad.backends.cupy_planner.Planner`
turns a :class:`~convgrad.problem.ConvProblem` into a plan (kernels, tiles, grids, split-K
slices, workspaces, the packed parameter struct); a
:class:`~convgrad.kernel_runner.KernelRunner` then compiles and launches it:

* ``cupy``: :class:`~convgrad.backends.cupy_runner.CupyRunner`, ``cupy.RawModule`` on the GPU
  that holds the arrays, on CuPy's current stream;
* ``cupy-host``: ``convgrad.cuda_host.HostRunner``, the same sources compiled with g++
  against an emulation of CUDA and run on the CPU, for CI.

This module holds what the two backends add to a plan: the arrays (workspaces, the packed
weight, staging, the pointer-alignment check of the vector path), the device's SM count,
and the launches in order.

Algorithms (kernels/*.cu; each file's header has the formulas and launch geometry):

* fprop, dgrad, wgrad: SIMT implicit GEMM (``implicit_gemm.cu``), one template per pass
  instantiated per dtype and tile shape (32, 64 and 128 wide, chosen for the device's SM
  count); fprop and dgrad read the weight packed once per call (``weight_pack.cu``) on the
  larger tiles; dgrad runs one GEMM per stride phase so no multiply is spent on taps the
  stride skips; any pass may split its reduction into slices whose partial sums go to a
  workspace and are added in a fixed order (``splitk_reduce.cu``), or, for wgrad with
  ``deterministic=False``, atomically;
* depthwise (``groups == C``, any channel multiplier): direct kernels (``depthwise.cu``);
* the bias of fprop is fused; the bias of conv_transpose is a small kernel (``bias.cu``);
* on the GPU, a 1×1 stride-1 unpadded channels-last fprop is one ``cupy.matmul`` (cuBLAS).

Accumulation is float32 for float16/bfloat16/float32 and float64 for float64.
"""

from __future__ import annotations

import functools
import threading
from abc import abstractmethod
from typing import Any, Sequence

import numpy as np

from ..kernel_runner import KernelRunner
from ..problem import ConvProblem
from .base import Backend
from .cupy_planner import ACCUMULATOR, Plan, Planner
from .cupy_runner import CupyRunner


# ----------------------------------------------------------------------------------------
# Backends


class _KernelBackend(Backend):
    """The passes, run as a :class:`Plan` through a :class:`KernelRunner` (the part both backends share)."""

    #: Compile each launch's ``batch`` together on first use (worth it where compiler runs are costly).
    compile_batches = False

    def __init__(self, runner: KernelRunner | None = None, planner: Planner | None = None) -> None:
        self.planner = planner or Planner()
        self._runner = runner
        self._runner_lock = threading.Lock()

    # Array-library specifics, provided by the subclasses.
    @abstractmethod
    def _make_runner(self) -> KernelRunner:
        """The runner that compiles and launches this backend's kernels."""

    @abstractmethod
    def _empty(self, elements: int, dtype: str, like: Any) -> Any:
        """An uninitialised flat workspace on ``like``'s device."""

    @abstractmethod
    def _zeros(self, elements: int, dtype: str, like: Any) -> Any:
        """A zeroed flat workspace on ``like``'s device."""

    def _execute(self, plan: Plan, tensors: dict[str, Any], outputs: Sequence[str]) -> None:
        """Run the launches of ``plan`` on ``tensors``; ``outputs`` are the roles written."""
        runner = self.runner
        for launch in plan.launches:
            if self.compile_batches and launch.batch:
                runner.compile(launch.source, launch.batch)
            params = launch.params
            if launch.vector_operand and _address(tensors[launch.vector_operand]) % launch.vector_alignment == 0:
                params = np.array(params)
                params["a_vec"] = 1
                params = params[()]
            args = [params, *(tensors[role] for role in launch.args)]
            runner.launch(launch.source, launch.kernel, launch.grid, launch.block, launch.shared_mem, args)

    @property
    def runner(self) -> KernelRunner:
        if self._runner is None:
            with self._runner_lock:
                if self._runner is None:
                    self._runner = self._make_runner()
        return self._runner

    def unsupported(self, problem: ConvProblem) -> str | None:
        return self.planner.unsupported(problem)

    def _sm_count(self, like: Any) -> int | None:
        """SMs of the device holding ``like`` (None: the planner's default)."""
        return None

    def _run(self, problem: ConvProblem, pass_: str, tensors: dict[str, Any], bias: Any = None) -> None:
        like = tensors["w"]
        plan = self.planner.plan(problem, pass_, has_bias=bias is not None, sm_count=self._sm_count(like))
        acc = ACCUMULATOR[problem.dtype]
        full = dict(tensors)
        full["bias"] = bias if bias is not None else tensors["w"]  # read only when has_bias is set
        if plan.workspace is None:
            full["workspace"] = self._empty(1, acc, like)  # never dereferenced
        elif plan.workspace.zeroed:
            full["workspace"] = self._zeros(plan.workspace.elements, plan.workspace.dtype, like)
        else:
            full["workspace"] = self._empty(plan.workspace.elements, plan.workspace.dtype, like)
        if plan.packed is not None:
            # The packed weight, in the weight's own dtype (bfloat16 may be held as its bits).
            full["packed"] = self._empty(plan.packed.elements, like.dtype, like)
        out_role = {"fprop": "y", "dgrad": "x", "wgrad": "w"}[pass_]
        self._execute(plan, full, (out_role,))

    def forward(self, x: Any, w: Any, bias: Any, problem: ConvProblem, out: Any) -> None:
        self._run(problem, "fprop", {"x": x, "w": w, "y": out}, bias)

    def grad_input(self, dy: Any, w: Any, problem: ConvProblem, out: Any) -> None:
        self._run(problem, "dgrad", {"y": dy, "w": w, "x": out})

    def grad_weight(self, x: Any, dy: Any, problem: ConvProblem, out: Any) -> None:
        self._run(problem, "wgrad", {"x": x, "y": dy, "w": out})

    def add_bias(self, out: Any, bias: Any, problem: ConvProblem) -> None:
        """``out`` (N, C, D, H, W) += ``bias`` (C,) in place, with the bias kernel."""
        if bias is None or out.size == 0:
            return
        itemsize = out.dtype.itemsize
        strides = tuple(s // itemsize for s in out.strides)
        plan = self.planner.bias_plan(problem, strides, tuple(out.shape))
        self._execute(plan, {"x": out, "bias": bias}, ("x",))


def _address(array: Any) -> int:
    """Address of an array's first element (NumPy or CuPy)."""
    if isinstance(array, np.ndarray):
        return int(array.__array_interface__["data"][0])
    return int(array.data.ptr)


@functools.lru_cache(maxsize=None)
def _cupy_device_present() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CuPy missing, or no driver/device: the backend is unavailable
        return False


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_id: int) -> int:
    """The SM count of a CUDA device, asked once."""
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _is_bfloat16(dtype: Any) -> bool:
    return getattr(dtype, "name", str(dtype)) == "bfloat16"


def matmul_1x1(xp: Any, x: Any, w: Any, bias: Any, problem: ConvProblem, out: Any) -> bool:
    """fprop of a 1×1, stride-1, unpadded, ungrouped, channels-last convolution as one GEMM.

    ``(N·D·H·W, C) @ (C, K)`` through ``xp.matmul`` (cuBLAS on the GPU).  Returns False,
    having done nothing, when the problem or the layouts do not qualify.
    """
    if (problem.G != 1 or problem.kernel_size != (1, 1, 1) or problem.stride != (1, 1, 1)
            or any(problem.pad_before) or any(problem.pad_after)
            or problem.dtype not in ("float16", "float32", "float64")):
        return False
    x_rows = x.transpose(0, 2, 3, 4, 1)
    y_rows = out.transpose(0, 2, 3, 4, 1)
    if not (x_rows.flags.c_contiguous and y_rows.flags.c_contiguous):
        return False
    x2 = x_rows.reshape(-1, problem.C)
    y2 = y_rows.reshape(-1, problem.K)
    w2 = w.reshape(problem.K, problem.C)
    if problem.dtype == "float16":
        # Accumulate in float32 as every other path does, then round once.
        result = xp.matmul(x2.astype(xp.float32), w2.T.astype(xp.float32))
        if bias is not None:
            result += bias.astype(xp.float32)
        y2[...] = result.astype(out.dtype)
        return True
    xp.matmul(x2, w2.T, out=y2)
    if bias is not None:
        y2 += bias
    return True


class CupyBackend(_KernelBackend):
    """CUDA C kernels on the GPU through ``cupy.RawModule``; CuPy arrays, zero copies."""

    name = "cupy"
    emulated = False
    array_kinds = ("cupy",)
    stages_numpy = True

    def available(self) -> bool:
        return _cupy_device_present()

    def _make_runner(self) -> KernelRunner:
        return CupyRunner()

    def _sm_count(self, like: Any) -> int | None:
        return _multiprocessor_count(like.device.id)

    def _empty(self, elements: int, dtype: str, like: Any) -> Any:
        import cupy

        with like.device:
            return cupy.empty(elements, dtype)

    def _zeros(self, elements: int, dtype: str, like: Any) -> Any:
        import cupy

        with like.device:
            return cupy.zeros(elements, dtype)

    def _execute(self, plan: Plan, tensors: dict[str, Any], outputs: Sequence[str]) -> None:
        with tensors[outputs[0]].device:
            super()._execute(plan, tensors, outputs)

    def forward(self, x: Any, w: Any, bias: Any, problem: ConvProblem, out: Any) -> None:
        import cupy

        with out.device:
            if matmul_1x1(cupy, x, w, bias, problem, out):
                return
        super().forward(x, w, bias, problem, out)

    def to_device(self, array: Any) -> Any:
        import cupy

        if _is_bfloat16(array.dtype):
            try:
                return cupy.asarray(array)
            except (TypeError, ValueError):
                # CuPy without a bfloat16 dtype: the kernels only need the bits.
                return cupy.asarray(array.view(np.uint16))
        return cupy.asarray(array)

    def to_host(self, array: Any) -> Any:
        import cupy

        host = cupy.asnumpy(array)
        if host.dtype == np.uint16:  # bfloat16 staged as its bits (see to_device)
            import ml_dtypes

            host = host.view(ml_dtypes.bfloat16)
        return host


class CupyHostBackend(_KernelBackend):
    """The ``cupy`` backend's planning and kernels, run on the CPU by ``convgrad.cuda_host`` (for CI).

    Parameters
    ----------
    runner : KernelRunner, optional
        Defaults to a ``HostRunner`` on the kernel directory (blocks in forward order).
    """

    name = "cupy-host"
    emulated = True
    array_kinds = ("numpy",)
    stages_numpy = False
    compile_batches = True

    def available(self) -> bool:
        from ..cuda_host import compiler_available

        return bool(compiler_available())

    def _make_runner(self) -> KernelRunner:
        from ..cuda_host import HostRunner

        return HostRunner()

    def _empty(self, elements: int, dtype: str, like: Any) -> Any:
        return np.empty(elements, dtype)

    def _zeros(self, elements: int, dtype: str, like: Any) -> Any:
        return np.zeros(elements, dtype)

    def _execute(self, plan: Plan, tensors: dict[str, Any], outputs: Sequence[str]) -> None:
        # The runner decides (HostRunner reads CONVGRAD_CUDA_HOST_SANITIZE=address by default).
        if not getattr(self.runner, "sanitize", False):
            super()._execute(plan, tensors, outputs)
            return
        # Every tensor in memory of exactly its extent, so one element past any buffer is
        # reported; results are copied back afterwards.
        from ..cuda_host import place_tight

        placed = {role: place_tight(array) for role, array in tensors.items()}
        super()._execute(plan, placed, outputs)
        for role in outputs:
            tensors[role][...] = placed[role]
