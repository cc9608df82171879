// implicit_gemm.cu: the three passes of a convolution as implicit GEMMs (SIMT).
//
// Formulas (DESIGN §1; g is the group, c < C/G, k < K/G, taps t, r, s):
//   fprop  y[n, gK+k, z, p, q]  = sum_{c,t,r,s} x[n, gC+c, z*sd-pd+t*dd, p*sh-ph+r*dh, q*sw-pw+s*dw] * w[gK+k, c, t, r, s]
//   dgrad  dx[n, gC+c, d, h, w] = sum_{k,t,r,s} dy[n, gK+k, z, p, q] * w[gK+k, c, t, r, s]
//            over the taps with d = z*sd-pd+t*dd (and likewise h, w) for an integer z in [0, Z)
//   wgrad  dw[gK+k, c, t, r, s] = sum_{n,z,p,q} dy[n, gK+k, z, p, q] * x[n, gC+c, z*sd-pd+t*dd, ...]
// Input positions outside [0, D) x [0, H) x [0, W) read as zero.
//
// Layouts: x (N, C, D, H, W), w (K, C/G, T, R, S), y (N, K, Z, P, Q), each with arbitrary
// 64-bit element strides (ConvParams::x_stride etc.): NCDHW, NDHWC and sliced views alike.
//
// GEMM per group (DESIGN §1):
//   fprop  M = N*Z*P*Q (output pixels), N = K/G, reduction = taps x C/G
//   dgrad  M = N*D*H*W of one stride phase, N = C/G, reduction = the phase's taps x K/G
//   wgrad  M = K/G, N = C/G*T*R*S (column j = c*T*R*S + tap, or tap*C/G + c for channels-last
//          staging; tap = (t*R + r)*S + s), reduction = N*Z*P*Q
// fprop and dgrad gather A from the activation (a row is one pixel, a reduction index is
// a (tap, channel) pair, taps outer and channels inner so each step is one tap and BK
// consecutive channels); wgrad gathers B from x.
//
// Strided dgrad (stride phases): input positions d with (d + pd) mod sd = phi receive
// exactly the taps t with t*dd = phi (mod sd), i.e. t = t0, t0 + step, ... with
// step = sd / gcd(sd, dd) (ConvParams::tap_step), and for such a tap z = i + (d0 + pd - t*dd)/sd
// where d = d0 + i*sd.  Each block computes one phase (phi_d, phi_h, phi_w), so every
// multiply it does is by a tap that contributes: none is spent on taps the stride skips.
//
// Launch geometry: a 1-D grid of tiles_m * tiles_n * phases * G (* splits for wgrad) blocks
// of (BM/TM)*(BN/TN) threads; block b is, fastest first, (tile along M, tile along N,
// phase or 1, group, split-K slice).  Thread tid computes the TM x TN outputs of its
// register block (rows fragment_index<BM,TM>(tid / (BN/TN), i), columns
// fragment_index<BN,TN>(tid % (BN/TN), j) of the block's tile).  Dynamic shared memory:
// TileShape::SMEM_BYTES = 2 * BK * (BM + BN) accumulators.
//
// Staging (global -> registers -> shared): each step a thread loads BM*BK/THREADS elements
// of A and BK*BN/THREADS of B.  Across threads the reduction index is fastest when it is
// the closer-packed direction in memory (a_kfast/b_kfast: channels-last activations), else
// the row/column is.  Fast path (p.a_vec, fprop/dgrad A only): when the activation's
// channels are contiguous and every VEC-channel vector is aligned to VEC*sizeof(T) bytes
// (the planner checks the strides and channel count, the backend the pointer), a thread
// loads VEC channels (16 bytes, or 8 for fp16/bf16) with one instruction.
//
// wgrad epilogues (ConvParams::epilogue): store to dw; or store the slice's partial sums
// to workspace[slice][K][C/G*T*R*S] (accumulator type) for splitk_reduce.cu to add in a
// fixed order (deterministic); or atomicAdd into one zeroed workspace (deterministic=False).
//
// Limits (checked by the planner): spatial extents, padded extents and C/G*T*R*S below 2^30;
// N below 2^31; fewer than 2^31 blocks.  Tensor offsets and the GEMM's M and reduction are
// 64-bit.
#include "dtype_traits.cuh"
#include "gemm_tile.cuh"

namespace convgrad {
namespace implicit_gemm {

// One spatial axis of a gathered (fprop or dgrad) GEMM, for one stride phase.
struct GatherAxis {
  int rows;                 // row extent along this axis (Z for fprop, the phase's share of D for dgrad)
  int row_mul, row_add;     // A coordinate of row index i before the tap: i * row_mul + row_add
  int out_mul, out_add;     // output coordinate of row index i: i * out_mul + out_add
  int tap_first, tap_step;  // the axis's taps: tap_first + u * tap_step, u < tap_count
  int tap_count;
  int off_first, off_step;  // A-coordinate offset of tap u: off_first + u * off_step
  int extent;               // A's extent along the axis (D for fprop, Z for dgrad)
};

__device__ __forceinline__ GatherAxis fprop_axis(const ConvParams& p, int a) {
  GatherAxis ax;
  ax.rows = (int)p.out_size[a];
  ax.row_mul = (int)p.stride[a];
  ax.row_add = -(int)p.pad[a];
  ax.out_mul = 1;
  ax.out_add = 0;
  ax.tap_first = 0;
  ax.tap_step = 1;
  ax.tap_count = (int)p.kernel_size[a];
  ax.off_first = 0;
  ax.off_step = (int)p.dilation[a];
  ax.extent = (int)p.in_size[a];
  return ax;
}

// Axis a of dgrad phase phi: input positions d = d0 + i*s with (d0 + pad) mod s = phi.
__device__ __forceinline__ GatherAxis dgrad_axis(const ConvParams& p, int a, int phi) {
  const int s = (int)p.stride[a], dil = (int)p.dilation[a], pad = (int)p.pad[a];
  const int size = (int)p.in_size[a], taps = (int)p.kernel_size[a], step = (int)p.tap_step[a];
  GatherAxis ax;
  const int d0 = ((phi - pad) % s + s) % s;
  ax.rows = d0 < size ? (size - 1 - d0) / s + 1 : 0;
  ax.row_mul = 1;
  ax.row_add = 0;
  ax.out_mul = s;
  ax.out_add = d0;
  // The first tap t < step with t*dil = phi (mod s); there is none when gcd(s, dil) does not divide phi.
  int first = 0;
  while (first < step && (first * dil - phi) % s != 0) ++first;
  ax.tap_first = first;
  ax.tap_step = step;
  ax.tap_count = first < step && first < taps ? (taps - 1 - first) / step + 1 : 0;
  ax.off_first = (d0 + pad - first * dil) / s;  // exact: the numerator is a multiple of s
  ax.off_step = -(step * dil) / s;              // exact: step * dil = lcm(s, dil)
  ax.extent = (int)p.out_size[a];
  return ax;
}

// Where a gathered GEMM reads and writes, for one group.
struct GatherOperands {
  index_t red_channels;                     // channels in the reduction: C/G (fprop), K/G (dgrad)
  index_t cols;                             // GEMM N: K/G (fprop), C/G (dgrad)
  index_t a_batch, a_chan, a_sp[3];         // A (the activation) strides
  index_t a_base;                           // A offset of the group's first reduction channel
  index_t b_red, b_col, b_tap[3];           // B (the weight) strides along reduction, column, taps
  index_t b_base;                           // B offset of the group's first reduction channel and column
  index_t o_batch, o_chan, o_sp[3];         // output strides
  index_t o_base;                           // output offset of the group's first column channel
};

__device__ __forceinline__ GatherOperands gather_operands(const ConvParams& p, bool dgrad, index_t g) {
  GatherOperands op;
  const index_t* a_strides = dgrad ? p.y_stride : p.x_stride;
  const index_t* o_strides = dgrad ? p.x_stride : p.y_stride;
  op.red_channels = dgrad ? p.Kg : p.Cg;
  op.cols = dgrad ? p.Cg : p.Kg;
  op.a_batch = a_strides[0];
  op.a_chan = a_strides[1];
  op.a_base = g * op.red_channels * a_strides[1];
  op.b_red = dgrad ? p.w_stride[0] : p.w_stride[1];
  op.b_col = dgrad ? p.w_stride[1] : p.w_stride[0];
  // The group's first output channel: B's first column for fprop, its first reduction channel for dgrad.
  op.b_base = g * p.Kg * p.w_stride[0];
  op.o_batch = o_strides[0];
  op.o_chan = o_strides[1];
  op.o_base = g * op.cols * o_strides[1];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    op.a_sp[a] = a_strides[2 + a];
    op.b_tap[a] = p.w_stride[2 + a];
    op.o_sp[a] = o_strides[2 + a];
  }
  return op;
}

// Where thread `tid`'s e-th staged element (e = tid + i * THREADS) of a ROWS x BK tile
// goes: its reduction lane and its row.  Reduction-fastest puts consecutive threads on
// consecutive reduction indices (coalesced when channels are contiguous, e.g. NHWC);
// otherwise consecutive threads take consecutive rows (coalesced for NCHW).
template <int ROWS, int BK>
__device__ __forceinline__ int staged_lane(int e, bool kfast) {
  return kfast ? e % BK : e / ROWS;
}
template <int ROWS, int BK>
__device__ __forceinline__ int staged_row(int e, bool kfast) {
  return kfast ? e / BK : e % ROWS;
}

// Stages the A (gathered activation) and B (weight) elements of one reduction step.
template <class Shape>
struct GatherLoader {
  typedef typename Shape::elem_t T;
  typedef typename Shape::Acc Acc;
  static constexpr int EA = Shape::A_PER_THREAD, EB = Shape::B_PER_THREAD;
  static constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK;

  const T* __restrict__ a_src;
  const T* __restrict__ b_src;
  GatherOperands op;
  GatherAxis ax[3];
  bool a_kfast, b_kfast;
  // The fast path (a_vec): A elements come in vectors of VEC contiguous channels; this
  // thread then stages EA / VEC vectors, described by the first EA / VEC entries below.
  static constexpr int VEC = VectorWidth<T, (EA < BK ? EA : BK)>::value;
  static constexpr int GROUPS = BK / VEC;  // vectors per row of the A tile
  bool a_vec;
  // This thread's A elements: offset of (row's pixel base, reduction lane), the row's
  // coordinates before the tap (far out of range for rows past the GEMM), and how many
  // channels remain from the lane (chan0 < a_room means the channel exists).
  index_t a_row[EA];
  int a_coord[EA][3];
  int a_room[EA];
  // This thread's B elements: offset of (column, reduction lane), and the same room (0 for
  // columns past the GEMM).
  index_t b_off[EB];
  int b_room[EB];
  // The current step: tap counters, their A-coordinate offsets, B's tap offset, first channel.
  int tap[3];
  int off[3];
  index_t b_tap_off;
  int chan0;
  Acc ra[EA], rb[EB];

  __device__ __forceinline__ void set_tap() {
    b_tap_off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      off[a] = ax[a].off_first + tap[a] * ax[a].off_step;
      b_tap_off += (index_t)(ax[a].tap_first + tap[a] * ax[a].tap_step) * op.b_tap[a];
    }
  }

  __device__ __forceinline__ void advance() {
    chan0 += BK;
    if (chan0 >= op.red_channels) {
      chan0 = 0;
      if (++tap[2] == ax[2].tap_count) {
        tap[2] = 0;
        if (++tap[1] == ax[1].tap_count) {
          tap[1] = 0;
          ++tap[0];
        }
      }
      set_tap();
    }
  }

  // Whether A element (or vector) i exists at the current tap, and its offset.
  __device__ __forceinline__ bool a_where(int i, index_t a_step, index_t& offset) const {
    const int z = a_coord[i][0] + off[0], y = a_coord[i][1] + off[1], x = a_coord[i][2] + off[2];
    const bool inside = (unsigned)z < (unsigned)ax[0].extent && (unsigned)y < (unsigned)ax[1].extent &&
                        (unsigned)x < (unsigned)ax[2].extent;
    offset = a_row[i] + a_step + z * op.a_sp[0] + y * op.a_sp[1] + x * op.a_sp[2];
    return inside && chan0 < a_room[i];
  }

  __device__ __forceinline__ void load() {
    const index_t a_step = chan0 * op.a_chan;
    const index_t b_step = chan0 * op.b_red + b_tap_off;
    if (a_vec) {
#pragma unroll
      for (int i = 0; i < EA / VEC; ++i) {
        index_t offset;
        if (a_where(i, a_step, offset)) {
          load_vector<T, VEC>(a_src, offset, ra + i * VEC);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) ra[i * VEC + j] = 0;
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < EA; ++i) {
        index_t offset;
        ra[i] = 0;
        if (a_where(i, a_step, offset)) ra[i] = load_elem(a_src, offset);
      }
    }
#pragma unroll
    for (int i = 0; i < EB; ++i) {
      rb[i] = 0;
      if (chan0 < b_room[i]) rb[i] = load_elem(b_src, b_off[i] + b_step);
    }
  }

  __device__ __forceinline__ void store(Acc* As, Acc* Bs) const {
    const int tid = threadIdx.x;
    if (a_vec) {
#pragma unroll
      for (int i = 0; i < EA / VEC; ++i) {
        const int v = tid + i * Shape::THREADS;
#pragma unroll
        for (int j = 0; j < VEC; ++j) As[((v % GROUPS) * VEC + j) * BM + v / GROUPS] = ra[i * VEC + j];
      }
    } else {
#pragma unroll
      for (int i = 0; i < EA; ++i) {
        const int e = tid + i * Shape::THREADS;
        As[staged_lane<BM, BK>(e, a_kfast) * BM + staged_row<BM, BK>(e, a_kfast)] = ra[i];
      }
    }
#pragma unroll
    for (int i = 0; i < EB; ++i) {
      const int e = tid + i * Shape::THREADS;
      Bs[staged_lane<BN, BK>(e, b_kfast) * BN + staged_row<BN, BK>(e, b_kfast)] = rb[i];
    }
  }
};

// fprop and dgrad: one tile of one (group, phase) GEMM.
template <bool DGRAD, class Shape>
__device__ __forceinline__ void gather_gemm(const ConvParams& p, const typename Shape::elem_t* __restrict__ a_src,
                                            const typename Shape::elem_t* __restrict__ b_src,
                                            const typename Shape::elem_t* __restrict__ bias,
                                            typename Shape::elem_t* __restrict__ out) {
  typedef typename Shape::Acc Acc;
  constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int tx = tid % Shape::THREADS_N, ty = tid / Shape::THREADS_N;

  index_t block = blockIdx.x;
  const index_t tile_m = block % p.tiles_m;
  block /= p.tiles_m;
  const index_t tile_n = block % p.tiles_n;
  block /= p.tiles_n;
  const index_t phase = block % p.phases;
  const index_t g = block / p.phases;

  GatherLoader<Shape> ld;
  ld.a_src = a_src;
  ld.b_src = b_src;
  ld.op = gather_operands(p, DGRAD, g);
  {
    // phase = (phi_d * sh + phi_h) * sw + phi_w
    index_t rest = phase;
#pragma unroll
    for (int a = 2; a >= 0; --a) {
      const int phi = (int)(rest % p.stride[a]);
      rest /= p.stride[a];
      ld.ax[a] = DGRAD ? dgrad_axis(p, a, phi) : fprop_axis(p, a);
    }
  }
  const int rows0 = ld.ax[0].rows, rows1 = ld.ax[1].rows, rows2 = ld.ax[2].rows;
  const index_t rows = p.N * rows0 * rows1 * rows2;
  // A tile wholly past this phase's rows (phases differ in size): the whole block leaves
  // together, before any barrier.
  if (tile_m * BM >= rows) return;

  const index_t m0 = tile_m * BM, n0 = tile_n * BN;
  ld.a_kfast = p.a_kfast != 0;
  ld.b_kfast = p.b_kfast != 0;
  ld.a_vec = p.a_vec != 0;
  const int red = (int)ld.op.red_channels;
  constexpr int VEC = GatherLoader<Shape>::VEC, GROUPS = GatherLoader<Shape>::GROUPS;
#pragma unroll
  for (int i = 0; i < Shape::A_PER_THREAD; ++i) {
    // Scalar staging: element e of the tile.  Vector staging: vector v (first EA / VEC entries).
    const int e = tid + i * Shape::THREADS;
    const int lane = ld.a_vec ? (e % GROUPS) * VEC : staged_lane<BM, BK>(e, ld.a_kfast);
    index_t m = m0 + (ld.a_vec ? e / GROUPS : staged_row<BM, BK>(e, ld.a_kfast));
    const bool valid = m < rows;
    if (!valid) m = 0;
    const int i2 = (int)(m % rows2);
    m /= rows2;
    const int i1 = (int)(m % rows1);
    m /= rows1;
    const int i0 = (int)(m % rows0);
    const index_t n = m / rows0;
    // A row past the GEMM gets a coordinate no tap brings back in range.
    ld.a_coord[i][0] = valid ? i0 * ld.ax[0].row_mul + ld.ax[0].row_add : -(1 << 30);
    ld.a_coord[i][1] = i1 * ld.ax[1].row_mul + ld.ax[1].row_add;
    ld.a_coord[i][2] = i2 * ld.ax[2].row_mul + ld.ax[2].row_add;
    ld.a_row[i] = n * ld.op.a_batch + ld.op.a_base + lane * ld.op.a_chan;
    ld.a_room[i] = red - lane;
  }
#pragma unroll
  for (int i = 0; i < Shape::B_PER_THREAD; ++i) {
    const int e = tid + i * Shape::THREADS;
    const int lane = staged_lane<BN, BK>(e, ld.b_kfast);
    const index_t col = n0 + staged_row<BN, BK>(e, ld.b_kfast);
    ld.b_room[i] = col < ld.op.cols ? red - lane : 0;
    ld.b_off[i] = ld.op.b_base + col * ld.op.b_col + lane * ld.op.b_red;
  }
  ld.tap[0] = ld.tap[1] = ld.tap[2] = 0;
  ld.chan0 = 0;
  ld.set_tap();

  const index_t chunks = (ld.op.red_channels + BK - 1) / BK;
  const index_t steps = (index_t)ld.ax[0].tap_count * ld.ax[1].tap_count * ld.ax[2].tap_count * chunks;
  Acc acc[Shape::TM][Shape::TN];
  gemm_mainloop<Shape>(ld, steps, reinterpret_cast<Acc*>(smem), acc, ty, tx);

#pragma unroll
  for (int i = 0; i < Shape::TM; ++i) {
    index_t m = m0 + fragment_index<BM, Shape::TM>(ty, i);
    if (m >= rows) continue;
    const int i2 = (int)(m % rows2);
    m /= rows2;
    const int i1 = (int)(m % rows1);
    m /= rows1;
    const int i0 = (int)(m % rows0);
    const index_t n = m / rows0;
    const index_t row_off = ld.op.o_base + n * ld.op.o_batch +
                            (index_t)(i0 * ld.ax[0].out_mul + ld.ax[0].out_add) * ld.op.o_sp[0] +
                            (index_t)(i1 * ld.ax[1].out_mul + ld.ax[1].out_add) * ld.op.o_sp[1] +
                            (index_t)(i2 * ld.ax[2].out_mul + ld.ax[2].out_add) * ld.op.o_sp[2];
#pragma unroll
    for (int j = 0; j < Shape::TN; ++j) {
      const index_t col = n0 + fragment_index<BN, Shape::TN>(tx, j);
      if (col >= ld.op.cols) continue;
      Acc v = acc[i][j];
      if (!DGRAD && p.has_bias) v += load_elem(bias, g * p.Kg + col);
      store_elem(out, row_off + col * ld.op.o_chan, v);
    }
  }
}

// wgrad: stages A (dy: rows are output channels k, reduction is n,z,p,q) and B (x gathered:
// columns are (c, t, r, s)).  Two stagings, chosen per launch (p.a_kfast):
//   reduction-fastest (NCHW): consecutive threads take consecutive reduction indices (q is
//     contiguous); a thread owns one reduction lane, tid % BK, and EA rows / EB columns;
//   channel-fastest (channels-last): consecutive threads take consecutive rows k and
//     columns; the columns are then ordered tap-major, j = tap*C/G + c, so that
//     neighbouring columns are neighbouring channels of x.  A thread owns one row and one
//     column and EA reduction lanes, (tid + i*THREADS) / BM, the same for A and B (BM == BN).
// Each owned reduction lane keeps its (n, z, p, q), advanced BK per step with carries.
template <class Shape>
struct WgradLoader {
  typedef typename Shape::elem_t T;
  typedef typename Shape::Acc Acc;
  static constexpr int EA = Shape::A_PER_THREAD, EB = Shape::B_PER_THREAD;
  static_assert(Shape::BM == Shape::BN && EA == EB, "channel-fastest wgrad staging pairs A and B lanes");

  const T* __restrict__ dy;
  const T* __restrict__ x;
  const ConvParams* p;
  bool kfast;
  index_t a_off[EA];
  bool a_valid[EA];
  index_t b_off[EB];
  int b_tap[EB][3];  // t*dd, r*dh, s*dw of the column
  bool b_valid[EB];
  // Reduction lanes this thread owns (the first one only when reduction-fastest): the
  // lane's offset in the step, and its (n, z, p, q).  The lane's reduction index is
  // slice start + pos + lane, valid while pos + lane < len.
  int lane[EA];
  int n[EA], z[EA], pp[EA], q[EA];
  index_t pos, len;
  Acc ra[EA], rb[EB];

  __device__ __forceinline__ int lanes() const { return kfast ? 1 : EA; }

  __device__ __forceinline__ void advance() {
    const int Q = (int)p->out_size[2], P = (int)p->out_size[1], Z = (int)p->out_size[0];
    pos += Shape::BK;
#pragma unroll
    for (int l = 0; l < EA; ++l) {
      if (l >= lanes()) break;
      q[l] += Shape::BK;
      while (q[l] >= Q) {
        q[l] -= Q;
        if (++pp[l] == P) {
          pp[l] = 0;
          if (++z[l] == Z) {
            z[l] = 0;
            ++n[l];
          }
        }
      }
    }
  }

  // A and B elements i, read at reduction lane l.
  __device__ __forceinline__ void load_pair(int i, int l) {
    ra[i] = 0;
    rb[i] = 0;
    if (pos + lane[l] >= len) return;
    if (a_valid[i]) {
      ra[i] = load_elem(dy, a_off[i] + n[l] * p->y_stride[0] + z[l] * p->y_stride[2] + pp[l] * p->y_stride[3] +
                                q[l] * p->y_stride[4]);
    }
    const int zi = z[l] * (int)p->stride[0] - (int)p->pad[0] + b_tap[i][0];
    const int yi = pp[l] * (int)p->stride[1] - (int)p->pad[1] + b_tap[i][1];
    const int xi = q[l] * (int)p->stride[2] - (int)p->pad[2] + b_tap[i][2];
    const bool inside = (unsigned)zi < (unsigned)p->in_size[0] && (unsigned)yi < (unsigned)p->in_size[1] &&
                        (unsigned)xi < (unsigned)p->in_size[2];
    if (b_valid[i] && inside) {
      rb[i] = load_elem(x, b_off[i] + n[l] * p->x_stride[0] + zi * p->x_stride[2] + yi * p->x_stride[3] +
                               xi * p->x_stride[4]);
    }
  }

  __device__ __forceinline__ void load() {
#pragma unroll
    for (int i = 0; i < EA; ++i) load_pair(i, kfast ? 0 : i);
  }

  __device__ __forceinline__ void store(Acc* As, Acc* Bs) const {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < EA; ++i) {
      const int e = tid + i * Shape::THREADS;
      As[staged_lane<Shape::BM, Shape::BK>(e, kfast) * Shape::BM + staged_row<Shape::BM, Shape::BK>(e, kfast)] = ra[i];
      Bs[staged_lane<Shape::BN, Shape::BK>(e, kfast) * Shape::BN + staged_row<Shape::BN, Shape::BK>(e, kfast)] = rb[i];
    }
  }
};

// Channel c and tap of wgrad column j: j = c*taps + tap, or j = tap*C/G + c when tap-major.
__device__ __forceinline__ void wgrad_column(index_t j, bool tap_major, index_t Cg, int taps, index_t& c, int& tap) {
  if (tap_major) {
    tap = (int)(j / Cg);
    c = j % Cg;
  } else {
    c = j / taps;
    tap = (int)(j % taps);
  }
}

template <class Shape>
__device__ __forceinline__ void wgrad_gemm(const ConvParams& p, const typename Shape::elem_t* __restrict__ x,
                                           const typename Shape::elem_t* __restrict__ dy,
                                           typename Shape::elem_t* __restrict__ dw,
                                           typename Shape::Acc* __restrict__ workspace) {
  typedef typename Shape::Acc Acc;
  constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int tx = tid % Shape::THREADS_N, ty = tid / Shape::THREADS_N;

  index_t block = blockIdx.x;
  const index_t tile_m = block % p.tiles_m;
  block /= p.tiles_m;
  const index_t tile_n = block % p.tiles_n;
  block /= p.tiles_n;
  const index_t g = block % p.G;
  const index_t slice = block / p.G;

  const int S = (int)p.kernel_size[2], RS = (int)(p.kernel_size[1] * p.kernel_size[2]);
  const int taps = (int)(p.kernel_size[0] * RS);
  const index_t cols = p.Cg * taps;
  const index_t red_total = p.N * p.out_size[0] * p.out_size[1] * p.out_size[2];
  const index_t red_begin = slice * p.split_len;
  const index_t red_end = red_begin + p.split_len < red_total ? red_begin + p.split_len : red_total;
  const index_t m0 = tile_m * BM, n0 = tile_n * BN;
  const bool kfast = p.a_kfast != 0;

  WgradLoader<Shape> ld;
  ld.dy = dy;
  ld.x = x;
  ld.p = &p;
  ld.kfast = kfast;
  ld.pos = 0;
  ld.len = red_end - red_begin;
#pragma unroll
  for (int i = 0; i < Shape::A_PER_THREAD; ++i) {
    const int e = tid + i * Shape::THREADS;
    const int row = staged_row<BM, BK>(e, kfast);
    ld.a_valid[i] = m0 + row < p.Kg;
    ld.a_off[i] = (g * p.Kg + m0 + row) * p.y_stride[1];
    const index_t j = n0 + staged_row<BN, BK>(e, kfast);
    ld.b_valid[i] = j < cols;
    index_t c;
    int tap;
    wgrad_column(ld.b_valid[i] ? j : 0, !kfast, p.Cg, taps, c, tap);
    ld.b_tap[i][0] = (tap / RS) * (int)p.dilation[0];
    ld.b_tap[i][1] = (tap % RS / S) * (int)p.dilation[1];
    ld.b_tap[i][2] = (tap % S) * (int)p.dilation[2];
    ld.b_off[i] = (g * p.Cg + c) * p.x_stride[1];
    // The reduction lane of element i, decoded once; afterwards advanced BK per step.
    ld.lane[i] = staged_lane<BM, BK>(e, kfast);
    index_t r = red_begin + ld.lane[i];
    if (r >= red_total) r = 0;
    ld.q[i] = (int)(r % p.out_size[2]);
    r /= p.out_size[2];
    ld.pp[i] = (int)(r % p.out_size[1]);
    r /= p.out_size[1];
    ld.z[i] = (int)(r % p.out_size[0]);
    ld.n[i] = (int)(r / p.out_size[0]);
  }
  const index_t steps = red_end > red_begin ? (red_end - red_begin + BK - 1) / BK : 0;
  Acc acc[Shape::TM][Shape::TN];
  gemm_mainloop<Shape>(ld, steps, reinterpret_cast<Acc*>(smem), acc, ty, tx);

  // Decode each column once, not once per element: with the 64-bit divisions in every one of
  // the TM x TN unrolled elements, NVVM and ptxas took about four times as long over a 128x128
  // wgrad instantiation (measured with NVRTC for sm_90), the longest build of a training step.
  index_t ws_col[Shape::TN], w_col[Shape::TN];
  bool col_ok[Shape::TN];
#pragma unroll
  for (int j = 0; j < Shape::TN; ++j) {
    const index_t col = n0 + fragment_index<BN, Shape::TN>(tx, j);
    col_ok[j] = col < cols;
    index_t c;
    int tap;
    wgrad_column(col_ok[j] ? col : 0, !kfast, p.Cg, taps, c, tap);
    ws_col[j] = c * taps + tap;
    w_col[j] = c * p.w_stride[1] + (tap / RS) * p.w_stride[2] + (tap % RS / S) * p.w_stride[3] +
               (tap % S) * p.w_stride[4];
  }
#pragma unroll
  for (int i = 0; i < Shape::TM; ++i) {
    const index_t k = m0 + fragment_index<BM, Shape::TM>(ty, i);
    if (k >= p.Kg) continue;
    const index_t kg = g * p.Kg + k;
#pragma unroll
    for (int j = 0; j < Shape::TN; ++j) {
      if (!col_ok[j]) continue;
      if (p.epilogue == EPILOGUE_WORKSPACE) {
        // The workspace is always in the canonical column order c*taps + tap.
        workspace[slice * p.ws_slice_stride + kg * cols + ws_col[j]] = acc[i][j];
      } else if (p.epilogue == EPILOGUE_ATOMIC) {
        atomicAdd(workspace + kg * cols + ws_col[j], acc[i][j]);
      } else {
        store_elem(dw, kg * p.w_stride[0] + w_col[j], acc[i][j]);
      }
    }
  }
}

}  // namespace implicit_gemm

// x: (N, C, D, H, W), w: (K, C/G, T, R, S), bias: (K,) (read only when p.has_bias), y: (N, K, Z, P, Q).
template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__(TileShape<T, BM, BN, BK, TM, TN>::THREADS, 1)
    fprop_gemm(const ConvParams p, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
               T* __restrict__ y) {
  implicit_gemm::gather_gemm<false, TileShape<T, BM, BN, BK, TM, TN>>(p, x, w, bias, y);
}

// dy: (N, K, Z, P, Q), w: (K, C/G, T, R, S), dx: (N, C, D, H, W).
template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__(TileShape<T, BM, BN, BK, TM, TN>::THREADS, 1)
    dgrad_gemm(const ConvParams p, const T* __restrict__ dy, const T* __restrict__ w, T* __restrict__ dx) {
  implicit_gemm::gather_gemm<true, TileShape<T, BM, BN, BK, TM, TN>>(p, dy, w, nullptr, dx);
}

// x: (N, C, D, H, W), dy: (N, K, Z, P, Q), dw: (K, C/G, T, R, S);
// workspace: (splits, K, C/G*T*R*S) accumulators for EPILOGUE_WORKSPACE, (K, C/G*T*R*S) for EPILOGUE_ATOMIC.
template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__(TileShape<T, BM, BN, BK, TM, TN>::THREADS, 1)
    wgrad_gemm(const ConvParams p, const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dw,
               acc_t<T>* __restrict__ workspace) {
  implicit_gemm::wgrad_gemm<TileShape<T, BM, BN, BK, TM, TN>>(p, x, dy, dw, workspace);
}

}  // namespace convgrad
