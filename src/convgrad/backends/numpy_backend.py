"""The ``numpy`` backend: im2col + BLAS GEMM on the CPU, chunked under a workspace cap.

Per group, every pass is one GEMM over the index set of DESIGN §1 with the batch folded
into the GEMM's long axis, so small spatial extents still give BLAS big matrices:

    fprop:  Y  (K/G, n·Z·P·Q) = Wm (K/G, C/G·T·R·S) @ col (C/G·T·R·S, n·Z·P·Q)
    dgrad:  dcol              = Wm.T @ dY, then col2im: add each tap's rows back in place
            (with stride 1, instead the forward pass of dy with the flipped kernel)
    wgrad:  dWm               = dY @ col.T

``col`` is im2col of the input, built by compiled loops (``cpu_im2col``) that write zeros
where a tap falls in the padding; dgrad's col2im is the same loops' adjoint.  Python loops
run only over chunks, groups and kernel taps, never over output pixels.  Chunking keeps the
temporaries (``col``, the GEMM result) under the workspace cap (``CONVGRAD_WORKSPACE_MB``,
default 256 MiB): first over the batch, and when one image's full im2col would not fit,
over kernel taps as well, down to one tap at a time (shift-GEMM).  Large chunks of GEMMs with
short reductions (a network's stem) run side by side on the CPU's cores, each with one-thread
BLAS (``cpu_workers``, see ``_planned``); the compiled loops release the GIL, so their copies
overlap too.  Depthwise convolutions skip the GEMM:
Numba-compiled direct loops (``cpu_kernels``) compute them in the caller's layout.

16-bit inputs are widened to float32 while building ``col`` and the result is rounded
once on store; float64 stays float64.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from dataclasses import replace
from typing import Any, Callable, Iterator

import numpy as np

from .. import options
from ..problem import ConvProblem
from . import cpu_im2col, cpu_workers
from .base import Backend


def _accumulator(problem: ConvProblem) -> type:
    return np.float64 if problem.dtype == "float64" else np.float32


def _workspace_bytes() -> int:
    return int(options.get("workspace_mb")) * 2**20


# Temporaries are sized for the last-level cache, not the cap: im2col written and read
# back while still cached runs about twice as fast as one huge buffer.  The cap bounds it.
_CHUNK_TARGET_BYTES = 16 * 2**20
# With this many output positions per image, one GEMM per image is already large enough
# for BLAS, and it reads and writes NCHW images in place instead of transposing the batch
# into the GEMM's columns and back.
_PER_IMAGE_MIN_COLUMNS = 512


# Every GEMM of this backend goes through _matmul, so that a caller which owns the cores can
# run them on its own thread pool (see gemms_through).  Inside PyTorch, NumPy's OpenBLAS
# workers busy-wait for about 0.1 s after each call and take the cores from PyTorch's next
# operators; convgrad.torch routes the GEMMs to torch.matmul instead.
_gemm_route = threading.local()
Matmul = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


def _matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.matmul(a, b, out=out)``, or the matmul routed to for the calling thread."""
    route = getattr(_gemm_route, "matmul", None)
    if route is None:
        return np.matmul(a, b, out=out)
    return route(a, b, out)


@contextlib.contextmanager
def gemms_through(matmul: Matmul | None) -> Iterator[None]:
    """Run this thread's GEMMs through ``matmul(a, b, out)`` (``np.matmul``'s meaning) inside the block.

    ``None`` means NumPy's own.  ``out`` is None or a C-contiguous array of the result's shape
    and dtype; the function returns the result (``out`` when given).
    """
    previous = getattr(_gemm_route, "matmul", None)
    _gemm_route.matmul = matmul
    try:
        yield
    finally:
        _gemm_route.matmul = previous


class _Plan:
    """Batch and tap chunking for one problem: temporaries stay under the workspace cap.

    ``workers`` chunks run at once (``cpu_workers``), each with its own temporaries, so each
    gets its share of the cap, and the batch is cut into at least ``workers`` chunks.
    """

    def __init__(self, problem: ConvProblem, out_channels: int, in_channels: int | None = None, *,
                 workers: int = 1) -> None:
        self.problem = problem
        self.itemsize = np.dtype(_accumulator(problem)).itemsize
        self.taps = list(itertools.product(*(range(k) for k in problem.kernel_size)))
        spatial_out = math.prod(problem.output_size)
        padded = math.prod(n + b + a for n, b, a in zip(problem.input_size, problem.pad_before, problem.pad_after))
        cg = problem.C_per_group if in_channels is None else in_channels
        cap = _workspace_bytes() // max(1, workers)
        # Bytes one image needs: its input (counted at its padded size: an upper bound for the
        # widened copy of 16-bit inputs), one tap's rows of col, and the GEMM result.
        per_image_fixed = self.itemsize * (cg * padded + out_channels * spatial_out)
        per_image_tap = self.itemsize * cg * spatial_out
        full_image = per_image_fixed + per_image_tap * len(self.taps)
        self.per_image = spatial_out >= _PER_IMAGE_MIN_COLUMNS
        if full_image <= cap:
            by_size = min(cap, _CHUNK_TARGET_BYTES) // full_image
            self.batch = max(1, min(problem.N, by_size, -(-problem.N // max(1, workers))))
            self.tap_chunk = len(self.taps)
        else:
            # Tap by tap, each further group of taps also needs a GEMM result of its own.
            fixed = per_image_fixed + self.itemsize * out_channels * spatial_out
            self.batch = 1
            self.tap_chunk = max(1, min(len(self.taps), (cap - fixed) // max(per_image_tap, 1)))

    def batches(self) -> Iterator[slice]:
        for start in range(0, self.problem.N, self.batch):
            yield slice(start, min(start + self.batch, self.problem.N))

    def chunks(self) -> list[tuple[int, slice]]:
        """Every (group, batch slice) pair, groups outermost: the independent pieces of a call."""
        return [(g, batch) for g in range(self.problem.G) for batch in self.batches()]

    def tap_groups(self) -> Iterator[list[tuple[int, int, int]]]:
        for start in range(0, len(self.taps), self.tap_chunk):
            yield self.taps[start:start + self.tap_chunk]


# Chunks run side by side only where that was measured to pay on two cores: GEMMs with a
# short reduction (few input channels times taps, as in a network's stem), where OpenBLAS
# splits one GEMM poorly between its threads (the 7x7/2 stem from 3 channels at 224x224,
# batch 8: 1.25 to 1.7 times faster side by side).  With long reductions the threaded GEMM
# is as fast or faster (a 3x3 layer of 32 channels at 56x56: 1.1 to 1.6 times slower side by
# side), and below about 64M multiply-adds per chunk handing chunks to threads costs more than
# it saves.
_SIDE_BY_SIDE_MAX_ROWS = 256
_SIDE_BY_SIDE_MIN_MACS = 64 * 2**20


def _planned(problem: ConvProblem, out_channels: int, in_channels: int | None = None) -> tuple[_Plan, int]:
    """The chunking for ``problem`` and how many threads run its chunks side by side."""
    cg = problem.C_per_group if in_channels is None else in_channels
    rows = cg * math.prod(problem.kernel_size)
    threads = cpu_workers.thread_count() if rows <= _SIDE_BY_SIDE_MAX_ROWS else 1
    if threads > 1:
        plan = _Plan(problem, out_channels, in_channels, workers=threads)
        macs = out_channels * rows * plan.batch * math.prod(problem.output_size)
        if macs >= _SIDE_BY_SIDE_MIN_MACS and len(plan.chunks()) > 1:
            return plan, threads
    return _Plan(problem, out_channels, in_channels), 1


def _run_chunks(work: Callable[[list[tuple[int, slice]]], Any], plan: _Plan, threads: int) -> list[Any]:
    """``work(pieces)`` for blocks of ``plan.chunks()`` side by side; each block's result, in block order.

    ``work`` processes its (group, batch) pieces in the order given.  Side by side, every GEMM
    runs on NumPy's BLAS held to one thread, on the thread of its block (a routed matmul,
    see gemms_through, would put a second thread pool beside these threads).
    """
    chunks = plan.chunks()

    def block(indices: range) -> Any:
        with contextlib.nullcontext() if len(indices) == len(chunks) else gemms_through(None):
            return work([chunks[i] for i in indices])

    return cpu_workers.run_blocks(block, len(chunks), threads)


def _each(chunk: Callable[[tuple[int, slice]], None]) -> Callable[[list[tuple[int, slice]]], None]:
    def work(pieces: list[tuple[int, slice]]) -> None:
        for piece in pieces:
            chunk(piece)
    return work


def _add_by_group(totals: dict[int, np.ndarray], parts: Iterator[tuple[int, np.ndarray]]) -> dict[int, np.ndarray]:
    """Add each (group, array) part into ``totals[group]`` in the order given (the first part is taken as it is)."""
    for g, part in parts:
        if g in totals:
            totals[g] += part
        else:
            totals[g] = part
    return totals


def _tap_array(taps: list[tuple[int, int, int]]) -> np.ndarray:
    """Taps as the compiled loops take them: (L, 3) int64, one (t, r, s) per row."""
    return np.array(taps, np.int64).reshape(-1, 3)


# Temporaries up to this size are kept per thread and reused by the next call.  Freshly
# allocated large buffers come from mmap, and their first touch page-faults page by page:
# that alone made the same layer up to 40% slower depending on allocation history.
_SCRATCH_KEEP_BYTES = 64 * 2**20
_scratch_buffers = threading.local()


def _scratch(role: str, shape: tuple[int, ...], dtype: Any, *, zero: bool = False) -> np.ndarray:
    """An uninitialised (or zeroed) temporary for ``role``, valid until the next request for that role."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > _SCRATCH_KEEP_BYTES:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    buffers = _scratch_buffers.__dict__
    buffer = buffers.get(role)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = buffers[role] = np.empty(max(nbytes, 1), np.uint8)
    array = buffer[:nbytes].view(dtype).reshape(shape)
    if zero:
        array.fill(0)
    return array


def _columns(x: np.ndarray, problem: ConvProblem, taps: list[tuple[int, int, int]], *,
             per_image: bool = False) -> np.ndarray:
    """im2col of the (unpadded) input chunk ``x`` (n, c, D, H, W) for ``taps``, by the compiled loops.

    Batch folded into the columns: (c·len(taps), n·Z·P·Q); ``per_image``: one matrix per
    image, (n, c·len(taps), Z·P·Q).  Rows ordered (c, tap).  16-bit inputs are widened to
    float32 first.  An unpadded 1×1 convolution per image is a view of the input, no copy.
    """
    acc = _accumulator(problem)
    n, c = x.shape[:2]
    spatial = math.prod(problem.output_size)
    if per_image and _is_pointwise(problem) and x.dtype == acc and x.flags.c_contiguous:
        return x.reshape(n, c, spatial)
    if x.dtype != acc:
        widened = _scratch("widened", x.shape, acc)
        np.copyto(widened, x)
        x = widened
    rows = c * len(taps)
    col = _scratch("col", (n, rows, *problem.output_size) if per_image else (rows, n, *problem.output_size), acc)
    cpu_im2col.im2col(x, col, _tap_array(taps), not per_image, problem.stride, problem.dilation,
                      problem.pad_before)
    return col.reshape(n, rows, spatial) if per_image else col.reshape(rows, n * spatial)


def _weight_matrix(w: np.ndarray, taps: list[tuple[int, int, int]], problem: ConvProblem) -> np.ndarray:
    """Wm (K/G, C/G·len(taps)) in the accumulator dtype, columns ordered (c, tap) like col's rows."""
    acc = _accumulator(problem)
    if len(taps) == math.prod(problem.kernel_size):
        return np.ascontiguousarray(w, dtype=acc).reshape(w.shape[0], -1)
    picked = np.stack([w[(slice(None), slice(None), *tap)] for tap in taps], axis=2)
    return np.ascontiguousarray(picked, dtype=acc).reshape(w.shape[0], -1)


def _batch_last(a: np.ndarray, acc: type) -> np.ndarray:
    """(n, k, Z, P, Q) -> (k, n·Z·P·Q) in ``acc``: the GEMM layout of an output (gradient)."""
    n, k = a.shape[:2]
    moved = _scratch("dy", (k, n, *a.shape[2:]), acc)
    np.copyto(moved, a.transpose(1, 0, 2, 3, 4), casting="unsafe")
    return moved.reshape(k, -1)


def _store_batch_first(dst: np.ndarray, src: np.ndarray) -> None:
    """Write a (k, n·Z·P·Q) GEMM result into ``dst`` (n, k, Z, P, Q), rounding once."""
    n, k = dst.shape[:2]
    src = src.reshape(k, n, *dst.shape[2:]).transpose(1, 0, 2, 3, 4)
    np.copyto(dst, src, casting="unsafe")


def _is_pointwise(problem: ConvProblem) -> bool:
    """A 1×1 convolution with stride 1 and no padding: a plain matrix product per image."""
    return (problem.kernel_size == (1, 1, 1) and problem.stride == (1, 1, 1) and not any(problem.pad_before)
            and not any(problem.pad_after) and problem.input_size == problem.output_size)


def _full_convolution(problem: ConvProblem) -> ConvProblem | None:
    """dgrad of a stride-1 problem restated as a forward convolution, or None.

    With stride 1, dx[h] = sum over r of dy[h + pb - r·d] · w[r]: a convolution of dy,
    padded by d·(R-1) - pb before and H - P + pb after, with the kernel flipped.  It is
    None when that padding would be negative (padding wider than the kernel's reach).
    """
    if any(s != 1 for s in problem.stride):
        return None
    before = tuple(d * (k - 1) - b for d, k, b in zip(problem.dilation, problem.kernel_size, problem.pad_before))
    after = tuple(h - p + b for h, p, b in zip(problem.input_size, problem.output_size, problem.pad_before))
    if min(before + after) < 0:
        return None
    return replace(problem, C=problem.K, K=problem.C, input_size=problem.output_size, output_size=problem.input_size,
                   pad_before=before, pad_after=after, x_strides=None, w_strides=None, y_strides=None)


def _flipped_transposed(w: np.ndarray, problem: ConvProblem) -> np.ndarray:
    """(K, C/G, T, R, S) -> (C, K/G, T, R, S) in the accumulator dtype: channels transposed within each group, taps flipped."""
    G, Kg, Cg = problem.G, problem.K_per_group, problem.C_per_group
    grouped = np.asarray(w, dtype=_accumulator(problem)).reshape(G, Kg, Cg, -1)
    return cpu_im2col.flip_transpose(grouped).reshape(problem.C, Kg, *problem.kernel_size)


class NumpyBackend(Backend):
    """im2col + BLAS on the CPU; always available."""

    name = "numpy"
    array_kinds = ("numpy",)

    def available(self) -> bool:
        return True

    # -- fprop ---------------------------------------------------------------------------
    def forward(self, x: np.ndarray, w: np.ndarray, bias: Any, problem: ConvProblem, out: np.ndarray) -> None:
        acc = _accumulator(problem)
        bias_acc = None if bias is None else np.asarray(bias, dtype=acc)
        if problem.is_depthwise:
            self._depthwise_forward(x, w, bias_acc, problem, out)
            return
        Cg, Kg = problem.C_per_group, problem.K_per_group
        plan, threads = _planned(problem, Kg)

        def chunk(piece: tuple[int, slice]) -> None:
            g, batch = piece
            cs, ks = slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)
            y = None
            for taps in plan.tap_groups():
                # per_image: (K/G, rows) @ (n, rows, Z·P·Q) -> (n, K/G, Z·P·Q), one GEMM per image.
                col = _columns(x[batch, cs], problem, taps, per_image=plan.per_image)
                wm = _weight_matrix(w[ks], taps, problem)
                if y is None:
                    shape = (col.shape[0], Kg, col.shape[2]) if plan.per_image else (Kg, col.shape[1])
                    y = _matmul(wm, col, out=_scratch("gemm", shape, acc))
                else:
                    y += _matmul(wm, col)
            if bias_acc is not None:
                y += bias_acc[ks, None]
            if plan.per_image:
                np.copyto(out[batch, ks], y.reshape(out[batch, ks].shape), casting="unsafe")
            else:
                _store_batch_first(out[batch, ks], y)

        _run_chunks(_each(chunk), plan, threads)

    # -- dgrad ---------------------------------------------------------------------------
    def grad_input(self, dy: np.ndarray, w: np.ndarray, problem: ConvProblem, out: np.ndarray) -> None:
        acc = _accumulator(problem)
        if problem.is_depthwise:
            self._depthwise_grad_input(dy, w, problem, out)
            return
        if _is_pointwise(problem):
            self._pointwise_grad_input(dy, w, problem, out)
            return
        full = _full_convolution(problem)
        if full is not None and np.isfinite(np.asarray(w, dtype=acc)).all():
            # Stride 1: dx is the forward convolution of dy with the flipped, transposed kernel.
            # Its zero border would meet a non-finite weight (0 · Inf is NaN) at outputs the
            # reference never pairs with it; the scatter below pairs only real positions, so
            # a weight that is not all finite (small, cheap to test) takes that path instead.
            self.forward(dy, _flipped_transposed(w, problem), None, full, out)
            return
        Cg, Kg = problem.C_per_group, problem.K_per_group
        plan, threads = _planned(problem, Kg)

        def chunk(piece: tuple[int, slice]) -> None:
            g, batch = piece
            cs, ks = slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)
            dY = _batch_last(dy[batch, ks], acc)
            nb = dY.shape[1] // math.prod(problem.output_size)
            target = out[batch, cs]
            dx = target if target.dtype == acc else _scratch("dx", target.shape, acc)
            for index, taps in enumerate(plan.tap_groups()):
                dcol = _matmul(_weight_matrix(w[ks], taps, problem).T, dY)
                # col2im: each tap's rows go back to the input positions that tap read; a later
                # group of taps (shift-GEMM) is scattered apart and added.
                into = dx if index == 0 else _scratch("dx_taps", dx.shape, acc)
                cpu_im2col.col2im(dcol.reshape(Cg * len(taps), nb, *problem.output_size), into, _tap_array(taps),
                                  True, problem.stride, problem.dilation, problem.pad_before)
                if index:
                    dx += into
            if dx is not target:
                np.copyto(target, dx, casting="unsafe")

        _run_chunks(_each(chunk), plan, threads)

    def _pointwise_grad_input(self, dy: np.ndarray, w: np.ndarray, problem: ConvProblem, out: np.ndarray) -> None:
        """dx[n] (C/G, H·W) = Wm.T (C/G, K/G) @ dy[n] (K/G, H·W): no im2col, no flip, no transposes."""
        acc = _accumulator(problem)
        Cg, Kg = problem.C_per_group, problem.K_per_group
        plan, threads = _planned(problem, Kg)

        def chunk(piece: tuple[int, slice]) -> None:
            g, batch = piece
            cs, ks = slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)
            wt = np.asarray(w[ks], dtype=acc).reshape(Kg, Cg).T
            dyb = np.asarray(dy[batch, ks], dtype=acc)
            dx = _matmul(wt, dyb.reshape(dyb.shape[0], Kg, -1))
            np.copyto(out[batch, cs], dx.reshape(out[batch, cs].shape), casting="unsafe")

        _run_chunks(_each(chunk), plan, threads)

    # -- wgrad ---------------------------------------------------------------------------
    def grad_weight(self, x: np.ndarray, dy: np.ndarray, problem: ConvProblem, out: np.ndarray) -> None:
        acc = _accumulator(problem)
        if problem.is_depthwise:
            self._depthwise_grad_weight(x, dy, problem, out)
            return
        Cg, Kg = problem.C_per_group, problem.K_per_group
        plan, threads = _planned(problem, Kg)
        taps_all = plan.taps

        def chunk(piece: tuple[int, slice]) -> tuple[int, np.ndarray]:
            g, batch = piece
            cs, ks = slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)
            dw = np.empty((Kg, Cg, len(taps_all)), dtype=acc)
            nb = batch.stop - batch.start
            if plan.per_image:
                # (n, K/G, Z·P·Q) @ (n, Z·P·Q, rows), summed over the images.
                dY = np.ascontiguousarray(dy[batch, ks], dtype=acc).reshape(nb, Kg, -1)
            else:
                dY = _batch_last(dy[batch, ks], acc)
            start = 0
            for taps in plan.tap_groups():
                col = _columns(x[batch, cs], problem, taps, per_image=plan.per_image)
                if plan.per_image:
                    part = _matmul(dY, col.transpose(0, 2, 1)).sum(axis=0)
                else:
                    part = _matmul(dY, col.T)
                dw[:, :, start:start + len(taps)] = part.reshape(Kg, Cg, len(taps))
                start += len(taps)
            return g, dw

        def summed(pieces: list[tuple[int, slice]]) -> dict[int, np.ndarray]:
            return _add_by_group({}, (chunk(piece) for piece in pieces))

        # Each block sums its chunks in batch order, then the blocks are added in order: a
        # fixed summation order for a given thread count.
        totals: dict[int, np.ndarray] = {}
        for sums in _run_chunks(summed, plan, threads):
            _add_by_group(totals, iter(sums.items()))
        for g, dw in totals.items():
            ks = slice(g * Kg, (g + 1) * Kg)
            np.copyto(out[ks], dw.reshape(Kg, Cg, *problem.kernel_size), casting="unsafe")

    # -- depthwise: compiled direct loops (cpu_kernels), chunked over the batch ------------
    def _depthwise_forward(self, x, w, bias, problem, out) -> None:
        from . import cpu_kernels

        acc = _accumulator(problem)
        bias_acc = np.zeros(problem.K, acc) if bias is None else np.ascontiguousarray(bias, dtype=acc)
        wt = _depthwise_weight(w, acc)
        order = _DepthwiseOrder(problem)
        for batch in order.batches(x, out):
            y = order.output(out[batch])
            cpu_kernels.depthwise_forward(order.operand(x[batch], "x"), wt, bias_acc, y, problem.stride,
                                          problem.dilation, problem.pad_before, order.channels_last)
            order.store(out[batch], y)

    def _depthwise_grad_input(self, dy, w, problem, out) -> None:
        from . import cpu_kernels

        acc = _accumulator(problem)
        wt = _depthwise_weight(w, acc)
        order = _DepthwiseOrder(problem)
        for batch in order.batches(dy, out):
            dx = order.output(out[batch])
            cpu_kernels.depthwise_grad_input(order.operand(dy[batch], "dy"), wt, dx, problem.stride,
                                             problem.dilation, problem.pad_before, order.channels_last)
            order.store(out[batch], dx)

    def _depthwise_grad_weight(self, x, dy, problem, out) -> None:
        from . import cpu_kernels

        acc = _accumulator(problem)
        total = np.zeros((problem.K, math.prod(problem.kernel_size)), acc)
        order = _DepthwiseOrder(problem)
        for batch in order.batches(x, dy):
            cpu_kernels.depthwise_grad_weight(order.operand(x[batch], "x"), order.operand(dy[batch], "dy"), total,
                                              problem.kernel_size, problem.stride, problem.dilation,
                                              problem.pad_before, order.channels_last)
        np.copyto(out, total.reshape(problem.K, 1, *problem.kernel_size), casting="unsafe")


def _depthwise_weight(w: np.ndarray, acc: type) -> np.ndarray:
    """(K, 1, T, R, S) -> (T, R, S, K) contiguous in ``acc``: a tap's weights for every channel side by side."""
    return np.ascontiguousarray(w[:, 0].transpose(1, 2, 3, 0), dtype=acc)


# Planar (NCDHW) depthwise loops run along output rows; below this many outputs per row the
# loop overhead per row and tap dominates, and copying to channels-last order (where the
# loops run along the channels instead) and back is faster, copies included.
_PLANAR_MIN_ROW = 32


class _DepthwiseOrder:
    """Which element order the depthwise kernels run in, and the copies that puts the arrays in it.

    Channels-last callers' arrays go to the channels-last kernels as they are.  Planar arrays
    go to the planar kernels, unless the output rows are short; then they are copied into
    channels-last order.  16-bit arrays are widened to float32 in the same copy, and outputs
    that are copied computed in a float32 temporary and rounded once on store.  Copies are
    made per batch chunk, so they stay near the cache-sized target.
    """

    def __init__(self, problem: ConvProblem) -> None:
        self.problem = problem
        self.acc = _accumulator(problem)
        self.channels_last = problem.channels_last or problem.output_size[2] < _PLANAR_MIN_ROW
        self.transposed = self.channels_last and not problem.channels_last

    def _view(self, a: np.ndarray) -> np.ndarray:
        return a.transpose(0, 2, 3, 4, 1) if self.channels_last else a

    def _copied(self, a: np.ndarray) -> bool:
        return self.transposed or a.dtype != self.acc

    def batches(self, *arrays: np.ndarray) -> Iterator[slice]:
        N = self.problem.N
        itemsize = np.dtype(self.acc).itemsize
        per_image = sum(itemsize * math.prod(a.shape[1:]) for a in arrays if self._copied(a))
        step = N if not per_image else max(1, min(N, min(_workspace_bytes(), _CHUNK_TARGET_BYTES) // per_image))
        for start in range(0, N, step):
            yield slice(start, min(start + step, N))

    def operand(self, a: np.ndarray, role: str) -> np.ndarray:
        """An input in the kernels' order and ``acc``: the caller's memory when possible, else a copy."""
        view = self._view(a)
        if not self._copied(a):
            return view
        copy = _scratch(role, view.shape, self.acc)
        np.copyto(copy, view)
        return copy

    def output(self, out: np.ndarray) -> np.ndarray:
        """Where a kernel writes: ``out`` itself when possible, else a temporary that ``store`` copies back."""
        view = self._view(out)
        return _scratch("depthwise_out", view.shape, self.acc) if self._copied(out) else view

    def store(self, out: np.ndarray, result: np.ndarray) -> None:
        view = self._view(out)
        if result is not view:
            np.copyto(view, result, casting="unsafe")
