"""The numpy backend's compiled depthwise loops (``backends/cpu_kernels.py``): threads and processes.

Their values are checked by the shared suite; here, what the suite cannot see: the sums do
not depend on the number of threads, Numba runs them on its fork-safe ``workqueue`` layer,
and a process that has run them can still fork workers (PyTorch's DataLoader) that run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import convgrad

SRC = Path(convgrad.__file__).resolve().parent.parent


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _run_child(code: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_child_env(env or {}),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# (channels_last, spatial), with stride 2 along W: output rows of 35 take the planar loops, of 5 the
# channels-last loops (on a copy for planar arrays).
GEOMETRIES = [(False, (9, 70)), (False, (9, 10)), (True, (9, 10))]


@pytest.mark.parametrize(("channels_last", "spatial"), GEOMETRIES, ids=["planar", "planar-short-rows", "nhwc"])
def test_results_do_not_depend_on_the_thread_count(channels_last, spatial):
    # A child with four Numba threads, however many cores this machine has, runs each pass on 1 and on 4.
    out = _run_child(f"""
        import numba, numpy as np, convgrad
        channels_last, spatial = {channels_last!r}, {spatial!r}
        rng = np.random.default_rng(0)
        N, C, m = 3, 24, 2
        x = rng.standard_normal((N, C, *spatial)).astype(np.float32)
        w = rng.standard_normal((C * m, 1, 3, 3)).astype(np.float32)
        if channels_last:
            x, w = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), np.ascontiguousarray(w.transpose(0, 2, 3, 1))
        geometry = dict(stride=(1, 2), padding=1, groups=C, channels_last=channels_last, backend="numpy")
        dy = rng.standard_normal(convgrad.conv2d(x, w, **geometry).shape).astype(np.float32)

        def run():
            return [convgrad.conv2d(x, w, **geometry).tobytes(),
                    convgrad.conv2d_input(x.shape, w, dy, **geometry).tobytes(),
                    convgrad.conv2d_weight(x, w.shape, dy, **geometry).tobytes()]

        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(4)
        four = run()
        print([a == b for a, b in zip(one, four)])
    """, env={"NUMBA_NUM_THREADS": "4"})
    same = out.strip().splitlines()[-1]
    assert same == "[True, True, True]", f"bits equal with 1 and 4 threads (fprop, dgrad, wgrad): {same}"


def test_the_threading_layer_is_workqueue():
    out = _run_child("""
        import numpy as np, numba, convgrad
        x = np.ones((1, 4, 6, 6), np.float32)
        convgrad.conv2d(x, np.ones((4, 1, 3, 3), np.float32), groups=4, backend="numpy")
        print(numba.threading_layer())
    """)
    assert out.split()[-1] == "workqueue"


def test_forked_dataloader_workers_run_the_kernels():
    """After the parent has run a parallel kernel, forked DataLoader workers run them and get exact values."""
    pytest.importorskip("torch")
    out = _run_child("""
        import numpy as np, torch, convgrad
        from torch.utils.data import DataLoader, Dataset
        from convgrad.problem import conv_problem
        from convgrad.testing import reference_forward
        
        # Small integers: every sum is exact in float32, so results equal the float64 reference.
        W = (np.arange(4 * 9) % 5 - 2).astype(np.float32).reshape(4, 1, 3, 3)
        PROBLEM = conv_problem("conv2d", 2, (2, 4, 7, 40), W.shape, 1, 1, 1, 4, dtype="float32")

        def image(i):
            return (np.arange(2 * 4 * 7 * 40) % (5 + i) - 2).astype(np.float32).reshape(2, 4, 7, 40)

        def depthwise(i):
            return convgrad.conv2d(image(i), W, padding=1, groups=4, backend="numpy")

        class Convolved(Dataset):
            def __len__(self):
                return 6

            def __getitem__(self, i):
                return torch.from_numpy(depthwise(i))

        depthwise(0)  # the parent starts Numba's threads before forking
        loader = DataLoader(Convolved(), batch_size=None, num_workers=2, multiprocessing_context="fork")
        got = [batch.numpy() for batch in loader]
        assert len(got) == 6
        for i, result in enumerate(got):
            exact = reference_forward(image(i)[:, :, None].astype(np.float64), W[:, :, None].astype(np.float64),
                                      PROBLEM)[:, :, 0]
            assert np.array_equal(result, exact), i
        print("ok", len(got))
    """, timeout=600)
    assert out.split()[-2:] == ["ok", "6"]


def test_a_child_forked_while_another_thread_launches_runs_the_kernels():
    """The launch lock is new in a forked child, even if a parent thread held it at the fork."""
    out = _run_child("""
        import os, time, numpy as np, convgrad
        from convgrad.backends import cpu_kernels

        x, w = np.ones((1, 4, 6, 6), np.float32), np.ones((4, 1, 3, 3), np.float32)
        convgrad.conv2d(x, w, groups=4, backend="numpy")
        with cpu_kernels._LAUNCH_LOCK:  # as if another thread were inside a launch
            pid = os.fork()
            if pid == 0:
                y = convgrad.conv2d(x, w, groups=4, backend="numpy")
                os._exit(0 if float(y[0, 0, 0, 0]) == 9.0 else 1)
        for _ in range(600):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("exit", os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            print("hung")
    """)
    assert out.split()[-2:] == ["exit", "0"]
