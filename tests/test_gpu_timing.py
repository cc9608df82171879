"""GPU timing without a GPU: every library is timed by the same method, and the L2 flush only reads.

Each library the timer can use (CuPy, PyTorch, Numba) is replaced by a stand-in that writes a
trace of what reached it: ``read`` (the flush), ``write`` (anything written to the flush
buffer after set-up), ``hold`` (the spin kernel, with its length), ``record`` (an event) and
``timed`` (the measured call).  The timed loop must be, for every library and every repeat,
read, hold, record, timed, record.
"""

from __future__ import annotations

import importlib.util
import types

import pytest

from convgrad.bench import timing

import cupy_stand_in

FLUSH_BYTES = 4096
REPEATS = 3


def _timed_loop(trace: list) -> list:
    """The last REPEATS x 5 entries: the timed loop, after the warm-up and the host-timed loop."""
    return trace[-5 * REPEATS:]


def _assert_same_method(trace: list) -> None:
    loop = _timed_loop(trace)
    for repeat in range(REPEATS):
        read, hold, start, timed, end = loop[5 * repeat:5 * repeat + 5]
        assert (read, start, timed, end) == ("read", "record", "timed", "record"), loop
        assert hold[0] == "hold" and hold[1] > 0, loop
    assert "write" not in trace, trace


def _cupy_trace(state: cupy_stand_in.StandIn, buffer_ptr: int) -> list:
    trace = []
    for event in state.events:
        if event.kind == "launch" and event.name == "convgrad_bench_read":
            assert buffer_ptr in event.detail["pointers"]
            trace.append("read")
        elif event.kind == "launch" and event.name == "convgrad_bench_spin":
            trace.append(("hold", int(event.detail["scalars"][0])))
        elif event.kind == "record":
            trace.append("record")
        elif event.kind == "kernel" and event.name == "timed":
            trace.append("timed")
        elif event.kind == "kernel":
            trace.append("write")
    return trace


def test_cupy_timer_flushes_by_reading_and_holds_the_gpu(monkeypatch):
    state = cupy_stand_in.install(monkeypatch)
    timer = timing.GpuTimer("cupy", flush_bytes=FLUSH_BYTES)
    buffer_ptr = timer._device.buffer.data.ptr
    state.events.clear()  # the buffer's initial zeros are written once, at set-up
    timer.measure(lambda: state.record("kernel", "timed"), warmup=1, repeats=REPEATS)
    _assert_same_method(_cupy_trace(state, buffer_ptr))


def test_torch_timer_flushes_by_reading_and_holds_the_gpu(monkeypatch):
    torch = pytest.importorskip("torch")
    trace: list = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *shape, device=None, **kw: real_zeros(*shape, **kw))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: trace.append(("hold", cycles)))

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            trace.append("record")

        def elapsed_time(self, end):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    timer = timing.GpuTimer("torch", flush_bytes=FLUSH_BYTES)
    buffer = timer._device.buffer
    version = buffer._version
    real_max = torch.Tensor.max

    def recording_max(self, *args, **kwargs):
        if self is buffer:
            trace.append("read")
        return real_max(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "max", recording_max)
    timer.measure(lambda: trace.append("timed"), warmup=1, repeats=REPEATS)
    if buffer._version != version:
        trace.append("write")
    _assert_same_method(trace)


def test_numba_timer_flushes_by_reading_and_holds_the_gpu(monkeypatch):
    pytest.importorskip("numba")
    from numba import cuda

    trace: list = []

    class Kernel:
        def __init__(self, function):
            self.name = function.__name__

        def __getitem__(self, config):
            def launch(*args):
                if self.name == "read":
                    assert args[0] is buffers[0] and args[2] == 0
                    trace.append("read")
                elif self.name == "hold":
                    trace.append(("hold", args[0]))
            return launch

    class Event:
        def record(self, stream=0):
            trace.append("record")

        def elapsed_time(self, end):
            return 1.0

    buffers = []

    def to_device(host, stream=0):
        buffers.append(types.SimpleNamespace(host=host, size=host.size))
        return buffers[-1]

    monkeypatch.setattr(cuda, "jit", lambda function: Kernel(function))
    monkeypatch.setattr(cuda, "to_device", to_device)
    monkeypatch.setattr(cuda, "event", lambda timing=True: Event())
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    timer = timing.GpuTimer("numba", flush_bytes=FLUSH_BYTES)
    assert buffers[0].host.nbytes == FLUSH_BYTES
    timer.measure(lambda: trace.append("timed"), warmup=1, repeats=REPEATS)
    _assert_same_method(trace)


def test_the_timing_kernels_compile_for_the_gpu():
    """The CUDA source (through NVRTC) and the Numba kernels (compile_ptx) build for sm_80."""
    from convgrad import compile_check

    if compile_check.nvrtc_available() is None:
        from cuda.bindings import nvrtc

        err, program = nvrtc.nvrtcCreateProgram(timing._CUDA_SOURCE.encode(), b"timing.cu", 0, [], [])
        options = [b"--gpu-architecture=sm_80"]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        nvrtc.nvrtcDestroyProgram(program)
        assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS
    if importlib.util.find_spec("numba") is None:
        return
    from numba import cuda, types as nbtypes

    read, hold, empty = (kernel.py_func for kernel in timing._numba_kernels())
    signatures = {read: (nbtypes.uint64[::1], nbtypes.uint64[::1], nbtypes.int32), hold: (nbtypes.int64,), empty: ()}
    for function, signature in signatures.items():
        ptx, _ = cuda.compile_ptx(function, signature, cc=(8, 0))
        assert ".entry" in ptx
