"""First-use compile cost: what one call compiles together, ``convgrad.precompile`` and its CLI.

The ``cupy`` runner is exercised against the stand-in CuPy (``cupy_stand_in.py``), whose
``RawModule`` logs each compile; NVRTC itself compiles two small kernels for real.
"""

from __future__ import annotations

import json
import pickle
import threading
import time

import numpy as np
import pytest

import convgrad
from convgrad import cli, compile_check, kernel_source, precompiler
from convgrad.bench.suites import SUITES
from convgrad.backends.cupy_runner import CupyRunner
from convgrad.kernel_catalog import compile_cost

import cupy_stand_in

_NVRTC = compile_check.nvrtc_available()


@pytest.fixture
def stand_in(monkeypatch):
    return cupy_stand_in.install(monkeypatch)


def _slow_modules(state: cupy_stand_in.StandIn, seconds: float) -> dict:
    """Make each stand-in module take ``seconds`` to build; report how many were built at once."""
    seen = {"now": 0, "most": 0, "built": []}
    lock = threading.Lock()
    base = state.module.RawModule

    class SlowModule(base):
        def get_function(self, name):
            with lock:
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            time.sleep(seconds)
            with lock:
                seen["now"] -= 1
                seen["built"].append(name)
            return super().get_function(name)

    state.module.RawModule = SlowModule
    return seen


def test_runner_builds_each_instantiation_once_in_its_own_program_concurrently(stand_in):
    seen = _slow_modules(stand_in, 0.2)
    runner = CupyRunner(workers=2)
    names = [f"convgrad::add_bias<{t}>" for t in ("float", "double", "__half", "__nv_bfloat16")]
    threads = [threading.Thread(target=runner.compile, args=("bias.cu", names)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen["built"]) == sorted(names)  # three threads asked, each built once
    assert seen["most"] == 2
    compiles = stand_in.of_kind("compile")
    assert sorted(e.name for e in compiles) == sorted(names)  # one name expression per program


def test_one_call_compiles_all_its_kernels_before_the_first_launch(stand_in):
    """A split-K wgrad needs the GEMM and the reduction: both are compiled together, up front."""
    x = cupy_stand_in.device_array(stand_in, np.zeros((2, 4, 32, 32), np.float32))
    dy = cupy_stand_in.device_array(stand_in, np.zeros((2, 6, 32, 32), np.float32))
    convgrad.conv2d_weight(x, (6, 4, 3, 3), dy, padding=1, backend="cupy")
    kinds = [(e.kind, e.name.split("<")[0]) for e in stand_in.events if e.kind in ("compile", "launch")]
    assert {k for k in kinds[:2]} == {("compile", "convgrad::wgrad_gemm"), ("compile", "convgrad::splitk_reduce")}
    assert [k[0] for k in kinds[2:]] == ["launch", "launch"]


def test_the_costliest_instantiation_starts_first():
    names = ["convgrad::splitk_reduce<float>", "convgrad::fprop_gemm<float, 32, 32, 8, 4, 4>",
             "convgrad::wgrad_gemm<float, 128, 128, 8, 8, 8>", "convgrad::wgrad_gemm<float, 32, 32, 8, 4, 4>"]
    ordered = sorted(names, key=lambda n: -compile_cost(n))
    assert ordered[0] == "convgrad::wgrad_gemm<float, 128, 128, 8, 8, 8>" and ordered[-1].startswith("convgrad::splitk")


def test_precompile_builds_what_a_resnet50_step_launches_and_the_step_then_compiles_nothing(stand_in):
    (report,) = convgrad.precompile("resnet50", dtypes=("float32", "bfloat16"), backend="cupy", batch=2)
    problems = precompiler.workload_problems("resnet50", ("float32", "bfloat16"), batch=2)
    planned = precompiler.planned_kernels(problems)
    assert sorted(report.kernels) == sorted(name for _, name in planned)
    assert {e.kind for e in stand_in.events} == {"compile"}  # nothing allocated, launched or synchronised
    assert any("__nv_bfloat16" in name for name in report.kernels) and any("<float," in n for n in report.kernels)
    before = len(stand_in.of_kind("compile"))
    layer = SUITES["resnet50"].layers[3]
    x_shape, w_shape = layer.shapes(2, False)
    x = cupy_stand_in.device_array(stand_in, np.zeros(x_shape, np.float32))
    w = cupy_stand_in.device_array(stand_in, np.zeros(w_shape, np.float32))
    y = convgrad.conv2d(x, w, None, layer.stride, layer.padding, backend="cupy")
    convgrad.conv2d_input(x_shape, w, y, layer.stride, layer.padding, backend="cupy")
    convgrad.conv2d_weight(x, w_shape, y, layer.stride, layer.padding, backend="cupy")
    assert len(stand_in.of_kind("compile")) == before
    assert len(stand_in.of_kind("launch")) >= 3


def test_precompile_without_a_gpu_backend_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(precompiler, "GPU_BACKENDS", ())
    with pytest.raises(RuntimeError, match="compile_only=True"):
        convgrad.precompile("resnet50")
    assert cli.main(["precompile", "--suite", "resnet50"]) == 1
    assert "compile_only" in capsys.readouterr().err


def test_cli_compile_only_reports_and_writes_json(monkeypatch, tmp_path, capsys):
    calls = []

    def compile_programs(kernels, arch, workers):
        calls.append((list(kernels), arch, workers))
        return [{"kernel": name, "ok": True, "error": None} for _, name in kernels]

    monkeypatch.setattr(compile_check, "nvrtc_available", lambda: None)
    monkeypatch.setattr(compile_check, "compile_programs", compile_programs)
    path = tmp_path / "pre.json"
    status = cli.main(["precompile", "--compile-only", "--arch", "sm_80", "--suite", "resnet50",
                                "--dtype", "float32,bfloat16", "--workers", "3", "--json", str(path)])
    assert status == 0
    ((kernels, arch, workers),) = calls
    assert arch == "sm_80" and workers == 3
    assert kernels == precompiler.planned_kernels(precompiler.workload_problems("resnet50", ("float32", "bfloat16")))
    document = json.loads(path.read_text())
    assert document["reports"][0]["kernels"] == len(kernels) and document["dtypes"] == ["float32", "bfloat16"]
    assert f"{len(kernels)} kernels" in capsys.readouterr().out


@pytest.mark.skipif(_NVRTC is not None, reason=f"NVRTC unavailable: {_NVRTC}")
def test_compile_programs_builds_one_program_per_instantiation_with_the_runners_options(monkeypatch):
    programs = []
    real = compile_check._compile_source

    def recording(source, specs, arch, options):
        programs.append(([s.name for s in specs], tuple(options)))
        return real(source, specs, arch, options)

    monkeypatch.setattr(compile_check, "_compile_source", recording)
    kernels = [("splitk_reduce.cu", "convgrad::splitk_reduce<float>"), ("bias.cu", "convgrad::add_bias<float>")]
    rows = compile_check.compile_programs(kernels, "sm_90", workers=2)
    assert all(row["ok"] for row in rows), rows
    assert sorted(names for names, _ in programs) == [["convgrad::add_bias<float>"], ["convgrad::splitk_reduce<float>"]]
    assert {options for _, options in programs} == {kernel_source.nvrtc_options("sm_90", compile_check._nvrtc_major())}


# ----------------------------------------------------------------------------------------
# Numba: kernels cached on disk


def test_numba_kernels_are_compiled_with_the_disk_cache(monkeypatch):
    pytest.importorskip("numba")
    from numba import cuda

    # Imported before cuda.jit is replaced: its device functions are decorated on import, by the real one.
    from convgrad.backends import numba_kernels  # noqa: F401
    from convgrad.backends.numba_backend import NumbaBackend

    jitted = []
    monkeypatch.setattr(cuda, "jit", lambda signature, **options: (jitted.append(options), lambda fn: fn)[1])
    built = NumbaBackend().precompile({"float32"})
    assert built and all("float32" in label for label in built)
    assert len(jitted) == len(built) and all(options.get("cache") is True for options in jitted)


def test_numba_kernel_closures_hash_the_same_in_every_process():
    """Numba's cache key hashes a kernel's closure cells: they must be plain values, so a later
    process finds the cached build (a function or array in a cell would change the key)."""
    pytest.importorskip("numba")
    from numba.core import types

    from convgrad.backends.numba_backend import launchable_kernels

    for label, function, _ in launchable_kernels():
        cells = tuple(cell.cell_contents for cell in (function.__closure__ or ()))
        for value in cells:
            assert isinstance(value, (int, float, bool, str, tuple, types.Type)), (label, type(value))
        assert pickle.loads(pickle.dumps(cells)) == cells


def test_workloads_cover_every_layout_and_dtype_asked_for():
    problems = precompiler.workload_problems(["resnet50"], ("float32", "bfloat16"), batch=4, layouts=("nchw", "nhwc"))
    layers = len(SUITES["resnet50"].layers)
    assert len(problems) == 4 * layers
    assert {(p.dtype, p.channels_last) for p in problems} == {(d, c) for d in ("float32", "bfloat16") for c in (False, True)}
    assert {p.N for p in problems} == {4}
    with pytest.raises(ValueError, match="layouts"):
        precompiler.workload_problems("resnet50", layouts=("nhw",))
    with pytest.raises(ValueError, match="unknown suite"):
        precompiler.workload_problems("resnet5")


def test_cli_records_each_backend_as_it_finishes(stand_in, monkeypatch, tmp_path):
    """A later backend failing (or running out of time) leaves the earlier ones' report."""
    from convgrad import backends

    numba = backends.get("numba")
    monkeypatch.setattr(type(numba), "available", lambda self: True)

    def fail(self, dtypes):
        raise RuntimeError("numba stopped")

    monkeypatch.setattr(type(numba), "precompile", fail)
    path = tmp_path / "pre.json"
    status = cli.main(["precompile", "--suite", "resnet50", "--batch", "2", "--backend", "cupy", "--backend", "numba",
                       "--json", str(path)])
    assert status == 1
    (report,) = json.loads(path.read_text())["reports"]
    assert report["backend"] == "cupy" and report["kernels"] > 0
