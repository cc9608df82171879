"""Autotuning of tensor-core configurations (``backends/tensor_core_autotune.py``) without a GPU.

The cache, the keys and the choice are plain Python; the backend's autotuning path runs on
``cupy-host`` with the GPU timer replaced by a table of made-up times, so the chosen
configuration is known and its results are checked.  Real timing needs a GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import convgrad
from convgrad import cuda_host
from convgrad.backends.cupy_backend import CupyHostBackend
from convgrad.backends.cupy_planner import Planner
from convgrad.backends.tensor_core_autotune import (AutotuneCache, Autotuner, cache_root, device_key,
                                                    problem_key)
from convgrad.backends.tensor_core_planner import DeviceModel, TensorCorePlanner
from convgrad.problem import conv_problem
from convgrad.tensor_core_catalog import TC_CONFIGS

CONFIGS = TC_CONFIGS["float16"]
H200 = DeviceModel(name="NVIDIA H200", sm_count=132, capability=90)
A100 = DeviceModel(name="NVIDIA A100-SXM4-80GB", sm_count=108, capability=80)


def _problem(**options):
    problem = conv_problem("conv2d", 2, (2, 16, 9, 10), (24, 16, 3, 3), 1, 1, 1, 1, dtype="float16")
    return problem.with_options(**options) if options else problem


class _Stopwatch:
    """Made-up seconds per configuration, and which configurations were timed."""

    def __init__(self, seconds: dict) -> None:
        self.seconds = seconds
        self.timed: list = []

    def __call__(self, config) -> float:
        self.timed.append(config)
        return self.seconds[config]


def test_cache_root_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CONVGRAD_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path / "autotune"
    monkeypatch.delenv("CONVGRAD_CACHE_DIR")
    import platformdirs

    assert cache_root() == platformdirs.user_cache_path("convgrad") / "autotune"


def test_keys_separate_devices_problems_passes_and_options() -> None:
    assert device_key(H200) != device_key(A100)
    base = _problem()
    keys = {problem_key(base, "fprop"), problem_key(base, "dgrad"),
            problem_key(base.with_options(dtype="bfloat16"), "fprop"),
            problem_key(base.with_options(deterministic=False), "fprop"),
            problem_key(base.with_strides((1440, 1, 1440, 160, 16), (144, 1, 144, 48, 16), (2160, 1, 2160, 240, 24)),
                        "fprop")}
    assert len(keys) == 5
    assert problem_key(base, "fprop") == problem_key(_problem(), "fprop")


def test_cache_round_trip_merges_writers_and_survives_a_new_process(tmp_path) -> None:
    first, second = AutotuneCache(tmp_path), AutotuneCache(tmp_path)
    first.put("gpu", "a", "x")
    second.put("gpu", "b", "y")  # reads what the first wrote before writing
    second.put("other gpu", "a", "z")
    fresh = AutotuneCache(tmp_path)
    assert (fresh.get("gpu", "a"), fresh.get("gpu", "b"), fresh.get("other gpu", "a")) == ("x", "y", "z")
    assert fresh.get("gpu", "c") is None
    assert json.loads(fresh.path("gpu").read_text()) == {"a": "x", "b": "y"}
    assert not list(tmp_path.glob(".autotune-*")), "no temporary file is left behind"
    fresh.path("broken").write_text("{not json")
    assert fresh.get("broken", "a") is None


def test_autotuner_times_every_candidate_once_then_uses_the_cache(tmp_path) -> None:
    problem = _problem()
    watch = _Stopwatch({CONFIGS[0]: 3.0, CONFIGS[1]: 1.0, CONFIGS[2]: 2.0})
    tuner = Autotuner(AutotuneCache(tmp_path))
    assert tuner.choose(H200, problem, "fprop", CONFIGS, watch) == CONFIGS[1]
    assert watch.timed == list(CONFIGS)
    # The same problem again, from another process: nothing is timed.
    again = Autotuner(AutotuneCache(tmp_path))
    assert again.choose(H200, problem, "fprop", CONFIGS, watch) == CONFIGS[1]
    assert len(watch.timed) == 3
    # Another device, or a cached winner that is no longer a candidate: timed afresh.
    assert again.choose(A100, problem, "fprop", CONFIGS, watch) == CONFIGS[1] and len(watch.timed) == 6
    assert again.choose(H200, problem, "fprop", (CONFIGS[0], CONFIGS[2]), watch) == CONFIGS[2]
    with pytest.raises(ValueError, match="at least one candidate"):
        again.choose(H200, problem, "fprop", (), watch)


class _TimedHost(CupyHostBackend):
    """cupy-host with autotuning switched on and a stopwatch of made-up times; each candidate still runs."""

    autotunes = True

    def __init__(self, watch: _Stopwatch, cache_dir) -> None:
        runner = cuda_host.HostRunner(num_threads=1, sanitize="none")
        super().__init__(runner=runner, planner=Planner(tensor_cores=TensorCorePlanner()),
                         autotuner=Autotuner(AutotuneCache(cache_dir)))
        self.watch = watch

    def _seconds(self, plan, arguments, out_role) -> float:
        self._execute(plan, arguments, (out_role,))
        return self.watch(plan.tensor_core)


@pytest.mark.skipif(not cuda_host.compiler_available(), reason="needs g++ for cupy-host")
def test_backend_runs_the_autotuned_configuration(tmp_path) -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(-2, 3, (2, 9, 10, 16)).astype(np.float16)
    w = rng.integers(-2, 3, (24, 3, 3, 16)).astype(np.float16)
    expected = convgrad.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1, channels_last=True,
                               backend="numpy")
    slowest_first = {CONFIGS[0]: 1.0, CONFIGS[1]: 2.0, CONFIGS[2]: 3.0}  # the heuristic would take CONFIGS[2]
    watch = _Stopwatch(slowest_first)
    backend = _TimedHost(watch, tmp_path)
    problem = conv_problem("conv2d", 2, x.shape, w.shape, 1, 1, 1, 1, dtype="float16", channels_last=True)
    assert backend.planner.plan(problem, "fprop").tensor_core == CONFIGS[2]
    with convgrad.config(autotune=True):
        y = convgrad.conv2d(x, w, padding=1, channels_last=True, backend=backend)
        assert watch.timed == list(CONFIGS)
        np.testing.assert_array_equal(y.astype(np.float64), expected)
        convgrad.conv2d(x, w, padding=1, channels_last=True, backend=backend)
        assert len(watch.timed) == 3, "the second call reuses the winner"
    cached = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert list(cached.values()) == [CONFIGS[0].name]
    # Without the option, the heuristic's plan runs and nothing is timed.
    convgrad.conv2d(x, w, padding=1, channels_last=True, backend=backend)
    assert len(watch.timed) == 3


@pytest.mark.skipif(not cuda_host.compiler_available(), reason="needs g++ for cupy-host")
def test_cupy_host_never_autotunes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONVGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CONVGRAD_AUTOTUNE", "1")
    x = np.ones((1, 4, 4, 8), np.float16)
    w = np.ones((8, 3, 3, 8), np.float16)
    y = convgrad.conv2d(x, w, padding=1, channels_last=True, backend="cupy-host")
    assert y[0, 1, 1, 0] == 72
    assert not (tmp_path / "autotune").exists()
