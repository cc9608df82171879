"""Every instantiation the ``cupy`` backend can launch compiles through NVRTC for sm_80 and sm_90.

No GPU is needed: NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel and the fp16/bf16 headers
from ``nvidia-cuda-runtime``/``nvidia-cuda-cccl``.  The ptxas report (``-Xptxas=-v``) gives
registers, shared memory and spills; a spill in a kernel that must not spill is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from convgrad import compile_check, kernel_source
from convgrad.backends.cupy_planner import Planner
from convgrad.backends.tensor_core_planner import DeviceModel, TensorCorePlanner
from convgrad.kernel_catalog import launchable_kernels
from convgrad.problem import conv_problem
from convgrad.tensor_core_catalog import tensor_core_kernels

_REASON = compile_check.nvrtc_available()
needs_nvrtc = pytest.mark.skipif(_REASON is not None, reason=f"NVRTC unavailable: {_REASON}")
ARCHS = ("sm_80", "sm_90")


_SASS_REASON = None
if _REASON is None:
    from convgrad.sass_report import tools_available

    _SASS_REASON = tools_available()
needs_sass = pytest.mark.skipif(_SASS_REASON is not None, reason=f"cuobjdump/nvdisasm unavailable: {_SASS_REASON}")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Every instantiation compiled once per architecture; the SASS is read from the same cubins."""
    return compile_check.compile_check(ARCHS, sass=_SASS_REASON is None)


@needs_nvrtc
def test_every_launchable_instantiation_compiles_for_every_arch(rows: list[dict]) -> None:
    failed = [f"{row['kernel']} ({row['arch']}): {row['error']}" for row in rows if not row["ok"]]
    assert not failed, "\n".join(failed)
    expected = {(spec.name, arch) for spec in launchable_kernels() for arch in ARCHS}
    assert {(row["kernel"], row["arch"]) for row in rows} == expected
    assert len(rows) == len(expected)


@needs_nvrtc
def test_report_has_resources(rows: list[dict]) -> None:
    specs = {spec.name: spec for spec in launchable_kernels()}
    for row in rows:
        assert 0 < row["registers"] <= 255, row
        assert row["shared_bytes"] >= specs[row["kernel"]].dynamic_shared_bytes
        # Above 48 KiB the runner opts in (CupyRunner sets max_dynamic_shared_size_bytes); 99 KiB
        # per block is what every sm_80+ GPU allows (sm_86/sm_89 have the least).
        assert row["shared_bytes"] <= 99 * 1024, row
        if not specs[row["kernel"]].may_spill:
            assert row["spill_bytes"] == 0, row


@needs_nvrtc
def test_run_compile_check_prints_table_and_succeeds(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, rows: list[dict]) -> None:
    monkeypatch.setattr(compile_check, "compile_check",
                        lambda archs, sass=False: [r for r in rows if r["arch"] in archs])
    parser = argparse.ArgumentParser()
    compile_check.add_compile_arguments(parser)
    status = compile_check.run_compile_check(parser.parse_args(["--compile-only", "--arch", "sm_80,sm_90"]))
    out = capsys.readouterr().out
    assert status == 0
    assert "convgrad::fprop_gemm<float, 32, 32, 8, 4, 4, false>" in out and "sm_90" in out


@needs_nvrtc
@needs_sass
def test_gemm_kernels_have_no_stack_frame_and_no_local_memory(rows: list[dict]) -> None:
    specs = {spec.name: spec for spec in launchable_kernels()}
    gemm = [row for row in rows if specs[row["kernel"]].gemm]
    assert gemm and all("sass" in row for row in gemm)
    bad = [f"{row['kernel']} ({row['arch']}): {row['sass']['stack']} B stack, "
           f"{row['sass']['local_instructions']} LDL/STL" for row in gemm
           if row["sass"]["stack"] or row["sass"]["local_instructions"]]
    assert not bad, "\n".join(bad)


@needs_nvrtc
@needs_sass
def test_occupancy_is_what_the_planner_counts_on(rows: list[dict]) -> None:
    specs = {spec.name: spec for spec in launchable_kernels()}
    for row in rows:
        spec = specs[row["kernel"]]
        assert row["sass"]["threads"] == spec.threads
        assert row["sass"]["blocks_per_sm"] >= spec.min_blocks_per_sm, row["sass"]


@needs_nvrtc
@needs_sass
def test_every_gemm_main_loop_is_found(rows: list[dict]) -> None:
    """The heuristic finds a main loop whose steady step is one reduction step of the tile."""
    specs = {spec.name: spec for spec in launchable_kernels()}
    for row in rows:
        spec = specs[row["kernel"]]
        if not spec.gemm:
            continue
        loop = row["sass"]["loop"]
        assert loop is not None, row["kernel"]
        # Tensor-core kernels read their fragments with load_matrix_sync, which takes a generic
        # pointer: generic loads (LD) rather than LDS.
        shared_reads = loop["lds"] + (loop["generic"] if "HMMA" in spec.required_ops else 0)
        assert loop["math"] == spec.math_per_step and shared_reads > 0 and loop["barrier"] == 1, (row["kernel"], loop)


@needs_nvrtc
@needs_sass
def test_default_fp32_fprop_tile_meets_the_static_targets(rows: list[dict]) -> None:
    """The large fp32 fprop tile: FFMA at least 80% of its main loop's steady step, two blocks
    (16 warps) per SM (static figures, read from the SASS; no GPU has timed them)."""
    from convgrad.kernel_catalog import LARGE_TILES, gemm_kernel

    name = gemm_kernel("fprop", "float32", LARGE_TILES["float32"])
    for row in (r for r in rows if r["kernel"] == name):
        assert row["sass"]["loop"]["math_share"] >= 0.8, row["sass"]["loop"]
        assert row["sass"]["blocks_per_sm"] >= 2 and row["sass"]["warps_per_sm"] >= 16


def test_run_compile_check_fails_on_an_error_row(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {"kernel": "convgrad::k<float>", "source": "k.cu", "arch": "sm_80", "registers": 40, "shared_bytes": 0,
           "spill_bytes": 64, "ok": False, "error": "64 bytes of register spills in a kernel that must not spill"}
    monkeypatch.setattr(compile_check, "compile_check", lambda archs, sass=False: [bad])
    status = compile_check.run_compile_check(argparse.Namespace(compile_only=True, arch="sm_80"))
    assert status == 1
    assert "must not spill" in capsys.readouterr().out


def test_bad_arch_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert compile_check.run_compile_check(argparse.Namespace(compile_only=True, arch="ampere")) == 2
    assert "--arch" in capsys.readouterr().err


def test_ptxas_report_parsing() -> None:
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
ptxas         .     16 bytes stack frame, 12 bytes spill stores, 60 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 2048 bytes smem, 808 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1gPd' for 'sm_80'
ptxas info    : Function properties for _Z1gPd
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers, 800 bytes cmem[0]
"""
    report = compile_check.parse_ptxas_report(log)
    assert report["_Z1kPf"] == {"registers": 168, "static_shared": 2048, "stack": 16, "spill": 72}
    assert report["_Z1gPd"] == {"registers": 28, "static_shared": 0, "stack": 0, "spill": 0}


def test_cuda_headers_found_for_nvrtc() -> None:
    if _REASON is not None:
        pytest.skip(f"NVRTC unavailable: {_REASON}")
    dirs = kernel_source.cuda_include_dirs()
    assert any((d / "cuda_fp16.h").is_file() for d in dirs)
    options = kernel_source.compile_options()
    assert "-std=c++17" in options and f"-I{kernel_source.kernel_dir()}" in options


def test_kernel_dir_search_order(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CONVGRAD_KERNEL_DIR wins; without it the package's or the checkout's kernels/ is found."""
    monkeypatch.delenv(kernel_source.KERNEL_DIR_ENV, raising=False)
    default = kernel_source.kernel_dir()
    assert (default / "conv_params.cuh").is_file() and (default / "implicit_gemm.cu").is_file()
    monkeypatch.setenv(kernel_source.KERNEL_DIR_ENV, str(tmp_path))
    assert kernel_source.kernel_dir() == tmp_path.resolve()
    monkeypatch.setenv(kernel_source.KERNEL_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CONVGRAD_KERNEL_DIR"):
        kernel_source.kernel_dir()


def test_every_kernel_source_documents_itself() -> None:
    """Each .cu file opens with its formula, layouts, launch geometry and limits."""
    root = kernel_source.kernel_dir()
    for name in kernel_source.source_files():
        if not name.endswith(".cu"):
            continue
        header = (root / name).read_text().split("#include")[0].lower()
        for word in ("formula", "layout", "launch geometry", "limits"):
            assert word in header, f"{name}: its header comment does not describe the {word}"


def test_sass_table_and_json_are_written(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path) -> None:
    from convgrad.sass_report import SassRow

    sass = SassRow(kernel="convgrad::k<float>", arch="sm_80", gemm=True, registers=128, stack=0, spill=0,
                   local_instructions=0, static_shared=0, dynamic_shared=16384, threads=256, blocks_per_sm=2,
                   warps_per_sm=16, occupancy_limit="registers", math_per_step=512,
                   loop={"issued": 600, "math_share": 512 / 600, "math": 512, "lds": 32, "ldg": 5, "integer": 30,
                         "branch": 3},
                   loop_max={"issued": 700, "math_share": 512 / 700})
    row = {"kernel": "convgrad::k<float>", "source": "k.cu", "arch": "sm_80", "registers": 128,
           "shared_bytes": 16384, "spill_bytes": 0, "stack_bytes": 0, "ok": True, "error": None, "sass": sass.as_dict()}
    seen = {}

    def fake(archs, sass=False):
        seen["sass"] = sass
        return [row]

    monkeypatch.setattr(compile_check, "compile_check", fake)
    out_json = tmp_path / "report.json"
    status = compile_check.run_compile_check(argparse.Namespace(compile_only=True, arch="sm_80", sass=True,
                                                                json=str(out_json)))
    out = capsys.readouterr().out
    assert status == 0 and seen["sass"] is True
    assert "FMA%" in out and "85.3" in out and "2 (registers)" in out
    written = json.loads(out_json.read_text())
    assert written["archs"] == ["sm_80"] and written["rows"][0]["sass"]["warps_per_sm"] == 16


# ----------------------------------------------------------------------------------------
# The tensor-core instantiations: HMMA and cp.async in the main loop, and what the planner picks


@needs_nvrtc
@needs_sass
def test_every_tensor_core_instantiation_has_hmma_and_ldgsts_in_its_main_loop(rows: list[dict]) -> None:
    tensor_core = {spec.name for spec in tensor_core_kernels() if spec.gemm}
    checked = [row for row in rows if row["kernel"] in tensor_core]
    assert {(row["kernel"], row["arch"]) for row in checked} == {(k, a) for k in tensor_core for a in ARCHS}
    for row in checked:
        sass = row["sass"]
        assert row["ok"] and not sass["problems"], (row["kernel"], row["arch"], row["error"])
        assert sass["stack"] == 0 and sass["local_instructions"] == 0
        # Every HMMA sits in the main loop: none is issued outside the cp.async pipeline.
        assert sass["math_total"] == sass["math_in_loop"] > 0, (row["kernel"], row["arch"])


def _resnet_layers_nhwc(dtype: str, **options):
    """A few ResNet-50 layers at batch 32, channels-last."""
    def nhwc(n, c, k, size, kernel, stride, padding):
        problem = conv_problem("conv2d", 2, (n, c, size, size), (k, c, kernel, kernel), stride, padding, 1, 1,
                               dtype=dtype, **options)
        d, h, w = problem.input_size
        z, p, q = problem.output_size
        return problem.with_strides((d * h * w * c, 1, h * w * c, w * c, c),
                                    (kernel * kernel * c, 1, kernel * kernel * c, kernel * c, c),
                                    (z * p * q * k, 1, p * q * k, q * k, k))
    return [nhwc(32, 64, 64, 56, 3, 1, 1), nhwc(32, 256, 512, 56, 1, 2, 0), nhwc(32, 512, 512, 7, 3, 1, 1),
            nhwc(32, 3, 64, 224, 7, 2, 3)]


@needs_nvrtc
@needs_sass
@pytest.mark.parametrize("device", [DeviceModel(), DeviceModel(name="A100", sm_count=108, capability=80,
                                                                  shared_per_sm=164 * 1024,
                                                                  shared_per_block=163 * 1024)],
                         ids=["h200", "a100"])
def test_the_planner_picks_checked_tensor_core_instantiations(rows: list[dict], device: DeviceModel) -> None:
    """A silent fallback to the SIMT kernels cannot pass: what the planner launches for
    tensor-core problems is a checked instantiation with HMMA in it."""
    by_key = {(row["kernel"], row["arch"]): row for row in rows}
    planner = Planner(tensor_cores=TensorCorePlanner())
    arch = f"sm_{device.capability}"
    picked = set()
    for problems in (_resnet_layers_nhwc("float16"), _resnet_layers_nhwc("bfloat16"),
                     _resnet_layers_nhwc("float32", allow_tf32=True)):
        for problem in problems:
            for pass_ in ("fprop", "dgrad", "wgrad"):
                plan = planner.plan(problem, pass_, device=device)
                assert plan.algorithm == "tensor-core", (problem.name(pass_), plan.algorithm)
                row = by_key[(plan.launches[0].kernel, arch)]
                assert row["ok"] and row["sass"]["math_in_loop"] > 0 and "HMMA" in _required_ops(row["kernel"])
                picked.add(row["kernel"])
    assert len(picked) >= 9, "the heuristic uses more than one configuration"


def _required_ops(kernel: str) -> tuple[str, ...]:
    return next(spec.required_ops for spec in launchable_kernels() if spec.name == kernel)


@needs_nvrtc
@needs_sass
def test_the_tensor_core_requirement_fails_on_a_simt_kernel() -> None:
    """The FMA kernel a silent fallback would run has neither HMMA nor LDGSTS: held to the
    tensor-core requirements, its row fails."""
    simt = next(spec for spec in launchable_kernels() if spec.name.startswith("convgrad::fprop_gemm<__half, 128"))
    spec = dataclasses.replace(simt, required_ops=("HMMA", "LDGSTS"))
    (row,) = compile_check._compile_source(spec.source, [spec], "sm_80",
                                           kernel_source.nvrtc_options("sm_80", compile_check._nvrtc_major()), True)
    assert not row["ok"]
    assert row["sass"]["problems"][:2] == ["no HMMA instruction", "no LDGSTS instruction"]
