"""PyTorch integration: convgrad's passes as differentiable custom ops, modules and ``patch()``.

>>> import convgrad.torch
>>> model = convgrad.torch.patch(model)      # every nn.ConvNd / ConvTransposeNd now runs on convgrad
>>> loss = criterion(model(x), target); loss.backward()

Operators (namespace ``convgrad``, one per kind, for 1-D/2-D/3-D alike):

====================  ==========================================  ================================
op                    computes                                    its backward uses
====================  ==========================================  ================================
``conv``              fprop ``y = conv(x, w) + b``                ``conv_input``, ``conv_weight``,
                                                                  ``conv_bias_grad``
``conv_input``        dgrad ``dx`` from ``dy`` and ``w``          ``conv_weight``, ``conv``
``conv_weight``       wgrad ``dw`` from ``x`` and ``dy``          ``conv_input``, ``conv``
``conv_transpose``    dgrad used as a layer, plus bias            ``conv``, ``conv_weight``,
                                                                  ``conv_bias_grad``
``conv_bias_grad``    ``dy`` summed over batch and space          ``expand``
====================  ==========================================  ================================

Each backward is built from the same ops, so gradients of gradients work.  The adjoint
identity ``<conv(x, w), g> = <x, dgrad(g, w)> = <w, wgrad(x, g)>`` (DESIGN §1) gives every
entry of that table: each op is linear in each of its tensor arguments, and the gradient
with respect to one argument is the pass that moves the upstream gradient to its place.

Data never leaves PyTorch's memory: CPU tensors reach the ``numpy`` backend as NumPy views
(bfloat16 through ``ml_dtypes``), CUDA tensors reach ``cupy`` (else ``numba``) through
DLPack / ``__cuda_array_interface__`` on PyTorch's current stream (bfloat16 as its int16
bits, with ``dtype="bfloat16"`` beside them), with temporary allocations routed through
PyTorch's caching allocator.  Results are written into tensors
that PyTorch allocates.  Tensors in ``torch.channels_last`` (``channels_last_3d``) memory
format run channels-last, with no ``.contiguous()``, and give channels-last results.

Flags follow PyTorch: ``torch.use_deterministic_algorithms(True)`` asks for the
deterministic paths, ``torch.backends.cudnn.allow_tf32`` decides TF32 for float32 CUDA
tensors, and under ``torch.autocast`` inputs are cast as ``nn.Conv2d``'s are.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from convgrad import functional
from convgrad.backends import cpu_workers, numpy_backend
from convgrad.backends import registered as registered_backends
from convgrad.nn import transposed_as_conv
from convgrad.problem import expand_param, normalize_padding

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "conv1d",
    "conv1d_input",
    "conv1d_weight",
    "conv2d",
    "conv2d_input",
    "conv2d_weight",
    "conv3d",
    "conv3d_input",
    "conv3d_weight",
    "conv_bias_grad",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "PatchReport",
    "PatchWarning",
    "PatchedLayer",
    "patch",
    "patch_report",
    "unpatch",
]


# ----------------------------------------------------------------------------------------
# Tensors as arrays: zero-copy views, on the right stream, allocations in PyTorch's allocator


def _is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is in channels-last memory format (and not also plainly contiguous)."""
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
    return False


def _channels_last(*tensors: Tensor) -> bool:
    """The layout of a call: channels-last when any activation or weight is (as PyTorch's CPU/cuDNN convs)."""
    return any(_is_channels_last(t) for t in tensors)


def _empty(shape: Sequence[Any], like: Tensor, channels_last: bool) -> Tensor:
    """A result tensor from PyTorch's allocator, in the call's layout."""
    if channels_last and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _in_layout(t: Tensor, channels_last: bool) -> Tensor:
    """(N, C, *spatial) -> (N, *spatial, C) for a channels-last call: a view, never a copy."""
    return t.permute(0, *range(2, t.dim()), 1) if channels_last else t


def _cpu_array(t: Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        # NumPy has no bfloat16: reinterpret the same bytes as ml_dtypes.bfloat16.
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _cupy_allocate(size: int) -> Any:
    """CuPy allocator that takes memory from PyTorch's caching allocator (graph-capture safe)."""
    import cupy

    buffer = torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", cupy.cuda.Device().id))
    # The tensor is the owner: the memory returns to PyTorch when CuPy drops the pointer.
    return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(buffer.data_ptr(), size, buffer), 0)


class _Arrays:
    """Views of tensors as arrays of the library a backend computes on, inside ``_arrays_for``."""

    def __init__(self, library: str, stream: Any = None) -> None:
        self.library = library
        self.stream = stream

    def __call__(self, t: Tensor | None) -> Any:
        if t is None:
            return None
        if self.library == "numpy":
            return _cpu_array(t)
        t = t.detach()
        if self.library == "cupy":
            import cupy

            if t.dtype == torch.bfloat16:
                # No CuPy can be relied on for bfloat16 (none has cupy.bfloat16; from_dlpack takes
                # it only with ml_dtypes and a recent NumPy): hand over the same memory as int16
                # bits, and the call declares dtype="bfloat16" (see _numerics).
                return cupy.from_dlpack(t.view(torch.int16))
            return cupy.from_dlpack(t)
        from numba import cuda

        return cuda.as_cuda_array(t, sync=False).bind(self.stream)

    def copy(self, dst: Tensor, src: Any) -> None:
        """``dst[...] = src`` for a small result the functional API returned as a new array."""
        view = self(dst)
        if self.library == "numba":
            view.copy_to_device(src, stream=self.stream)
        else:
            view[...] = src


@functools.lru_cache(maxsize=None)
def _cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------
# One thread budget: convgrad's CPU work runs on PyTorch's threads, never beside them
#
# NumPy's OpenBLAS keeps its worker threads busy-waiting for about 0.1 s after each GEMM; on
# a machine with as many cores as PyTorch has threads, they then take the cores from the
# PyTorch operators that follow (a batch norm after a convgrad convolution ran 7 times
# slower on two cores).  Limiting OpenBLAS to one thread ends the contention but leaves the
# GEMMs on one core.  Instead, inside convgrad.torch the numpy backend's GEMMs run through
# torch.matmul on zero-copy views, on PyTorch's own pool and thread count: one pool does
# all the work, and nothing spins when it returns.


def _tensor_view(a: np.ndarray) -> Tensor:
    """``a`` as a CPU tensor sharing its memory (a copy only for negative strides, which tensors lack)."""
    if any(stride < 0 for stride in a.strides):
        a = np.ascontiguousarray(a)
    if a.flags.writeable:
        return torch.from_numpy(a)
    # Read-only views (im2col windows of the input) are only read here: PyTorch's warning about
    # writing to them does not apply.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


#: GEMMs with fewer multiply-adds per matrix than this stay on NumPy: OpenBLAS runs them on
#: the calling thread without waking its workers (its own threshold for threading is
#: 4 x 65536), while entering PyTorch's OpenMP pool for them costs more than the product, and
#: on a loaded machine the pool's barrier waited milliseconds for a descheduled thread.
_SMALL_GEMM_MACS = 4 * 65536


def _torch_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``np.matmul(a, b, out=out)`` computed by ``torch.matmul`` on PyTorch's thread pool (small ones by NumPy)."""
    if a.shape[-2] * a.shape[-1] * b.shape[-1] < _SMALL_GEMM_MACS:
        return np.matmul(a, b, out=out)
    if out is None:
        return torch.matmul(_tensor_view(a), _tensor_view(b)).numpy()
    torch.matmul(_tensor_view(a), _tensor_view(b), out=torch.from_numpy(out))
    return out


@contextlib.contextmanager
def _numba_threads(threads: int) -> Iterator[None]:
    """Numba's CPU kernels on at most ``threads`` threads inside the block, when Numba's pool runs.

    A pool that has not started is left alone: starting it here would choose Numba's
    threading layer before convgrad's kernel module has set it.  Without Numba nothing happens.
    """
    numba = sys.modules.get("numba")
    previous = None
    if numba is not None:
        try:
            from numba.np.ufunc import parallel

            if parallel._is_initialized:
                previous = numba.get_num_threads()
                numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        except (ImportError, AttributeError, ValueError):
            previous = None
    try:
        yield
    finally:
        if previous is not None:
            numba.set_num_threads(previous)


_thread_budget_state = {"enabled": True}


@contextlib.contextmanager
def _thread_budget(enabled: bool) -> Iterator[None]:
    """Turn the thread budget on or off inside the block (``convgrad bench`` compares both)."""
    previous = _thread_budget_state["enabled"]
    _thread_budget_state["enabled"] = enabled
    try:
        yield
    finally:
        _thread_budget_state["enabled"] = previous


@contextlib.contextmanager
def _cpu_thread_budget() -> Iterator[None]:
    """Inside the block, convgrad's CPU GEMMs and Numba kernels use PyTorch's threads."""
    if not _thread_budget_state["enabled"]:
        yield
        return
    threads = torch.get_num_threads()
    with numpy_backend.gemms_through(_torch_matmul), _numba_threads(threads), cpu_workers.limited_to(threads):
        yield


@contextlib.contextmanager
def _arrays_for(device: torch.device) -> Iterator[_Arrays]:
    """Array views for tensors on ``device``, with PyTorch's current stream current for the call."""
    if device.type == "cpu":
        with _cpu_thread_budget():
            yield _Arrays("numpy")
        return
    if device.type != "cuda":
        raise TypeError(f"convgrad.torch: tensors on {device.type} are not supported; use CPU or CUDA tensors")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    # CuPy arrays whenever CuPy is there: the numba backend takes them too, on CuPy's current stream.
    if _cupy_importable():
        import cupy

        with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index), \
                cupy.cuda.using_allocator(_cupy_allocate):
            yield _Arrays("cupy")
        return
    from numba import cuda

    from convgrad.backends import numba_backend

    numba_stream = cuda.external_stream(stream.cuda_stream)
    with cuda.gpus[index], numba_backend.using_allocator(functools.partial(_numba_allocate, index)):
        yield _Arrays("numba", numba_stream)


def _numba_allocate(device_index: int, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> Any:
    """Scratch memory for the numba backend from PyTorch's caching allocator, bound to ``stream``.

    The allocator orders the memory on PyTorch's current stream (the call's) and is legal under
    CUDA-graph capture, where Numba's own cuMemAlloc is not.  The tensor owns the memory.
    """
    from numba import cuda

    nbytes = int(np.prod(shape)) * dtype.itemsize
    buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=torch.device("cuda", device_index))
    interface = {"shape": tuple(shape), "strides": None, "typestr": dtype.str, "data": (buffer.data_ptr(), False),
                 "version": 3}
    return cuda.from_cuda_array_interface(interface, owner=buffer, sync=False).bind(stream)


def _numerics(t: Tensor) -> dict[str, Any]:
    """PyTorch's flags as convgrad options (None leaves convgrad's own setting), and the element type."""
    deterministic = True if torch.are_deterministic_algorithms_enabled() else None
    allow_tf32 = bool(torch.backends.cudnn.allow_tf32) if t.is_cuda and t.dtype == torch.float32 else None
    return {"deterministic": deterministic, "allow_tf32": allow_tf32, **_declared_dtype(t)}


def _declared_dtype(t: Tensor) -> dict[str, Any]:
    """``dtype="bfloat16"`` for bfloat16 tensors, whose CUDA arrays carry the bits (see ``_Arrays``)."""
    return {"dtype": "bfloat16"} if t.dtype == torch.bfloat16 else {}


def _pairs(before: Sequence[int], after: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((int(b), int(a)) for b, a in zip(before, after))


def _conv_extent(size: Any, kernel: Any, stride: Any, dilation: Any, before: Any, after: Any) -> Any:
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def _conv_output_shape(input: Tensor, weight: Tensor, stride: Sequence[int], pad_before: Sequence[int],
                       pad_after: Sequence[int], dilation: Sequence[int]) -> list[Any]:
    spatial = [
        _conv_extent(*args)
        for args in zip(input.shape[2:], weight.shape[2:], stride, dilation, pad_before, pad_after)
    ]
    if any(extent < 1 for extent in spatial):
        raise ValueError(
            f"convgrad.conv: the kernel {tuple(weight.shape[2:])} (dilation {tuple(dilation)}) is larger than the "
            f"padded input {tuple(input.shape[2:])} (padding {tuple(pad_before)} before, {tuple(pad_after)} after)"
        )
    return [input.shape[0], weight.shape[0], *spatial]


def _transpose_output_shape(input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                            output_padding: Sequence[int], dilation: Sequence[int], groups: int) -> list[Any]:
    spatial = [
        (n - 1) * s - 2 * p + d * (k - 1) + o + 1
        for n, k, s, p, o, d in zip(input.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)
    ]
    return [input.shape[0], weight.shape[1] * groups, *spatial]


# ----------------------------------------------------------------------------------------
# The operators


@torch.library.custom_op("convgrad::conv", mutates_args=())
def _conv_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
             pad_before: Sequence[int], pad_after: Sequence[int], dilation: Sequence[int], groups: int,
             backend: Optional[str]) -> Tensor:
    """fprop on batched (N, C, *spatial) tensors; padding given as before/after per axis."""
    ndim = input.dim() - 2
    channels_last = _channels_last(input, weight)
    out = _empty(_conv_output_shape(input, weight, stride, pad_before, pad_after, dilation), input, channels_last)
    fprop = getattr(functional, f"conv{ndim}d")
    with _arrays_for(input.device) as array:
        fprop(array(_in_layout(input, channels_last)), array(_in_layout(weight, channels_last)), array(bias),
              list(stride), _pairs(pad_before, pad_after), list(dilation), groups, channels_last=channels_last,
              backend=backend, out=array(_in_layout(out, channels_last)), **_numerics(input))
    return out


@_conv_op.register_fake
def _(input, weight, bias, stride, pad_before, pad_after, dilation, groups, backend):
    shape = _conv_output_shape(input, weight, stride, pad_before, pad_after, dilation)
    return _empty(shape, input, _channels_last(input, weight))


@torch.library.custom_op("convgrad::conv_input", mutates_args=())
def _conv_input_op(input_size: Sequence[int], weight: Tensor, grad_output: Tensor, stride: Sequence[int],
                   pad_before: Sequence[int], pad_after: Sequence[int], dilation: Sequence[int], groups: int,
                   backend: Optional[str]) -> Tensor:
    """dgrad: the gradient of ``conv`` with respect to its (batched) input of shape ``input_size``."""
    ndim = grad_output.dim() - 2
    channels_last = _channels_last(grad_output, weight)
    out = _empty(input_size, grad_output, channels_last)
    size = [out.shape[0], *out.shape[2:], out.shape[1]] if channels_last else list(out.shape)
    dgrad = getattr(functional, f"conv{ndim}d_input")
    with _arrays_for(grad_output.device) as array:
        dgrad(size, array(_in_layout(weight, channels_last)), array(_in_layout(grad_output, channels_last)),
              list(stride), _pairs(pad_before, pad_after), list(dilation), groups, channels_last=channels_last,
              backend=backend, out=array(_in_layout(out, channels_last)), **_numerics(grad_output))
    return out


@_conv_input_op.register_fake
def _(input_size, weight, grad_output, stride, pad_before, pad_after, dilation, groups, backend):
    return _empty(input_size, grad_output, _channels_last(grad_output, weight))


@torch.library.custom_op("convgrad::conv_weight", mutates_args=())
def _conv_weight_op(input: Tensor, weight_size: Sequence[int], grad_output: Tensor, stride: Sequence[int],
                    pad_before: Sequence[int], pad_after: Sequence[int], dilation: Sequence[int], groups: int,
                    backend: Optional[str]) -> Tensor:
    """wgrad: the gradient of ``conv`` with respect to its weight of shape ``weight_size``."""
    ndim = input.dim() - 2
    channels_last = _channels_last(input, grad_output)
    out = _empty(weight_size, input, channels_last)
    size = [out.shape[0], *out.shape[2:], out.shape[1]] if channels_last else list(out.shape)
    wgrad = getattr(functional, f"conv{ndim}d_weight")
    with _arrays_for(input.device) as array:
        wgrad(array(_in_layout(input, channels_last)), size, array(_in_layout(grad_output, channels_last)),
              list(stride), _pairs(pad_before, pad_after), list(dilation), groups, channels_last=channels_last,
              backend=backend, out=array(_in_layout(out, channels_last)), **_numerics(input))
    return out


@_conv_weight_op.register_fake
def _(input, weight_size, grad_output, stride, pad_before, pad_after, dilation, groups, backend):
    return _empty(weight_size, input, _channels_last(input, grad_output))


@torch.library.custom_op("convgrad::conv_transpose", mutates_args=())
def _conv_transpose_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                       padding: Sequence[int], output_padding: Sequence[int], dilation: Sequence[int], groups: int,
                       backend: Optional[str]) -> Tensor:
    """Transposed convolution on batched tensors (dgrad used as a layer), plus bias."""
    ndim = input.dim() - 2
    channels_last = _channels_last(input, weight)
    shape = _transpose_output_shape(input, weight, stride, padding, output_padding, dilation, groups)
    out = _empty(shape, input, channels_last)
    layer = getattr(functional, f"conv_transpose{ndim}d")
    with _arrays_for(input.device) as array:
        layer(array(_in_layout(input, channels_last)), array(_in_layout(weight, channels_last)), array(bias),
              list(stride), list(padding), list(output_padding), groups, list(dilation),
              channels_last=channels_last, backend=backend, out=array(_in_layout(out, channels_last)),
              **_numerics(input))
    return out


@_conv_transpose_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, dilation, groups, backend):
    shape = _transpose_output_shape(input, weight, stride, padding, output_padding, dilation, groups)
    return _empty(shape, input, _channels_last(input, weight))


@torch.library.custom_op("convgrad::conv_bias_grad", mutates_args=())
def _conv_bias_grad_op(grad_output: Tensor, backend: Optional[str]) -> Tensor:
    """The bias gradient: (N, K, *spatial) summed to (K,)."""
    out = torch.empty(grad_output.shape[1], dtype=grad_output.dtype, device=grad_output.device)
    with _arrays_for(grad_output.device) as array:
        # Channel axis 1 of the logical view, whatever the strides: no layout flag needed.
        array.copy(out, functional.conv_bias_grad(array(grad_output), backend=backend, **_declared_dtype(grad_output)))
    return out


@_conv_bias_grad_op.register_fake
def _(grad_output, backend):
    return grad_output.new_empty(grad_output.shape[1])


# ----------------------------------------------------------------------------------------
# Their gradients, built from the same operators


def _save_geometry(ctx: Any, stride: Any, pad_before: Any, pad_after: Any, dilation: Any, groups: Any,
                   backend: Any) -> None:
    ctx.geometry = (list(stride), list(pad_before), list(pad_after), list(dilation), groups, backend)


_NO_GRAD_GEOMETRY = (None,) * 6


def _conv_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, weight, bias, stride, pad_before, pad_after, dilation, groups, backend = inputs
    ctx.save_for_backward(input, weight)
    _save_geometry(ctx, stride, pad_before, pad_after, dilation, groups, backend)


def _conv_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_input = _conv_input_op(list(input.shape), weight, grad, *ctx.geometry) if need_input else None
    grad_weight = _conv_weight_op(input, list(weight.shape), grad, *ctx.geometry) if need_weight else None
    grad_bias = _conv_bias_grad_op(grad, ctx.geometry[-1]) if need_bias else None
    return (grad_input, grad_weight, grad_bias, *_NO_GRAD_GEOMETRY)


def _conv_input_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input_size, weight, grad_output, stride, pad_before, pad_after, dilation, groups, backend = inputs
    ctx.save_for_backward(weight, grad_output)
    _save_geometry(ctx, stride, pad_before, pad_after, dilation, groups, backend)


def _conv_input_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    # dgrad(g, w) is linear in w and in g: <dgrad(g, w), h> = <w, wgrad(h, g)> = <g, conv(h, w)>.
    weight, grad_output = ctx.saved_tensors
    need_weight, need_grad_output = ctx.needs_input_grad[1:3]
    grad_weight = _conv_weight_op(grad, list(weight.shape), grad_output, *ctx.geometry) if need_weight else None
    grad_grad_output = _conv_op(grad, weight, None, *ctx.geometry) if need_grad_output else None
    return (None, grad_weight, grad_grad_output, *_NO_GRAD_GEOMETRY)


def _conv_weight_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, weight_size, grad_output, stride, pad_before, pad_after, dilation, groups, backend = inputs
    ctx.save_for_backward(input, grad_output)
    _save_geometry(ctx, stride, pad_before, pad_after, dilation, groups, backend)


def _conv_weight_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    # wgrad(x, g) is linear in x and in g: <wgrad(x, g), h> = <x, dgrad(g, h)> = <g, conv(x, h)>.
    input, grad_output = ctx.saved_tensors
    need_input, need_grad_output = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_input = _conv_input_op(list(input.shape), grad, grad_output, *ctx.geometry) if need_input else None
    grad_grad_output = _conv_op(input, grad, None, *ctx.geometry) if need_grad_output else None
    return (grad_input, None, grad_grad_output, *_NO_GRAD_GEOMETRY)


def _conv_transpose_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, weight, bias, stride, padding, output_padding, dilation, groups, backend = inputs
    ctx.save_for_backward(input, weight)
    pairs, crop = transposed_as_conv(list(padding), list(output_padding), len(padding))
    ctx.geometry = (list(stride), [b for b, _ in pairs], [a for _, a in pairs], list(dilation), groups, backend)
    ctx.crop = crop


def _conv_transpose_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    # The layer is dgrad of conv(., w) padded (p, p - output_padding): its input gradient is
    # that convolution's fprop, its weight gradient that convolution's wgrad with the roles
    # of input and output gradient swapped.
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    cropped = grad
    for axis, amount in enumerate(ctx.crop):
        if amount:
            cropped = cropped.narrow(2 + axis, 0, cropped.shape[2 + axis] - amount)
    grad_input = _conv_op(cropped, weight, None, *ctx.geometry) if need_input else None
    grad_weight = _conv_weight_op(cropped, list(weight.shape), input, *ctx.geometry) if need_weight else None
    grad_bias = _conv_bias_grad_op(grad, ctx.geometry[-1]) if need_bias else None
    return (grad_input, grad_weight, grad_bias, *_NO_GRAD_GEOMETRY)


def _conv_bias_grad_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.shape = inputs[0].shape


def _conv_bias_grad_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    # A sum's gradient is its upstream gradient broadcast back over the summed axes.
    ones = [1] * (len(ctx.shape) - 2)
    return grad.reshape(1, -1, *ones).expand(ctx.shape), None


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)
_conv_input_op.register_autograd(_conv_input_backward, setup_context=_conv_input_setup)
_conv_weight_op.register_autograd(_conv_weight_backward, setup_context=_conv_weight_setup)
_conv_transpose_op.register_autograd(_conv_transpose_backward, setup_context=_conv_transpose_setup)
_conv_bias_grad_op.register_autograd(_conv_bias_grad_backward, setup_context=_conv_bias_grad_setup)


# ----------------------------------------------------------------------------------------
# Functions on tensors, with torch.nn.functional's and torch.nn.grad's signatures


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast as autocast casts a convolution's arguments: floating, non-float64 tensors to its dtype."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def _check_tensors(op: str, **tensors: Any) -> None:
    """A short TypeError naming the first argument that is not a tensor (``bias`` may be None).

    Without it a NumPy array reaches the custom op, whose error prints the whole array.
    """
    for arg, value in tensors.items():
        if value is None and arg == "bias":
            continue
        if not isinstance(value, Tensor):
            got = "None" if value is None else f"{type(value).__module__}.{type(value).__name__}"
            raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {got} (for NumPy, CuPy or Numba arrays "
                            f"use convgrad.{op})")


def _check_rank(op: str, arg: str, t: Tensor, ndim: int) -> bool:
    """Whether ``t`` is batched; a ValueError unless it has ndim + 1 or ndim + 2 dimensions."""
    if t.dim() not in (ndim + 1, ndim + 2):
        raise ValueError(f"{op}: {arg} must be {ndim + 1}-D (unbatched) or {ndim + 2}-D (batched), got {t.dim()}-D")
    return t.dim() == ndim + 2


def _conv(ndim: int, input: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
          groups: int, backend: str | None) -> Tensor:
    op = f"conv{ndim}d"
    _check_tensors(op, input=input, weight=weight, bias=bias)
    batched = _check_rank(op, "input", input, ndim)
    stride_ = expand_param(op, "stride", stride, ndim, 1)
    dilation_ = expand_param(op, "dilation", dilation, ndim, 1)
    before, after = normalize_padding(op, padding, ndim, tuple(weight.shape[2:]), stride_, dilation_)
    input, weight, bias = _autocast(input, weight, bias)
    x = input if batched else input.unsqueeze(0)
    y = _conv_op(x, weight, bias, list(stride_), list(before), list(after), list(dilation_), groups, backend)
    return y if batched else y.squeeze(0)


def _conv_transpose(ndim: int, input: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any,
                    output_padding: Any, groups: int, dilation: Any, backend: str | None) -> Tensor:
    op = f"conv_transpose{ndim}d"
    _check_tensors(op, input=input, weight=weight, bias=bias)
    batched = _check_rank(op, "input", input, ndim)
    args = [expand_param(op, name, value, ndim, minimum) for name, value, minimum in
            (("stride", stride, 1), ("padding", padding, 0), ("output_padding", output_padding, 0),
             ("dilation", dilation, 1))]
    input, weight, bias = _autocast(input, weight, bias)
    x = input if batched else input.unsqueeze(0)
    stride_, padding_, output_padding_, dilation_ = (list(a) for a in args)
    y = _conv_transpose_op(x, weight, bias, stride_, padding_, output_padding_, dilation_, groups, backend)
    return y if batched else y.squeeze(0)


def _conv_input(ndim: int, input_size: Sequence[int], weight: Tensor, grad_output: Tensor, stride: Any, padding: Any,
                dilation: Any, groups: int, backend: str | None) -> Tensor:
    op = f"conv{ndim}d_input"
    _check_tensors(op, weight=weight, grad_output=grad_output)
    batched = _check_rank(op, "grad_output", grad_output, ndim)
    stride_ = expand_param(op, "stride", stride, ndim, 1)
    dilation_ = expand_param(op, "dilation", dilation, ndim, 1)
    before, after = normalize_padding(op, padding, ndim, tuple(weight.shape[2:]), stride_, dilation_)
    weight, grad_output = _autocast(weight, grad_output)
    size = list(input_size) if batched else [1, *input_size]
    g = grad_output if batched else grad_output.unsqueeze(0)
    dx = _conv_input_op(size, weight, g, list(stride_), list(before), list(after), list(dilation_), groups, backend)
    return dx if batched else dx.squeeze(0)


def _conv_weight(ndim: int, input: Tensor, weight_size: Sequence[int], grad_output: Tensor, stride: Any, padding: Any,
                 dilation: Any, groups: int, backend: str | None) -> Tensor:
    op = f"conv{ndim}d_weight"
    _check_tensors(op, input=input, grad_output=grad_output)
    batched = _check_rank(op, "input", input, ndim)
    stride_ = expand_param(op, "stride", stride, ndim, 1)
    dilation_ = expand_param(op, "dilation", dilation, ndim, 1)
    before, after = normalize_padding(op, padding, ndim, tuple(weight_size[2:]), stride_, dilation_)
    input, grad_output = _autocast(input, grad_output)
    x = input if batched else input.unsqueeze(0)
    g = grad_output if batched else grad_output.unsqueeze(0)
    return _conv_weight_op(x, list(weight_size), g, list(stride_), list(before), list(after), list(dilation_), groups,
                           backend)


def conv_bias_grad(grad_output: Tensor, *, backend: str | None = None) -> Tensor:
    """The bias gradient of a convolution: ``grad_output`` (N, K, *spatial) summed to (K,)."""
    _check_tensors("conv_bias_grad", grad_output=grad_output)
    return _conv_bias_grad_op(grad_output, backend)


_SHAPES = {1: "(N, C_in, W)", 2: "(N, C_in, H, W)", 3: "(N, C_in, D, H, W)"}
_WEIGHTS = {1: "(C_out, C_in/groups, kW)", 2: "(C_out, C_in/groups, kH, kW)", 3: "(C_out, C_in/groups, kD, kH, kW)"}


def _make(ndim: int) -> tuple[Any, Any, Any, Any]:
    x = _SHAPES[ndim]

    def conv(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
             dilation: Any = 1, groups: int = 1, *, backend: str | None = None) -> Tensor:
        return _conv(ndim, input, weight, bias, stride, padding, dilation, groups, backend)

    def conv_transpose(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                       output_padding: Any = 0, groups: int = 1, dilation: Any = 1, *,
                       backend: str | None = None) -> Tensor:
        return _conv_transpose(ndim, input, weight, bias, stride, padding, output_padding, groups, dilation, backend)

    def conv_input(input_size: Sequence[int], weight: Tensor, grad_output: Tensor, stride: Any = 1, padding: Any = 0,
                   dilation: Any = 1, groups: int = 1, *, backend: str | None = None) -> Tensor:
        return _conv_input(ndim, input_size, weight, grad_output, stride, padding, dilation, groups, backend)

    def conv_weight(input: Tensor, weight_size: Sequence[int], grad_output: Tensor, stride: Any = 1, padding: Any = 0,
                    dilation: Any = 1, groups: int = 1, *, backend: str | None = None) -> Tensor:
        return _conv_weight(ndim, input, weight_size, grad_output, stride, padding, dilation, groups, backend)

    w = _WEIGHTS[ndim]
    common = f"""    stride, dilation : int or tuple of {ndim} ints
    padding : int, tuple of {ndim} ints, tuple of {ndim} (before, after) pairs, 'same' or 'valid'
    groups : int
    backend : str, optional, keyword-only
        A convgrad backend; by default the tensors' device decides (CPU: numpy, CUDA: cupy, else numba).
"""
    docs = {
        conv: (f"conv{ndim}d", f"""{ndim}-D convolution, as ``torch.nn.functional.conv{ndim}d``; differentiable to any order.

    Parameters
    ----------
    input : Tensor, {x} or unbatched
    weight : Tensor, {w}
    bias : Tensor, (C_out,), optional
{common}
    Returns
    -------
    Tensor, (N, C_out, *spatial_out), channels-last when the input or weight is
    """),
        conv_transpose: (f"conv_transpose{ndim}d", f"""{ndim}-D transposed convolution, as ``torch.nn.functional.conv_transpose{ndim}d``.

    Parameters
    ----------
    input : Tensor, (N, C_in, *spatial) or unbatched
    weight : Tensor, (C_in, C_out/groups, *kernel)
    bias : Tensor, (C_out,), optional
    stride, padding, output_padding, dilation : int or tuple of {ndim} ints
    groups : int
    backend : str, optional, keyword-only

    Returns
    -------
    Tensor, (N, C_out, *spatial_out) with
    spatial_out = (in - 1)·stride - 2·padding + dilation·(kernel - 1) + output_padding + 1
    """),
        conv_input: (f"conv{ndim}d_input", f"""The input gradient of conv{ndim}d, as ``torch.nn.grad.conv{ndim}d_input``.

    Parameters
    ----------
    input_size : sequence of ints, the input's shape {x} (or unbatched)
    weight : Tensor, {w}
    grad_output : Tensor, (N, C_out, *spatial_out)
{common}
    Returns
    -------
    Tensor of shape ``input_size``
    """),
        conv_weight: (f"conv{ndim}d_weight", f"""The weight gradient of conv{ndim}d, as ``torch.nn.grad.conv{ndim}d_weight``.

    Parameters
    ----------
    input : Tensor, {x} (or unbatched)
    weight_size : sequence of ints, {w}
    grad_output : Tensor, (N, C_out, *spatial_out)
{common}
    Returns
    -------
    Tensor of shape ``weight_size``
    """),
    }
    for fn, (name, doc) in docs.items():
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = doc
    return conv, conv_transpose, conv_input, conv_weight


conv1d, conv_transpose1d, conv1d_input, conv1d_weight = _make(1)
conv2d, conv_transpose2d, conv2d_input, conv2d_weight = _make(2)
conv3d, conv_transpose3d, conv3d_input, conv3d_weight = _make(3)


# ----------------------------------------------------------------------------------------
# Modules and patching


class _ConvMixin:
    """Replaces the convolution inside ``nn.ConvNd.forward``; padding modes as PyTorch does them."""

    _ndim = 2
    backend: Optional[str] = None

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return _conv(self._ndim, input, weight, bias, self.stride, padding, self.dilation, self.groups, self.backend)

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        return text + (f", backend={self.backend!r}" if self.backend is not None else "")


class _ConvTransposeMixin:
    """Replaces ``nn.ConvTransposeNd.forward`` (PyTorch's output_size handling, convgrad's op)."""

    _ndim = 2
    backend: Optional[str] = None

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"only 'zeros' padding_mode is supported for {type(self).__name__}")
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            input, output_size, self.stride, self.padding, self.kernel_size, self._ndim, self.dilation)
        return _conv_transpose(self._ndim, input, self.weight, self.bias, self.stride, self.padding, output_padding,
                               self.groups, self.dilation, self.backend)

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        return text + (f", backend={self.backend!r}" if self.backend is not None else "")


class Conv1d(_ConvMixin, nn.Conv1d):
    """``torch.nn.Conv1d`` computed by convgrad; same arguments plus ``backend=``."""

    _ndim = 1

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class Conv2d(_ConvMixin, nn.Conv2d):
    """``torch.nn.Conv2d`` computed by convgrad; same arguments plus ``backend=``."""

    _ndim = 2

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class Conv3d(_ConvMixin, nn.Conv3d):
    """``torch.nn.Conv3d`` computed by convgrad; same arguments plus ``backend=``."""

    _ndim = 3

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class ConvTranspose1d(_ConvTransposeMixin, nn.ConvTranspose1d):
    """``torch.nn.ConvTranspose1d`` computed by convgrad; same arguments plus ``backend=``."""

    _ndim = 1

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class ConvTranspose2d(_ConvTransposeMixin, nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` computed by convgrad; same arguments plus ``backend=``."""

    _ndim = 2

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class ConvTranspose3d(_ConvTransposeMixin, nn.ConvTranspose3d):
    """``torch.nn.ConvTranspose3d`` computed by convgrad; same arguments plus ``backend=``."""

    _ndim = 3

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


_PATCHED = {
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.ConvTranspose1d: ConvTranspose1d,
    nn.ConvTranspose2d: ConvTranspose2d,
    nn.ConvTranspose3d: ConvTranspose3d,
}
_ORIGINAL = {patched: original for original, patched in _PATCHED.items()}
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Classes made by patch() for subclasses of the torch.nn convolutions: user class -> patched class.
_PATCHED_SUBCLASSES: dict[type, type] = {}
#: The report of the last patch() of each model (see patch_report), kept without holding the model.
_REPORTS: "weakref.WeakKeyDictionary[nn.Module, tuple[Optional[str], list[tuple[str, str, Any, str]]]]" = \
    weakref.WeakKeyDictionary()
_log = logging.getLogger(__name__)


class PatchWarning(UserWarning):
    """A convolution layer that :func:`patch` left on PyTorch, with the reason."""


@dataclass(frozen=True)
class PatchedLayer:
    """One convolution layer of a patched model.

    ``status`` is ``"patched"`` (runs on convgrad), ``"lazy"`` (an uninitialised lazy layer:
    it becomes convgrad's on its first forward) or ``"skipped"`` (stays on PyTorch; ``reason``
    says why).
    """

    name: str
    layer_type: str
    status: str
    reason: str = ""


@dataclass(frozen=True)
class PatchReport:
    """What the last :func:`patch` of a model did, layer by layer; ``str()`` is the one-line summary."""

    backend: Optional[str]
    layers: tuple[PatchedLayer, ...]

    def _named(self, status: str) -> list[str]:
        return [layer.name for layer in self.layers if layer.status == status]

    @property
    def patched(self) -> list[str]:
        return self._named("patched")

    @property
    def lazy(self) -> list[str]:
        return self._named("lazy")

    @property
    def skipped(self) -> list[str]:
        return self._named("skipped")

    def __str__(self) -> str:
        total = len(self.layers)
        if not total:
            return "convgrad.torch.patch: no convolution layers found"
        text = f"convgrad.torch.patch: {len(self.patched)} of {total} convolution layers run on convgrad"
        if self.lazy:
            text += f", {len(self.lazy)} more from their first forward (lazy)"
        if self.skipped:
            text += f"; {len(self.skipped)} stay on PyTorch ({', '.join(map(_display, self.skipped))})"
        return text + (f"; backend {self.backend}" if self.backend else "")


def _display(name: str) -> str:
    return name or "(the model itself)"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _torch_base(cls: type) -> Optional[type]:
    """The torch.nn convolution class that ``cls`` is or derives from, else None."""
    return next((base for base in cls.__mro__ if base in _PATCHED), None)


def _calls(function: Any, *names: str) -> bool:
    """Whether the code of ``function`` refers to any of ``names`` (attribute or global names it uses)."""
    code = getattr(function, "__code__", None)
    return code is not None and any(name in code.co_names for name in names)


def _why_not(cls: type) -> str:
    """Why layers of class ``cls`` (a subclass of a torch.nn convolution) cannot be patched; '' when they can."""
    base = _torch_base(cls)
    assert base is not None
    transposed = issubclass(base, nn.modules.conv._ConvTransposeNd)
    if not transposed and cls._conv_forward is not base._conv_forward:
        return f"it overrides _conv_forward, so its convolution is its own, not {base.__name__}'s"
    if cls.forward is not base.forward:
        # Its own forward reaches the convolution through super().forward (or Base.forward), or,
        # for ConvNd, through _conv_forward: exactly the methods convgrad replaces.
        through = ("forward",) if transposed else ("forward", "_conv_forward")
        if not _calls(cls.forward, *through):
            route = "super().forward" if transposed else "_conv_forward or super().forward"
            return f"its forward computes the convolution itself (it does not call {route})"
    return ""


def _replacement(cls: type) -> type:
    """convgrad's class for layers of class ``cls``: convgrad's own for the torch.nn classes, else a subclass.

    For a user's subclass ``C`` of, say, ``nn.Conv2d`` it is ``class C(C, convgrad.torch.Conv2d)``: C's
    methods come first, then convgrad's ``_conv_forward`` in place of ``nn.Conv2d``'s.  A lazy
    class is treated the same way, and becomes convgrad's class when it materialises.
    """
    if cls in _PATCHED:
        return _PATCHED[cls]
    if cls not in _PATCHED_SUBCLASSES:
        attributes = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_convgrad_replaces": cls}
        if issubclass(cls, nn.modules.lazy.LazyModuleMixin) and cls.cls_to_become is not None:
            attributes["cls_to_become"] = _replacement(cls.cls_to_become)
        _PATCHED_SUBCLASSES[cls] = type(cls.__name__, (cls, _PATCHED[_torch_base(cls)]), attributes)
    return _PATCHED_SUBCLASSES[cls]


def _is_convgrad(module: nn.Module) -> bool:
    return isinstance(module, (_ConvMixin, _ConvTransposeMixin))


def _is_pending_lazy(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


def _plan(module: nn.Module) -> tuple[str, str]:
    """(status, reason) of one convolution layer: what patch() will do with it."""
    lazy = _is_pending_lazy(module)
    if _is_convgrad(module):
        return ("lazy" if lazy else "patched"), ""
    if lazy and (module.cls_to_become is None or _torch_base(module.cls_to_become) is None):
        return "skipped", "it is a lazy layer that does not become a torch.nn convolution"
    cls = type(module)
    reason = _why_not(cls) if cls not in _PATCHED else ""
    if not reason and not lazy and module.weight.dtype not in _SUPPORTED_DTYPES:
        reason = f"its weight is {module.weight.dtype}; convgrad computes float16, bfloat16, float32 and float64"
    if reason:
        return "skipped", reason
    return ("lazy" if lazy else "patched"), ""


def patch(model: nn.Module, backend: str | None = None, *, strict: bool = False) -> nn.Module:
    """Make every convolution layer of ``model`` run on convgrad, in place.

    Each ``nn.ConvNd`` / ``nn.ConvTransposeNd`` changes class to convgrad's subclass and keeps
    its parameters (the same ``Parameter`` objects, so an optimizer built before still works),
    buffers, hooks and ``state_dict`` keys.  Patching a patched model changes the backend.

    Which layers are patched:

    * the torch.nn classes themselves;
    * lazy layers (``nn.LazyConv2d``, ...), whose first forward already runs on convgrad and
      which then become convgrad's class instead of the torch.nn one;
    * user subclasses whose convolution is still torch.nn's: convgrad replaces
      ``nn.ConvNd._conv_forward`` (and ``nn.ConvTransposeNd.forward``), so a subclass is
      patched when it does not override ``_conv_forward`` and its ``forward`` is inherited or
      calls ``_conv_forward`` / ``super().forward`` (judged from the names its code uses).  It
      becomes ``class Sub(Sub, convgrad.torch.Conv2d)``: its own methods still run first, and
      only the convolution inside them moves to convgrad.  Such a patched model pickles only
      after :func:`unpatch` (its class is made at run time); ``state_dict`` is unaffected.

    Every other convolution layer stays on PyTorch: a subclass that overrides
    ``_conv_forward`` or computes the convolution in its own ``forward`` (convgrad cannot
    know what it computes), or weights of a dtype convgrad does not compute (complex).

    A one-line summary goes to the ``convgrad.torch`` logger (level INFO), each layer left on
    PyTorch gets a :class:`PatchWarning` with the reason, and :func:`patch_report` returns the
    details.

    Parameters
    ----------
    model : torch.nn.Module (itself a convolution, or containing some)
    backend : str, optional
        The convgrad backend for every patched layer; by default the tensors' device decides.
    strict : bool
        Raise instead of warning when some convolution layer cannot be patched; nothing is
        changed then.

    Returns
    -------
    The same ``model``.

    Raises
    ------
    ValueError
        With ``strict=True``, when a convolution layer cannot be patched; or an unknown backend.
    """
    if backend is not None and backend not in registered_backends():
        raise ValueError(f"patch: unknown backend {backend!r}; registered backends: {', '.join(registered_backends())}")
    layers = [(name, module) for name, module in model.named_modules()
              if _is_convgrad(module) or isinstance(module, tuple(_PATCHED))]
    plans = [(name, module, *_plan(module)) for name, module in layers]
    skipped = [(name, module, reason) for name, module, status, reason in plans if status == "skipped"]
    if strict and skipped:
        details = "; ".join(f"{_display(name)} ({_qualified(type(m))}): {reason}" for name, m, reason in skipped)
        raise ValueError(f"patch(strict=True): {len(skipped)} convolution layer(s) cannot run on convgrad: {details}")
    for name, module, status, reason in plans:
        if status != "skipped":
            if not _is_convgrad(module):
                module.__class__ = _replacement(type(module))
            module.backend = backend
    _REPORTS[model] = (backend, [(name, _qualified(type(m)), weakref.ref(m), reason) for name, m, _, reason in plans])
    report = patch_report(model)
    _log.info("%s", report)
    for name, module, reason in skipped:
        warnings.warn(f"convgrad.torch.patch: {_display(name)} ({_qualified(type(module))}) stays on PyTorch: {reason}",
                      PatchWarning, stacklevel=2)
    return model


def patch_report(model: nn.Module) -> PatchReport:
    """What the last :func:`patch` of ``model`` did, per convolution layer, as it stands now.

    A lazy layer that has materialised since reads ``"patched"``.

    Raises
    ------
    ValueError
        If ``model`` was not patched (or was unpatched since).
    """
    if model not in _REPORTS:
        raise ValueError("patch_report: this model was not patched by convgrad.torch.patch")
    backend, entries = _REPORTS[model]
    layers = []
    for name, layer_type, ref, reason in entries:
        module = ref()
        if reason:
            status = "skipped"
        elif module is not None and _is_pending_lazy(module):
            status = "lazy"
        else:
            status = "patched"
        layers.append(PatchedLayer(name, layer_type, status, reason))
    return PatchReport(backend, tuple(layers))


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: convgrad's convolution modules go back to their original classes, in place."""
    for module in model.modules():
        cls = type(module)
        if cls in _ORIGINAL or "_convgrad_replaces" in cls.__dict__:
            module.__class__ = _ORIGINAL.get(cls) or cls.__dict__["_convgrad_replaces"]
            module.__dict__.pop("backend", None)
    _REPORTS.pop(model, None)
    return model
