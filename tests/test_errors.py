"""Bad input gets a ValueError or TypeError naming the argument, before any work (DESIGN §7)."""

from __future__ import annotations

import numpy as np
import pytest

import convgrad
from convgrad.backends.base import Backend

x = np.zeros((2, 4, 7, 7), np.float32)
w = np.zeros((6, 2, 3, 3), np.float32)


class _Refusing(Backend):
    """A backend that records calls; bad input must never reach it."""

    name = "refusing"
    calls = 0

    def available(self) -> bool:
        return True

    def forward(self, *args):
        _Refusing.calls += 1

    grad_input = grad_weight = forward


BAD_CALLS = [
    ("wrong input rank", None, ValueError, "input must be 3-D .unbatched. or 4-D .batched., got 5-D",
     lambda b: convgrad.conv2d(np.zeros((1, 2, 4, 7, 7), np.float32), w, backend=b)),
    ("wrong weight rank", None, ValueError, "weight must be 4-D, got 3-D",
     lambda b: convgrad.conv2d(x, np.zeros((6, 2, 3), np.float32), backend=b)),
    ("channel mismatch", None, ValueError, r"input has 4 channels but weight expects 6 \(weight.shape\[1\]=3 × groups=2\)",
     lambda b: convgrad.conv2d(x, np.zeros((6, 3, 3, 3), np.float32), groups=2, backend=b)),
    ("groups do not divide channels", None, ValueError, "groups=3 does not divide the 4 input channels",
     lambda b: convgrad.conv2d(x, np.zeros((6, 1, 3, 3), np.float32), groups=3, backend=b)),
    ("groups do not divide output channels", None, ValueError, "groups=2 does not divide the 5 output channels",
     lambda b: convgrad.conv2d(x, np.zeros((5, 2, 3, 3), np.float32), groups=2, backend=b)),
    ("groups zero", None, ValueError, "groups must be at least 1, got 0",
     lambda b: convgrad.conv2d(x, w, groups=0, backend=b)),
    ("stride zero", None, ValueError, r"stride must be at least 1, got \(1, 0\)",
     lambda b: convgrad.conv2d(x, w, stride=(1, 0), groups=2, backend=b)),
    ("dilation zero", None, ValueError, "dilation must be at least 1, got 0",
     lambda b: convgrad.conv2d(x, w, dilation=0, groups=2, backend=b)),
    ("negative padding", None, ValueError, "padding must be non-negative, got -1",
     lambda b: convgrad.conv2d(x, w, padding=-1, groups=2, backend=b)),
    ("negative padding pair", None, ValueError, "padding must be non-negative",
     lambda b: convgrad.conv2d(x, w, padding=((0, -1), (1, 1)), groups=2, backend=b)),
    ("same with stride", None, ValueError, "padding='same' is not supported for strided convolutions",
     lambda b: convgrad.conv2d(x, w, padding="same", stride=2, groups=2, backend=b)),
    ("unknown padding mode", None, ValueError, "padding must be 'same', 'valid'",
     lambda b: convgrad.conv2d(x, w, padding="full", groups=2, backend=b)),
    ("stride wrong length", TypeError, None, "stride must be an int or a tuple of 2 ints",
     lambda b: convgrad.conv2d(x, w, stride=(1, 1, 1), groups=2, backend=b)),
    ("kernel larger than padded input", None, ValueError, "kernel extent 9 .* larger than the padded input extent 7",
     lambda b: convgrad.conv2d(x, np.zeros((6, 2, 9, 3), np.float32), groups=2, backend=b)),
    ("dilated kernel larger than input", None, ValueError, r"kernel extent 9 \(kernel_size=3, dilation=4\)",
     lambda b: convgrad.conv2d(x, w, dilation=4, groups=2, backend=b)),
    ("mismatched dtypes", TypeError, None, "weight has dtype float64 but input has dtype float32",
     lambda b: convgrad.conv2d(x, w.astype(np.float64), groups=2, backend=b)),
    ("integer dtype", TypeError, None, "input has dtype int32; supported dtypes are",
     lambda b: convgrad.conv2d(x.astype(np.int32), w.astype(np.int32), groups=2, backend=b)),
    ("bias dtype", TypeError, None, "bias has dtype float64",
     lambda b: convgrad.conv2d(x, w, np.zeros(6), groups=2, backend=b)),
    ("bias shape", None, ValueError, r"bias must have shape \(6,\), got \(5,\)",
     lambda b: convgrad.conv2d(x, w, np.zeros(5, np.float32), groups=2, backend=b)),
    ("a list is no array", TypeError, None, "input must be a NumPy, CuPy or Numba device array, got list",
     lambda b: convgrad.conv2d(x.tolist(), w, groups=2, backend=b)),
    ("out shape", None, ValueError, r"out has shape \(2, 6, 7, 7\) but the result has shape \(2, 6, 5, 5\)",
     lambda b: convgrad.conv2d(x, w, groups=2, out=np.zeros((2, 6, 7, 7), np.float32), backend=b)),
    ("out dtype", TypeError, None, "out has dtype float64 but the result has dtype float32",
     lambda b: convgrad.conv2d(x, w, groups=2, out=np.zeros((2, 6, 5, 5)), backend=b)),
    ("out aliases input", None, ValueError, "out overlaps input",
     lambda b: convgrad.conv2d(x, np.zeros((4, 4, 1, 1), np.float32), out=x, backend=b)),
    ("out aliases grad_output", None, ValueError, "out overlaps grad_output",
     lambda b: _alias_grad_output(b)),
    ("out is a broadcast view", None, ValueError, "out has overlapping elements",
     lambda b: convgrad.conv2d(x, w, groups=2, out=np.broadcast_to(np.zeros((1, 6, 5, 5), np.float32), (2, 6, 5, 5)),
                               backend=b)),
    ("input_size cannot produce grad_output", None, ValueError,
     r"grad_output has shape \(2, 6, 4, 4\) but input_size of shape \(2, 4, 7, 7\) .* give an output of shape \(2, 6, 5, 5\)",
     lambda b: convgrad.conv2d_input((2, 4, 7, 7), w, np.zeros((2, 6, 4, 4), np.float32), groups=2, backend=b)),
    ("input_size not ints", TypeError, None, "input_size must be a tuple of ints",
     lambda b: convgrad.conv2d_input((2, 4, 7.0, 7), w, np.zeros((2, 6, 5, 5), np.float32), groups=2, backend=b)),
    ("weight_size wrong", None, ValueError, "grad_output has shape",
     lambda b: convgrad.conv2d_weight(x, (6, 2, 4, 4), np.zeros((2, 6, 5, 5), np.float32), groups=2, backend=b)),
    ("output_padding too large", None, ValueError, "output_padding must be smaller than either stride or dilation",
     lambda b: convgrad.conv_transpose2d(np.zeros((1, 6, 4, 4), np.float32), w, stride=2, output_padding=2,
                                         backend=b)),
    ("transposed padding mode", None, ValueError, "padding='same' is not supported",
     lambda b: convgrad.conv_transpose2d(np.zeros((1, 6, 4, 4), np.float32), w, padding="same", backend=b)),
    ("transposed channel mismatch", None, ValueError, r"input has 5 channels but weight expects 6",
     lambda b: convgrad.conv_transpose2d(np.zeros((1, 5, 4, 4), np.float32), w, backend=b)),
    ("bias grad rank", None, ValueError, "grad_output must be batched",
     lambda b: convgrad.conv_bias_grad(np.zeros(4, np.float32), backend=b)),
    ("input is None", TypeError, None, "conv2d: input must be a NumPy, CuPy or Numba device array, got None",
     lambda b: convgrad.conv2d(None, w, groups=2, backend=b)),
    ("read-only out", None, ValueError, "conv2d: out is read-only; give a writable array",
     lambda b: convgrad.conv2d(x, w, groups=2, out=_read_only((2, 6, 5, 5)), backend=b)),
    ("read-only out of dgrad", None, ValueError, "conv2d_input: out is read-only",
     lambda b: convgrad.conv2d_input(x.shape, w, np.zeros((2, 6, 5, 5), np.float32), groups=2,
                                     out=_read_only(x.shape), backend=b)),
    ("NCHW arrays with channels_last=True", None, ValueError,
     r"input has 8 channels but weight expects 3 \(weight.shape\[1\]=3 × groups=1\); "
     r"read as channels-first arrays \(channels_last=False\) the shapes match",
     lambda b: convgrad.conv2d(np.zeros((2, 3, 8, 8), np.float32), np.zeros((16, 3, 3, 3), np.float32),
                               channels_last=True, backend=b)),
    ("NHWC arrays without channels_last", None, ValueError,
     r"input has 8 channels but weight expects 3 .*; read as channels-last arrays \(channels_last=True\) the shapes match",
     lambda b: convgrad.conv2d(np.zeros((2, 8, 8, 3), np.float32), np.zeros((16, 3, 3, 3), np.float32),
                               backend=b)),
    ("grouped NCHW arrays with channels_last=True", None, ValueError,
     r"groups=2 does not divide the 7 input channels; read as channels-first arrays \(channels_last=False\)",
     lambda b: convgrad.conv2d(x, w, groups=2, channels_last=True, backend=b)),
    ("NCHW input_size with channels_last=True", None, ValueError, "read as channels-first arrays",
     lambda b: convgrad.conv2d_input((2, 3, 8, 8), np.zeros((16, 3, 3, 3), np.float32),
                                     np.zeros((2, 6, 6, 16), np.float32), channels_last=True, backend=b)),
    ("transposed NCHW arrays with channels_last=True", None, ValueError,
     r"input has 4 channels but weight expects 6 .*; read as channels-first arrays \(channels_last=False\)",
     lambda b: convgrad.conv_transpose2d(np.zeros((1, 6, 4, 4), np.float32), w, channels_last=True, backend=b)),
]


def _read_only(shape):
    array = np.zeros(shape, np.float32)
    array.flags.writeable = False
    return array


def _array_arguments():
    """(label, call, argument) for every array argument of every public function, given a bad value.

    Required arrays get None; the optional ones (bias, out) get a list, since None is their default.
    """
    for ndim in (1, 2, 3):
        xs = np.zeros((2, 4, *(7,) * ndim), np.float32)
        ws = np.zeros((6, 2, *(3,) * ndim), np.float32)
        dys = np.zeros((2, 6, *(5,) * ndim), np.float32)
        conv = getattr(convgrad, f"conv{ndim}d")
        conv_input = getattr(convgrad, f"conv{ndim}d_input")
        conv_weight = getattr(convgrad, f"conv{ndim}d_weight")
        transpose = getattr(convgrad, f"conv_transpose{ndim}d")
        calls = {
            conv: lambda a, fn=conv: fn(a["input"], a["weight"], a["bias"], groups=2, out=a["out"], backend=a["b"]),
            conv_input: lambda a, fn=conv_input, size=xs.shape: fn(size, a["weight"], a["grad_output"], groups=2,
                                                                   out=a["out"], backend=a["b"]),
            conv_weight: lambda a, fn=conv_weight, size=ws.shape: fn(a["input"], size, a["grad_output"], groups=2,
                                                                     out=a["out"], backend=a["b"]),
            transpose: lambda a, fn=transpose: fn(a["input"], a["weight"], a["bias"], groups=2, out=a["out"],
                                                  backend=a["b"]),
        }
        arguments = {
            conv: {"input": xs, "weight": ws, "bias": None, "out": None},
            conv_input: {"weight": ws, "grad_output": dys, "out": None},
            conv_weight: {"input": xs, "grad_output": dys, "out": None},
            transpose: {"input": dys, "weight": np.zeros((6, 2, *(3,) * ndim), np.float32), "bias": None, "out": None},
        }
        for fn, good in arguments.items():
            for arg in good:
                bad_value = [0.0] if arg in ("bias", "out") else None
                yield pytest.param(calls[fn], {**good, arg: bad_value}, fn.__name__, arg,
                                   id=f"{fn.__name__}-{arg}")
    yield pytest.param(lambda a: convgrad.conv_bias_grad(a["grad_output"], backend=a["b"]), {"grad_output": None},
                       "conv_bias_grad", "grad_output", id="conv_bias_grad-grad_output")


@pytest.mark.parametrize("call, arguments, op, arg", list(_array_arguments()))
def test_every_array_argument_is_checked_and_named(call, arguments, op, arg) -> None:
    _Refusing.calls = 0
    got = "None" if arguments[arg] is None else "list"
    with pytest.raises(TypeError, match=rf"^{op}: {arg} must be a NumPy, CuPy or Numba device array, got {got}$"):
        call({**arguments, "b": _Refusing()})
    assert _Refusing.calls == 0


def test_a_real_channel_mismatch_gets_no_layout_hint() -> None:
    with pytest.raises(ValueError, match="input has 4 channels but weight expects 6") as error:
        convgrad.conv2d(x, np.zeros((6, 3, 3, 3), np.float32), groups=2, backend=_Refusing())
    assert "read as" not in str(error.value)


def _alias_grad_output(backend):
    g = np.zeros((2, 4, 7, 7), np.float32)  # a grad_output that is also (wrongly) the out of dgrad
    return convgrad.conv2d_input((2, 4, 7, 7), np.zeros((4, 4, 1, 1), np.float32), g, out=g, backend=backend)


@pytest.mark.parametrize("label, type_error, value_error, message, call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_before_any_kernel(label, type_error, value_error, message, call) -> None:
    expected = type_error or value_error
    backend = _Refusing()
    _Refusing.calls = 0
    with pytest.raises(expected, match=message):
        call(backend)
    assert _Refusing.calls == 0, "the backend ran although the input was bad"


def test_torch_tensor_points_to_convgrad_torch() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="use convgrad.torch"):
        convgrad.conv2d(torch.zeros(2, 4, 7, 7), w, groups=2)


@pytest.mark.parametrize("arg", ["input", "weight"])
def test_torch_function_given_an_array_is_a_short_type_error(arg, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    import convgrad.torch as ct

    def no_work(*args, **kwargs):
        raise AssertionError("convgrad ran although the input was bad")

    monkeypatch.setattr(convgrad.functional, "_run", no_work)
    big = np.arange(4 * 4 * 3 * 3, dtype=np.float32).reshape(4, 4, 3, 3)
    tensors = {"input": torch.zeros(2, 4, 7, 7), "weight": torch.from_numpy(big)}
    tensors[arg] = np.zeros((2, 4, 7, 7), np.float32) if arg == "input" else big
    with pytest.raises(TypeError, match=rf"^conv2d: {arg} must be a torch.Tensor, got numpy.ndarray \(for NumPy, "
                                        r"CuPy or Numba arrays use convgrad.conv2d\)$"):
        ct.conv2d(tensors["input"], tensors["weight"])
    with pytest.raises(TypeError, match="^conv2d_weight: grad_output must be a torch.Tensor, got None"):
        ct.conv2d_weight(torch.zeros(2, 4, 7, 7), (4, 4, 3, 3), None)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown backend 'nope'; registered backends: numpy"):
        convgrad.conv2d(x, w, groups=2, backend="nope")


def test_backend_that_cannot_run_the_problem_says_why() -> None:
    class NoBfloat(_Refusing):
        def unsupported(self, problem):
            return "bfloat16 is not supported" if problem.dtype == "bfloat16" else None

    import ml_dtypes

    with pytest.raises(ValueError, match="backend 'refusing' cannot run this problem: bfloat16 is not supported"):
        convgrad.conv2d(x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16), groups=2, backend=NoBfloat())


def test_device_backend_rejects_host_arrays_unless_named() -> None:
    class DeviceOnly(_Refusing):
        array_kinds = ("cupy",)

    with pytest.raises(TypeError, match="backend 'refusing' computes on cupy arrays"):
        convgrad.conv2d(x, w, groups=2, backend=DeviceOnly())


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        with convgrad.config(speed=True):
            pass
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        with convgrad.config(deterministic=1):
            pass


@pytest.mark.parametrize("pass_", ["fprop", "dgrad", "wgrad"])
def test_float16_overflow_gives_inf_without_a_warning(pass_: str, recwarn) -> None:
    """A float16 result beyond 65504 is Inf, as the reference gives, and no NumPy warning leaks."""
    x = np.full((1, 1, 4, 4), 200.0, np.float16)
    w = np.full((1, 1, 3, 3), 200.0, np.float16)
    dy = np.full((1, 1, 2, 2), 200.0, np.float16)
    if pass_ == "fprop":
        result = convgrad.conv2d(x, w)  # 9 · 200 · 200 = 360000
    elif pass_ == "dgrad":
        result = convgrad.conv2d_input(x.shape, w, np.full((1, 1, 2, 2), 2000.0, np.float16))
    else:
        result = convgrad.conv2d_weight(np.full_like(x, 2000.0), w.shape, dy)
    assert result.dtype == np.float16
    assert np.isposinf(result).any()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]
