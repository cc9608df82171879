"""How the GPU paths use CuPy, Numba and PyTorch, checked on a machine without a GPU.

A stand-in CuPy (``cupy_stand_in.py``) logs every allocation, kernel, copy, synchronisation
and launch with its stream; stand-in Numba arrays expose only what a device array exposes.
The tests assert what the GPU would have been asked to do:

* argument checking does no device work (no ``cupy.shares_memory``, allocation or sync);
* every launch, copy and allocation goes to the caller's stream;
* bfloat16 reaches the kernels as its bits, with the dtype carried beside it, without a copy.
"""

from __future__ import annotations

import numpy as np
import pytest

import convgrad
from convgrad import arrays
from convgrad.backends.base import Backend

import cupy_stand_in


@pytest.fixture
def stand_in(monkeypatch):
    return cupy_stand_in.install(monkeypatch)


class RecordingBackend(Backend):
    """A backend that computes nothing and remembers what had happened on the device when it was called."""

    name = "recording"

    def __init__(self, kinds: tuple[str, ...], state: cupy_stand_in.StandIn | None = None) -> None:
        self.array_kinds = kinds
        self.state = state
        self.events_before_call: list | None = None

    def available(self) -> bool:
        return True

    def _called(self) -> None:
        self.events_before_call = list(self.state.events) if self.state is not None else []

    def forward(self, x, w, bias, problem, out):
        self._called()

    def grad_input(self, dy, w, problem, out):
        self._called()

    def grad_weight(self, x, dy, problem, out):
        self._called()


# ----------------------------------------------------------------------------------------
# Argument checking: metadata only


def test_checking_cupy_arguments_does_no_device_work(stand_in):
    """``out=`` is checked for overlap on every call (convgrad.torch always passes it): no device work."""
    rng = np.random.default_rng(0)
    x = cupy_stand_in.device_array(stand_in, rng.standard_normal((2, 8, 9, 9), np.float32))
    w = cupy_stand_in.device_array(stand_in, rng.standard_normal((4, 8, 3, 3), np.float32))
    bias = cupy_stand_in.device_array(stand_in, rng.standard_normal(4, np.float32))
    out = cupy_stand_in.device_array(stand_in, np.empty((2, 4, 9, 9), np.float32))
    dy = cupy_stand_in.device_array(stand_in, rng.standard_normal((2, 4, 9, 9), np.float32))
    dw = cupy_stand_in.device_array(stand_in, np.empty((4, 8, 3, 3), np.float32))
    backend = RecordingBackend(("cupy",), stand_in)
    convgrad.conv2d(x, w, bias, padding=1, out=out, backend=backend)
    assert backend.events_before_call == []
    convgrad.conv2d_input(x.shape, w, dy, padding=1, out=cupy_stand_in.device_array(stand_in, np.empty(x.shape, np.float32)),
                          backend=backend)
    assert backend.events_before_call == []
    convgrad.conv2d_weight(x, w.shape, dy, padding=1, out=dw, backend=backend)
    assert backend.events_before_call == []


def test_an_overlapping_cupy_out_is_still_rejected_without_device_work(stand_in):
    x = cupy_stand_in.device_array(stand_in, np.zeros((2, 8, 9, 9), np.float32))
    w = cupy_stand_in.device_array(stand_in, np.zeros((8, 8, 1, 1), np.float32))
    with pytest.raises(ValueError, match="out overlaps input"):
        convgrad.conv2d(x, w, out=x, backend=RecordingBackend(("cupy",), stand_in))
    assert stand_in.events == []


class StandInNumbaArray:
    """What the numba path reads of a Numba device array: metadata, and a copy_to_host it must not call."""

    __module__ = "numba.cuda.cudadrv.devicearray"

    def __init__(self, host: np.ndarray) -> None:
        self._host = host
        self.shape, self.strides, self.dtype, self.size = host.shape, host.strides, host.dtype, host.size
        self.stream = 0

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "strides": self.strides, "typestr": self.dtype.str,
                "data": (self._host.__array_interface__["data"][0], False), "version": 3}

    def copy_to_host(self, *args, **kwargs):
        raise AssertionError("argument checking copied a device array to the host")

    def copy_to_device(self, *args, **kwargs):
        raise AssertionError("argument checking copied to a device array")


def test_checking_numba_arguments_does_no_device_work(monkeypatch):
    # The 5-D views handed to the backend are metadata too; build them over the stand-in's host memory.
    monkeypatch.setattr(arrays, "_permuted", lambda array, kind, shape, strides: StandInNumbaArray(
        np.lib.stride_tricks.as_strided(array._host, shape=shape, strides=strides)))
    base = np.zeros((2, 16, 9, 9), np.float32)
    x = StandInNumbaArray(base[:, ::2])
    out = StandInNumbaArray(np.empty((2, 4, 9, 9), np.float32))
    w = StandInNumbaArray(np.zeros((4, 8, 3, 3), np.float32))
    backend = RecordingBackend(("numba",))
    convgrad.conv2d(x, w, padding=1, out=out, backend=backend)
    assert backend.events_before_call == []
    # Interleaved channel halves of one buffer: their address ranges overlap, their elements do not.
    assert not arrays.may_overlap("numba", StandInNumbaArray(base[:, 1::2]), x)
    assert arrays.may_overlap("numba", StandInNumbaArray(base[:, 3:5]), x)


VIEWS = {
    "even_odd_channels": (lambda a: a[:, ::2], lambda a: a[:, 1::2]),
    "channel_halves": (lambda a: a[:, :4], lambda a: a[:, 4:]),
    "halves_sharing_one_channel": (lambda a: a[:, :5], lambda a: a[:, 4:]),
    "same_array_other_layout": (lambda a: a, lambda a: a.transpose(0, 2, 3, 1)),
    "interleaved_columns": (lambda a: a[..., ::2], lambda a: a[..., 1::2]),
    "reversed_rows_touching": (lambda a: a[:, :, ::-1], lambda a: a[1:, :, :1]),
    "strided_grids": (lambda a: a[:, :, ::3, 1::5], lambda a: a[:, :, 1::3, ::5]),
    "same_element_from_two_views": (lambda a: a[:, :, ::3, ::2], lambda a: a[:, :, ::2, ::3]),
}


@pytest.mark.parametrize("views", VIEWS.values(), ids=VIEWS)
def test_device_overlap_answers_match_numpy_exactly(stand_in, views):
    """From metadata alone, the same answer NumPy's exact solver gives on the host arrays."""
    first, second = views
    host = np.zeros((2, 8, 7, 11), np.float32)
    device = cupy_stand_in.device_array(stand_in, host)
    expected = bool(np.shares_memory(first(host), second(host)))
    assert arrays.may_overlap("cupy", first(device), second(device)) == expected
    assert arrays.may_overlap("numpy", first(host), second(host)) == expected
    assert stand_in.events == []


def test_a_problem_too_hard_to_solve_counts_as_overlap(monkeypatch):
    host = np.zeros(10_000, np.float32)
    a, b = host[::7], host[3::11]  # they do share elements; the bound stops the solver first
    monkeypatch.setattr(arrays, "OVERLAP_MAX_WORK", 1)
    assert arrays.may_overlap("numpy", a, b)
    assert not arrays.may_overlap("numpy", host[:10], host[10:20])  # disjoint ranges need no solver


# ----------------------------------------------------------------------------------------
# Streams: every launch, copy and allocation on the caller's stream

CALLER_STREAM = 0xBEEF


def _device_work(state: cupy_stand_in.StandIn) -> list:
    return [e for e in state.events if e.kind != "compile"]


def test_cupy_backend_runs_everything_on_cupys_current_stream(stand_in):
    rng = np.random.default_rng(1)

    def device(shape):
        return cupy_stand_in.device_array(stand_in, rng.standard_normal(shape).astype(np.float32))

    x, w, b, dy = device((2, 4, 32, 32)), device((6, 4, 3, 3)), device((6,)), device((2, 6, 32, 32))
    x_last, w_last = device((2, 8, 8, 4)), device((6, 1, 1, 4))
    with stand_in.module.cuda.ExternalStream(CALLER_STREAM):
        convgrad.conv2d(x, w, b, padding=1, backend="cupy")
        convgrad.conv2d(x_last, w_last, b, channels_last=True, backend="cupy")  # 1x1: one matmul
        convgrad.conv2d_input(x.shape, w, dy, padding=1, backend="cupy")
        convgrad.conv2d_weight(x, w.shape, dy, padding=1, backend="cupy")  # split-K: workspace and reduction
        convgrad.conv_transpose2d(dy, w, device((4,)), padding=1, backend="cupy")  # dgrad, then the bias kernel
        convgrad.conv_bias_grad(dy, backend="cupy")
        convgrad.conv2d(device((2, 0, 5, 5)), device((6, 0, 3, 3)), b, backend="cupy")  # empty: zeros plus bias
        convgrad.conv2d(rng.standard_normal((1, 4, 5, 5)).astype(np.float32),  # staged NumPy arrays
                        rng.standard_normal((6, 4, 3, 3)).astype(np.float32), backend="cupy")
    work = _device_work(stand_in)
    assert {e.kind for e in work} >= {"alloc", "kernel", "launch", "copy"}
    launched = {e.name.split("<")[0] for e in work if e.kind == "launch"}
    assert {"convgrad::fprop_gemm", "convgrad::dgrad_gemm", "convgrad::wgrad_gemm", "convgrad::splitk_reduce",
            "convgrad::add_bias"} <= launched
    assert any(e.name == "matmul" for e in work)
    wrong = [(e.kind, e.name, hex(e.stream)) for e in work if e.stream != CALLER_STREAM]
    assert not wrong, f"device work outside the caller's stream: {wrong}"


@pytest.fixture
def torch_on_the_stand_in(stand_in, monkeypatch):
    """convgrad.torch with its CUDA path taken for CPU tensors: CuPy is the stand-in, PyTorch's stream is CALLER_STREAM."""
    torch = pytest.importorskip("torch")
    import types

    import convgrad.torch as ct

    real = ct._arrays_for
    monkeypatch.setattr(ct, "_arrays_for", lambda device: real(torch.device("cuda", 0)))
    monkeypatch.setattr(ct, "_cupy_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=CALLER_STREAM))
    return ct


def test_torch_path_runs_everything_on_pytorchs_stream_with_its_allocator(stand_in, torch_on_the_stand_in):
    import torch

    ct = torch_on_the_stand_in
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=gen, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    y = ct.conv2d(x, w, b, padding=1)
    y.backward(torch.ones_like(y))  # dgrad, wgrad (split-K) and the bias gradient
    work = _device_work(stand_in)
    launches = [e for e in work if e.kind == "launch"]
    assert {e.name.split("<")[0] for e in launches} >= {"convgrad::fprop_gemm", "convgrad::dgrad_gemm",
                                                        "convgrad::wgrad_gemm"}
    wrong = [(e.kind, e.name, hex(e.stream)) for e in work if e.stream != CALLER_STREAM]
    assert not wrong, f"device work outside PyTorch's current stream: {wrong}"
    allocations = [e for e in work if e.kind == "alloc"]
    assert allocations and all(e.allocator is ct._cupy_allocate for e in allocations)
    # Zero copies: the forward kernel read PyTorch's own memory.
    fprop = next(e for e in launches if e.name.startswith("convgrad::fprop_gemm"))
    assert x.data_ptr() in fprop.detail["pointers"] and w.data_ptr() in fprop.detail["pointers"]


class _Bindable:
    """What convgrad.torch's numba path makes of a tensor or a buffer: an array that can be bound to a stream."""

    def __init__(self, owner, interface=None, stream=0):
        self.owner, self.interface, self.stream = owner, interface, stream

    def bind(self, stream):
        return _Bindable(self.owner, self.interface, stream)


def test_torch_numba_path_binds_arrays_to_pytorchs_stream_and_allocates_from_pytorch(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("numba")
    import contextlib

    from numba import cuda

    import convgrad.torch as ct
    from convgrad.backends import numba_backend

    external = object()
    monkeypatch.setattr(ct, "_cupy_importable", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": CALLER_STREAM})())
    monkeypatch.setattr(cuda, "external_stream", lambda ptr: external if ptr == CALLER_STREAM else None)
    monkeypatch.setattr(cuda, "gpus", {0: contextlib.nullcontext()})
    monkeypatch.setattr(cuda, "as_cuda_array", lambda t, sync=True: _Bindable(t))
    monkeypatch.setattr(cuda, "from_cuda_array_interface", lambda desc, owner=None, sync=True: _Bindable(owner, desc))
    allocated = []
    real_empty = torch.empty

    def empty(*shape, device=None, **kwargs):
        allocated.append((shape, str(device)))
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    with ct._arrays_for(torch.device("cuda", 0)) as array:
        assert array.stream is external
        assert array(torch.zeros(3)).stream is external
        scratch = numba_backend.device_array((4, 5), np.float32, array.stream)
        assert scratch.stream is external
        assert allocated == [((80,), "cuda:0")] and scratch.interface["shape"] == (4, 5)
        assert scratch.interface["data"][0] == scratch.owner.data_ptr()
    assert numba_backend._ALLOCATOR.get() is None


# ----------------------------------------------------------------------------------------
# bfloat16 without a CuPy bfloat16 dtype: the bits, with the dtype beside them


def _bf16_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    import ml_dtypes

    return rng.integers(-3, 4, shape).astype(ml_dtypes.bfloat16).view(np.uint16)


def test_the_stand_in_has_no_bfloat16(stand_in):
    import ml_dtypes

    assert not hasattr(stand_in.module, "bfloat16")
    with pytest.raises(TypeError):
        stand_in.module.asarray(np.zeros(3, ml_dtypes.bfloat16))


def test_torch_bfloat16_reaches_the_kernels_as_bits_without_a_copy(stand_in, torch_on_the_stand_in):
    import torch

    ct = torch_on_the_stand_in
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 9, 9, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(8, 8, 3, 3, generator=gen).bfloat16().requires_grad_()
    b = torch.randn(8, generator=gen).bfloat16().requires_grad_()
    y = ct.conv2d(x, w, b, padding=1)
    forward = [e for e in stand_in.events if e.kind != "compile"]
    assert [e.kind for e in forward] == ["alloc", "launch"]  # the unused workspace pointer, then the kernel
    launch = forward[-1]
    assert launch.name.startswith("convgrad::tc_fprop<__nv_bfloat16")
    assert {x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr()} <= set(launch.detail["pointers"])
    assert set(launch.detail["dtypes"]) == {"int16"}  # every tensor as its bits
    g = torch.randn(y.shape, generator=gen).bfloat16()
    y.backward(g)
    kernels = {e.name.split(",")[0] for e in stand_in.events if e.kind == "launch"}
    # bfloat16 on an sm_90 device runs on the tensor cores (the SIMT kernels on older ones).
    assert {"convgrad::tc_dgrad<__nv_bfloat16", "convgrad::tc_wgrad<__nv_bfloat16"} <= kernels
    # The bias gradient runs on the host here (the stand-in computes): float32 sums, rounded once.
    import ml_dtypes

    summed = g.float().numpy().sum(axis=(0, 2, 3), dtype=np.float32)
    np.testing.assert_array_equal(b.grad.view(torch.int16).numpy().view(np.uint16),
                                  summed.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_cupy_users_pass_bfloat16_as_uint16_bits_with_dtype(stand_in):
    rng = np.random.default_rng(4)
    x = cupy_stand_in.device_array(stand_in, _bf16_bits(rng, (2, 8, 9, 9)))
    w = cupy_stand_in.device_array(stand_in, _bf16_bits(rng, (8, 8, 3, 3)))
    with pytest.raises(TypeError, match="input has dtype uint16; for bfloat16 given as its bits, pass dtype='bfloat16'"):
        convgrad.conv2d(x, w, padding=1, backend="cupy")  # integers are not data without dtype=
    y = convgrad.conv2d(x, w, padding=1, backend="cupy", dtype="bfloat16")
    assert y.dtype == np.uint16 and y.shape == (2, 8, 9, 9)
    launch = next(e for e in stand_in.events if e.kind == "launch")
    assert launch.name.startswith("convgrad::tc_fprop<__nv_bfloat16")
    assert {x.data.ptr, w.data.ptr, y.data.ptr} <= set(launch.detail["pointers"])
    dw = convgrad.conv2d_weight(x, w.shape, y, padding=1, backend="cupy", dtype="bfloat16")
    assert dw.dtype == np.uint16
    with pytest.raises(TypeError, match="weight has dtype float32"):
        convgrad.conv2d(x, cupy_stand_in.device_array(stand_in, np.zeros((8, 8, 3, 3), np.float32)),
                        backend="cupy", dtype="bfloat16")
    with pytest.raises(TypeError, match="input has dtype uint16; supported dtypes are"):
        convgrad.conv2d(x, w, backend="cupy", dtype="float16")
    with pytest.raises(TypeError, match="dtype='float16' but the arrays hold float32"):
        convgrad.conv2d(np.zeros((1, 2, 3, 3), np.float32), np.zeros((1, 2, 1, 1), np.float32), dtype="float16")


def test_bias_gradient_of_bfloat16_bits_on_cupy_rounds_a_float32_sum(stand_in):
    import ml_dtypes

    rng = np.random.default_rng(5)
    values = rng.standard_normal((3, 6, 5, 7)).astype(ml_dtypes.bfloat16)
    dy = cupy_stand_in.device_array(stand_in, values.view(np.uint16))
    db = convgrad.conv_bias_grad(dy, backend="cupy", dtype="bfloat16")
    expected = values.astype(np.float32).sum(axis=(0, 2, 3), dtype=np.float32).astype(ml_dtypes.bfloat16)
    assert db.dtype == np.uint16
    np.testing.assert_array_equal(db._host, expected.view(np.uint16))
    work = _device_work(stand_in)
    assert work and all(e.kind in ("alloc", "kernel") for e in work)  # no copy to the host, no sync


@pytest.mark.parametrize("carrier", [np.uint16, np.int16])
def test_numpy_bits_with_dtype_give_the_bits_of_the_bfloat16_result(carrier):
    import ml_dtypes

    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 7, 6)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((6, 4, 3, 3)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal(6).astype(ml_dtypes.bfloat16)
    bits = [a.view(carrier) for a in (x, w, b)]
    y = convgrad.conv2d(x, w, b, padding=1)
    y_bits = convgrad.conv2d(*bits, padding=1, dtype="bfloat16")
    assert y_bits.dtype == carrier
    np.testing.assert_array_equal(y_bits.view(ml_dtypes.bfloat16).view(np.uint16), y.view(np.uint16))
    out = np.empty(y.shape, carrier)
    assert convgrad.conv2d(*bits, padding=1, dtype="bfloat16", out=out) is out
    np.testing.assert_array_equal(out.view(np.uint16), y.view(np.uint16))
    dx = convgrad.conv2d_input(x.shape, bits[1], y_bits, padding=1, dtype="bfloat16")
    np.testing.assert_array_equal(dx.view(np.uint16), convgrad.conv2d_input(x.shape, w, y, padding=1).view(np.uint16))
    db = convgrad.conv_bias_grad(y_bits, dtype="bfloat16")
    np.testing.assert_array_equal(db.view(np.uint16), convgrad.conv_bias_grad(y).view(np.uint16))


def test_bfloat16_rounding_of_the_bit_helpers_matches_ml_dtypes():
    import ml_dtypes

    rng = np.random.default_rng(7)
    every_pattern = np.frombuffer(rng.integers(0, 2**32, 200_000, dtype=np.uint32).tobytes(), np.float32)
    special = np.array([np.inf, -np.inf, 3.3895314e38, 3.4e38, 1e-40, -0.0, 1.00390625, 1.01171875], np.float32)
    values = np.concatenate([every_pattern, special, rng.standard_normal(10_000).astype(np.float32)])
    got = arrays.float32_to_bfloat16_bits(np, values)
    with np.errstate(invalid="ignore"):
        want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()
    np.testing.assert_array_equal(arrays.bfloat16_to_float32(np, want[~nan]),
                                  want[~nan].view(ml_dtypes.bfloat16).astype(np.float32))
