"""The compile check compiles with exactly the options NVRTC receives from the ``cupy`` runner.

``cupy.RawModule`` adds options of its own to the ones it is given (``-ftz=true``, the
architecture, include directories); :func:`convgrad.kernel_source.nvrtc_options` is the one
place that lists them all, and both the runner and the compile check follow it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from convgrad import compile_check, kernel_source

import cupy_stand_in

ROOT = Path(__file__).resolve().parents[1]


def test_runner_gives_rawmodule_the_options_nvrtc_options_starts_from(monkeypatch):
    state = cupy_stand_in.install(monkeypatch)
    from convgrad.backends.cupy_runner import CupyRunner

    runner = CupyRunner()
    runner.compile("bias.cu", ["convgrad::add_bias<float>"])
    assert state.options_seen == [kernel_source.compile_options(13)]
    full = kernel_source.nvrtc_options("sm_90", 13)
    ours = kernel_source.compile_options(13)
    start = full.index(ours[0])
    assert full[start:start + len(ours)] == ours  # CuPy keeps ours in order, between its own


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_options_hold_what_cupy_adds(arch):
    options = kernel_source.nvrtc_options(arch, 13)
    assert options[-2:] == (f"-arch={arch}", "--device-as-default-execution-space")
    assert options.count("-ftz=true") == 1 and options.index("-ftz=true") < options.index(f"-arch={arch}")
    assert sum(1 for o in options if "-std=" in o) == 1  # ours; CuPy adds none then


def test_compile_check_compiles_with_exactly_the_runners_options(monkeypatch):
    seen = {}

    def record(source, specs, arch, options, sass=False):
        seen.setdefault(arch, set()).add(tuple(options))
        return [compile_check._row(spec, arch, registers=1) for spec in specs]

    monkeypatch.setattr(compile_check, "nvrtc_available", lambda: None)
    monkeypatch.setattr(compile_check, "_nvrtc_major", lambda: 13)
    monkeypatch.setattr(compile_check, "_compile_source", record)
    compile_check.compile_check(("sm_80", "sm_90"), workers=1)  # in this process, where the recorder is
    assert seen == {arch: {kernel_source.nvrtc_options(arch, 13)} for arch in ("sm_80", "sm_90")}


def test_cupy_debug_and_pch_settings_are_followed(monkeypatch):
    monkeypatch.setenv("CUPY_CUDA_COMPILE_WITH_DEBUG", "1")
    monkeypatch.setenv("CUPY_NVRTC_USE_PCH", "1")
    options = kernel_source.nvrtc_options("sm_90", 13)
    assert options[-5:] == ("--device-debug", "--generate-line-info", "-arch=sm_90",
                            "--device-as-default-execution-space", "--pch")


def test_readme_says_where_the_emulator_differs_from_the_gpu_build():
    """cupy-host keeps subnormals and does not contract a*b+c; the GPU build does both (README)."""
    assert kernel_source.CUPY_FLUSH_TO_ZERO in kernel_source.nvrtc_options("sm_90", 13)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### `cupy-host`"):]
    section = section[:section.index("\n### ", 4)]
    assert "-ftz=true" in section and "subnormal" in section
    assert "-ffp-contract=off" in section and re.search(r"contract", section)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cross-check against an installed CuPy")
def test_nvrtc_options_match_what_cupy_itself_passes_to_nvrtc(monkeypatch):
    """Where CuPy is installed (no GPU needed), run its own option assembly and catch the NVRTC call."""
    import cupy
    import cupy.cuda.compiler as compiler
    from cupy._core import core

    if not hasattr(cupy, "__version__") or "stand-in" in cupy.__version__:
        pytest.skip("a stand-in CuPy is installed")
    captured = {}

    class Program:
        def __init__(self, source, name, headers=(), include_names=(), name_expressions=None, method=None):
            pass

        def compile(self, options=(), log_stream=None):
            captured["options"] = tuple(options)
            raise RuntimeError("captured")

    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    monkeypatch.setattr(compiler, "_NVRTCProgram", Program)
    monkeypatch.setattr(compiler, "_preprocess", lambda *args, **kwargs: "")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    major = 13
    with pytest.raises(RuntimeError, match="captured"):
        core.compile_with_cache("", kernel_source.compile_options(major), "90", prepend_cupy_headers=False,
                                name_expressions=["k"])
    assert captured["options"] == kernel_source.nvrtc_options("sm_90", major)
