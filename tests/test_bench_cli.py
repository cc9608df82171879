"""``convgrad bench --suite quick --backend numpy``: every field for every layer and pass, and sane numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convgrad.bench import SUITES

SRC = Path(__file__).resolve().parents[1] / "src"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _convgrad(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    env.pop("CONVGRAD_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "convgrad", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = _convgrad("bench", "--suite", "quick", "--backend", "numpy", "--json", "out.json", "--plot", "out.png",
                     "--repeats", "1", "--warmup", "0", "--no-progress", cwd=out)
    return done, out


def test_quick_suite_json(quick_run):
    done, out = quick_run
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads((out / "out.json").read_text())
    meta, records = document["meta"], document["records"]

    assert meta["dtype"] == "float32" and meta["allow_tf32"] is False and meta["layout"] == "nchw"
    assert meta["versions"]["convgrad"] and meta["versions"]["numpy"]
    assert "git" in meta and "ratio_definition" in meta
    cpu = meta["devices"]["cpu"]
    assert cpu["name"] and cpu["peak_tflops"] > 0 and cpu["bandwidth_gbs"] > 0
    assert "threadpools" in cpu and "environment" in cpu
    if importlib.util.find_spec("threadpoolctl") is not None:
        assert any(pool["user_api"] == "blas" for pool in cpu["threadpools"])
    if HAS_TORCH:
        assert meta["reference"] == "torch" and meta["versions"]["torch"]

    layers = [layer.name for layer in SUITES["quick"].layers]
    seen = {(r["layer"], r["pass"]) for r in records}
    assert seen == {(layer, p) for layer in layers for p in ("fprop", "dgrad", "wgrad")}
    assert len(records) == 3 * len(layers)
    for r in records:
        for name in ("suite", "layer", "problem", "pass", "backend", "device", "dtype", "layout", "batch", "flops",
                     "bytes", "status", "check", "time_s", "wall_s", "repeats", "tflops", "gbs", "roofline_tflops",
                     "roofline_fraction", "reference", "reference_time_s", "reference_tflops", "ratio",
                     "max_abs_error", "launch_overhead_s"):
            assert name in r, (name, r["problem"])
        assert r["backend"] == "numpy" and r["device"] == "cpu" and r["suite"] == "quick"
        assert r["status"] == "ok" and r["check"].startswith("ok"), r
        assert r["time_s"] > 0 and r["wall_s"] > 0 and r["repeats"] == 1
        assert math.isclose(r["tflops"], r["flops"] / r["time_s"] / 1e12, rel_tol=1e-9)
        assert math.isclose(r["gbs"], r["bytes"] / r["time_s"] / 1e9, rel_tol=1e-9)
        assert 0 < r["roofline_fraction"] and r["roofline_tflops"] > 0
        assert r["problem"].startswith(f"conv") and f"_{r['pass']}_" in r["problem"]
        if HAS_TORCH:
            assert r["reference"] == "torch" and r["reference_time_s"] > 0
            assert math.isclose(r["ratio"], r["reference_time_s"] / r["time_s"], rel_tol=1e-9)
        else:
            assert r["ratio"] is None
    assert set(document["summary"]["numpy"]) == {"fprop", "dgrad", "wgrad"}


def test_quick_suite_table_and_plot(quick_run):
    done, out = quick_run
    assert "geometric means" in done.stdout
    for layer in SUITES["quick"].layers:
        assert layer.name in done.stdout
    assert (out / "out.png").stat().st_size > 1000


def test_bad_arguments(tmp_path):
    done = _convgrad("bench", "--backend", "no-such-backend", cwd=tmp_path)
    assert done.returncode == 2 and "no-such-backend" in done.stderr


def test_plot_without_matplotlib_stops_before_any_work(tmp_path, monkeypatch, capsys):
    import argparse

    from convgrad.bench import cli, runner, timing

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark started although --plot cannot be written")

    for module in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: `import` raises ImportError
    monkeypatch.setattr(runner.Bench, "setup", must_not_run)
    monkeypatch.setattr(runner.Bench, "run_layer", must_not_run)
    monkeypatch.setattr(timing.CpuTimer, "measure", must_not_run)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    plot = tmp_path / "out.png"
    args = parser.parse_args(["--backend", "numpy", "--reference", "none", "--plot", str(plot), "--no-progress"])

    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--plot needs matplotlib" in err and 'pip install "convgrad[bench]"' in err
    assert not plot.exists()


def test_emulated_backends_are_never_benchmarked():
    import convgrad.backends as registry
    from convgrad.bench.cli import _resolve_backends

    for name in registry.registered():
        if registry.get(name).emulated:
            with pytest.raises(ValueError, match="emulated"):
                _resolve_backends([name])
    assert all(not registry.get(n).emulated for n in _resolve_backends(None))
    assert all(not registry.get(n).emulated for n in _resolve_backends(["all"]))


def test_importable_without_torch_cupy_numba():
    code = ("import sys\n"
            "for name in ('torch', 'cupy', 'numba'):\n"
            "    sys.modules[name] = None\n"
            "import convgrad.bench, convgrad.explain\n"
            "assert not any(sys.modules.get(n) for n in ('torch', 'cupy', 'numba'))\n")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_suites_are_what_they_say():
    resnet = SUITES["resnet50"]
    assert len(resnet.layers) == 23 and sum(layer.count for layer in resnet.layers) == 53
    assert resnet.batch_gpu == 32
    depthwise = SUITES["mobilenetv2-dw"]
    assert sum(layer.count for layer in depthwise.layers) == 17
    assert all(layer.groups == layer.C == layer.K and layer.kernel == (3, 3) for layer in depthwise.layers)
    assert all(layer.ndim == 1 and 3 <= layer.kernel[0] <= 9 for layer in SUITES["audio1d"].layers)
    assert all(layer.kernel == (3, 3, 3) for layer in SUITES["video3d"].layers)
    assert SUITES["video3d"].layers[0].size == (16, 56, 56)
