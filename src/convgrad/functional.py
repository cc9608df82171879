"""The public API: PyTorch's convolution functions on NumPy, CuPy and Numba arrays.

Each function checks its arguments and builds a :class:`~convgrad.problem.ConvProblem`
before any work starts, picks a backend (DESIGN §4), allocates ``out`` (or checks the one
given) and runs one of the three passes:

====================================  =====  =====================================
function                              pass   computes
====================================  =====  =====================================
``conv{1,2,3}d``                      fprop  y = conv(x, w) + b
``conv{1,2,3}d_input``                dgrad  dx = full conv of dy with flipped w
``conv{1,2,3}d_weight``               wgrad  dw = x correlated with dy
``conv_transpose{1,2,3}d``            dgrad  the input gradient, used as a layer
``conv_bias_grad``                    -      db = sum of dy over batch and space
====================================  =====  =====================================
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from . import arrays, backends, options
from .backends.base import Backend
from .problem import (
    ConvProblem,
    check_dtype,
    check_input_size,
    conv_problem,
    dtype_name,
    transposed_problem,
    w_user_shape,
    x_user_shape,
    y_user_shape,
)

_ACCUMULATE = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32, "float64": np.float64}


# ----------------------------------------------------------------------------------------
# Backend selection and execution


def select_backend(op: str, backend: str | Backend | None, kind: str, problem: ConvProblem | None) -> Backend:
    """The backend for a call (DESIGN §4): named, else ``CONVGRAD_BACKEND``, else by array kind."""
    env_name = os.environ.get("CONVGRAD_BACKEND") or None
    named = backend is not None or env_name is not None
    if isinstance(backend, Backend):
        chosen = backend
    elif backend is not None or env_name is not None:
        chosen = backends.get(backend if backend is not None else env_name)  # type: ignore[arg-type]
    elif kind == "numpy":
        chosen = backends.get("numpy")
    elif kind == "cupy":
        cupy_backend = backends.get("cupy") if "cupy" in backends.registered() else None
        chosen = cupy_backend if cupy_backend is not None and cupy_backend.available() else backends.get("numba")
    else:
        chosen = backends.get("numba")
    if not chosen.available():
        raise RuntimeError(f"{op}: backend {chosen.name!r} is not available on this machine")
    if kind not in chosen.array_kinds and not (kind == "numpy" and chosen.stages_numpy and named):
        if kind == "numpy":
            raise TypeError(f"{op}: backend {chosen.name!r} computes on {'/'.join(chosen.array_kinds)} arrays; name it explicitly to copy NumPy arrays to the device")
        raise TypeError(f"{op}: backend {chosen.name!r} takes {'/'.join(chosen.array_kinds)} arrays, got {kind} arrays")
    if problem is not None:
        reason = chosen.unsupported(problem)
        if reason:
            raise ValueError(f"{op}: backend {chosen.name!r} cannot run this problem: {reason}")
    return chosen


def _check_out(op: str, out: Any, kind: str, shape: tuple[int, ...], dtype: Any, inputs: dict[str, Any]) -> None:
    out_kind = arrays.array_kind(out, op, "out")
    if out_kind != kind:
        raise TypeError(f"{op}: out is a {out_kind} array but the inputs are {kind} arrays")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: out has shape {tuple(out.shape)} but the result has shape {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{op}: out has dtype {out.dtype} but the result has dtype {np.dtype(dtype)}")
    if arrays.has_internal_overlap(out):
        raise ValueError(f"{op}: out has overlapping elements (strides {out.strides}); give a writable array")
    if kind == "numpy" and not out.flags.writeable:
        raise ValueError(f"{op}: out is read-only; give a writable array")
    for arg, value in inputs.items():
        if value is not None and arrays.may_overlap(kind, out, value):
            raise ValueError(f"{op}: out overlaps {arg}; give a separate output array")


def _element_type(op: str, declared: Any, **arrays_: Any) -> str:
    """The dtype of a call: the arrays' own, or ``declared`` (``dtype=``) for bfloat16 carried as bits.

    ``dtype="bfloat16"`` accepts bfloat16 arrays and 16-bit integer arrays holding bfloat16 bit
    patterns (how CuPy arrays carry bfloat16; CuPy has no bfloat16 dtype); any other declared
    dtype must be the arrays' own.
    """
    if declared is None:
        for arg, a in arrays_.items():
            if a is not None and dtype_name(a.dtype) in arrays.BFLOAT16_CARRIERS[1:]:
                raise TypeError(f"{op}: {arg} has dtype {dtype_name(a.dtype)}; for bfloat16 given as its bits, "
                                "pass dtype='bfloat16'")
        return check_dtype(op, **arrays_)
    name = declared if isinstance(declared, str) else dtype_name(declared)
    if name != "bfloat16":
        found = check_dtype(op, **arrays_)
        if found != name:
            raise TypeError(f"{op}: dtype={name!r} but the arrays hold {found}; dtype= declares the element type "
                            "only for bfloat16 given as its bits (uint16 or int16 arrays)")
        return found
    names = {arg: dtype_name(a.dtype) for arg, a in arrays_.items() if a is not None}
    for arg, found in names.items():
        if found not in arrays.BFLOAT16_CARRIERS:
            raise TypeError(f"{op}: dtype='bfloat16' takes bfloat16 arrays or uint16/int16 arrays holding bfloat16 "
                            f"bit patterns; {arg} has dtype {found}")
    first_arg, first = next(iter(names.items()))
    for arg, found in names.items():
        if found != first:
            raise TypeError(f"{op}: {arg} has dtype {found} but {first_arg} has dtype {first}; they must match")
    return "bfloat16"


def _bfloat16_view(array: Any) -> Any:
    """A NumPy array of bfloat16 bits viewed as ``ml_dtypes.bfloat16`` (same memory), for the CPU code."""
    import ml_dtypes

    return None if array is None else array.view(ml_dtypes.bfloat16)


def _options(deterministic: bool | None, allow_tf32: bool | None) -> dict[str, bool]:
    return {
        "deterministic": bool(options.get("deterministic", deterministic)),
        "allow_tf32": bool(options.get("allow_tf32", allow_tf32)),
    }


def _run(
    op: str,
    pass_: str,
    problem: ConvProblem,
    kind: str,
    backend: str | Backend | None,
    inputs: dict[str, Any],
    bias: Any,
    out: Any,
    arg_names: dict[str, str],
) -> Any:
    """Allocate or check ``out``, stage if needed, and run ``pass_``.

    ``inputs`` maps roles to arrays: fprop ``{"x", "w"}``, dgrad ``{"y", "w"}``,
    wgrad ``{"x", "y"}``; the result has the remaining role.  ``arg_names`` maps roles
    to the caller's argument names, for messages.
    """
    out_role = {"fprop": "y", "dgrad": "x", "wgrad": "w"}[pass_]
    out_shape = {"x": x_user_shape, "y": y_user_shape, "w": w_user_shape}[out_role](problem)
    like = next(iter(inputs.values()))
    dtype = like.dtype
    if kind == "numpy" and problem.dtype == "bfloat16" and dtype_name(dtype) != "bfloat16":
        # bfloat16 bits in NumPy arrays: compute on ml_dtypes.bfloat16 views, return the bits.
        viewed = {role: _bfloat16_view(a) for role, a in inputs.items()}
        result = _run(op, pass_, problem, kind, backend, viewed, _bfloat16_view(bias), _bfloat16_view(out), arg_names)
        return out if out is not None else result.view(dtype)
    chosen = select_backend(op, backend, kind, problem)
    if out is not None:
        named_inputs = {arg_names[role]: a for role, a in inputs.items()}
        _check_out(op, out, kind, out_shape, dtype, {**named_inputs, "bias": bias})
    else:
        out = arrays.empty(kind, out_shape, dtype, like)
    if problem.is_empty or int(np.prod(out_shape)) == 0:
        _fill_empty(kind, out, out_role, bias, problem, chosen)
        return out

    staged = kind not in chosen.array_kinds
    if staged:
        inputs = {role: chosen.to_device(a) for role, a in inputs.items()}
        bias_run = chosen.to_device(bias) if bias is not None else None
        out_run = chosen.to_device(out)
        run_kind = arrays.array_kind(out_run)
    else:
        bias_run, out_run, run_kind = bias, out, kind

    views = {role: arrays.logical_view(a, run_kind, role, problem) for role, a in inputs.items()}
    views[out_role] = arrays.logical_view(out_run, run_kind, out_role, problem)
    problem = problem.with_strides(
        x=arrays.element_strides(views["x"]),
        w=arrays.element_strides(views["w"]),
        y=arrays.element_strides(views["y"]),
    )
    # A 16-bit result that overflows is Inf, as in the reference; NumPy's cast would also
    # warn from inside the backend, which tells the caller nothing the result does not.
    with np.errstate(over="ignore", invalid="ignore"):
        if pass_ == "fprop":
            chosen.forward(views["x"], views["w"], bias_run, problem, views["y"])
        elif pass_ == "dgrad":
            chosen.grad_input(views["y"], views["w"], problem, views["x"])
            if bias_run is not None:
                chosen.add_bias(views["x"], bias_run, problem)
        else:
            chosen.grad_weight(views["x"], views["y"], problem, views["w"])

    if staged:
        out[...] = chosen.to_host(out_run)
    return out


def _fill_empty(kind: str, out: Any, out_role: str, bias: Any, problem: ConvProblem, backend: Backend) -> None:
    """Results of problems with a zero extent: zeros, plus the bias where there are outputs (as PyTorch)."""
    if out.size == 0:
        return
    arrays.fill(kind, out, 0)
    if bias is not None:
        backend.add_bias(arrays.logical_view(out, kind, out_role, problem), bias, problem)


def _check_bias(op: str, bias: Any, channels: int) -> None:
    if bias is not None and (len(bias.shape) != 1 or bias.shape[0] != channels):
        raise ValueError(f"{op}: bias must have shape ({channels},), got {tuple(bias.shape)}")


# ----------------------------------------------------------------------------------------
# The generic implementations behind the per-dimension functions.


def _conv(op: str, ndim: int, input: Any, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any, groups: Any,
          channels_last: bool, backend: Any, out: Any, deterministic: Any, allow_tf32: Any,
          declared: Any = None) -> Any:
    kind = arrays.check_same_library(op, input=input, weight=weight, bias=bias)
    dtype = _element_type(op, declared, input=input, weight=weight, bias=bias)
    problem = conv_problem(op, ndim, input.shape, weight.shape, stride, padding, dilation, groups, dtype=dtype,
                           channels_last=channels_last, **_options(deterministic, allow_tf32))
    _check_bias(op, bias, problem.K)
    return _run(op, "fprop", problem, kind, backend, {"x": input, "w": weight}, bias, out,
                {"x": "input", "w": "weight"})


def _conv_input(op: str, ndim: int, input_size: Any, weight: Any, grad_output: Any, stride: Any, padding: Any,
                dilation: Any, groups: Any, channels_last: bool, backend: Any, out: Any, deterministic: Any,
                allow_tf32: Any, declared: Any = None) -> Any:
    kind = arrays.check_same_library(op, weight=weight, grad_output=grad_output)
    dtype = _element_type(op, declared, weight=weight, grad_output=grad_output)
    size = check_input_size(op, "input_size", input_size, ndim)
    problem = conv_problem(op, ndim, size, weight.shape, stride, padding, dilation, groups, dtype=dtype,
                           channels_last=channels_last, y_shape=grad_output.shape, x_arg="input_size",
                           **_options(deterministic, allow_tf32))
    return _run(op, "dgrad", problem, kind, backend, {"y": grad_output, "w": weight}, None, out,
                {"y": "grad_output", "w": "weight"})


def _conv_weight(op: str, ndim: int, input: Any, weight_size: Any, grad_output: Any, stride: Any, padding: Any,
                 dilation: Any, groups: Any, channels_last: bool, backend: Any, out: Any, deterministic: Any,
                 allow_tf32: Any, declared: Any = None) -> Any:
    kind = arrays.check_same_library(op, input=input, grad_output=grad_output)
    dtype = _element_type(op, declared, input=input, grad_output=grad_output)
    size = check_input_size(op, "weight_size", weight_size, ndim)
    problem = conv_problem(op, ndim, input.shape, size, stride, padding, dilation, groups, dtype=dtype,
                           channels_last=channels_last, y_shape=grad_output.shape, w_arg="weight_size",
                           **_options(deterministic, allow_tf32))
    return _run(op, "wgrad", problem, kind, backend, {"x": input, "y": grad_output}, None, out,
                {"x": "input", "y": "grad_output"})


def _conv_transpose(op: str, ndim: int, input: Any, weight: Any, bias: Any, stride: Any, padding: Any,
                    output_padding: Any, groups: Any, dilation: Any, channels_last: bool, backend: Any, out: Any,
                    deterministic: Any, allow_tf32: Any, declared: Any = None) -> Any:
    kind = arrays.check_same_library(op, input=input, weight=weight, bias=bias)
    dtype = _element_type(op, declared, input=input, weight=weight, bias=bias)
    problem = transposed_problem(op, ndim, input.shape, weight.shape, stride, padding, output_padding, groups,
                                 dilation, dtype=dtype, channels_last=channels_last,
                                 **_options(deterministic, allow_tf32))
    _check_bias(op, bias, problem.C)
    return _run(op, "dgrad", problem, kind, backend, {"y": input, "w": weight}, bias, out,
                {"y": "input", "w": "weight"})


def conv_bias_grad(grad_output: Any, *, channels_last: bool = False, backend: str | Backend | None = None,
                   dtype: str | None = None) -> Any:
    """Gradient of the bias: ``grad_output`` summed over the batch and every spatial axis.

    Parameters
    ----------
    grad_output : array, (N, K, *spatial), or (N, *spatial, K) with ``channels_last=True``
    channels_last : bool
    backend : str or Backend, optional
    dtype : str, optional
        ``"bfloat16"`` when ``grad_output`` is a uint16/int16 array of bfloat16 bit patterns.

    Returns
    -------
    array, (K,)
        In ``grad_output``'s dtype, summed in float32 for 16-bit types and float64 for float64.
    """
    op = "conv_bias_grad"
    kind = arrays.check_same_library(op, grad_output=grad_output)
    dtype = _element_type(op, dtype, grad_output=grad_output)
    if len(grad_output.shape) < 2:
        raise ValueError(f"{op}: grad_output must be batched, (N, K, *spatial), got shape {tuple(grad_output.shape)}")
    channel_axis = len(grad_output.shape) - 1 if channels_last else 1
    chosen = select_backend(op, backend, kind, None)
    if dtype == "bfloat16" and kind == "numpy" and dtype_name(grad_output.dtype) != "bfloat16":
        return chosen.grad_bias(_bfloat16_view(grad_output), channel_axis, np.float32).view(grad_output.dtype)
    if dtype == "bfloat16" and kind != "numpy":
        # Device arrays carry bfloat16 as bits, which no array library sums: widen to float32
        # (a temporary twice the size of grad_output), sum, round once.
        xp = arrays.array_module(kind, op)
        summed = chosen.grad_bias(arrays.bfloat16_to_float32(xp, grad_output), channel_axis, np.float32)
        return arrays.float32_to_bfloat16_bits(xp, summed).view(grad_output.dtype)
    return chosen.grad_bias(grad_output, channel_axis, _ACCUMULATE[dtype])


# ----------------------------------------------------------------------------------------
# The per-dimension public functions, with PyTorch's argument names, order and defaults.

_SHAPES = {
    1: ("(N, C, W)", "(C_out, C/groups, kW)", "(N, K, Q)"),
    2: ("(N, C, H, W)", "(C_out, C/groups, kH, kW)", "(N, K, P, Q)"),
    3: ("(N, C, D, H, W)", "(C_out, C/groups, kD, kH, kW)", "(N, K, Z, P, Q)"),
}

_OPTIONS_DOC = """
    channels_last : bool, keyword-only
        Every array of the call is channels-last: activations (N, *spatial, C), weights
        (K, *kernel, C/groups); results come back the same way.
    backend : str or Backend, optional, keyword-only
        ``"numpy"``, ``"cupy"``, ``"numba"``, ... ; default: ``CONVGRAD_BACKEND``, else by
        where the arrays live.
    out : array, optional, keyword-only
        Where to write the result (checked for shape and dtype; must not overlap an input).
    deterministic, allow_tf32 : bool, optional, keyword-only
        Numerics options; default from ``convgrad.config`` / environment (True, False).
    dtype : str, optional, keyword-only
        ``"bfloat16"`` declares uint16/int16 arrays to hold bfloat16 bit patterns (CuPy has no
        bfloat16 dtype); the result then comes back as bits in the same integer dtype.  By
        default the arrays' own dtype.
"""


def _make_conv(ndim: int) -> Any:
    def conv(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
             groups: int = 1, *, channels_last: bool = False, backend: str | Backend | None = None, out: Any = None,
             deterministic: bool | None = None, allow_tf32: bool | None = None, dtype: str | None = None) -> Any:
        return _conv(f"conv{ndim}d", ndim, input, weight, bias, stride, padding, dilation, groups, channels_last,
                     backend, out, deterministic, allow_tf32, dtype)

    x, w, y = _SHAPES[ndim]
    conv.__name__ = conv.__qualname__ = f"conv{ndim}d"
    conv.__doc__ = f"""{ndim}-D convolution (cross-correlation), as ``torch.nn.functional.conv{ndim}d``.

    Parameters
    ----------
    input : array, {x} or unbatched without N
    weight : array, {w}
    bias : array, (C_out,), optional
    stride, dilation : int or tuple of {ndim} ints
    padding : int, tuple of {ndim} ints, tuple of {ndim} (before, after) pairs, 'same' or 'valid'
    groups : int
{_OPTIONS_DOC}
    Returns
    -------
    array, {y}
        In the input's dtype and array library.
    """
    return conv


def _make_conv_input(ndim: int) -> Any:
    def conv_input(input_size: Sequence[int], weight: Any, grad_output: Any, stride: Any = 1, padding: Any = 0,
                   dilation: Any = 1, groups: int = 1, *, channels_last: bool = False,
                   backend: str | Backend | None = None, out: Any = None, deterministic: bool | None = None,
                   allow_tf32: bool | None = None, dtype: str | None = None) -> Any:
        return _conv_input(f"conv{ndim}d_input", ndim, input_size, weight, grad_output, stride, padding, dilation,
                           groups, channels_last, backend, out, deterministic, allow_tf32, dtype)

    x, w, y = _SHAPES[ndim]
    conv_input.__name__ = conv_input.__qualname__ = f"conv{ndim}d_input"
    conv_input.__doc__ = f"""Gradient of conv{ndim}d with respect to its input, as ``torch.nn.grad.conv{ndim}d_input``.

    The full convolution of ``grad_output`` with the kernel flipped in every spatial axis
    (channels transposed within each group; with stride, ``grad_output`` dilated by it).

    Parameters
    ----------
    input_size : tuple of ints
        The input's shape, {x} (or unbatched); must produce ``grad_output``'s extents.
    weight : array, {w}
    grad_output : array, {y}
    stride, padding, dilation, groups
        As for ``conv{ndim}d``.
{_OPTIONS_DOC}
    Returns
    -------
    array of shape ``input_size``
    """
    return conv_input


def _make_conv_weight(ndim: int) -> Any:
    def conv_weight(input: Any, weight_size: Sequence[int], grad_output: Any, stride: Any = 1, padding: Any = 0,
                    dilation: Any = 1, groups: int = 1, *, channels_last: bool = False,
                    backend: str | Backend | None = None, out: Any = None, deterministic: bool | None = None,
                    allow_tf32: bool | None = None, dtype: str | None = None) -> Any:
        return _conv_weight(f"conv{ndim}d_weight", ndim, input, weight_size, grad_output, stride, padding, dilation,
                            groups, channels_last, backend, out, deterministic, allow_tf32, dtype)

    x, w, y = _SHAPES[ndim]
    conv_weight.__name__ = conv_weight.__qualname__ = f"conv{ndim}d_weight"
    conv_weight.__doc__ = f"""Gradient of conv{ndim}d with respect to its weight, as ``torch.nn.grad.conv{ndim}d_weight``.

    The input cross-correlated with ``grad_output``, summed over the batch.

    Parameters
    ----------
    input : array, {x}
    weight_size : tuple of ints, {w}
    grad_output : array, {y}
    stride, padding, dilation, groups
        As for ``conv{ndim}d``.
{_OPTIONS_DOC}
    Returns
    -------
    array of shape ``weight_size``
    """
    return conv_weight


def _make_conv_transpose(ndim: int) -> Any:
    def conv_transpose(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                       output_padding: Any = 0, groups: int = 1, dilation: Any = 1, *, channels_last: bool = False,
                       backend: str | Backend | None = None, out: Any = None, deterministic: bool | None = None,
                       allow_tf32: bool | None = None, dtype: str | None = None) -> Any:
        return _conv_transpose(f"conv_transpose{ndim}d", ndim, input, weight, bias, stride, padding, output_padding,
                               groups, dilation, channels_last, backend, out, deterministic, allow_tf32, dtype)

    x, _, y = _SHAPES[ndim]
    kernel = _SHAPES[ndim][1].split(", ", 2)[2]
    conv_transpose.__name__ = conv_transpose.__qualname__ = f"conv_transpose{ndim}d"
    conv_transpose.__doc__ = f"""{ndim}-D transposed convolution, as ``torch.nn.functional.conv_transpose{ndim}d``.

    The input gradient of a convolution, used as a layer.

    Parameters
    ----------
    input : array, (N, C_in, *spatial) or unbatched
    weight : array, (C_in, C_out/groups, {kernel}
    bias : array, (C_out,), optional
    stride, padding, output_padding, dilation : int or tuple of {ndim} ints
    groups : int
{_OPTIONS_DOC}
    Returns
    -------
    array, (N, C_out, *spatial_out)
        spatial_out = (in - 1)·stride - 2·padding + dilation·(kernel - 1) + output_padding + 1.
    """
    return conv_transpose


conv1d, conv2d, conv3d = (_make_conv(n) for n in (1, 2, 3))
conv1d_input, conv2d_input, conv3d_input = (_make_conv_input(n) for n in (1, 2, 3))
conv1d_weight, conv2d_weight, conv3d_weight = (_make_conv_weight(n) for n in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (_make_conv_transpose(n) for n in (1, 2, 3))
