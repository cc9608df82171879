"""One layer's data at one batch size, and the calls that run a pass of it on convgrad or PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..problem import ConvProblem, y_user_shape
from .arrays import random_array
from .suites import Layer


@dataclass
class Case:
    """The host data of one layer at one batch size, shared by every backend of a device."""

    suite: str
    layer: Layer
    batch: int
    dtype: str
    channels_last: bool
    allow_tf32: bool
    x: np.ndarray
    w: np.ndarray
    dy: np.ndarray

    @property
    def problem(self) -> ConvProblem:
        return self.layer.problem(self.batch, self.dtype, self.channels_last, self.allow_tf32)


def make_case(suite: str, layer: Layer, batch: int, dtype: str, channels_last: bool, allow_tf32: bool,
              seed: int) -> Case:
    rng = np.random.default_rng(seed)
    x_shape, w_shape = layer.shapes(batch, channels_last)
    problem = layer.problem(batch, dtype, channels_last)
    return Case(suite, layer, batch, dtype, channels_last, allow_tf32, random_array(rng, x_shape, dtype),
                random_array(rng, w_shape, dtype), random_array(rng, y_user_shape(problem), dtype))


def convgrad_call(case: Case, pass_: str, backend: str, arrays: dict[str, Any]) -> Callable[[], Any]:
    import convgrad

    layer, n = case.layer, case.layer.ndim
    common = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  channels_last=case.channels_last, backend=backend, allow_tf32=case.allow_tf32, dtype=case.dtype)
    x, w, dy = arrays["x"], arrays["w"], arrays["dy"]
    if pass_ == "fprop":
        conv = getattr(convgrad, f"conv{n}d")
        return lambda: conv(x, w, None, **common)
    if pass_ == "dgrad":
        conv_input = getattr(convgrad, f"conv{n}d_input")
        x_shape = tuple(case.x.shape)
        return lambda: conv_input(x_shape, w, dy, **common)
    conv_weight = getattr(convgrad, f"conv{n}d_weight")
    w_shape = tuple(case.w.shape)
    return lambda: conv_weight(x, w_shape, dy, **common)


def torch_call(case: Case, pass_: str, tensors: dict[str, Any]) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    layer, n = case.layer, case.layer.ndim
    stride, padding, dilation = [layer.stride] * n, [layer.padding] * n, [layer.dilation] * n
    x, w, dy = tensors["x"], tensors["w"], tensors["dy"]
    if pass_ == "fprop":
        conv = getattr(F, f"conv{n}d")
        return lambda: conv(x, w, None, stride, padding, dilation, layer.groups)
    mask = [pass_ == "dgrad", pass_ == "wgrad", False]
    index = 0 if pass_ == "dgrad" else 1
    backward = torch.ops.aten.convolution_backward
    return lambda: backward(dy, x, w, None, stride, padding, dilation, False, [0] * n, layer.groups, mask)[index]
