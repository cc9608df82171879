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

* fprop, dgrad, wgrad in float16, bfloat16, and float32 with ``allow_tf32``: tensor-core
  implicit GEMM (``tensor_core_gemm.cu``, WMMA with a cp.async pipeline), planned by
  ``tensor_core_planner``; dgrad by stride phases, wgrad with deterministic split-K;
* otherwise (and where the tensor cores cannot run a problem): SIMT implicit GEMM
  (``implicit_gemm.cu``), one template per pass instantiated per dtype and tile shape (32,
  64 and 128 wide, chosen for the device's SM count); fprop and dgrad read the weight packed
  once per call (``weight_pack.cu``) on the larger tiles; dgrad runs one GEMM per stride
  phase so no multiply is spent on taps the stride skips; any pass may split its reduction
  into slices whose partial sums go to a workspace and are added in a fixed order
  (``splitk_reduce.cu``), or, for wgrad with ``deterministic=False``, atomically;
* depthwise (``groups == C``, any channel multiplier): direct kernels (``depthwise.cu``);
* the bias of fprop is fused; the bias of conv_transpose is a small kernel (``bias.cu``);
* on the GPU, a 1×1 stride-1 unpadded channels-last fprop that the tensor cores do not run
  is one ``cupy.matmul`` (cuBLAS).

Accumulation is float32 for float16/bfloat16/float32 and float64 for float64.

With ``CONVGRAD_AUTOTUNE=1`` (or ``convgrad.config(autotune=True)``), ``cupy`` times the
tensor-core configurations of a pass on first use of a problem and caches the fastest per
device and problem (``tensor_core_autotune``); ``cupy-host`` always uses the heuristic.
"""

from __future__ import annotations

import functools
import threading
from abc import abstractmethod
from typing import Any, Iterable, Sequence

import numpy as np

from .. import options
from ..kernel_runner import KernelRunner
from ..problem import ConvProblem
from ..tensor_core_catalog import TcConfig
from .base import Backend
from .cupy_planner import ACCUMULATOR, Plan, Planner
from .cupy_runner import CupyRunner
from .tensor_core_autotune import Autotuner
from .tensor_core_planner import DEFAULT_DEVICE, DeviceModel, TensorCorePlanner


# ----------------------------------------------------------------------------------------
# Backends


class _KernelBackend(Backend):
    """The passes, run as a :class:`Plan` through a :class:`KernelRunner` (the part both backends share)."""

    #: Compile each launch's ``batch`` together on first use (worth it where compiler runs are costly).
    compile_batches = False
    #: Whether CONVGRAD_AUTOTUNE times tensor-core configurations here (a real GPU only).
    autotunes = False

    def __init__(self, runner: KernelRunner | None = None, planner: Planner | None = None,
                 autotuner: Autotuner | None = None) -> None:
        self.planner = planner or Planner(tensor_cores=TensorCorePlanner())
        self._runner = runner
        self._runner_lock = threading.Lock()
        self._autotuner = autotuner

    @property
    def autotuner(self) -> Autotuner:
        """Chooses tensor-core configurations by timing (created on first use: it owns a cache directory)."""
        if self._autotuner is None:
            self._autotuner = Autotuner()
        return self._autotuner

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

    def compile_plans(self, plans: Iterable[Plan]) -> None:
        """Build every kernel the plans launch, together, before the first launch.

        The ``cupy`` runner compiles them concurrently, one NVRTC program each; the host
        runner builds each launch's ``batch`` (the other passes of its dtype and tile too) as
        one library, since its compiler runs are costly.
        """
        runner = self.runner
        launches = [launch for plan in plans for launch in plan.launches]
        if self.compile_batches:
            for launch in launches:
                runner.compile(launch.source, launch.batch or (launch.kernel,))
        else:
            runner.compile_many((launch.source, launch.kernel) for launch in launches)

    def _execute(self, plan: Plan, tensors: dict[str, Any], outputs: Sequence[str]) -> None:
        """Run the launches of ``plan`` on ``tensors``; ``outputs`` are the roles written."""
        runner = self.runner
        self.compile_plans([plan])
        for launch in plan.launches:
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

    def uses_tensor_cores(self, problem: ConvProblem, pass_: str) -> bool:
        """Whether ``pass_`` of ``problem`` is planned on the tensor-core kernels (on the current device)."""
        if self.unsupported(problem) is not None or problem.is_empty:
            return False
        return self.planner.plan(problem, pass_, device=self._device_model(None)).algorithm == "tensor-core"

    def rounds_to_tf32(self, problem: ConvProblem, pass_: str) -> bool:
        return problem.dtype == "float32" and problem.allow_tf32 and self.uses_tensor_cores(problem, pass_)

    def _device_model(self, like: Any) -> DeviceModel | None:
        """The GPU the tensor-core planner plans for: ``like``'s, or the current one when None
        (None: the planner's default model)."""
        return None

    def _with_workspace(self, plan: Plan, problem: ConvProblem, tensors: dict[str, Any], bias: Any) -> dict[str, Any]:
        """The launch arguments by role: the tensors, the bias (or a stand-in) and the plan's workspace."""
        like = tensors["w"]
        full = dict(tensors)
        full["bias"] = bias if bias is not None else tensors["w"]  # read only when has_bias is set
        if plan.workspace is None:
            full["workspace"] = self._empty(1, ACCUMULATOR[problem.dtype], like)  # never dereferenced
        elif plan.workspace.zeroed:
            full["workspace"] = self._zeros(plan.workspace.elements, plan.workspace.dtype, like)
        else:
            full["workspace"] = self._empty(plan.workspace.elements, plan.workspace.dtype, like)
        if plan.packed is not None:
            # The packed weight, in the weight's own dtype (bfloat16 may be held as its bits).
            full["packed"] = self._empty(plan.packed.elements, like.dtype, like)
        return full

    def _seconds(self, plan: Plan, arguments: dict[str, Any], out_role: str) -> float:
        """How long ``plan`` takes on the device (autotuning); backends that cannot time raise."""
        raise NotImplementedError(f"{self.name} does not autotune")

    def _plan(self, problem: ConvProblem, pass_: str, tensors: dict[str, Any], bias: Any, out_role: str) -> Plan:
        """The planner's plan; with autotuning on a GPU, the fastest tensor-core configuration."""
        model = self._device_model(tensors["w"])
        device = model or DEFAULT_DEVICE
        # The SIMT planner counts the real device's SMs, else its own default.
        plan = self.planner.plan(problem, pass_, has_bias=bias is not None, device=device,
                                 sm_count=model.sm_count if model is not None else None)
        if not (self.autotunes and plan.algorithm == "tensor-core" and options.get("autotune")):
            return plan
        tensor_cores = self.planner.tensor_cores
        candidates = tensor_cores.configs(problem, pass_, device)

        def plan_with(config: TcConfig) -> Plan:
            return tensor_cores.plan(self.planner, problem, pass_, bias is not None, device, config=config)

        def measure(config: TcConfig) -> float:
            candidate = plan_with(config)
            return self._seconds(candidate, self._with_workspace(candidate, problem, tensors, bias), out_role)

        return plan_with(self.autotuner.choose(device, problem, pass_, candidates, measure))

    def _run(self, problem: ConvProblem, pass_: str, tensors: dict[str, Any], bias: Any = None) -> None:
        out_role = {"fprop": "y", "dgrad": "x", "wgrad": "w"}[pass_]
        plan = self._plan(problem, pass_, tensors, bias, out_role)
        self._execute(plan, self._with_workspace(plan, problem, tensors, bias), (out_role,))

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


#: Timed runs per candidate configuration when autotuning.
AUTOTUNE_REPEATS = 5


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
def _cupy_device_model(device_id: int) -> DeviceModel:
    import cupy

    attributes = cupy.cuda.Device(device_id).attributes
    major = attributes["ComputeCapabilityMajor"]
    minor = attributes["ComputeCapabilityMinor"]
    return DeviceModel(sm_count=attributes["MultiProcessorCount"], capability=10 * major + minor,
                       shared_per_sm=attributes["MaxSharedMemoryPerMultiprocessor"],
                       shared_per_block=attributes["MaxSharedMemoryPerBlockOptin"],
                       threads_per_sm=attributes["MaxThreadsPerMultiProcessor"],
                       registers_per_sm=attributes["MaxRegistersPerMultiprocessor"],
                       name=cupy.cuda.runtime.getDeviceProperties(device_id)["name"].decode())


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
    autotunes = True

    def available(self) -> bool:
        return _cupy_device_present()

    def _make_runner(self) -> KernelRunner:
        return CupyRunner()

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

    def _seconds(self, plan: Plan, arguments: dict[str, Any], out_role: str) -> float:
        """Median of AUTOTUNE_REPEATS runs between CUDA events on the current stream, after a warm-up
        (which also compiles).  The output is overwritten; the real run follows."""
        import cupy

        self._execute(plan, arguments, (out_role,))
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(AUTOTUNE_REPEATS):
            start.record()
            self._execute(plan, arguments, (out_role,))
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        return sorted(times)[len(times) // 2]

    def _device_model(self, like: Any) -> DeviceModel:
        import cupy

        return _cupy_device_model(like.device.id if like is not None else cupy.cuda.Device().id)

    def forward(self, x: Any, w: Any, bias: Any, problem: ConvProblem, out: Any) -> None:
        import cupy

        with out.device:
            # cuBLAS in float32 for 1x1 layers, unless the tensor cores run the problem (16-bit
            # types, TF32): they accumulate the same way as every other layer then.
            if not self.uses_tensor_cores(problem, "fprop") and matmul_1x1(cupy, x, w, bias, problem, out):
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
