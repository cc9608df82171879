"""``convgrad bench --suite quick --backend numpy``: every field for every layer and pass, and sane numbers."""

from __future__ import annotations

import copy
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


# ----------------------------------------------------------------------------------------
# convgrad bench --model: whole training steps, patched against native


def test_model_names_are_the_models_defined():
    pytest.importorskip("torch")
    from convgrad.bench.models import MODELS
    from convgrad.bench.training import MODEL_NAMES

    assert set(MODEL_NAMES) == set(MODELS)


def _count_convolutions(model, torch):
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def test_models_have_the_networks_shapes():
    torch = pytest.importorskip("torch")
    from convgrad.bench.models import MODELS

    resnet, mobilenet = MODELS["resnet18"](), MODELS["mobilenetv2"]()
    # ResNet-18: stem + 16 block convolutions + 3 projections; 11.7 M parameters.
    assert _count_convolutions(resnet, torch) == 20
    assert sum(p.numel() for p in resnet.parameters()) == 11_689_512
    # MobileNetV2: stem, 17 blocks (the first without expansion), the 1x1 to 1280; 3.5 M parameters.
    assert _count_convolutions(mobilenet, torch) == 1 + 2 + 16 * 3 + 1
    assert sum(p.numel() for p in mobilenet.parameters()) == 3_504_872
    depthwise = [m for m in mobilenet.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    for model in (resnet, mobilenet):
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_gradient_check_fails_on_a_wrong_pairing():
    torch = pytest.importorskip("torch")
    import convgrad.torch as ct
    from convgrad.bench import training

    native = training.build_model("resnet18", torch.float64, seed=0)
    other = ct.patch(training.build_model("resnet18", torch.float64, seed=1))  # other weights: other gradients
    x, target = training._inputs(2, 32, torch.float64, "cpu", seed=3)
    report = training.compare_gradients(native, other, x, target)
    assert not report.ok and report.max_error > 1e-3
    with pytest.raises(training.GradientMismatch, match="differ from native PyTorch"):
        training.require_matching_gradients(native, other, x, target, "planted")
    same = ct.patch(copy.deepcopy(native))
    assert training.compare_gradients(native, same, x, target).ok


def test_gradient_check_catches_a_wrong_convgrad_pass(monkeypatch):
    """A weight gradient off by 0.1% in the numpy backend fails the check of the whole model."""
    pytest.importorskip("torch")
    from convgrad.backends import numpy_backend
    from convgrad.bench import training

    grad_weight = numpy_backend.NumpyBackend.grad_weight

    def slightly_wrong(self, x, dy, problem, out):
        grad_weight(self, x, dy, problem, out)
        out *= 1.001

    monkeypatch.setattr(numpy_backend.NumpyBackend, "grad_weight", slightly_wrong)
    with pytest.raises(training.GradientMismatch, match="resnet18"):
        training.check_model_gradients("resnet18")


def test_gradient_check_ignores_rounding_in_cancelling_gradients():
    """A gradient that is zero up to rounding is judged against the model's scale, not its own."""
    torch = pytest.importorskip("torch")
    from convgrad.bench import training

    class Fixed(torch.nn.Module):
        def __init__(self, tiny):
            super().__init__()
            self.big = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
            self.tiny = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
            self.offset = tiny

        def forward(self, x):
            return (x * self.big + self.tiny * self.offset).reshape(x.shape[0], -1)[:, :2]

    x, target = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    report = training.compare_gradients(Fixed(1e-17), Fixed(2e-17), x, target)
    assert report.ok, report


def _model_args(*extra: str) -> list[str]:
    return ["bench", "--model", "resnet18", "--batch", "2", "--size", "32", "--repeats", "1", "--warmup", "0", *extra]


@pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch")
def test_model_bench_runs_and_writes_json(tmp_path):
    done = _convgrad(*_model_args("--json", "model.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads((tmp_path / "model.json").read_text())
    [record] = document["models"]
    assert record["model"] == "resnet18" and record["device"] == "cpu" and record["dtype"] == "float32"
    assert record["batch"] == 2 and record["size"] == 32 and record["repeats"] == 1
    assert record["gradient_check"] == "ok" and record["gradient_max_error"] <= 1e-8
    assert record["patched_layers"] == 20 and record["thread_budget"] is True
    assert record["native_time_s"] > 0 and record["patched_time_s"] > 0
    assert math.isclose(record["ratio"], record["native_time_s"] / record["patched_time_s"], rel_tol=1e-9)
    assert "native_time_s / patched_time_s" in document["meta"]["ratio_definition"]
    [budget] = document["thread_budget"]
    assert budget["thread_budget"] is True
    assert set(budget["operators"]) == {"batch_norm", "conv2d", "relu"}
    for result in budget["operators"].values():
        assert math.isclose(result["slowdown"], result["after_convgrad_s"] / result["after_torch_s"], rel_tol=1e-9)
        assert math.isclose(result["slowdown_min"], result["after_convgrad_min_s"] / result["after_torch_min_s"],
                            rel_tol=1e-9)
    assert "resnet18" in done.stdout and "ratio" in done.stdout and "thread budget on" in done.stdout


@pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch")
def test_model_bench_fails_loudly_on_a_gradient_mismatch(tmp_path, monkeypatch, capsys):
    import argparse

    from convgrad.bench import cli, training

    def planted_mismatch(name, device="cpu", seed=0):
        raise training.GradientMismatch(f"{name}: planted")

    def must_not_time(*args, **kwargs):
        raise AssertionError("a model whose gradients are wrong was timed")

    monkeypatch.setattr(training, "check_model_gradients", planted_mismatch)
    monkeypatch.setattr(training, "training_step", must_not_time)
    monkeypatch.setattr("convgrad.bench.thread_budget.measure_thread_budget",
                        lambda enabled=True, **kwargs: {"thread_budget": enabled, "operators": {}})
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(_model_args("--json", str(tmp_path / "out.json"))[1:])
    assert cli.run(args) == 1
    assert "GRADIENT MISMATCH" in capsys.readouterr().err
    document = json.loads((tmp_path / "out.json").read_text())
    assert document["models"] == [] and "planted" in document["meta"]["gradient_failure"]


@pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch")
def test_model_and_suite_together_are_refused(tmp_path):
    done = _convgrad("bench", "--model", "resnet18", "--suite", "quick", cwd=tmp_path)
    assert done.returncode == 2 and "choose one" in done.stderr


@pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch")
def test_thread_budget_measurement_has_both_states():
    from convgrad.bench.thread_budget import measure_thread_budget

    for enabled in (True, False):
        result = measure_thread_budget(enabled, repeats=1, warmup=0, activation=(1, 8, 8, 8))
        assert result["thread_budget"] is enabled and result["repeats"] == 1
        for name, r in result["operators"].items():
            assert r["after_torch_s"] > 0 and r["after_convgrad_s"] > 0, name
