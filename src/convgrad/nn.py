"""Layers with a ``forward`` and a ``backward``, on NumPy or CuPy arrays: a CNN trained by hand.

Each layer's ``forward(x)`` keeps what its backward will need; ``backward(grad_output)``
takes the gradient of the loss with respect to the layer's output and returns the gradient
with respect to its input, after adding the gradients of its parameters into ``.grad``.
A convolution's backward is the three passes of convgrad, one line each:

=======  ===========================================  ======================================
pass     line                                         what it answers
=======  ===========================================  ======================================
dgrad    ``conv2d_input(x.shape, w, grad_output)``    how the loss changes with each input
wgrad    ``conv2d_weight(x, w.shape, grad_output)``   ... with each weight
bias     ``conv_bias_grad(grad_output)``              ... with each bias
=======  ===========================================  ======================================

The layers work on whatever array library the data comes in (NumPy on the CPU, CuPy on a
GPU); ``to("cuda")`` moves a layer's parameters.  Initialisation follows PyTorch's, so
the same seed-free recipe gives layers of the same scale as ``torch.nn``.

Example
-------
>>> model = Sequential(Conv2d(1, 8, 3, padding=1), ReLU(), Flatten(), Linear(8 * 8 * 8, 10))
>>> loss_fn, optimizer = SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.05, momentum=0.9)
>>> loss = loss_fn(model(images), labels)
>>> model.backward(loss_fn.backward())
>>> optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Iterable, Sequence

import numpy as np

from . import functional
from .problem import expand_param

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Flatten",
    "Layer",
    "Linear",
    "Parameter",
    "ReLU",
    "SGD",
    "Sequential",
    "SoftmaxCrossEntropy",
    "array_module",
    "transposed_as_conv",
]


def array_module(array: Any) -> Any:
    """``cupy`` for a CuPy array, ``numpy`` otherwise (CuPy is imported only when it is in use)."""
    if (type(array).__module__ or "").startswith("cupy"):
        import cupy

        return cupy
    return np


def _move(array: Any, device: str) -> Any:
    if device == "cpu":
        return array if isinstance(array, np.ndarray) else array.get()
    if device == "cuda":
        import cupy

        return cupy.asarray(array)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


class Parameter:
    """A trainable array (``data``) and the gradient of the loss with respect to it (``grad``)."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.grad: Any = None

    def accumulate(self, grad: Any) -> None:
        """Add ``grad`` into ``.grad``, as PyTorch does: gradients sum until ``zero_grad``."""
        self.grad = grad if self.grad is None else self.grad + grad

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class Layer(ABC):
    """Base class: ``forward``, ``backward``, ``parameters`` and ``to``."""

    @abstractmethod
    def forward(self, x: Any) -> Any:
        """The layer's output; keeps what ``backward`` needs."""

    @abstractmethod
    def backward(self, grad_output: Any) -> Any:
        """The gradient with respect to the input; fills the parameters' ``.grad``."""

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def parameters(self) -> list[Parameter]:
        return [value for value in vars(self).values() if isinstance(value, Parameter)]

    def to(self, device: str) -> "Layer":
        """Move the parameters to ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy), in place."""
        for parameter in self.parameters():
            parameter.data = _move(parameter.data, device)
            parameter.grad = None if parameter.grad is None else _move(parameter.grad, device)
        return self


def _uniform(rng: np.random.Generator, bound: float, shape: Sequence[int], dtype: Any) -> np.ndarray:
    return rng.uniform(-bound, bound, size=tuple(shape)).astype(dtype)


def _unbatched(x: Any, ndim: int) -> bool:
    return len(x.shape) == ndim + 1


# ----------------------------------------------------------------------------------------
# Convolutions


class _ConvNd(Layer):
    """Shared by Conv1d/2d/3d: ``y = conv(x, w) + b`` and its three backward passes."""

    ndim = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, *, dtype: Any = np.float32,
                 rng: np.random.Generator | None = None, backend: str | None = None) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        rng = rng if rng is not None else np.random.default_rng()
        self.kernel_size = expand_param(type(self).__name__, "kernel_size", kernel_size, self.ndim, 1)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.backend = backend
        # PyTorch's default: uniform in +-1/sqrt(fan_in) for the weight and the bias.
        fan_in = in_channels // groups * math.prod(self.kernel_size)
        bound = 1 / math.sqrt(fan_in)
        self.weight = Parameter(_uniform(rng, bound, (out_channels, in_channels // groups, *self.kernel_size), dtype))
        self.bias = Parameter(_uniform(rng, bound, (out_channels,), dtype)) if bias else None
        self.input: Any = None

    def _geometry(self) -> tuple[Any, Any, Any, int]:
        return self.stride, self.padding, self.dilation, self.groups

    def forward(self, x: Any) -> Any:
        """fprop: ``y = conv(x, w) + b``; keeps ``x`` for the weight gradient."""
        self.input = x
        fprop = getattr(functional, f"conv{self.ndim}d")
        bias = None if self.bias is None else self.bias.data
        return fprop(x, self.weight.data, bias, *self._geometry(), backend=self.backend)

    def backward(self, grad_output: Any) -> Any:
        """The three passes: weight and bias gradients into ``.grad``; returns the input gradient."""
        x, w = self.input, self.weight.data
        wgrad = getattr(functional, f"conv{self.ndim}d_weight")
        dgrad = getattr(functional, f"conv{self.ndim}d_input")
        # wgrad: the input correlated with grad_output, summed over the batch.
        self.weight.accumulate(wgrad(x, w.shape, grad_output, *self._geometry(), backend=self.backend))
        # bias: grad_output summed over the batch and every spatial position.
        if self.bias is not None:
            batched = grad_output[None] if _unbatched(grad_output, self.ndim) else grad_output
            self.bias.accumulate(functional.conv_bias_grad(batched, backend=self.backend))
        # dgrad: grad_output convolved with the flipped kernel, handed to the layer below.
        return dgrad(x.shape, w, grad_output, *self._geometry(), backend=self.backend)

    def __repr__(self) -> str:
        out_channels, in_per_group = self.weight.data.shape[:2]
        return (f"{type(self).__name__}({in_per_group * self.groups}, {out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups})")


class Conv1d(_ConvNd):
    """1-D convolution on (N, C, W) arrays; weight (C_out, C_in/groups, kW)."""

    ndim = 1


class Conv2d(_ConvNd):
    """2-D convolution on (N, C, H, W) arrays; weight (C_out, C_in/groups, kH, kW)."""

    ndim = 2


class Conv3d(_ConvNd):
    """3-D convolution on (N, C, D, H, W) arrays; weight (C_out, C_in/groups, kD, kH, kW)."""

    ndim = 3


def transposed_as_conv(padding: Any, output_padding: Any, ndim: int) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """The convolution a transposed convolution is the input gradient of: its padding, and a crop.

    ``conv_transpose(x, w)`` with padding ``p`` and output_padding ``o`` is the input
    gradient of ``conv(·, w)`` padded ``p`` before and ``p - o`` after.  When ``p - o`` is
    negative, the last ``o - p`` outputs of the transposed convolution depend on neither
    ``x`` nor ``w`` (only the bias reaches them): crop them away and pad 0 instead.

    Returns
    -------
    pairs : tuple of ``(before, after)`` per spatial axis
    crop : tuple of ints, how many trailing positions to drop per spatial axis
    """
    p = expand_param("conv_transpose", "padding", padding, ndim, 0)
    o = expand_param("conv_transpose", "output_padding", output_padding, ndim, 0)
    pairs = tuple((pi, max(pi - oi, 0)) for pi, oi in zip(p, o))
    crop = tuple(max(oi - pi, 0) for pi, oi in zip(p, o))
    return pairs, crop


def _cropped(array: Any, crop: Sequence[int]) -> Any:
    if not any(crop):
        return array
    ndim = len(crop)
    index = tuple(slice(0, n - c) for n, c in zip(array.shape[-ndim:], crop))
    return array[(Ellipsis, *index)]


class _ConvTransposeNd(Layer):
    """Shared by ConvTranspose1d/2d/3d: the input gradient of a convolution, used as a layer."""

    ndim = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 output_padding: Any = 0, groups: int = 1, bias: bool = True, dilation: Any = 1, *,
                 dtype: Any = np.float32, rng: np.random.Generator | None = None, backend: str | None = None) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        rng = rng if rng is not None else np.random.default_rng()
        self.kernel_size = expand_param(type(self).__name__, "kernel_size", kernel_size, self.ndim, 1)
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dilation, self.groups, self.backend = dilation, groups, backend
        # PyTorch computes fan_in from the weight's second axis: C_out/groups taps per kernel position.
        fan_in = out_channels // groups * math.prod(self.kernel_size)
        bound = 1 / math.sqrt(fan_in)
        self.weight = Parameter(_uniform(rng, bound, (in_channels, out_channels // groups, *self.kernel_size), dtype))
        self.bias = Parameter(_uniform(rng, bound, (out_channels,), dtype)) if bias else None
        self.input: Any = None

    def forward(self, x: Any) -> Any:
        """dgrad used as a layer: ``y = conv_transpose(x, w) + b``; keeps ``x`` for the weight gradient."""
        self.input = x
        layer = getattr(functional, f"conv_transpose{self.ndim}d")
        bias = None if self.bias is None else self.bias.data
        return layer(x, self.weight.data, bias, self.stride, self.padding, self.output_padding, self.groups,
                     self.dilation, backend=self.backend)

    def backward(self, grad_output: Any) -> Any:
        """The convolution's passes with the roles of input and output swapped.

        The forward is the dgrad of ``conv(·, w)``, so its input gradient is that
        convolution's fprop, and its weight gradient is that convolution's wgrad with
        ``grad_output`` in the input's place and ``x`` in the output gradient's place.
        """
        x, w = self.input, self.weight.data
        pairs, crop = transposed_as_conv(self.padding, self.output_padding, self.ndim)
        g = _cropped(grad_output, crop)
        geometry = (self.stride, pairs, self.dilation, self.groups)
        fprop = getattr(functional, f"conv{self.ndim}d")
        wgrad = getattr(functional, f"conv{self.ndim}d_weight")
        # wgrad (of the underlying convolution): grad_output plays its input, x its output gradient.
        self.weight.accumulate(wgrad(g, w.shape, x, *geometry, backend=self.backend))
        # bias: grad_output summed over the batch and every spatial position (cropped ones too).
        if self.bias is not None:
            batched = grad_output[None] if _unbatched(grad_output, self.ndim) else grad_output
            self.bias.accumulate(functional.conv_bias_grad(batched, backend=self.backend))
        # fprop (of the underlying convolution) is this layer's input gradient.
        return fprop(g, w, None, *geometry, backend=self.backend)


class ConvTranspose1d(_ConvTransposeNd):
    """1-D transposed convolution; weight (C_in, C_out/groups, kW)."""

    ndim = 1


class ConvTranspose2d(_ConvTransposeNd):
    """2-D transposed convolution; weight (C_in, C_out/groups, kH, kW)."""

    ndim = 2


class ConvTranspose3d(_ConvTransposeNd):
    """3-D transposed convolution; weight (C_in, C_out/groups, kD, kH, kW)."""

    ndim = 3


# ----------------------------------------------------------------------------------------
# What a small CNN needs around its convolutions


class ReLU(Layer):
    """``max(x, 0)``; its backward lets the gradient through where the input was positive."""

    def forward(self, x: Any) -> Any:
        self.mask = x > 0
        return x * self.mask

    def backward(self, grad_output: Any) -> Any:
        return grad_output * self.mask


class Flatten(Layer):
    """(N, *rest) -> (N, prod(rest)); its backward restores the shape."""

    def forward(self, x: Any) -> Any:
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_output: Any) -> Any:
        return grad_output.reshape(self.shape)


class Linear(Layer):
    """``y = x @ W.T + b`` with W (out_features, in_features), initialised as ``torch.nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype: Any = np.float32,
                 rng: np.random.Generator | None = None) -> None:
        rng = rng if rng is not None else np.random.default_rng()
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(_uniform(rng, bound, (out_features, in_features), dtype))
        self.bias = Parameter(_uniform(rng, bound, (out_features,), dtype)) if bias else None

    def forward(self, x: Any) -> Any:
        self.input = x
        y = x @ self.weight.data.T
        return y if self.bias is None else y + self.bias.data

    def backward(self, grad_output: Any) -> Any:
        # A fully connected layer is a 1x1 convolution on a 1x1 image: the same three passes.
        self.weight.accumulate(grad_output.T @ self.input)       # wgrad
        if self.bias is not None:
            self.bias.accumulate(grad_output.sum(axis=0))        # bias
        return grad_output @ self.weight.data                     # dgrad


class Sequential(Layer):
    """Layers applied in order; ``backward`` visits them in reverse."""

    def __init__(self, *layers: Layer) -> None:
        self.layers = list(layers)

    def forward(self, x: Any) -> Any:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad_output: Any) -> Any:
        for layer in reversed(self.layers):
            grad_output = layer.backward(grad_output)
        return grad_output

    def parameters(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def to(self, device: str) -> "Sequential":
        for layer in self.layers:
            layer.to(device)
        return self

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels.

    ``forward(logits, labels)`` returns the loss as a float; ``backward()`` returns its
    gradient with respect to the logits, ``(softmax(logits) - onehot(labels)) / N``.
    """

    def __call__(self, logits: Any, labels: Any) -> float:
        return self.forward(logits, labels)

    def forward(self, logits: Any, labels: Any) -> float:
        xp = array_module(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_z = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        log_probs = shifted - log_z
        self.probs = xp.exp(log_probs)
        self.labels = labels
        rows = xp.arange(logits.shape[0])
        return float(-log_probs[rows, labels].mean())

    def backward(self) -> Any:
        xp = array_module(self.probs)
        grad = self.probs.copy()
        grad[xp.arange(grad.shape[0]), self.labels] -= 1
        return grad / grad.shape[0]


class SGD:
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    ``buf = momentum * buf + grad`` (``buf = grad`` on the first step), then
    ``data -= lr * buf``; ``weight_decay`` adds ``weight_decay * data`` to ``grad`` first.
    """

    def __init__(self, parameters: Iterable[Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.parameters = list(parameters)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: dict[int, Any] = {}

    def step(self) -> None:
        for i, p in enumerate(self.parameters):
            if p.grad is None:
                continue
            grad = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.momentum:
                buf = self.buffers.get(i)
                buf = grad.copy() if buf is None else buf * self.momentum + grad
                self.buffers[i] = buf
                grad = buf
            p.data -= (self.lr * grad).astype(p.data.dtype, copy=False)

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None
