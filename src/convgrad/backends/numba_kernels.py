"""Numba CUDA kernels of the ``numba`` backend, and the list of signatures it can launch.

Every tensor reaches a kernel as a flat 1-D array that starts at the tensor's lowest
address, plus the element offset of its first logical element and its five element
strides (64-bit), all carried in one ``geometry`` tuple of int64 (:data:`GEOMETRY_FIELDS`).
So any layout (NCHW, NHWC, sliced, broadcast) runs without a copy, and every index is
computed in 64 bits.  Logical views (DESIGN §1):

    x  (N, C, D, H, W)      input, or input gradient
    w  (K, C/G, T, R, S)    weight, or weight gradient
    y  (N, K, Z, P, Q)      output, or output gradient

Kernels are written once and specialised by closure constants: the tile shape of the
dense kernels and the accumulator type (float32 for float16/float32 data, float64 for
float64).  They use shared memory and ``cuda.syncthreads`` only, no warp intrinsics, so
Numba's CUDA simulator runs them unchanged.  Nothing here uses atomics: every output
element is written by exactly one thread, which makes every result bit-identical from
run to run for the same device, problem and plan.

Dense passes: implicit GEMM (DESIGN §1), one group per ``blockIdx.z`` step
-------------------------------------------------------------------------
A block computes a ``BM x BN`` tile of the GEMM result with ``(BM/TM)·(BN/TN)`` threads,
each owning a ``TM x TN`` register tile at rows ``row_t + i·BM/TM`` and columns
``col_t + j·BN/TN``.  Per step of ``BK`` along the reduction, the threads stage the
``BK x BM`` slice of A and the ``BK x BN`` slice of B in shared memory (converted to the
accumulator type), then multiply-add from there; each step's global loads go out before
the previous step's multiply-adds, into registers, so their latency overlaps the
arithmetic.  The reduction index is decoded once at the start and then advanced
incrementally (channel fastest, then taps), so the inner loop does no integer division;
fprop and dgrad keep one such cursor per thread, moved on from each staged element to the
next.  The three kernels run one main loop, :func:`gemm_main_loop` (device functions, like
``kernels/gemm_tile.cuh`` for the CUDA C kernels); each brings the step that reads its
elements of A and B, and its epilogue.

* fprop: rows are output pixels ``(n, z, p, q)``, columns output channels ``k`` of the
  group, reduction ``(tap, c)``.  Grid ``(ceil(N·Z·P·Q / BM), ceil(K/G / BN), G)``.
* dgrad: rows are input pixels of one stride phase, columns input channels ``c``, and the
  reduction runs only over ``(tap, k)`` for the taps that phase can reach (the others
  would read between the strided output positions, always zero).  Each thread gathers
  from dy for the input-gradient elements it owns, so there are no atomics.  Grid
  ``(ceil(rows of phase 0 / BM), ceil(C/G / BN), G · sd·sh·sw)``.
* wgrad: rows are output channels ``k``, columns ``(c, t, r, s)``, and the reduction over
  ``N·Z·P·Q`` is split into chunks, one per ``blockIdx.z`` step; each block writes its
  partial tile to a workspace in the accumulator type and ``wgrad_reduce`` adds the
  chunks in a fixed order.  Grid ``(ceil(K/G / BM), ceil(C/G·T·R·S / BN), G · splits)``.

Depthwise (``groups == C``, any channel multiplier ``K/C``)
-----------------------------------------------------------
Direct kernels: fprop and dgrad give one output element to each thread (grid-stride over
all of them; dgrad gathers over the taps that reach its element).  wgrad gives one output
channel and one chunk of ``N·Z·P·Q`` to each block: its threads stride over the chunk for a
batch of taps at a time, a few threads add the per-thread sums in thread order, and
``wgrad_reduce`` adds the chunks as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from numba import cuda
from numba.cuda import types

int64 = types.int64

#: The int64 fields of the ``geometry`` tuple every convolution kernel receives, in order.
GEOMETRY_FIELDS = (
    "N", "C", "K", "G", "Cg", "Kg",
    "D", "H", "W", "T", "R", "S", "Z", "P", "Q",
    "str_d", "str_h", "str_w", "dil_d", "dil_h", "dil_w", "pad_d", "pad_h", "pad_w",
    "xsN", "xsC", "xsD", "xsH", "xsW", "x0",
    "wsK", "wsC", "wsT", "wsR", "wsS", "w0",
    "ysN", "ysK", "ysZ", "ysP", "ysQ", "y0",
)
GEOMETRY_LENGTH = len(GEOMETRY_FIELDS)

#: Fields of the ``layout`` tuple of the ``add_bias`` kernel: extents and strides of a 5-D view.
LAYOUT5_LENGTH = 11
#: Fields of the ``layout`` tuple of the ``grad_bias`` kernel: K, 4 other extents, K's stride, 4 strides, offset.
BIAS_LAYOUT_LENGTH = 11

DTYPES = ("float16", "float32", "float64")
#: Most threads per block of the reducing kernels (depthwise wgrad, bias gradient); a power of two.
REDUCTION_THREADS = 256
#: Taps of the depthwise weight gradient that one pass over the output gradient serves.
TAP_BATCH = 8
#: Threads per block of the element-wise kernels (depthwise fprop/dgrad, reduce, bias).
ELEMENTWISE_THREADS = 128


@dataclass(frozen=True)
class Tile:
    """Tile shape of the dense implicit-GEMM kernels.

    ``BM x BN`` outputs per block, ``BK`` reduction steps staged in shared memory at a
    time, ``TM x TN`` outputs per thread (so ``(BM/TM)·(BN/TN)`` threads).
    """

    name: str
    BM: int
    BN: int
    BK: int
    TM: int
    TN: int

    @property
    def threads(self) -> int:
        return (self.BM // self.TM) * (self.BN // self.TN)

    @property
    def loads(self) -> int:
        """Elements of each shared tile (A and B) that one thread stages per step."""
        return self.BK * self.BM // self.threads

    @property
    def constants(self) -> tuple[int, int, int, int, int, int]:
        """``(BM, BN, BK, TM, TN, LOADS)``: the shape as the GEMM core's device functions take it."""
        return (self.BM, self.BN, self.BK, self.TM, self.TN, self.loads)

    def check(self) -> None:
        """The thread-to-element maps of the kernels need these divisibilities."""
        nt = self.threads
        ok = (
            self.BM == self.BN
            and self.BM % self.TM == 0
            and self.BN % self.TN == 0
            and nt % self.BM == 0
            and nt % self.BK == 0
            and (self.BK * self.BM) % nt == 0
        )
        if not ok:
            raise ValueError(f"tile {self} does not satisfy the kernels' thread maps")


TILES = (
    Tile("tiny", BM=16, BN=16, BK=16, TM=4, TN=4),     # 16 threads: problems of a few tiles, the simulator
    Tile("small", BM=16, BN=16, BK=8, TM=2, TN=2),     # 64 threads
    Tile("medium", BM=64, BN=64, BK=8, TM=4, TN=4),    # 256 threads
    Tile("large", BM=128, BN=128, BK=8, TM=8, TN=8),   # 256 threads, 64 accumulators each
)
TILES_BY_NAME = {tile.name: tile for tile in TILES}
for _tile in TILES:
    _tile.check()


def numba_type(dtype: str) -> Any:
    return {"float16": types.float16, "float32": types.float32, "float64": types.float64}[dtype]


def accumulator(dtype: str) -> Any:
    """float32 for 16-bit and 32-bit data, float64 for float64 (DESIGN §5)."""
    return types.float64 if dtype == "float64" else types.float32


def accumulator_name(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _accumulator_bytes(dtype: str) -> int:
    return 8 if dtype == "float64" else 4


# Shared memory is dynamic everywhere (sized at launch): the simulator allocates it once per
# launch before any thread starts, where its static shared arrays are created by the first
# thread to reach them, without a lock.


def dense_shared_bytes(tile: Tile, dtype: str) -> int:
    """Dynamic shared memory of a dense kernel: the A and B tiles of one step."""
    return tile.BK * (tile.BM + tile.BN) * _accumulator_bytes(dtype)


def depthwise_wgrad_shared_bytes(threads: int, dtype: str) -> int:
    """Dynamic shared memory of ``wgrad_depthwise``: TAP_BATCH rows of ``threads + 1`` sums."""
    return TAP_BATCH * (threads + 1) * _accumulator_bytes(dtype)


def grad_bias_shared_bytes(threads: int, dtype: str) -> int:
    """Dynamic shared memory of ``grad_bias``: one sum per thread."""
    return threads * _accumulator_bytes(dtype)


# ----------------------------------------------------------------------------------------
# The dense kernels' GEMM core: device functions
#
# Each dense kernel runs the same main loop (gemm_main_loop) and differs only in how a
# thread reads its elements of A and B for a step (its ``load_step``) and in its epilogue,
# as the CUDA C kernels share ``gemm_mainloop`` of kernels/gemm_tile.cuh.
#
# The device functions are inlined into each kernel at the Numba IR level
# (``inline="always"``), so the tile constants they receive as arguments are compile-time
# constants there: local array sizes, fully unrolled loops over a thread's registers, the
# same code as if each kernel spelt the loop out.  Inlined before typing, they are never
# compiled on their own, which numba-cuda does only for the GPU present, so compile_ptx
# still needs none.  They are module-level rather than closures of the kernels: a kernel's
# closure cells are part of Numba's disk-cache key and must stay plain values.

# A cursor (4,) int64 holds the digits (d3, d2, d1, d0) of an index
# ((d3·n2 + d2)·n1 + d1)·n0 + d0, d0 fastest; d3 is not reduced, so an index past the end
# of the walk has d3 at or past its extent.  fprop walks (t, r, s, c), dgrad (jt, jr, js, k),
# wgrad (n, z, p, q).
_D3, _D2, _D1, _D0 = 0, 1, 2, 3
# wgrad's position: a cursor, then the index it stands for.
_INDEX = 4


@cuda.jit(device=True, inline="always")
def gemm_main_loop(shape, acc, shared, out, steps, stage_at, stage_stride, load_step, loader):
    """out = this thread's part of the block's tile of A · B, over ``steps`` steps of BK.

    shape: :attr:`Tile.constants`; acc: the accumulator type.
    shared: the block's dynamic shared memory (:func:`dense_shared_bytes`): A (BK, BM) then
        B (BK, BN), row-major, in the accumulator type.
    out: (TM, TN) accumulators; element (i, j) is the block tile's row ``row_t + i·BM/TM``
        and column ``col_t + j·BN/TN``, with ``row_t, col_t = tid % (BM/TM), tid // (BM/TM)``.
    steps: the same for every thread of the block, so that every thread reaches every barrier.
    stage_at, stage_stride: the i-th element (0 <= i < LOADS) a thread stages goes to flat
        position ``stage_at + i·stage_stride`` of A, and of B (BM == BN: the same position).
    load_step(shape, acc, loader, a_next, b_next): reads the thread's LOADS elements of A and
        of B for the next step into a_next and b_next (LOADS,), and moves the cursors held in
        ``loader`` (local arrays, updated in place) on to the step after.

    On return every thread has passed a barrier after its last read of shared memory.
    """
    BM, BN, BK, TM, TN, LOADS = shape
    RT = BM // TM
    CT = BN // TN
    a_tile = shared[:BK * BM]
    b_tile = shared[BK * BM:BK * (BM + BN)]
    a_frag = cuda.local.array(TM, acc)
    b_frag = cuda.local.array(TN, acc)
    a_next = cuda.local.array(LOADS, acc)   # the next step's staged elements, in flight
    b_next = cuda.local.array(LOADS, acc)
    tid = cuda.threadIdx.x
    row_t = tid % RT
    col_t = tid // RT
    for i in range(TM):
        for j in range(TN):
            out[i, j] = acc(0)
    # Software pipelining: step s's global loads are issued before step s-1's
    # multiply-adds, so their latency hides behind the arithmetic.
    for step in range(steps + 1):
        if step > 0:
            for i in range(LOADS):
                a_tile[stage_at + i * stage_stride] = a_next[i]
                b_tile[stage_at + i * stage_stride] = b_next[i]
            # The tiles must be complete before any thread multiplies from them.
            cuda.syncthreads()
        if step < steps:
            load_step(shape, acc, loader, a_next, b_next)
        if step > 0:
            for kk in range(BK):
                for i in range(TM):
                    a_frag[i] = a_tile[kk * BM + row_t + i * RT]
                for j in range(TN):
                    b_frag[j] = b_tile[kk * BN + col_t + j * CT]
                for i in range(TM):
                    for j in range(TN):
                        out[i, j] += a_frag[i] * b_frag[j]
            # Every thread must be done reading before the next step overwrites the tiles.
            cuda.syncthreads()


@cuda.jit(device=True, inline="always")
def cursor_start(cursor, index, n0, n1, n2):
    """cursor := the digits of ``index`` (radices n0, n1, n2 from the fastest; see _D3)."""
    cursor[_D0] = index % n0
    rest = index // n0
    cursor[_D1] = rest % n1
    rest //= n1
    cursor[_D2] = rest % n2
    cursor[_D3] = rest // n2


@cuda.jit(device=True, inline="always")
def cursor_advance(cursor, by, n0, n1, n2):
    """Move ``cursor`` on by ``by`` indices, without integer division."""
    d0 = cursor[_D0] + by
    d1 = cursor[_D1]
    d2 = cursor[_D2]
    d3 = cursor[_D3]
    while d0 >= n0:
        d0 -= n0
        d1 += 1
        if d1 == n1:
            d1 = 0
            d2 += 1
            if d2 == n2:
                d2 = 0
                d3 += 1
    cursor[_D0] = d0
    cursor[_D1] = d1
    cursor[_D2] = d2
    cursor[_D3] = d3


@cuda.jit(device=True, inline="always")
def fprop_load_step(shape, acc, loader, a_next, b_next):
    """A: x gathered at this thread's output pixel, B: w at its output channel, for (t, r, s, c).

    loader: ``(x, w, geometry, cursor, x_row, w_col, row_ok, col_ok, z_base, p_base,
    q_base)``; cursor (4,) over the reduction (T, R, S, C/G), at the thread's next element.
    """
    BM, BN, BK, TM, TN, LOADS = shape
    KSTEP = (BM // TM) * (BN // TN) // BM   # reduction distance between a thread's staged elements
    x, w, geometry, cursor, x_row, w_col, row_ok, col_ok, z_base, p_base, q_base = loader
    (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
     str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
     xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
     ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
    for i in range(LOADS):
        t = cursor[_D3]
        r = cursor[_D2]
        s = cursor[_D1]
        c = cursor[_D0]
        a = acc(0)
        b = acc(0)
        if t < T:
            if row_ok:
                d = z_base + t * dil_d
                h = p_base + r * dil_h
                wi = q_base + s * dil_w
                if 0 <= d < D and 0 <= h < H and 0 <= wi < W:
                    a = acc(x[x_row + c * xsC + d * xsD + h * xsH + wi * xsW])
            if col_ok:
                b = acc(w[w_col + c * wsC + t * wsT + r * wsR + s * wsS])
        a_next[i] = a
        b_next[i] = b
        cursor_advance(cursor, KSTEP, Cg, S, R)


@cuda.jit(device=True, inline="always")
def dgrad_load_step(shape, acc, loader, a_next, b_next):
    """A: dy gathered for this thread's input pixel, B: w at its input channel, for (jt, jr, js, k).

    loader: ``(dy, w, geometry, cursor, row_ok, col_ok, dy_row, w_col, first, tap_step,
    count, back, first_out)``: cursor (4,) over the reduction (reachable taps, K/G), at the
    thread's next element;
    the rest are ``(t, r, s)`` triples (``(z, p, q)`` for first_out): the phase's first
    reachable tap, the distance between its reachable taps and their number, how far the
    next reachable tap moves the output position back, and the output position the first
    reachable tap reads for this thread's row.
    """
    BM, BN, BK, TM, TN, LOADS = shape
    KSTEP = (BM // TM) * (BN // TN) // BM   # reduction distance between a thread's staged elements
    dy, w, geometry, cursor, row_ok, col_ok, dy_row, w_col, first, tap_step, count, back, first_out = loader
    (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
     str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
     xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
     ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
    t0, r0, s0 = first
    t_step, r_step, s_step = tap_step
    nT, nR, nS = count
    dz, dp, dq = back
    z_first, p_first, q_first = first_out
    for i in range(LOADS):
        jt = cursor[_D3]
        jr = cursor[_D2]
        js = cursor[_D1]
        k = cursor[_D0]
        a = acc(0)
        b = acc(0)
        if jt < nT:
            if row_ok:
                zz = z_first - jt * dz
                pp = p_first - jr * dp
                qq = q_first - js * dq
                if 0 <= zz < Z and 0 <= pp < P and 0 <= qq < Q:
                    a = acc(dy[dy_row + k * ysK + zz * ysZ + pp * ysP + qq * ysQ])
            if col_ok:
                t = t0 + jt * t_step
                r = r0 + jr * r_step
                s = s0 + js * s_step
                b = acc(w[w_col + k * wsK + t * wsT + r * wsR + s * wsS])
        a_next[i] = a
        b_next[i] = b
        cursor_advance(cursor, KSTEP, Kg, nS, nR)


@cuda.jit(device=True, inline="always")
def wgrad_load_step(shape, acc, loader, a_next, b_next):
    """A: dy at this thread's (n, z, p, q) for output channels, B: x gathered there for columns (c, t, r, s).

    loader: ``(x, dy, geometry, g, end, k_tile, first, position, b_chan, b_tap_t, b_tap_r,
    b_tap_s)``: position (5,) int64 is the cursor ``(n, z, p, q)`` of the thread's next
    element of the reduction over N·Z·P·Q, then that element's index, which stops at
    ``end``; the b_* arrays (LOADS,) are the columns it stages (c = -1 past the last column).
    """
    BM, BN, BK, TM, TN, LOADS = shape
    x, dy, geometry, g, end, k_tile, first, position, b_chan, b_tap_t, b_tap_r, b_tap_s = loader
    (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
     str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
     xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
     ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
    RSTEP = (BM // TM) * (BN // TN) // BK   # row distance between a thread's staged elements
    j = position[_INDEX]
    n = position[_D3]
    z = position[_D2]
    p = position[_D1]
    q = position[_D0]
    valid = j < end
    dy_pos = y0 + n * ysN + z * ysZ + p * ysP + q * ysQ + g * Kg * ysK
    x_pos = x0 + n * xsN + g * Cg * xsC
    z_base = z * str_d - pad_d
    p_base = p * str_h - pad_h
    q_base = q * str_w - pad_w
    for i in range(LOADS):
        lane = first + i * RSTEP
        a = acc(0)
        b = acc(0)
        if valid:
            if k_tile + lane < Kg:
                a = acc(dy[dy_pos + (k_tile + lane) * ysK])
            c = b_chan[i]
            if c >= 0:
                d = z_base + b_tap_t[i] * dil_d
                h = p_base + b_tap_r[i] * dil_h
                wi = q_base + b_tap_s[i] * dil_w
                if 0 <= d < D and 0 <= h < H and 0 <= wi < W:
                    b = acc(x[x_pos + c * xsC + d * xsD + h * xsH + wi * xsW])
        a_next[i] = a
        b_next[i] = b
    position[_INDEX] = j + BK
    cursor_advance(position, BK, Q, P, Z)


@cuda.jit(device=True, inline="always")
def reachable_taps(geometry, coord3, reach_first, reach_step, reach_count):
    """The taps of each axis that reach input coordinate ``coord3`` (d, h, w) from some output position.

    Output position o reads coordinate o·stride - pad + t·dil, so tap t reaches coordinate
    c when (c + pad - t·dil) is a multiple of the stride: that holds for t = first + j·step,
    and the first two such taps lie below 2·stride.  Per axis a: reach_first[a] (-1 when no
    tap reaches it), reach_step[a] and reach_count[a], each (3,) int64.  Only the residue of
    coord3 modulo the stride matters, so a stride phase may stand for its coordinates.
    """
    (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
     str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
     xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
     ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
    taps3 = (T, R, S)
    stride3 = (str_d, str_h, str_w)
    dil3 = (dil_d, dil_h, dil_w)
    pad3 = (pad_d, pad_h, pad_w)
    for a in range(3):
        reach_first[a] = -1
        reach_step[a] = 0
        for t in range(min(taps3[a], 2 * stride3[a])):
            if (coord3[a] + pad3[a] - t * dil3[a]) % stride3[a] == 0:
                if reach_first[a] < 0:
                    reach_first[a] = t
                elif reach_step[a] == 0:
                    reach_step[a] = t - reach_first[a]
        if reach_step[a] == 0:
            reach_step[a] = taps3[a]  # at most one tap reaches it
        reach_count[a] = 0 if reach_first[a] < 0 else (taps3[a] - reach_first[a] + reach_step[a] - 1) // reach_step[a]


# ----------------------------------------------------------------------------------------
# Dense kernels (implicit GEMM)


def _dense_kernels(tile: Tile, acc: Any) -> dict[str, Callable]:
    """The three dense kernels for one tile shape and accumulator type (Python functions)."""
    BM, BN, BK, TM, TN = tile.BM, tile.BN, tile.BK, tile.TM, tile.TN
    SHAPE = tile.constants
    NT = tile.threads
    RT = BM // TM            # threads along the rows of the register tiles
    CT = BN // TN            # threads along the columns
    LOADS = tile.loads
    KSTEP = NT // BM         # fprop/dgrad: reduction distance between a thread's staged elements
    RSTEP = NT // BK         # wgrad: row distance between a thread's staged elements

    def conv_fprop_dense(x, w, y, bias, geometry, has_bias, bias_stride, bias0):
        """y[n, g·K/G + k, z, p, q] = sum over (t, r, s, c) of x (gathered) · w, (+ bias).

        x, w, y, bias: flat arrays (see the module docstring); geometry: GEOMETRY_FIELDS;
        bias is read at ``bias0 + k·bias_stride`` when ``has_bias`` is non-zero.
        """
        (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
         str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
         xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
         ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
        shared = cuda.shared.array(0, acc)      # dynamic: dense_shared_bytes(tile, dtype)
        out = cuda.local.array((TM, TN), acc)
        cursor = cuda.local.array(4, int64)     # the thread's next element of the reduction

        tid = cuda.threadIdx.x
        row_t = tid % RT
        col_t = tid // RT
        lane = tid % BM          # the row of A and the column of B this thread stages
        kk_first = tid // BM     # and the first reduction step it stages
        M = N * Z * P * Q
        reduction = Cg * T * R * S
        m0 = int64(cuda.blockIdx.x) * BM
        k_tile = int64(cuda.blockIdx.y) * BN

        m_load = m0 + lane
        row_ok = m_load < M
        q = m_load % Q
        rest = m_load // Q
        p = rest % P
        rest //= P
        z = rest % Z
        n = rest // Z
        z_base = z * str_d - pad_d
        p_base = p * str_h - pad_h
        q_base = q * str_w - pad_w
        k_load = k_tile + lane
        col_ok = k_load < Kg

        for g in range(cuda.blockIdx.z, G, cuda.gridDim.z):
            x_row = x0 + n * xsN + g * Cg * xsC
            w_col = w0 + (g * Kg + k_load) * wsK
            cursor_start(cursor, kk_first, Cg, S, R)
            loader = (x, w, geometry, cursor, x_row, w_col, row_ok, col_ok, z_base, p_base, q_base)
            gemm_main_loop(SHAPE, acc, shared, out, (reduction + BK - 1) // BK, kk_first * BM + lane, KSTEP * BM,
                           fprop_load_step, loader)

            # The bias once per column, in a loop of its own: kept out of the store loop, both
            # unroll fully and the accumulators stay in registers (no stack frame).
            if has_bias != 0:
                for j in range(TN):
                    k = k_tile + col_t + j * CT
                    if k < Kg:
                        v = acc(bias[bias0 + (g * Kg + k) * bias_stride])
                        for i in range(TM):
                            out[i, j] += v
            for i in range(TM):
                m = m0 + row_t + i * RT
                if m < M:
                    qo = m % Q
                    rest2 = m // Q
                    po = rest2 % P
                    rest2 //= P
                    zo = rest2 % Z
                    no = rest2 // Z
                    base = y0 + no * ysN + zo * ysZ + po * ysP + qo * ysQ
                    for j in range(TN):
                        k = k_tile + col_t + j * CT
                        if k < Kg:
                            y[base + (g * Kg + k) * ysK] = out[i, j]

    def conv_dgrad_dense(dy, w, dx, geometry):
        """dx[n, g·C/G + c, d, h, w] = sum over reachable (t, r, s) and k of dy (gathered) · w.

        Rows of one block share a stride phase ``(d mod sd, h mod sh, w mod sw)``, so they
        share the taps that can reach them; a phase no tap reaches gets zeros.
        """
        (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
         str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
         xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
         ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
        shared = cuda.shared.array(0, acc)      # dynamic: dense_shared_bytes(tile, dtype)
        out = cuda.local.array((TM, TN), acc)
        cursor = cuda.local.array(4, int64)     # the thread's next element of the reduction
        reach_first = cuda.local.array(3, int64)
        reach_step = cuda.local.array(3, int64)
        reach_count = cuda.local.array(3, int64)

        tid = cuda.threadIdx.x
        row_t = tid % RT
        col_t = tid // RT
        lane = tid % BM
        kk_first = tid // BM
        phases = str_d * str_h * str_w
        m0 = int64(cuda.blockIdx.x) * BM
        c_tile = int64(cuda.blockIdx.y) * BN
        c_load = c_tile + lane
        col_ok = c_load < Cg

        for gz in range(cuda.blockIdx.z, G * phases, cuda.gridDim.z):
            g = gz // phases
            phase = gz % phases
            ph_w = phase % str_w
            ph_h = (phase // str_w) % str_h
            ph_d = phase // (str_w * str_h)
            Dp = (D - ph_d + str_d - 1) // str_d
            Hp = (H - ph_h + str_h - 1) // str_h
            Wp = (W - ph_w + str_w - 1) // str_w
            M = N * Dp * Hp * Wp
            if m0 >= M:
                continue
            reachable_taps(geometry, (ph_d, ph_h, ph_w), reach_first, reach_step, reach_count)
            t0, t_step, nT = reach_first[0], reach_step[0], reach_count[0]
            r0, r_step, nR = reach_first[1], reach_step[1], reach_count[1]
            s0, s_step, nS = reach_first[2], reach_step[2], reach_count[2]
            # Moving to the next reachable tap moves the output position back by this much.
            dz = t_step * dil_d // str_d
            dp = r_step * dil_h // str_h
            dq = s_step * dil_w // str_w
            reduction = nT * nR * nS * Kg

            m_load = m0 + lane
            row_ok = m_load < M
            iw = m_load % Wp
            rest = m_load // Wp
            ih = rest % Hp
            rest //= Hp
            idd = rest % Dp
            n = rest // Dp
            z_first = (ph_d + idd * str_d + pad_d - t0 * dil_d) // str_d
            p_first = (ph_h + ih * str_h + pad_h - r0 * dil_h) // str_h
            q_first = (ph_w + iw * str_w + pad_w - s0 * dil_w) // str_w
            dy_row = y0 + n * ysN + g * Kg * ysK
            w_col = w0 + g * Kg * wsK + c_load * wsC

            if reduction > 0:
                cursor_start(cursor, kk_first, Kg, nS, nR)
            loader = (dy, w, geometry, cursor, row_ok, col_ok, dy_row, w_col, (t0, r0, s0), (t_step, r_step, s_step),
                      (nT, nR, nS), (dz, dp, dq), (z_first, p_first, q_first))
            gemm_main_loop(SHAPE, acc, shared, out, (reduction + BK - 1) // BK, kk_first * BM + lane, KSTEP * BM,
                           dgrad_load_step, loader)

            for i in range(TM):
                m = m0 + row_t + i * RT
                if m < M:
                    wo = m % Wp
                    rest2 = m // Wp
                    ho = rest2 % Hp
                    rest2 //= Hp
                    do = rest2 % Dp
                    no = rest2 // Dp
                    base = (x0 + no * xsN + (ph_d + do * str_d) * xsD + (ph_h + ho * str_h) * xsH
                            + (ph_w + wo * str_w) * xsW)
                    for j in range(TN):
                        c = c_tile + col_t + j * CT
                        if c < Cg:
                            dx[base + (g * Cg + c) * xsC] = out[i, j]

    def conv_wgrad_dense(x, dy, workspace, geometry, splits, chunk):
        """workspace[split, g·K/G + k, (c, t, r, s)] = sum over chunk ``split`` of (n, z, p, q) of dy · x (gathered).

        workspace: flat, ``splits · K · C/G·T·R·S`` in the accumulator type; chunk
        ``split`` covers ``[split·chunk, min(N·Z·P·Q, (split+1)·chunk))``.
        """
        (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
         str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
         xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
         ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
        shared = cuda.shared.array(0, acc)      # dynamic: dense_shared_bytes(tile, dtype)
        out = cuda.local.array((TM, TN), acc)
        position = cuda.local.array(5, int64)   # wgrad_load_step's cursor (n, z, p, q), then its index
        # (c, t, r, s) of each column of B this thread stages; c = -1 past the last column.
        b_chan = cuda.local.array(LOADS, int64)
        b_tap_t = cuda.local.array(LOADS, int64)
        b_tap_r = cuda.local.array(LOADS, int64)
        b_tap_s = cuda.local.array(LOADS, int64)

        tid = cuda.threadIdx.x
        row_t = tid % RT
        col_t = tid // RT
        kk_lane = tid % BK        # the reduction step this thread stages
        first = tid // BK         # and its first row of A / column of B
        taps = T * R * S
        CTRS = Cg * taps
        NPQ = N * Z * P * Q
        total = K * CTRS
        k_tile = int64(cuda.blockIdx.x) * BM
        col_tile = int64(cuda.blockIdx.y) * BN

        for i in range(LOADS):
            col = col_tile + first + i * RSTEP
            s = col % S
            rest = col // S
            b_tap_s[i] = s
            b_tap_r[i] = rest % R
            rest //= R
            b_tap_t[i] = rest % T
            b_chan[i] = rest // T if col < CTRS else -1

        for gz in range(cuda.blockIdx.z, G * splits, cuda.gridDim.z):
            g = gz % G
            split = gz // G
            begin = split * chunk
            end = min(NPQ, begin + chunk)
            position[_INDEX] = begin + kk_lane
            cursor_start(position, begin + kk_lane, Q, P, Z)
            loader = (x, dy, geometry, g, end, k_tile, first, position, b_chan, b_tap_t, b_tap_r, b_tap_s)
            gemm_main_loop(SHAPE, acc, shared, out, (max(end - begin, 0) + BK - 1) // BK, kk_lane * BM + first, RSTEP,
                           wgrad_load_step, loader)

            for i in range(TM):
                k = k_tile + row_t + i * RT
                if k < Kg:
                    base = split * total + (g * Kg + k) * CTRS
                    for jj in range(TN):
                        col = col_tile + col_t + jj * CT
                        if col < CTRS:
                            workspace[base + col] = out[i, jj]

    return {"fprop_dense": conv_fprop_dense, "dgrad_dense": conv_dgrad_dense, "wgrad_dense": conv_wgrad_dense}


# ----------------------------------------------------------------------------------------
# Depthwise, reduction and bias kernels


def _direct_kernels(acc: Any) -> dict[str, Callable]:
    """Depthwise kernels, the workspace reduction and the bias kernels for one accumulator type."""
    TB = TAP_BATCH

    def conv_fprop_depthwise(x, w, y, bias, geometry, has_bias, bias_stride, bias0):
        """One thread per y element: y[n, k, z, p, q] = sum over taps of x[n, k // (K/C), ...] · w[k, 0, t, r, s]."""
        (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
         str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
         xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
         ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
        total = N * K * Z * P * Q
        idx = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = int64(cuda.gridDim.x) * cuda.blockDim.x
        while idx < total:
            q = idx % Q
            rest = idx // Q
            p = rest % P
            rest //= P
            z = rest % Z
            rest //= Z
            k = rest % K
            n = rest // K
            x_base = x0 + n * xsN + (k // Kg) * xsC
            w_base = w0 + k * wsK
            v = acc(0)
            for t in range(T):
                d = z * str_d - pad_d + t * dil_d
                if 0 <= d < D:
                    for r in range(R):
                        h = p * str_h - pad_h + r * dil_h
                        if 0 <= h < H:
                            for s in range(S):
                                wi = q * str_w - pad_w + s * dil_w
                                if 0 <= wi < W:
                                    v += (acc(x[x_base + d * xsD + h * xsH + wi * xsW])
                                          * acc(w[w_base + t * wsT + r * wsR + s * wsS]))
            if has_bias != 0:
                v += acc(bias[bias0 + k * bias_stride])
            y[y0 + n * ysN + k * ysK + z * ysZ + p * ysP + q * ysQ] = v
            idx += step

    def conv_dgrad_depthwise(dy, w, dx, geometry):
        """One thread per dx element: gathers dy over its channel's K/C outputs and the taps that reach it."""
        (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
         str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
         xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
         ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
        reach_first = cuda.local.array(3, int64)
        reach_step = cuda.local.array(3, int64)
        reach_count = cuda.local.array(3, int64)
        total = N * C * D * H * W
        idx = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        grid_step = int64(cuda.gridDim.x) * cuda.blockDim.x
        while idx < total:
            wi = idx % W
            rest = idx // W
            h = rest % H
            rest //= H
            d = rest % D
            rest //= D
            c = rest % C
            n = rest // C
            reachable_taps(geometry, (d, h, wi), reach_first, reach_step, reach_count)
            t0, t_step, nT = reach_first[0], reach_step[0], reach_count[0]
            r0, r_step, nR = reach_first[1], reach_step[1], reach_count[1]
            s0, s_step, nS = reach_first[2], reach_step[2], reach_count[2]
            z_first = (d + pad_d - t0 * dil_d) // str_d
            p_first = (h + pad_h - r0 * dil_h) // str_h
            q_first = (wi + pad_w - s0 * dil_w) // str_w
            dz = t_step * dil_d // str_d
            dp = r_step * dil_h // str_h
            dq = s_step * dil_w // str_w
            v = acc(0)
            for mult in range(Kg):
                k = c * Kg + mult
                dy_base = y0 + n * ysN + k * ysK
                w_base = w0 + k * wsK
                for jt in range(nT):
                    zz = z_first - jt * dz
                    if 0 <= zz < Z:
                        for jr in range(nR):
                            pp = p_first - jr * dp
                            if 0 <= pp < P:
                                for js in range(nS):
                                    qq = q_first - js * dq
                                    if 0 <= qq < Q:
                                        v += (acc(dy[dy_base + zz * ysZ + pp * ysP + qq * ysQ])
                                              * acc(w[w_base + (t0 + jt * t_step) * wsT + (r0 + jr * r_step) * wsR
                                                      + (s0 + js * s_step) * wsS]))
            dx[x0 + n * xsN + c * xsC + d * xsD + h * xsH + wi * xsW] = v
            idx += grid_step

    def conv_wgrad_depthwise(x, dy, workspace, geometry, splits, chunk):
        """workspace[split, k, tap] = sum over chunk ``split`` of (n, z, p, q) of x (gathered) · dy.

        One block per output channel k (``blockIdx.x``, grid-stride) and chunk
        (``blockIdx.y``).  Its threads stride over the chunk, each summing TAP_BATCH taps
        at once (dy read once for all of them); thread ``b`` then adds the block's partial
        sums of tap ``b`` in thread order.  ``blockDim.x`` <= REDUCTION_THREADS.
        """
        (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
         str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
         xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
         ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
        # Dynamic: TAP_BATCH rows of blockDim.x + 1 (depthwise_wgrad_shared_bytes); the extra
        # column spreads the rows over the shared-memory banks.
        partial = cuda.shared.array(0, acc)
        sums = cuda.local.array(TB, acc)
        tap_t = cuda.local.array(TB, int64)
        tap_r = cuda.local.array(TB, int64)
        tap_s = cuda.local.array(TB, int64)
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        row = nthreads + 1
        taps = T * R * S
        total = K * taps
        NPQ = N * Z * P * Q
        split = cuda.blockIdx.y
        begin = split * chunk
        end = min(NPQ, begin + chunk)
        for k in range(cuda.blockIdx.x, K, cuda.gridDim.x):
            x_chan = x0 + (k // Kg) * xsC
            dy_chan = y0 + k * ysK
            for tap0 in range(0, taps, TB):
                for b in range(TB):
                    tap = tap0 + b
                    tap_s[b] = tap % S
                    tap_r[b] = (tap // S) % R
                    # A tap past the last gets t = T: never in range below.
                    tap_t[b] = tap // (S * R) if tap < taps else T
                    sums[b] = acc(0)
                j = begin + tid
                while j < end:
                    q = j % Q
                    rest = j // Q
                    p = rest % P
                    rest //= P
                    z = rest % Z
                    n = rest // Z
                    grad = acc(dy[dy_chan + n * ysN + z * ysZ + p * ysP + q * ysQ])
                    x_img = x_chan + n * xsN
                    for b in range(TB):
                        d = z * str_d - pad_d + tap_t[b] * dil_d
                        h = p * str_h - pad_h + tap_r[b] * dil_h
                        wi = q * str_w - pad_w + tap_s[b] * dil_w
                        if tap_t[b] < T and 0 <= d < D and 0 <= h < H and 0 <= wi < W:
                            sums[b] += acc(x[x_img + d * xsD + h * xsH + wi * xsW]) * grad
                    j += nthreads
                for b in range(TB):
                    partial[b * row + tid] = sums[b]
                # Every thread's partial sums must be in shared memory before they are added up.
                cuda.syncthreads()
                if tid < TB and tap0 + tid < taps:
                    v = acc(0)
                    for i in range(nthreads):
                        v += partial[tid * row + i]
                    workspace[split * total + k * taps + tap0 + tid] = v
                # The sums are read before the next batch of taps overwrites them.
                cuda.syncthreads()

    def wgrad_reduce(workspace, dw, geometry, splits):
        """dw[k, c, t, r, s] = sum over split of workspace[split, k, (c, t, r, s)], in split order."""
        (N, C, K, G, Cg, Kg, D, H, W, T, R, S, Z, P, Q,
         str_d, str_h, str_w, dil_d, dil_h, dil_w, pad_d, pad_h, pad_w,
         xsN, xsC, xsD, xsH, xsW, x0, wsK, wsC, wsT, wsR, wsS, w0,
         ysN, ysK, ysZ, ysP, ysQ, y0) = geometry
        CTRS = Cg * T * R * S
        total = K * CTRS
        idx = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = int64(cuda.gridDim.x) * cuda.blockDim.x
        while idx < total:
            v = acc(0)
            for split in range(splits):
                v += workspace[split * total + idx]
            s = idx % S
            rest = idx // S
            r = rest % R
            rest //= R
            t = rest % T
            rest //= T
            c = rest % Cg
            k = rest // Cg
            dw[w0 + k * wsK + c * wsC + t * wsT + r * wsR + s * wsS] = v
            idx += step

    def add_bias(out, bias, layout, bias_stride, bias0):
        """out[n, c, d, h, w] += bias[c] for a 5-D strided view; layout: extents, strides, offset."""
        (N, C, D, H, W, sN, sC, sD, sH, sW, o0) = layout
        total = N * C * D * H * W
        idx = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = int64(cuda.gridDim.x) * cuda.blockDim.x
        while idx < total:
            wi = idx % W
            rest = idx // W
            h = rest % H
            rest //= H
            d = rest % D
            rest //= D
            c = rest % C
            n = rest // C
            pos = o0 + n * sN + c * sC + d * sD + h * sH + wi * sW
            out[pos] = acc(out[pos]) + acc(bias[bias0 + c * bias_stride])
            idx += step

    def grad_bias(dy, db, layout):
        """db[k] = sum of dy over every axis but the channel axis; one block per channel (grid-stride).

        layout: (K, e0, e1, e2, e3, sK, s0, s1, s2, s3, offset), the channel axis and the
        (up to four) others; thread 0 adds the threads' partial sums in thread order.
        ``blockDim.x`` <= REDUCTION_THREADS.
        """
        (K, e0, e1, e2, e3, sK, s0, s1, s2, s3, o0) = layout
        partial = cuda.shared.array(0, acc)     # dynamic: blockDim.x elements
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        count = e0 * e1 * e2 * e3
        for k in range(cuda.blockIdx.x, K, cuda.gridDim.x):
            v = acc(0)
            j = tid
            while j < count:
                i3 = j % e3
                rest = j // e3
                i2 = rest % e2
                rest //= e2
                i1 = rest % e1
                i0 = rest // e1
                v += acc(dy[o0 + k * sK + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3])
                j += nthreads
            partial[tid] = v
            # Every thread's partial sum must be in shared memory before thread 0 adds them up.
            cuda.syncthreads()
            if tid == 0:
                total = acc(0)
                for i in range(nthreads):
                    total += partial[i]
                db[k] = total
            # The sums are read before the next channel overwrites them.
            cuda.syncthreads()

    return {
        "fprop_depthwise": conv_fprop_depthwise,
        "dgrad_depthwise": conv_dgrad_depthwise,
        "wgrad_depthwise": conv_wgrad_depthwise,
        "wgrad_reduce": wgrad_reduce,
        "add_bias": add_bias,
        "grad_bias": grad_bias,
    }


# ----------------------------------------------------------------------------------------
# Signatures: exactly what the backend can launch


DENSE_KERNELS = ("fprop_dense", "dgrad_dense", "wgrad_dense")
DIRECT_KERNELS = ("fprop_depthwise", "dgrad_depthwise", "wgrad_depthwise", "wgrad_reduce", "add_bias", "grad_bias")


def signature(kernel: str, dtype: str) -> Any:
    """The one Numba signature ``kernel`` is compiled with for data of ``dtype``."""
    data = types.Array(numba_type(dtype), 1, "C")
    work = types.Array(accumulator(dtype), 1, "C")
    geometry = types.UniTuple(int64, GEOMETRY_LENGTH)
    if kernel in ("fprop_dense", "fprop_depthwise"):
        return types.void(data, data, data, data, geometry, int64, int64, int64)
    if kernel in ("dgrad_dense", "dgrad_depthwise"):
        return types.void(data, data, data, geometry)
    if kernel in ("wgrad_dense", "wgrad_depthwise"):
        return types.void(data, data, work, geometry, int64, int64)
    if kernel == "wgrad_reduce":
        return types.void(work, data, geometry, int64)
    if kernel == "add_bias":
        return types.void(data, data, types.UniTuple(int64, LAYOUT5_LENGTH), int64, int64)
    if kernel == "grad_bias":
        return types.void(data, data, types.UniTuple(int64, BIAS_LAYOUT_LENGTH))
    raise KeyError(kernel)


_PY_KERNELS: dict[tuple[str, str, str], Callable] = {}


def python_kernel(kernel: str, tile: str | None, dtype: str) -> Callable:
    """The Python function of ``kernel`` (for ``tile``, dense kernels only) for ``dtype``'s accumulator."""
    acc_name = accumulator_name(dtype)
    key = (kernel, tile or "", acc_name)
    if key not in _PY_KERNELS:
        acc = accumulator(dtype)
        if kernel in DENSE_KERNELS:
            for name, fn in _dense_kernels(TILES_BY_NAME[tile], acc).items():  # type: ignore[index]
                _PY_KERNELS[(name, tile, acc_name)] = fn  # type: ignore[index]
        else:
            for name, fn in _direct_kernels(acc).items():
                _PY_KERNELS[(name, "", acc_name)] = fn
    return _PY_KERNELS[key]


@dataclass(frozen=True)
class KernelSpec:
    """One compiled kernel: what the backend caches and launches, and CI compiles with compile_ptx."""

    kernel: str
    tile: str | None
    dtype: str

    @property
    def label(self) -> str:
        tile = f"[{self.tile}]" if self.tile else ""
        return f"{self.kernel}{tile}<{self.dtype}>"

    @property
    def signature(self) -> Any:
        return signature(self.kernel, self.dtype)

    def python_function(self) -> Callable:
        return python_kernel(self.kernel, self.tile, self.dtype)


def launchable_kernels() -> list[KernelSpec]:
    """Every (kernel, tile, dtype) the backend can launch, each with its one signature."""
    specs = []
    for dtype in DTYPES:
        for kernel in DENSE_KERNELS:
            for tile in TILES:
                specs.append(KernelSpec(kernel, tile.name, dtype))
        for kernel in DIRECT_KERNELS:
            specs.append(KernelSpec(kernel, None, dtype))
    return specs


def next_power_of_two(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= n, clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(n, 1))))))
