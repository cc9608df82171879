"""The curated case list every backend runs (DESIGN §6), and the arrays for a case.

Each case is chosen on purpose: odd extents, channels below and not a multiple of any
tile, kernels 1×1 to 6×5, stride 2 and 3, dilation, asymmetric padding, groups and
depthwise, batch 1, unbatched input, 1×1 output, channels-last, sliced views, 1-D and 3-D.
``small`` cases are cheap enough for the emulators (the Numba simulator, the sanitized
``cupy-host``); ``slow`` cases are for GPU runs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..problem import ConvProblem, conv_problem

DTYPES = ("float16", "bfloat16", "float32", "float64")


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a name; bfloat16 comes from ``ml_dtypes``."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class ConvCase:
    """One convolution geometry; ``batch=None`` means unbatched input."""

    ndim: int
    batch: int | None
    C: int
    K: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    channels_last: bool = False
    sliced: bool = False
    small: bool = True
    slow: bool = False
    tags: tuple[str, ...] = field(default=())

    def x_shape(self) -> tuple[int, ...]:
        inner = (*self.spatial, self.C) if self.channels_last else (self.C, *self.spatial)
        return inner if self.batch is None else (self.batch, *inner)

    def w_shape(self) -> tuple[int, ...]:
        cg = self.C // self.groups
        return (self.K, *self.kernel, cg) if self.channels_last else (self.K, cg, *self.kernel)

    def problem(self, dtype: str = "float32") -> ConvProblem:
        return conv_problem(
            f"conv{self.ndim}d", self.ndim, self.x_shape(), self.w_shape(), self.stride, self.padding,
            self.dilation, self.groups, dtype=dtype, channels_last=self.channels_last,
        )

    def y_shape(self) -> tuple[int, ...]:
        p = self.problem()
        spatial = p.output_size[3 - self.ndim:]
        inner = (*spatial, self.K) if self.channels_last else (self.K, *spatial)
        return inner if self.batch is None else (self.batch, *inner)

    def name(self, pass_: str = "fprop", dtype: str = "float32") -> str:
        suffix = "_sliced" if self.sliced else ""
        unbatched = "_unbatched" if self.batch is None else ""
        return self.problem(dtype).name(pass_) + unbatched + suffix

    def kwargs(self) -> dict[str, Any]:
        """The geometry arguments of the functional API."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "channels_last": self.channels_last}


def _c2(*args: Any, **kwargs: Any) -> ConvCase:
    return ConvCase(2, *args, **kwargs)


CASES: tuple[ConvCase, ...] = (
    _c2(2, 3, 8, (7, 9), (5, 5), stride=2, padding=1),
    _c2(2, 5, 7, (6, 6), (1, 1)),
    _c2(2, 4, 6, (7, 9), (3, 3), padding=1),
    _c2(2, 3, 5, (9, 8), (4, 4), stride=2, padding=1),
    _c2(1, 2, 3, (11, 10), (6, 5), padding=((1, 2), (0, 3))),
    _c2(2, 3, 4, (13, 11), (3, 3), stride=3, padding=2, dilation=2),
    _c2(2, 3, 2, (8, 7), (3, 2), stride=(2, 3), padding=(1, 0), dilation=(1, 2)),
    _c2(2, 6, 4, (8, 8), (3, 3), padding=1, groups=2),
    _c2(2, 4, 4, (7, 7), (3, 3), padding=1, groups=4),
    _c2(2, 3, 6, (9, 9), (3, 3), stride=2, padding=1, groups=3),
    _c2(None, 3, 4, (6, 7), (3, 3), padding=1),
    _c2(2, 3, 4, (5, 5), (5, 5)),
    _c2(2, 4, 6, (7, 9), (3, 3), stride=2, padding=1, groups=2, channels_last=True),
    _c2(1, 4, 4, (6, 6), (3, 3), padding=1, groups=4, channels_last=True),
    _c2(2, 4, 5, (7, 9), (3, 3), stride=2, padding=1, sliced=True),
    _c2(2, 4, 6, (7, 6), (3, 3), padding=(1, 2), sliced=True, channels_last=True),
    _c2(2, 12, 16, (6, 7), (3, 3), padding=1, channels_last=True, small=False),  # channels-last, above 8 channels: vector loads
    _c2(2, 3, 4, (7, 8), (3, 4), padding="same", dilation=(2, 1)),
    _c2(2, 3, 4, (7, 8), (3, 3), padding="valid"),
    # Channels-last with channel counts that are multiples of 8: the tensor-core kernels' fast
    # path (16-byte cp.async tiles); then several k-tiles per tap (40 channels), several tiles
    # along N (72), and a group whose input channels allow it and output channels do not.
    _c2(2, 16, 16, (7, 9), (3, 3), stride=2, padding=1, channels_last=True),
    _c2(1, 40, 72, (5, 6), (3, 3), padding=1, channels_last=True, small=False),
    _c2(2, 16, 24, (6, 5), (3, 3), padding=1, groups=2, channels_last=True, small=False),
    _c2(2, 17, 33, (9, 9), (3, 3), padding=1, small=False),
    _c2(2, 3, 4, (33, 34), (3, 3), stride=1, padding=1, small=False),  # over 512 outputs per image: one GEMM per image
    ConvCase(1, 2, 3, 4, (17,), (5,), stride=2, padding=2),
    ConvCase(1, 2, 4, 4, (19,), (3,), padding=((3, 1),), dilation=3, groups=2),
    ConvCase(1, None, 2, 3, (9,), (2,), stride=3, channels_last=True),
    ConvCase(3, 1, 2, 3, (5, 5, 3), (3, 3, 2), padding=1),
    ConvCase(3, 2, 4, 4, (6, 5, 4), (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), dilation=(2, 1, 1), groups=2,
             channels_last=True),
    # Depthwise in every rank and layout: a multiplier of 2 with stride, dilation and
    # asymmetric padding; channels-last, sliced; channels-last with 20 channels, a
    # multiplier of 2 and stride 2.  Output rows of 32 or more (the first, third and fourth) take the numpy
    # backend's planar loops, shorter ones its channels-last loops; the emulators skip the
    # larger ones.
    ConvCase(1, 2, 5, 10, (71,), (5,), stride=2, padding=((3, 1),), dilation=2, groups=5),
    ConvCase(1, 2, 6, 6, (17,), (3,), padding=1, groups=6, channels_last=True, sliced=True),
    ConvCase(3, 2, 4, 4, (5, 6, 36), (3, 3, 2), stride=(2, 1, 1), padding=(1, 1, 0), dilation=(1, 1, 2), groups=4,
             small=False),
    _c2(2, 3, 3, (5, 33), (3, 3), padding=1, groups=3, sliced=True, small=False),
    ConvCase(3, 1, 3, 6, (4, 5, 5), (2, 3, 3), stride=(1, 2, 2), padding=1, groups=3, channels_last=True),
    _c2(2, 20, 40, (7, 8), (3, 3), stride=2, padding=1, groups=20, channels_last=True, small=False),
    _c2(8, 64, 64, (28, 28), (3, 3), padding=1, small=False, slow=True),
    _c2(4, 128, 96, (15, 17), (3, 3), stride=2, padding=1, small=False, slow=True),
    _c2(4, 96, 96, (28, 28), (3, 3), padding=1, groups=96, small=False, slow=True),
)

#: conv_transpose cases: (ndim, batch, C_in, C_out, spatial, kernel, stride, padding, output_padding, groups, dilation)
TRANSPOSED_CASES: tuple[tuple[Any, ...], ...] = (
    (2, 2, 4, 3, (5, 5), (3, 3), 2, 1, 1, 1, 1),
    (2, 2, 4, 6, (4, 5), (4, 3), (2, 3), (1, 0), (0, 2), 2, 1),
    (2, 1, 3, 3, (5, 4), (3, 3), 1, 1, (1, 1), 3, 2),
    (1, 2, 3, 2, (7,), (4,), 3, 2, 2, 1, 1),
    (3, 1, 2, 2, (3, 4, 3), (2, 3, 2), 2, (0, 1, 0), 1, 1, 1),
)


def _values(rng: np.random.Generator, shape: tuple[int, ...], integer: bool) -> np.ndarray:
    if integer:
        return rng.integers(-2, 3, size=shape).astype(np.float64)
    return rng.standard_normal(shape)


def make_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, *, integer: bool = True,
               sliced: bool = False) -> np.ndarray:
    """Random values of ``shape`` in ``dtype``; with ``sliced``, a non-contiguous view into a larger buffer.

    Integer values in [-2, 2] make every accumulator exact, so results compare exactly.
    """
    values = _values(rng, shape, integer)
    if not sliced:
        return values.astype(numpy_dtype(dtype))
    # Every other element of a buffer twice as long in the last axis, offset by one.
    buffer = np.full((*shape[:-1], 2 * shape[-1] + 1), np.nan).astype(numpy_dtype(dtype))
    view = buffer[..., 1::2]
    view[...] = values.astype(numpy_dtype(dtype))
    return view


def poisoned(shape: tuple[int, ...], dtype: str, *, sliced: bool = False) -> np.ndarray:
    """An output buffer filled with NaN (sliced: a non-contiguous view), to prove every element is written."""
    if not sliced:
        return np.full(shape, np.nan).astype(numpy_dtype(dtype))
    buffer = np.full((*shape[:-1], 2 * shape[-1] + 1), np.nan).astype(numpy_dtype(dtype))
    return buffer[..., 1::2]
