"""The geometry of one convolution call: argument checking and normalisation.

Every public function builds one :class:`ConvProblem` before any work starts.  It is the
only thing a backend needs besides the arrays.  1-D and 2-D problems are normalised to
three spatial axes by giving the leading axes extent 1, so every backend handles one case.

Letters follow cuDNN and CUTLASS (DESIGN §1): input N, C, (D, H, W); filter K, C/G,
(T, R, S); output N, K, (Z, P, Q); G groups.  Every argument error is raised here with a
message naming the argument and the offending values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
PASSES = ("fprop", "dgrad", "wgrad")

Triple = tuple[int, int, int]
Strides5 = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class ConvProblem:
    """One convolution, normalised to three spatial axes.

    Extents are per logical axis.  ``x`` is the input (or input gradient), ``w`` the
    weight (or weight gradient), ``y`` the output (or output gradient).  The strides, set
    by ``functional`` once the arrays are known, are element strides of the logical
    5-D views ``x: (N, C, D, H, W)``, ``w: (K, C/G, T, R, S)``, ``y: (N, K, Z, P, Q)``.
    """

    op: str
    ndim: int
    N: int
    C: int
    K: int
    G: int
    input_size: Triple
    kernel_size: Triple
    output_size: Triple
    stride: Triple
    dilation: Triple
    pad_before: Triple
    pad_after: Triple
    dtype: str
    channels_last: bool = False
    batched: bool = True
    deterministic: bool = True
    allow_tf32: bool = False
    x_strides: Strides5 | None = field(default=None, compare=False)
    w_strides: Strides5 | None = field(default=None, compare=False)
    y_strides: Strides5 | None = field(default=None, compare=False)

    # Extents by their conventional letters.
    D = property(lambda self: self.input_size[0])
    H = property(lambda self: self.input_size[1])
    W = property(lambda self: self.input_size[2])
    T = property(lambda self: self.kernel_size[0])
    R = property(lambda self: self.kernel_size[1])
    S = property(lambda self: self.kernel_size[2])
    Z = property(lambda self: self.output_size[0])
    P = property(lambda self: self.output_size[1])
    Q = property(lambda self: self.output_size[2])

    @property
    def C_per_group(self) -> int:
        return self.C // self.G

    @property
    def K_per_group(self) -> int:
        return self.K // self.G

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group (``groups == C``), any channel multiplier."""
        return self.G == self.C and self.G > 1

    @property
    def is_empty(self) -> bool:
        """Nothing to compute: some extent of the GEMM is zero."""
        return self.N == 0 or self.C == 0 or self.K == 0

    def with_strides(self, x: Sequence[int], w: Sequence[int], y: Sequence[int]) -> "ConvProblem":
        return replace(self, x_strides=tuple(x), w_strides=tuple(w), y_strides=tuple(y))

    def with_options(self, **options: Any) -> "ConvProblem":
        return replace(self, **options)

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.N, self.C, *self.input_size)

    @property
    def w_shape(self) -> tuple[int, ...]:
        return (self.K, self.C_per_group, *self.kernel_size)

    @property
    def y_shape(self) -> tuple[int, ...]:
        return (self.N, self.K, *self.output_size)

    @property
    def gemm_reduction(self) -> dict[str, int]:
        """Length of the reduction (GEMM K) of each pass (DESIGN §1)."""
        taps = math.prod(self.kernel_size)
        return {
            "fprop": self.C_per_group * taps,
            "dgrad": self.K_per_group * taps,
            "wgrad": self.N * math.prod(self.output_size),
        }

    def flops(self, pass_: str = "fprop") -> int:
        """Multiply-adds times two; the same count for all three passes."""
        _check_pass(pass_)
        return 2 * self.N * self.K * math.prod(self.output_size) * self.C_per_group * math.prod(self.kernel_size)

    def bytes(self, pass_: str = "fprop") -> int:
        """Compulsory memory traffic of a pass: each operand read once, the result written once."""
        _check_pass(pass_)
        size = 2 if self.dtype in ("float16", "bfloat16") else np.dtype(self.dtype).itemsize
        x = math.prod(self.x_shape)
        w = math.prod(self.w_shape)
        y = math.prod(self.y_shape)
        return size * (x + w + y)

    def name(self, pass_: str = "fprop") -> str:
        """A name that identifies the case, e.g. ``conv2d_fprop_nchw_2x3x7x9_k8x3x5x5_s2_p1_d1_g1_float32``."""
        sp = slice(3 - self.ndim, 3)
        layout = {1: "ncw", 2: "nchw", 3: "ncdhw"}[self.ndim]
        if self.channels_last:
            layout = layout[0] + layout[2:] + "c"
        x = "x".join(map(str, (self.N, self.C, *self.input_size[sp])))
        w = "x".join(map(str, (self.K, self.C_per_group, *self.kernel_size[sp])))
        s = _compact(self.stride[sp])
        d = _compact(self.dilation[sp])
        pads = [(b, a) for b, a in zip(self.pad_before[sp], self.pad_after[sp])]
        if all(b == a for b, a in pads):
            p = _compact([b for b, _ in pads])
        else:
            p = "x".join(f"{b}-{a}" for b, a in pads)
        return f"conv{self.ndim}d_{pass_}_{layout}_{x}_k{w}_s{s}_p{p}_d{d}_g{self.G}_{self.dtype}"


def _compact(values: Sequence[int]) -> str:
    """``3`` for (3, 3), ``1x2`` for (1, 2): one number when every axis agrees."""
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")


# ----------------------------------------------------------------------------------------
# Argument normalisation


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def expand_param(op: str, arg: str, value: Any, ndim: int, minimum: int) -> tuple[int, ...]:
    """An int or a sequence of ``1`` or ``ndim`` ints, as PyTorch accepts, checked ``>= minimum``."""
    if _is_int(value):
        values = (int(value),) * ndim
    elif isinstance(value, (tuple, list)) and all(_is_int(v) for v in value) and len(value) in (1, ndim):
        values = tuple(int(v) for v in value) * (ndim if len(value) == 1 else 1)
    else:
        raise TypeError(f"{op}: {arg} must be an int or a tuple of {ndim} ints, got {value!r}")
    if any(v < minimum for v in values):
        bound = "at least 1" if minimum == 1 else "non-negative"
        raise ValueError(f"{op}: {arg} must be {bound}, got {value!r}")
    return values


def normalize_padding(
    op: str,
    padding: Any,
    ndim: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    *,
    allow_modes: bool = True,
    allow_pairs: bool = True,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Padding in any accepted form (DESIGN §3) as ``(before, after)`` per axis."""
    if isinstance(padding, str):
        if not allow_modes:
            raise ValueError(f"{op}: padding={padding!r} is not supported; give an int or a tuple of ints")
        if padding == "valid":
            return (0,) * ndim, (0,) * ndim
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions, got stride={tuple(stride)}")
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            before = tuple(t // 2 for t in total)
            return before, tuple(t - b for t, b in zip(total, before))
        raise ValueError(f"{op}: padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
    is_pairs = (
        isinstance(padding, (tuple, list))
        and len(padding) == ndim
        and len(padding) > 0
        and all(isinstance(p, (tuple, list)) for p in padding)
    )
    if is_pairs:
        if not allow_pairs:
            raise ValueError(f"{op}: padding must be an int or a tuple of {ndim} ints, got {padding!r}")
        if not all(len(p) == 2 and all(_is_int(v) for v in p) for p in padding):
            raise TypeError(f"{op}: padding pairs must be (before, after) ints, got {padding!r}")
        before = tuple(int(p[0]) for p in padding)
        after = tuple(int(p[1]) for p in padding)
        if min(before + after) < 0:
            raise ValueError(f"{op}: padding must be non-negative, got {padding!r}")
        return before, after
    values = expand_param(op, "padding", padding, ndim, 0)
    return values, values


def _pad3(values: Sequence[int], fill: int) -> Triple:
    return tuple([fill] * (3 - len(values)) + list(values))  # type: ignore[return-value]


def _spatial_and_channels(shape: Sequence[int], channels_last: bool) -> tuple[int, list[int]]:
    """(channels, spatial extents) of a batched or unbatched activation shape without N."""
    if channels_last:
        return shape[-1], list(shape[:-1])
    return shape[0], list(shape[1:])


def split_activation(op: str, arg: str, shape: Sequence[int], ndim: int, channels_last: bool) -> tuple[bool, int, int, list[int]]:
    """Split an activation shape into (batched, N, C, spatial)."""
    shape = tuple(shape)  # some device arrays' shapes refuse negative indexes
    rank = len(shape)
    if rank == ndim + 2:
        channels, spatial = _spatial_and_channels(shape[1:], channels_last)
        return True, shape[0], channels, spatial
    if rank == ndim + 1:
        channels, spatial = _spatial_and_channels(shape, channels_last)
        return False, 1, channels, spatial
    raise ValueError(
        f"{op}: {arg} must be {ndim + 1}-D (unbatched) or {ndim + 2}-D (batched), got {rank}-D shape {tuple(shape)}"
    )


def split_weight(op: str, arg: str, shape: Sequence[int], ndim: int, channels_last: bool) -> tuple[int, int, list[int]]:
    """Split a weight shape into (first axis, second axis, kernel extents).

    The logical layout is (K, C/G, *kernel); channels-last is (K, *kernel, C/G).
    """
    shape = tuple(shape)
    if len(shape) != ndim + 2:
        raise ValueError(f"{op}: {arg} must be {ndim + 2}-D, got {len(shape)}-D shape {tuple(shape)}")
    if channels_last:
        return shape[0], shape[-1], list(shape[1:-1])
    return shape[0], shape[1], list(shape[2:])


def output_extent(size: int, kernel: int, stride: int, dilation: int, before: int, after: int) -> int:
    """Output length of a convolution along one axis (may be < 1 for an invalid geometry)."""
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def check_groups(op: str, groups: Any) -> int:
    if not _is_int(groups):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"{op}: groups must be at least 1, got {groups}")
    return int(groups)


def check_dtype(op: str, **arrays: Any) -> str:
    """The common dtype name of the given arrays (None entries ignored)."""
    names = {arg: dtype_name(a.dtype) for arg, a in arrays.items() if a is not None}
    first_arg, first = next(iter(names.items()))
    for arg, name in names.items():
        if name not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {arg} has dtype {name}; supported dtypes are {', '.join(SUPPORTED_DTYPES)}")
    for arg, name in names.items():
        if name != first:
            raise TypeError(f"{op}: {arg} has dtype {name} but {first_arg} has dtype {first}; they must match")
    return first


def dtype_name(dtype: Any) -> str:
    """Canonical name of a NumPy-style dtype (``ml_dtypes.bfloat16`` is ``'bfloat16'``)."""
    return str(np.dtype(dtype)) if not hasattr(dtype, "name") else str(dtype.name)


def _geometry_message(op: str, axis: int, ndim: int, size: int, kernel: int, dilation: int, before: int, after: int) -> str:
    name = "DHW"[3 - ndim:][axis] if ndim > 1 else "W"
    return (
        f"{op}: kernel extent {dilation * (kernel - 1) + 1} (kernel_size={kernel}, dilation={dilation}) along {name} "
        f"is larger than the padded input extent {size + before + after} (input {size} + padding {before}+{after})"
    )


def make_problem(
    op: str,
    ndim: int,
    *,
    batched: bool,
    N: int,
    C: int,
    K: int,
    groups: int,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pad_before: Sequence[int],
    pad_after: Sequence[int],
    dtype: str,
    channels_last: bool,
    output_size: Sequence[int] | None = None,
    deterministic: bool = True,
    allow_tf32: bool = False,
) -> ConvProblem:
    """Check the geometry and build the problem; ``output_size`` defaults to the conv formula."""
    computed = [
        output_extent(*args) for args in zip(input_size, kernel_size, stride, dilation, pad_before, pad_after)
    ]
    for axis, extent in enumerate(computed):
        if extent < 1:
            raise ValueError(
                _geometry_message(op, axis, ndim, input_size[axis], kernel_size[axis], dilation[axis], pad_before[axis], pad_after[axis])
            )
    if output_size is None:
        output_size = computed
    return ConvProblem(
        op=op,
        ndim=ndim,
        N=int(N),
        C=int(C),
        K=int(K),
        G=int(groups),
        input_size=_pad3(input_size, 1),
        kernel_size=_pad3(kernel_size, 1),
        output_size=_pad3(output_size, 1),
        stride=_pad3(stride, 1),
        dilation=_pad3(dilation, 1),
        pad_before=_pad3(pad_before, 0),
        pad_after=_pad3(pad_after, 0),
        dtype=dtype,
        channels_last=bool(channels_last),
        batched=batched,
        deterministic=deterministic,
        allow_tf32=allow_tf32,
    )


def check_channels(op: str, C: int, K: int, w_channels: int, groups: int, *, weight_arg: str = "weight") -> None:
    """Channels must match the weight times groups, and groups must divide both."""
    if C % groups:
        raise ValueError(f"{op}: groups={groups} does not divide the {C} input channels")
    if K % groups:
        raise ValueError(f"{op}: groups={groups} does not divide the {K} output channels ({weight_arg}.shape[0]={K})")
    if C != w_channels * groups:
        raise ValueError(
            f"{op}: input has {C} channels but {weight_arg} expects {w_channels * groups} "
            f"({weight_arg}.shape[1]={w_channels} \u00d7 groups={groups})"
        )


def _other_layout_hint(op: str, ndim: int, x_shape: Sequence[int], w_shape: Sequence[int], groups: int,
                       channels_last: bool, *, transposed: bool = False) -> str:
    """A clause for a channel mismatch that disappears in the other layout (NCHW read as NHWC or back)."""
    other = not channels_last
    try:
        _, _, C, _ = split_activation(op, "input", x_shape, ndim, other)
        K, w_channels, _ = split_weight(op, "weight", w_shape, ndim, other)
    except ValueError:
        return ""
    if transposed:
        matches = C == K and C % groups == 0
    else:
        matches = C == w_channels * groups and C % groups == 0 and K % groups == 0
    if not matches:
        return ""
    layout = "channels-last" if other else "channels-first"
    return f"; read as {layout} arrays (channels_last={other}) the shapes match"


def _check_channels_or_hint(op: str, check: Any, ndim: int, x_shape: Sequence[int], w_shape: Sequence[int],
                            groups: int, channels_last: bool, *, transposed: bool = False) -> None:
    """Run the channel check ``check()``; a failure that the other layout would fix says so."""
    try:
        check()
    except ValueError as error:
        hint = _other_layout_hint(op, ndim, x_shape, w_shape, groups, channels_last, transposed=transposed)
        if not hint:
            raise
        raise ValueError(f"{error}{hint}") from None


def conv_problem(
    op: str,
    ndim: int,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: Any,
    *,
    dtype: str,
    channels_last: bool = False,
    y_shape: Sequence[int] | None = None,
    x_arg: str = "input",
    w_arg: str = "weight",
    y_arg: str = "grad_output",
    **options: Any,
) -> ConvProblem:
    """The problem of a (non-transposed) convolution with input ``x_shape`` and weight ``w_shape``.

    With ``y_shape`` given (the gradient passes), its extents must be those the
    convolution produces.
    """
    groups = check_groups(op, groups)
    batched, N, C, spatial = split_activation(op, x_arg, x_shape, ndim, channels_last)
    K, w_channels, kernel = split_weight(op, w_arg, w_shape, ndim, channels_last)
    _check_channels_or_hint(op, lambda: check_channels(op, C, K, w_channels, groups, weight_arg=w_arg), ndim,
                            x_shape, w_shape, groups, channels_last)
    stride_ = expand_param(op, "stride", stride, ndim, 1)
    dilation_ = expand_param(op, "dilation", dilation, ndim, 1)
    before, after = normalize_padding(op, padding, ndim, kernel, stride_, dilation_)
    problem = make_problem(
        op, ndim, batched=batched, N=N, C=C, K=K, groups=groups, input_size=spatial, kernel_size=kernel,
        stride=stride_, dilation=dilation_, pad_before=before, pad_after=after, dtype=dtype,
        channels_last=channels_last, **options,
    )
    if y_shape is not None:
        y_batched, yN, yK, y_spatial = split_activation(op, y_arg, y_shape, ndim, channels_last)
        expected = _activation_shape(batched, N, K, list(problem.output_size[3 - ndim:]), channels_last)
        if y_batched != batched or (yN, yK, list(y_spatial)) != (N, K, list(problem.output_size[3 - ndim:])):
            raise ValueError(
                f"{op}: {y_arg} has shape {tuple(y_shape)} but {x_arg} of shape {tuple(x_shape)} and {w_arg} of shape "
                f"{tuple(w_shape)} give an output of shape {tuple(expected)}"
            )
    return problem


def transposed_problem(
    op: str,
    ndim: int,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    stride: Any,
    padding: Any,
    output_padding: Any,
    groups: Any,
    dilation: Any,
    *,
    dtype: str,
    channels_last: bool = False,
    **options: Any,
) -> ConvProblem:
    """The problem of ``conv_transpose{ndim}d``, stated as the convolution it is the input gradient of.

    The transposed convolution's input plays the convolution's output ``y`` (K channels),
    its output plays the convolution's input ``x`` (C channels), and its weight
    ``(C_in, C_out/G, *kernel)`` is exactly the convolution's ``(K, C/G, *kernel)``.
    """
    groups = check_groups(op, groups)
    batched, N, K, y_spatial = split_activation(op, "input", x_shape, ndim, channels_last)
    wK, c_per_group, kernel = split_weight(op, "weight", w_shape, ndim, channels_last)
    def check() -> None:
        if K % groups:
            raise ValueError(f"{op}: groups={groups} does not divide the {K} input channels")
        if K != wK:
            raise ValueError(f"{op}: input has {K} channels but weight expects {wK} (weight.shape[0]={wK})")

    _check_channels_or_hint(op, check, ndim, x_shape, w_shape, groups, channels_last, transposed=True)
    stride_ = expand_param(op, "stride", stride, ndim, 1)
    dilation_ = expand_param(op, "dilation", dilation, ndim, 1)
    before, after = normalize_padding(op, padding, ndim, kernel, stride_, dilation_, allow_modes=False, allow_pairs=False)
    out_pad = expand_param(op, "output_padding", output_padding, ndim, 0)
    for op_i, s, d in zip(out_pad, stride_, dilation_):
        if op_i >= max(s, d):
            raise ValueError(
                f"{op}: output_padding must be smaller than either stride or dilation, got "
                f"output_padding={tuple(out_pad)}, stride={tuple(stride_)}, dilation={tuple(dilation_)}"
            )
    out_spatial = [
        (p - 1) * s - b - a + d * (k - 1) + o + 1
        for p, s, b, a, d, k, o in zip(y_spatial, stride_, before, after, dilation_, kernel, out_pad)
    ]
    if min(out_spatial) < 1:
        raise ValueError(f"{op}: the output would have non-positive extents {tuple(out_spatial)}; reduce padding")
    problem = make_problem(
        op, ndim, batched=batched, N=N, C=c_per_group * groups, K=K, groups=groups, input_size=out_spatial,
        kernel_size=kernel, stride=stride_, dilation=dilation_, pad_before=before, pad_after=after, dtype=dtype,
        channels_last=channels_last, output_size=y_spatial, **options,
    )
    return problem


def check_input_size(op: str, arg: str, size: Any, ndim: int) -> tuple[int, ...]:
    """A shape given as a sequence of non-negative ints (``input_size`` / ``weight_size``)."""
    if not isinstance(size, (tuple, list)) and not hasattr(size, "__len__"):
        raise TypeError(f"{op}: {arg} must be a tuple of ints, got {size!r}")
    values = tuple(size)
    if not all(_is_int(v) for v in values):
        raise TypeError(f"{op}: {arg} must be a tuple of ints, got {size!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"{op}: {arg} must have non-negative extents, got {tuple(values)}")
    return tuple(int(v) for v in values)


def _activation_shape(batched: bool, N: int, C: int, spatial: Sequence[int], channels_last: bool) -> tuple[int, ...]:
    inner = (*spatial, C) if channels_last else (C, *spatial)
    return (N, *inner) if batched else inner


def x_user_shape(problem: ConvProblem) -> tuple[int, ...]:
    """Shape of the input (or input gradient) in the caller's layout."""
    return _activation_shape(problem.batched, problem.N, problem.C, problem.input_size[3 - problem.ndim:], problem.channels_last)


def y_user_shape(problem: ConvProblem) -> tuple[int, ...]:
    """Shape of the output (or output gradient) in the caller's layout."""
    return _activation_shape(problem.batched, problem.N, problem.K, problem.output_size[3 - problem.ndim:], problem.channels_last)


def w_user_shape(problem: ConvProblem) -> tuple[int, ...]:
    """Shape of the weight (or weight gradient) in the caller's layout."""
    kernel = problem.kernel_size[3 - problem.ndim:]
    if problem.channels_last:
        return (problem.K, *kernel, problem.C_per_group)
    return (problem.K, problem.C_per_group, *kernel)
