"""convgrad.torch: the custom ops, the modules, patch()/unpatch(), and training with them.

PyTorch itself is the oracle: every result is compared with torch.nn.functional,
torch.nn.grad or a native nn.Conv model, and every op passes gradcheck, gradgradcheck
and torch.library.opcheck.  CUDA variants run only where a GPU is present.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import convgrad  # noqa: E402
import convgrad.torch as ct  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OPS = torch.ops.convgrad


def test_import_convgrad_does_not_import_torch():
    code = "import sys, convgrad; sys.exit(1 if 'torch' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


# ----------------------------------------------------------------------------------------
# Cases: one geometry exercises groups, dilation, stride and asymmetric padding at once.


@dataclass(frozen=True)
class Case:
    name: str
    ndim: int
    N: int
    C: int
    K: int
    groups: int
    spatial: tuple
    kernel: tuple
    stride: tuple
    pad_before: tuple
    pad_after: tuple
    dilation: tuple
    channels_last: bool = False

    def tensors(self, dtype=torch.float64, device="cpu", seed=0):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.N, self.C, *self.spatial, generator=gen, dtype=dtype)
        w = torch.randn(self.K, self.C // self.groups, *self.kernel, generator=gen, dtype=dtype)
        b = torch.randn(self.K, generator=gen, dtype=dtype)
        if self.channels_last:
            fmt = torch.channels_last if self.ndim == 2 else torch.channels_last_3d
            x, w = x.to(memory_format=fmt), w.to(memory_format=fmt)
        return x.to(device), w.to(device), b.to(device)

    def geometry(self):
        return [list(self.stride), list(self.pad_before), list(self.pad_after), list(self.dilation), self.groups, None]

    def padding_pairs(self):
        return tuple(zip(self.pad_before, self.pad_after))

    def output_spatial(self):
        return tuple((n + b + a - d * (k - 1) - 1) // s + 1 for n, k, s, b, a, d in
                     zip(self.spatial, self.kernel, self.stride, self.pad_before, self.pad_after, self.dilation))


CASES = [
    Case("conv2d_nchw", 2, 2, 4, 6, 2, (7, 6), (3, 2), (2, 1), (1, 0), (0, 1), (1, 2)),
    Case("conv2d_nhwc", 2, 2, 4, 6, 2, (7, 6), (3, 2), (2, 1), (1, 0), (0, 1), (1, 2), channels_last=True),
    Case("conv2d_depthwise", 2, 2, 3, 6, 3, (5, 5), (3, 3), (1, 2), (1, 1), (1, 1), (1, 1)),
    Case("conv1d", 1, 2, 3, 4, 1, (9,), (3,), (2,), (0,), (2,), (2,)),
    Case("conv3d_ndhwc", 3, 1, 2, 4, 2, (4, 5, 4), (2, 3, 2), (1, 2, 1), (1, 0, 1), (0, 1, 1), (1, 1, 2),
         channels_last=True),
]
CASE_IDS = [c.name for c in CASES]
# opcheck is slow (it traces through AOTAutograd with dynamic shapes): the two 2-D layouts only.
OPCHECK_CASES = [c for c in CASES if c.name in ("conv2d_nchw", "conv2d_nhwc")]


def _op_args(case: Case, op: str, requires_grad: bool = True, **kw):
    """(op, args) for one of the five ops on this case, with tensors that require grad."""
    x, w, b = case.tensors(**kw)
    y_shape = (case.N, case.K, *case.output_spatial())
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(y_shape, generator=gen, dtype=x.dtype).to(x.device)
    if case.channels_last:
        g = g.to(memory_format=torch.channels_last if case.ndim == 2 else torch.channels_last_3d)
    for t in (x, w, b, g):
        t.requires_grad_(requires_grad)
    geometry = case.geometry()
    if op == "conv":
        return OPS.conv.default, (x, w, b, *geometry)
    if op == "conv_input":
        return OPS.conv_input.default, (list(x.shape), w, g, *geometry)
    if op == "conv_weight":
        return OPS.conv_weight.default, (x, list(w.shape), g, *geometry)
    if op == "conv_bias_grad":
        return OPS.conv_bias_grad.default, (g, None)
    if op == "conv_transpose":
        # The transposed layer of the same weight: input has K channels; symmetric padding.
        wt = w.detach().clone().requires_grad_(requires_grad)
        bt = torch.randn(case.C, generator=gen, dtype=x.dtype).to(x.device).requires_grad_(requires_grad)
        padding = [min(b, a) for b, a in zip(case.pad_before, case.pad_after)]
        output_padding = [max(s, d) - 1 for s, d in zip(case.stride, case.dilation)]
        return OPS.conv_transpose.default, (g, wt, bt, list(case.stride), padding, output_padding,
                                            list(case.dilation), case.groups, None)
    raise ValueError(op)


ALL_OPS = ["conv", "conv_input", "conv_weight", "conv_bias_grad", "conv_transpose"]


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck(case, op):
    fn, args = _op_args(case, op)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def call(*ts):
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t
        return fn(*full)

    assert torch.autograd.gradcheck(call, [args[i] for i in tensors])


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c.name for c in OPCHECK_CASES])
def test_opcheck(case, op):
    fn, args = _op_args(case, op)
    torch.library.opcheck(fn, args)


@pytest.mark.parametrize("op", ["conv", "conv_input", "conv_weight", "conv_transpose"])
def test_gradgradcheck(op):
    case = CASES[0]
    fn, args = _op_args(case, op)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def call(*ts):
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t
        return fn(*full)

    assert torch.autograd.gradgradcheck(call, [args[i] for i in tensors])


def test_gradgradcheck_transposed_with_cropped_outputs():
    # output_padding > padding: the last outputs see only the bias (the backward crops them).
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def layer(x, w, b):
        return ct.conv_transpose2d(x, w, b, stride=1, padding=0, output_padding=1, dilation=2)

    torch.testing.assert_close(layer(x, w, b), F.conv_transpose2d(x, w, b, 1, 0, 1, 1, 2))
    assert torch.autograd.gradcheck(layer, (x, w, b))
    assert torch.autograd.gradgradcheck(layer, (x, w, b))


# ----------------------------------------------------------------------------------------
# The tensor functions against torch.nn.functional and torch.nn.grad


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_functions_match_pytorch(case):
    n = case.ndim
    x, w, b = case.tensors()
    pads = [p for pair in reversed(case.padding_pairs()) for p in pair]  # F.pad order: last axis first
    expected = getattr(F, f"conv{n}d")(F.pad(x, pads), w, b, case.stride, 0, case.dilation, case.groups)
    y = getattr(ct, f"conv{n}d")(x, w, b, case.stride, case.padding_pairs(), case.dilation, case.groups)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last if n == 2 else torch.channels_last_3d) \
        if case.channels_last else y.is_contiguous()

    # The gradient functions, against autograd through the native convolution.
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    padded = getattr(F, f"conv{n}d")(F.pad(xr, pads), wr, None, case.stride, 0, case.dilation, case.groups)
    g = torch.randn_like(padded)
    gx, gw = torch.autograd.grad(padded, (xr, wr), g)
    dx = getattr(ct, f"conv{n}d_input")(x.shape, w, g, case.stride, case.padding_pairs(), case.dilation, case.groups)
    dw = getattr(ct, f"conv{n}d_weight")(x, w.shape, g, case.stride, case.padding_pairs(), case.dilation,
                                          case.groups)
    torch.testing.assert_close(dx, gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, gw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ct.conv_bias_grad(g), g.sum(dim=[0, *range(2, g.dim())]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_symmetric_functions_match_torch_nn_grad(n):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *[6] * n, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 2, *[3] * n, generator=gen, dtype=torch.float64)
    y = getattr(F, f"conv{n}d")(x, w, None, 2, 1, 1, 2)
    g = torch.randn_like(y)
    torch.testing.assert_close(getattr(ct, f"conv{n}d")(x, w, None, 2, 1, 1, 2), y)
    torch.testing.assert_close(getattr(ct, f"conv{n}d_input")(x.shape, w, g, 2, 1, 1, 2),
                               getattr(torch.nn.grad, f"conv{n}d_input")(x.shape, w, g, 2, 1, 1, 2))
    torch.testing.assert_close(getattr(ct, f"conv{n}d_weight")(x, w.shape, g, 2, 1, 1, 2),
                               getattr(torch.nn.grad, f"conv{n}d_weight")(x, w.shape, g, 2, 1, 1, 2))
    wt = torch.randn(4, 3, *[3] * n, generator=gen, dtype=torch.float64)
    bt = torch.randn(6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(getattr(ct, f"conv_transpose{n}d")(x, wt, bt, 2, 1, 1, 2, 1),
                               getattr(F, f"conv_transpose{n}d")(x, wt, bt, 2, 1, 1, 2, 1))


def test_unbatched_and_string_padding():
    x = torch.randn(3, 8, 7, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64)
    for padding in ("same", "valid"):
        torch.testing.assert_close(ct.conv2d(x, w, padding=padding, dilation=2),
                                   F.conv2d(x, w, padding=padding, dilation=2))
    with pytest.raises(ValueError, match="stride"):
        ct.conv2d(x, w, padding="same", stride=2)
    with pytest.raises(ValueError, match="input"):
        ct.conv2d(x[0], w)


# ----------------------------------------------------------------------------------------
# Data movement and flags


def test_cpu_tensors_reach_numpy_without_copies(monkeypatch):
    seen = {}
    real = convgrad.functional.conv2d

    def spy(input, weight, bias, *args, **kwargs):
        seen.update(input=input, weight=weight, out=kwargs["out"], kwargs=kwargs)
        return real(input, weight, bias, *args, **kwargs)

    monkeypatch.setattr(convgrad.functional, "conv2d", spy)
    x = torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3)
    y = ct.conv2d(x, w, padding=1)
    assert seen["kwargs"]["channels_last"] is True
    assert isinstance(seen["input"], np.ndarray) and seen["input"].shape == (2, 6, 5, 3)
    assert seen["input"].ctypes.data == x.data_ptr()  # the tensor's own memory, not a copy
    assert seen["weight"].ctypes.data == w.data_ptr()
    assert seen["out"].ctypes.data == y.data_ptr()  # written straight into PyTorch's tensor
    assert y.is_contiguous(memory_format=torch.channels_last)

    sliced = torch.randn(2, 6, 6, 5)[:, ::2]  # non-contiguous NCHW view
    ct.conv2d(sliced, w, padding=1)
    assert seen["kwargs"]["channels_last"] is False
    assert seen["input"].ctypes.data == sliced.data_ptr()


def test_bfloat16_view_is_zero_copy():
    import ml_dtypes

    t = torch.randn(3, 4, dtype=torch.bfloat16)[:, 1:]
    array = ct._cpu_array(t)
    assert array.dtype == ml_dtypes.bfloat16 and array.ctypes.data == t.data_ptr()
    np.testing.assert_array_equal(array.astype(np.float32), t.float().numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu(dtype):
    case = CASES[0]
    x, w, b = (t.to(dtype).requires_grad_() for t in case.tensors(torch.float32))
    y = ct.conv2d(x, w, b, case.stride, case.padding_pairs(), case.dilation, case.groups)
    assert y.dtype == dtype
    # Computed in float32 and rounded once: within one rounding of the float32 result.
    pads = [p for pair in reversed(case.padding_pairs()) for p in pair]
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
    expected = F.conv2d(F.pad(xf, pads), wf, bf, case.stride, 0, case.dilation, case.groups)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), expected, rtol=eps, atol=eps)
    g = torch.randn_like(expected)
    y.backward(g.to(dtype))
    expected.backward(g.to(dtype).float())
    for ours, theirs in ((x.grad, xf.grad), (w.grad, wf.grad), (b.grad, bf.grad)):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), theirs, rtol=2 * eps, atol=2 * eps)


def test_autocast_behaves_as_nn_conv2d():
    native = nn.Conv2d(3, 8, 3, padding=1)
    patched = ct.patch(copy.deepcopy(native))
    x = torch.randn(2, 3, 8, 8)
    outputs = []
    for model in (native, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        outputs.append(y)
    assert outputs[0].dtype == outputs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[1].float(), outputs[0].float(), rtol=1e-2, atol=1e-2)
    assert patched.weight.grad.dtype == torch.float32
    torch.testing.assert_close(patched.weight.grad, native.weight.grad, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left alone, as by autocast
        assert ct.conv2d(x.double(), native.weight.double()).dtype == torch.float64


def test_deterministic_flag_reaches_convgrad(monkeypatch):
    seen = []
    real = convgrad.functional.conv2d
    monkeypatch.setattr(convgrad.functional, "conv2d",
                        lambda *a, **k: seen.append(k["deterministic"]) or real(*a, **k))
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    ct.conv2d(x, w)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ct.conv2d(x, w)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [None, True]


# ----------------------------------------------------------------------------------------
# Modules and patching


MODULES = [
    (nn.Conv1d, ct.Conv1d, (2, 3, 11)),
    (nn.Conv2d, ct.Conv2d, (2, 3, 9, 8)),
    (nn.Conv3d, ct.Conv3d, (1, 3, 5, 6, 5)),
]


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("native_cls, ours_cls, shape", MODULES, ids=["1d", "2d", "3d"])
def test_padding_modes(native_cls, ours_cls, shape, mode):
    torch.manual_seed(0)
    native = native_cls(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode=mode, dtype=torch.float64)
    torch.manual_seed(0)
    ours = ours_cls(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode=mode, dtype=torch.float64,
                    backend="numpy")
    torch.testing.assert_close(ours.weight, native.weight)  # same initialisation
    x = torch.randn(shape, dtype=torch.float64)
    xs = (x.clone().requires_grad_(), x.clone().requires_grad_())
    for model, xi in zip((native, ours), xs):
        model(xi).square().sum().backward()
        model(xi[0]).sum().backward()  # unbatched
    torch.testing.assert_close(ours(x), native(x))
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    torch.testing.assert_close(ours.weight.grad, native.weight.grad)
    torch.testing.assert_close(ours.bias.grad, native.bias.grad)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_transposed_modules(n):
    native = getattr(nn, f"ConvTranspose{n}d")(4, 6, 3, stride=2, padding=1, groups=2, dtype=torch.float64)
    ours = ct.patch(copy.deepcopy(native))
    assert type(ours) is getattr(ct, f"ConvTranspose{n}d")
    x = torch.randn(2, 4, *[4] * n, dtype=torch.float64)
    size = [8] * n  # output_size picks output_padding = 1
    torch.testing.assert_close(ours(x, output_size=size), native(x, output_size=size))
    torch.testing.assert_close(ours(x[0]), native(x[0]))
    with pytest.raises(ValueError):
        getattr(ct, f"ConvTranspose{n}d")(4, 6, 3, padding_mode="reflect")


def test_patch_unpatch_round_trip():
    class Custom(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.ConvTranspose2d(4, 2, 2), nn.Conv1d(2, 2, 1)), Custom(2, 2, 1))
    parameters = list(model.parameters())
    state = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert ct.patch(model, backend="numpy") is model
    types = [type(m) for m in model.modules()][1:]
    assert types[:4] == [ct.Conv2d, nn.Sequential, ct.ConvTranspose2d, ct.Conv1d]
    assert issubclass(types[4], Custom) and issubclass(types[4], ct.Conv2d)  # a subclass keeps its class too
    assert all(m.backend == "numpy" for m in model.modules() if isinstance(m, (ct.Conv2d, ct.ConvTranspose2d)))
    assert "backend='numpy'" in repr(model)
    assert list(model.parameters()) == parameters and list(model.state_dict()) == list(state)
    model[0](torch.randn(1, 1, 5, 5)).sum().backward()
    optimizer.step()  # the optimizer built before patching holds the same parameters
    ct.patch(model)  # again: only the backend changes
    assert model[0].backend is None and type(model[0]) is ct.Conv2d
    assert ct.unpatch(model) is model
    assert [type(m) for m in model.modules()][1:] == [nn.Conv2d, nn.Sequential, nn.ConvTranspose2d, nn.Conv1d, Custom]
    assert not hasattr(model[0], "backend") and list(model.parameters()) == parameters
    conv = ct.patch(nn.Conv3d(1, 1, 1))  # a convolution as the model itself
    assert type(ct.unpatch(conv)) is nn.Conv3d


@pytest.fixture
def convgrad_calls(monkeypatch):
    """Names of the convgrad functional entry points called, in order."""
    calls = []
    for name in ("conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"):
        real = getattr(convgrad.functional, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(convgrad.functional, name, spy)
    return calls


def test_lazy_layers_are_patched_when_they_materialise(convgrad_calls):
    model = nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU(), nn.LazyConvTranspose2d(2, 2, stride=2))
    ct.patch(model, backend="numpy")
    report = ct.patch_report(model)
    assert report.lazy == ["0", "2"] and report.patched == [] and report.skipped == []
    x = torch.randn(2, 3, 5, 5)
    y = model(x)  # the first forward materialises the layers, and already runs on convgrad
    assert convgrad_calls == ["conv2d", "conv_transpose2d"]
    assert type(model[0]) is ct.Conv2d and type(model[2]) is ct.ConvTranspose2d
    assert model[0].backend == "numpy" and model[0].weight.shape == (4, 3, 3, 3)
    expected = F.conv_transpose2d(F.relu(F.conv2d(x, model[0].weight, model[0].bias, padding=1)), model[2].weight,
                                  model[2].bias, stride=2)
    torch.testing.assert_close(y, expected)
    assert ct.patch_report(model).patched == ["0", "2"]
    assert type(ct.unpatch(model)[0]) is nn.Conv2d


def test_lazy_layer_unpatched_before_it_materialises_stays_torch():
    model = ct.unpatch(ct.patch(nn.Sequential(nn.LazyConv1d(2, 3))))
    model(torch.randn(1, 3, 8))
    assert type(model[0]) is nn.Conv1d and not hasattr(model[0], "backend")


class _ScaledWeightConv2d(nn.Conv2d):
    """A subclass whose forward changes the weight, then uses nn.Conv2d's convolution (as QAT layers do)."""

    def forward(self, input):
        return self._conv_forward(input, 2 * self.weight, self.bias)


class _SuperForwardTranspose1d(nn.ConvTranspose1d):
    def forward(self, input, output_size=None):
        return super().forward(input, output_size) + 1


class _OwnConvolution2d(nn.Conv2d):
    def forward(self, input):
        return F.conv2d(input, self.weight.flip(-1), self.bias)


class _OwnConvForward2d(nn.Conv2d):
    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, weight - weight.mean(), bias)


def test_subclasses_that_use_the_torch_convolution_are_patched(convgrad_calls):
    model = nn.Sequential(_ScaledWeightConv2d(3, 4, 3), _SuperForwardTranspose1d(2, 3, 3))
    native = copy.deepcopy(model)
    ct.patch(model, backend="numpy")
    assert isinstance(model[0], _ScaledWeightConv2d) and isinstance(model[0], ct.Conv2d)
    assert isinstance(model[1], _SuperForwardTranspose1d) and isinstance(model[1], ct.ConvTranspose1d)
    assert ct.patch_report(model).patched == ["0", "1"]
    x, z = torch.randn(2, 3, 6, 6), torch.randn(2, 2, 5)
    torch.testing.assert_close(model[0](x), native[0](x))
    torch.testing.assert_close(model[1](z), native[1](z))
    assert convgrad_calls == ["conv2d", "conv_transpose1d"]
    ct.unpatch(model)
    assert type(model[0]) is _ScaledWeightConv2d and type(model[1]) is _SuperForwardTranspose1d


def test_layers_that_cannot_be_patched_warn_once_each_and_are_reported(caplog, convgrad_calls):
    import logging

    model = nn.Sequential(nn.Conv2d(3, 3, 1), _OwnConvolution2d(3, 3, 1), _OwnConvForward2d(3, 3, 1),
                          nn.Conv2d(3, 3, 1, dtype=torch.complex64))
    with caplog.at_level(logging.INFO, logger="convgrad.torch"), pytest.warns(ct.PatchWarning) as warned:
        assert ct.patch(model) is model
    messages = [str(w.message) for w in warned]
    assert messages == [
        f"convgrad.torch.patch: 1 ({__name__}._OwnConvolution2d) stays on PyTorch: its forward computes the "
        "convolution itself (it does not call _conv_forward or super().forward)",
        f"convgrad.torch.patch: 2 ({__name__}._OwnConvForward2d) stays on PyTorch: it overrides _conv_forward, so "
        "its convolution is its own, not Conv2d's",
        "convgrad.torch.patch: 3 (torch.nn.modules.conv.Conv2d) stays on PyTorch: its weight is torch.complex64; "
        "convgrad computes float16, bfloat16, float32 and float64",
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "convgrad.torch"] == [
        "convgrad.torch.patch: 1 of 4 convolution layers run on convgrad; 3 stay on PyTorch (1, 2, 3)"]
    report = ct.patch_report(model)
    assert [(layer.name, layer.status) for layer in report.layers] == [
        ("0", "patched"), ("1", "skipped"), ("2", "skipped"), ("3", "skipped")]
    assert report.layers[2].reason.startswith("it overrides _conv_forward")
    assert [type(m) for m in model] == [ct.Conv2d, _OwnConvolution2d, _OwnConvForward2d, nn.Conv2d]
    model[1:3](torch.randn(1, 3, 4, 4))  # the skipped layers still work, on PyTorch
    assert convgrad_calls == []


def test_strict_patch_raises_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(_OwnConvForward2d(3, 3, 1)))
    with pytest.raises(ValueError, match=rf"^patch\(strict=True\): 1 convolution layer\(s\) cannot run on convgrad: "
                                         rf"1.0 \({__name__}._OwnConvForward2d\): it overrides _conv_forward"):
        ct.patch(model, strict=True)
    assert type(model[0]) is nn.Conv2d
    with pytest.raises(ValueError, match="was not patched"):
        ct.patch_report(model)
    assert ct.patch(nn.Sequential(nn.Conv2d(3, 3, 1), nn.LazyConv2d(2, 1)), strict=True)  # nothing to refuse


def test_patch_rejects_an_unknown_backend_before_changing_anything():
    model = nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="patch: unknown backend 'nmpy'; registered backends: numpy"):
        ct.patch(model, backend="nmpy")
    assert type(model) is nn.Conv2d


# ----------------------------------------------------------------------------------------
# Training: parity with native PyTorch, torch.compile, DistributedDataParallel


def _digits(dtype):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=dtype)
    return (x - x.mean()) / x.std(), torch.tensor(digits.target)


def _cnn(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).to(dtype)


def _train_losses(model, x, y, steps=50, batch=32, device="cpu"):
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(steps):
        index = order[(step * batch) % x.shape[0]:][:batch]
        loss = F.cross_entropy(model(x[index].to(device)), y[index].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses)


def _parity(dtype, rtol, device="cpu"):
    x, y = _digits(dtype)
    native = _cnn(dtype)
    patched = ct.patch(copy.deepcopy(native))
    expected = _train_losses(native, x, y, device=device)
    losses = _train_losses(patched, x, y, device=device)
    np.testing.assert_allclose(losses, expected, rtol=rtol, atol=0)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_training_parity_with_native(dtype, rtol):
    _parity(dtype, rtol)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = ct.patch(_cnn(torch.float32))
    x, y = _digits(torch.float32)
    x, y = x[:16], y[:16]
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for run in (compiled, model):
        model.zero_grad()
        out = run(x)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_c, grads_c), (out_e, grads_e) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        base = _cnn(torch.float64)
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (8,), generator=gen)
        grads = {}
        for name, model in (("native", copy.deepcopy(base)), ("patched", ct.patch(copy.deepcopy(base)))):
            ddp = DistributedDataParallel(model)
            F.cross_entropy(ddp(x), y).backward()
            grads[name] = [p.grad for p in model.parameters()]
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_two_cpu_processes(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    context = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("DistributedDataParallel workers did not finish in 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for grads in ranks:
        for ours, theirs in zip(grads["patched"], grads["native"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(ranks[0]["patched"], ranks[1]["patched"]):  # all-reduced: the same on both ranks
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# On a GPU


@needs_cuda
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_cuda_training_parity_with_native(dtype, rtol, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _parity(dtype, rtol, device="cuda")


def _bfloat16_training_follows_native(device):
    """50 SGD steps in bfloat16: the first loss as native's to bf16 precision, then learning as native does."""
    x, y = _digits(torch.bfloat16)
    native = _cnn(torch.bfloat16)
    patched = ct.patch(copy.deepcopy(native))
    expected = _train_losses(native, x, y, device=device)
    losses = _train_losses(patched, x, y, device=device)
    assert losses[0] == pytest.approx(expected[0], rel=2e-2)
    assert np.mean(losses[-10:]) < 0.5 * losses[0]
    assert np.mean(losses[-10:]) == pytest.approx(np.mean(expected[-10:]), abs=0.1 * expected[0])


@needs_cuda
def test_cuda_bfloat16_training_follows_native():
    """bf16 CUDA tensors reach the kernels as their bits (no CuPy bfloat16 needed) and train."""
    _bfloat16_training_follows_native("cuda")


@needs_cuda
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_gradcheck(case, op):
    fn, args = _op_args(case, op, device="cuda")
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def call(*ts):
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t
        return fn(*full)

    assert torch.autograd.gradcheck(call, [args[i] for i in tensors])
