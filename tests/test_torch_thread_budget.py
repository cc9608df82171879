"""convgrad.torch's thread budget: on CPU tensors convgrad's CPU work stays within PyTorch's threads.

A call that is one chunk of work runs its GEMMs on PyTorch's pool; a call cut into several
chunks runs them side by side on PyTorch's thread count, each GEMM on NumPy's BLAS held to one
thread (``cpu_workers``).  Either way OpenBLAS's own pool never wakes.

What is checked here is the routing and its numerics (results as PyTorch's, bit-identical
run to run); how much it speeds a training step is a benchmark (``convgrad bench
--thread-budget`` and ``--model``), not a test.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import convgrad.torch as ct  # noqa: E402
from convgrad.backends import cpu_workers, numpy_backend  # noqa: E402


@pytest.fixture
def counted_gemms(monkeypatch):
    """Counts the GEMMs convgrad.torch hands to PyTorch, and every GEMM NumPy's BLAS runs for the backend."""
    counts = {"torch": 0, "torch.matmul": 0, "numpy": 0, "blas_threads": set()}
    to_torch, matmul = ct._torch_matmul, torch.matmul

    def via_torch(a, b, out):
        counts["torch"] += 1
        return to_torch(a, b, out)

    def counted_matmul(*args, **kwargs):
        counts["torch.matmul"] += 1
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", counted_matmul)

    def via_numpy(a, b, out=None):
        counts["numpy"] += 1
        counts["blas_threads"].update(lib.num_threads for lib in cpu_workers._blas_libraries().lib_controllers)
        return np.matmul(a, b, out=out)

    monkeypatch.setattr(ct, "_torch_matmul", via_torch)
    # The backend's default route, as _matmul takes it when nothing is routed: NumPy's matmul.
    original = numpy_backend._matmul

    def counted_default(a, b, out=None):
        if getattr(numpy_backend._gemm_route, "matmul", None) is None:
            return via_numpy(a, b, out)
        return original(a, b, out)

    monkeypatch.setattr(numpy_backend, "_matmul", counted_default)
    return counts


def _train_once(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    (layer(x) ** 2).sum().backward()
    return x.grad, layer.weight.grad


@pytest.fixture
def two_torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel, stride, padding, groups", [(3, 1, 1, 1), (3, 2, 1, 2), (1, 1, 0, 1)],
                         ids=["3x3", "3x3_s2_g2", "1x1"])
@pytest.mark.parametrize("side_by_side", [False, True], ids=["one_after_another", "side_by_side"])
def test_gemms_stay_within_torch_threads_and_match_native(counted_gemms, two_torch_threads, monkeypatch, dtype, kernel,
                                                          stride, padding, groups, side_by_side):
    if side_by_side:
        # Every chunk of these small problems side by side, as the stem of a network runs.
        monkeypatch.setattr(numpy_backend, "_SIDE_BY_SIDE_MIN_MACS", 0)
        monkeypatch.setattr(numpy_backend, "_SIDE_BY_SIDE_MAX_ROWS", 10**9)
    torch.manual_seed(0)
    # Large enough that every pass's GEMMs pass _SMALL_GEMM_MACS and would run in PyTorch.
    native = torch.nn.Conv2d(32, 48, kernel, stride, padding, groups=groups).to(dtype)
    patched = ct.patch(torch.nn.Conv2d(32, 48, kernel, stride, padding, groups=groups).to(dtype))
    patched.load_state_dict(native.state_dict())
    x = torch.randn(2, 32, 21, 19, dtype=dtype)
    expected = _train_once(native, x)
    counted_gemms["torch.matmul"] = 0  # count convgrad's products only
    got = _train_once(patched, x)
    if not side_by_side:
        # Chunks one after another: their GEMMs run on PyTorch's pool, none on NumPy's BLAS.
        assert counted_gemms["torch"] >= 3, "fprop, dgrad and wgrad should each route a GEMM to PyTorch"
        assert counted_gemms["torch.matmul"] >= 3
        assert counted_gemms["numpy"] == 0, "no GEMM of a convgrad.torch call may run on NumPy's BLAS pool"
    else:
        # Chunks side by side on PyTorch's two threads: each GEMM on NumPy's BLAS held to one thread.
        assert counted_gemms["numpy"] >= 3 * 2
        assert counted_gemms["blas_threads"] == {1}, "OpenBLAS's pool must not run beside PyTorch's"
        assert counted_gemms["torch"] == 0
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


def test_without_the_budget_gemms_run_on_numpy(counted_gemms):
    layer = ct.patch(torch.nn.Conv2d(4, 4, 3, padding=1))
    with ct._thread_budget(False):
        _train_once(layer, torch.randn(1, 4, 6, 6))
    assert counted_gemms["torch"] == 0 and counted_gemms["numpy"] >= 3
    # And the state is restored after the block.
    _train_once(layer, torch.randn(1, 4, 6, 6))
    assert counted_gemms["torch"] >= 3


def test_the_route_ends_with_the_call():
    layer = ct.patch(torch.nn.Conv2d(4, 4, 3, padding=1))
    layer(torch.randn(1, 4, 6, 6))
    assert getattr(numpy_backend._gemm_route, "matmul", None) is None


def test_the_route_ends_when_the_call_raises(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(numpy_backend.NumpyBackend, "forward", failing)
    with pytest.raises(RuntimeError, match="planted failure"):
        ct.conv2d(torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3), padding=1, backend="numpy")
    assert getattr(numpy_backend._gemm_route, "matmul", None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_identical_run_to_run(dtype):
    """Fresh tensors each run (other addresses, other alignment): the same bits for the same problem."""
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(shape) for shape in ((2, 16, 28, 28), (16, 16, 3, 3), (2, 16, 14, 14))]
    runs = []
    for _ in range(3):
        x, w, dy = (torch.tensor(a, dtype=dtype) for a in data)
        torch.empty(int(rng.integers(1, 4096)))  # shift the allocator's next addresses
        results = (ct.conv2d(x, w, None, 2, 1), ct.conv2d_input(x.shape, w, dy, 2, 1),
                   ct.conv2d_weight(x, w.shape, dy, 2, 1))
        runs.append([r.numpy().tobytes() for r in results])
    assert runs[0] == runs[1] == runs[2]


def test_large_gemms_go_to_torch_small_ones_stay_on_numpy(monkeypatch):
    calls = []
    matmul = torch.matmul

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", counted)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 72)), rng.standard_normal((72, 64))
    assert 64 * 72 * 64 >= ct._SMALL_GEMM_MACS
    np.testing.assert_allclose(ct._torch_matmul(a, b, None), a @ b, rtol=1e-10, atol=1e-10)
    assert len(calls) == 1
    small = a[:8, :8] @ b[:8, :8]
    np.testing.assert_array_equal(ct._torch_matmul(a[:8, :8], b[:8, :8], None), small)
    assert len(calls) == 1


def test_a_read_only_operand_is_read_without_warning():
    import warnings

    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 72))
    a.flags.writeable = False
    b = rng.standard_normal((72, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ct._torch_matmul(a, b, None)
    np.testing.assert_allclose(result, a @ b, rtol=1e-10, atol=1e-10)
    out = np.empty((64, 64))
    assert ct._torch_matmul(a, b[:, ::-1], out) is out  # a negative stride: copied, not refused
    np.testing.assert_allclose(out, a @ b[:, ::-1], rtol=1e-10, atol=1e-10)


def test_numba_threads_without_numba_is_a_no_op(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "numba", None)
    with ct._numba_threads(1):
        pass


def test_numba_pool_follows_torch_threads_inside_a_call():
    """In a child process (it starts Numba's workqueue pool): inside a call, Numba runs on PyTorch's thread count."""
    pytest.importorskip("numba")
    import os
    import subprocess
    import sys

    code = (
        "import numba, torch\n"
        "import convgrad.torch as ct\n"
        "numba.config.THREADING_LAYER = 'workqueue'\n"
        "numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)\n"
        "torch.set_num_threads(1)\n"
        "with ct._numba_threads(torch.get_num_threads()):\n"
        "    inside = numba.get_num_threads()\n"
        "print(inside, numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    inside, after, maximum = map(int, done.stdout.split())
    assert (inside, after, maximum) == (1, 2, 2)
