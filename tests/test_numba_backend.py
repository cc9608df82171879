"""The ``numba`` backend on a machine without a GPU, and its determinism on one.

Without a GPU the kernels run in three child processes, started together so they share the
machine's cores, and never in this process (the simulator must be chosen before Numba is
first imported, and must not touch the other tests):

* the shared suite (``tests/test_passes.py -m small``) on ``numba`` under the CUDA simulator;
* this backend's own simulator cases (``tests/numba_simulator_cases.py``);
* ``numba.cuda.compile_ptx`` of every kernel signature the backend can launch, for compute
  capability 8.0 and 9.0: the simulator does no type checking, so this is what shows that
  the kernels compile for a real GPU (libNVVM comes from the ``nvidia-nvvm`` wheel, found by
  numba-cuda through ``cuda-pathfinder``; no driver is needed).

On a machine with a CUDA GPU the shared suite runs on ``numba`` in-process with all cases,
and the determinism test below checks that dgrad and wgrad are bit-identical run to run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convgrad

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SRC = Path(convgrad.__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 600
COMPUTE_CAPABILITIES = ("8.0", "9.0")

# Prints one JSON line per kernel, then a summary line, in a process without the simulator.
_COMPILE_PTX = """
import json, sys
from numba import cuda
from convgrad.backends.numba_backend import launchable_kernels
cc = tuple(int(v) for v in sys.argv[1].split("."))
failures = {}
kernels = launchable_kernels()
for label, function, signature in kernels:
    try:
        ptx, _ = cuda.compile_ptx(function, signature, cc=cc)
        assert ".entry" in ptx, "no kernel entry in the PTX"
    except Exception as error:
        failures[label] = f"{type(error).__name__}: {error}"[-2000:]
    print(json.dumps({"kernel": label, "ok": label not in failures}), flush=True)
print(json.dumps({"compiled": len(kernels) - len(failures), "kernels": len(kernels), "failures": failures}))
"""


def _environment(simulator: bool) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _children() -> dict[str, tuple[list[str], dict[str, str]]]:
    pytest_args = ["-q", "-p", "no:cacheprovider"]
    children = {
        "shared_suite": (
            [sys.executable, "-m", "pytest", str(TESTS / "test_passes.py"), "--backend", "numba", "-m", "small",
             *pytest_args],
            _environment(simulator=True),
        ),
        "simulator_cases": (
            [sys.executable, "-m", "pytest", str(TESTS / "numba_simulator_cases.py"), *pytest_args],
            _environment(simulator=True),
        ),
    }
    for cc in COMPUTE_CAPABILITIES:
        children[f"compile_ptx_{cc}"] = ([sys.executable, "-c", _COMPILE_PTX, cc], _environment(simulator=False))
    return children


# Which test waits for which child; only the children of selected tests are started.
_TEST_OF_CHILD = {
    "shared_suite": "test_shared_suite_under_simulator",
    "simulator_cases": "test_simulator_cases",
    **{f"compile_ptx_{cc}": "test_compile_ptx_of_every_launchable_kernel" for cc in COMPUTE_CAPABILITIES},
}


@pytest.fixture(scope="module")
def children(request):
    """The child processes of this module's selected tests, all started at once."""
    selected = {item.originalname for item in request.session.items
                if getattr(getattr(item, "module", None), "__name__", None) == __name__}
    specs = _children()
    processes = {}
    for name, (command, env) in specs.items():
        if _TEST_OF_CHILD[name] not in selected:
            continue
        if name == "shared_suite" and not (TESTS / "test_passes.py").exists():
            continue
        processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def _finish(children, name: str) -> tuple[int, str]:
    process = children[name]
    try:
        output, _ = process.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{name} did not finish within {CHILD_TIMEOUT_S} s:\n{output[-4000:]}")
    return process.returncode, output


def _summary(output: str) -> dict[str, int]:
    """Counts from pytest's final summary line, e.g. ``376 passed, 69 skipped in 120.5s``."""
    lines = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b", line)]
    last = lines[-1] if lines else ""
    return {word: int(count) for count, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last)}


def _assert_pytest_child_passed(children, name: str) -> None:
    returncode, output = _finish(children, name)
    counts = _summary(output)
    assert returncode == 0 and not counts.get("failed") and not counts.get("error") and not counts.get("errors"), (
        f"{name} failed (exit status {returncode}):\n{output[-8000:]}")
    assert counts.get("passed", 0) > 0, f"{name} ran no tests:\n{output[-4000:]}"


def test_shared_suite_under_simulator(children):
    if "shared_suite" not in children:
        pytest.skip("tests/test_passes.py does not exist")
    _assert_pytest_child_passed(children, "shared_suite")


def test_simulator_cases(children):
    _assert_pytest_child_passed(children, "simulator_cases")


@pytest.mark.parametrize("cc", COMPUTE_CAPABILITIES)
def test_compile_ptx_of_every_launchable_kernel(children, cc):
    returncode, output = _finish(children, f"compile_ptx_{cc}")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert returncode == 0 and lines, f"compile_ptx child failed (exit status {returncode}):\n{output[-8000:]}"
    summary = json.loads(lines[-1])
    assert not summary["failures"], "\n\n".join(f"{k}:\n{v}" for k, v in summary["failures"].items())
    assert summary["compiled"] == summary["kernels"] > 0


# ----------------------------------------------------------------------------------------
# In this process: no simulator, no kernels unless there is a GPU.


def test_every_kernel_has_one_signature_per_dtype():
    from convgrad.backends import numba_kernels

    specs = numba_kernels.launchable_kernels()
    assert len({spec.label for spec in specs}) == len(specs)
    for dtype in numba_kernels.DTYPES:
        names = {(spec.kernel, spec.tile) for spec in specs if spec.dtype == dtype}
        dense = {(k, t.name) for k in numba_kernels.DENSE_KERNELS for t in numba_kernels.TILES}
        direct = {(k, None) for k in numba_kernels.DIRECT_KERNELS}
        assert names == dense | direct


def test_bfloat16_is_unsupported_with_a_reason():
    from convgrad.problem import conv_problem

    backend = convgrad.backends.get("numba")
    problem = conv_problem("conv2d", 2, (1, 2, 5, 5), (3, 2, 3, 3), 1, 0, 1, 1, dtype="bfloat16")
    assert "bfloat16" in backend.unsupported(problem)
    assert backend.unsupported(problem.with_options(dtype="float16")) is None


def test_not_emulated_without_the_simulator():
    from convgrad.backends.numba_backend import simulator_enabled

    if simulator_enabled():
        pytest.skip("this process runs under the simulator")
    backend = convgrad.backends.get("numba")
    assert backend.emulated is False
    from numba import cuda

    assert backend.available() == cuda.is_available()


def _real_gpu() -> bool:
    from convgrad.backends.numba_backend import simulator_enabled

    if simulator_enabled():
        return False
    from numba import cuda

    return cuda.is_available()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("groups, stride", [(1, 1), (1, 2), (4, 1), (64, 2)], ids=["dense", "dense_s2", "grouped", "depthwise_s2"])
def test_dgrad_and_wgrad_are_bit_identical_run_to_run(dtype, groups, stride):
    if not _real_gpu():
        pytest.skip("needs a CUDA GPU")
    from numba import cuda

    rng = np.random.default_rng(0)
    N, C, K, H, W = 8, 64, 64, 28, 28
    x = cuda.to_device(rng.standard_normal((N, C, H, W)).astype(dtype))
    w = cuda.to_device(rng.standard_normal((K, C // groups, 3, 3)).astype(dtype))
    y = convgrad.conv2d(x, w, None, stride, 1, 1, groups)
    dy = cuda.to_device(rng.standard_normal(tuple(y.shape)).astype(dtype))
    runs = []
    for _ in range(2):
        dx = convgrad.conv2d_input((N, C, H, W), w, dy, stride, 1, 1, groups)
        dw = convgrad.conv2d_weight(x, tuple(w.shape), dy, stride, 1, 1, groups)
        runs.append((dx.copy_to_host(), dw.copy_to_host()))
    assert runs[0][0].tobytes() == runs[1][0].tobytes(), "dgrad differs between two runs"
    assert runs[0][1].tobytes() == runs[1][1].tobytes(), "wgrad differs between two runs"
