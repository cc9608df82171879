// tensor_core_loaders.cuh: what each pass of tensor_core_gemm.cu copies into a pipeline stage.
//
// A loader fills the A and B slots of one stage with one k-tile (wmma_tile.cuh gives the
// slot layouts) and steps to the next k-tile.  Each thread owns a fixed set of 16-byte
// vector slots per operand (VectorSlot: A_VECS of A, B_VECS of B); the tensor coordinates
// that do not change along the reduction are decoded once, before the loop.
//
// Two paths per operand, chosen per launch (p.a_vec, p.b_vec, and the pointer's alignment):
//   fast:    the slot's VEC elements are contiguous in memory (channels-last, the channel
//            count a multiple of VEC, every other stride a multiple of VEC, the pointer
//            16-byte aligned): one cp.async of 16 bytes, or its zero-fill form for padding,
//            rows past the GEMM and channels past the group;
//   general: any strides and channel counts: VEC plain loads (each element checked on its
//            own), one 16-byte shared store.  The stores are synchronous, which the pipeline
//            allows: a stage is written only after the barrier that ends its last reads.
//
// Reduction order of fprop and dgrad: kernel taps outer, channels inner, so a k-tile is one
// tap and BK consecutive channels (channels past the group read as zero); of wgrad: the
// flattened (n, z, p, q), BK at a time, within the block's split-K slice.
#pragma once

#include "wmma_tile.cuh"

namespace convgrad {
namespace tc {

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15) == 0; }

// How the taps of one spatial axis of a gathered GEMM (fprop, or one stride phase of dgrad)
// are walked; the same for the whole block.
struct TapAxis {
  int first, step, count;     // the axis's taps: first + u * step, u < count
  int off_first, off_step;    // gathered-coordinate offset of tap u: off_first + u * off_step
};

// How the GEMM rows of one axis map to the gathered tensor and to the output.
struct RowAxis {
  int rows;              // row extent along this axis
  int row_mul, row_add;  // gathered coordinate of row index i before the tap: i * row_mul + row_add
  int out_mul, out_add;  // output coordinate of row index i: i * out_mul + out_add
};

// Axis a of fprop, or of dgrad stride phase phi (phi < stride[a]).  dgrad: input positions
// d = d0 + i*s with (d0 + pad) mod s = phi receive exactly the taps t = t0, t0 + step, ...
// with t*dil = phi (mod s), from z = i + (d0 + pad - t*dil) / s (implicit_gemm.cu derives it).
template <bool DGRAD>
__device__ __forceinline__ void gather_axis(const ConvParams& p, int a, int phi, TapAxis& tap, RowAxis& row) {
  if (!DGRAD) {
    tap.first = 0;
    tap.step = 1;
    tap.count = (int)p.kernel_size[a];
    tap.off_first = 0;
    tap.off_step = (int)p.dilation[a];
    row.rows = (int)p.out_size[a];
    row.row_mul = (int)p.stride[a];
    row.row_add = -(int)p.pad[a];
    row.out_mul = 1;
    row.out_add = 0;
    return;
  }
  const int s = (int)p.stride[a], dil = (int)p.dilation[a], pad = (int)p.pad[a];
  const int size = (int)p.in_size[a], taps = (int)p.kernel_size[a], step = (int)p.tap_step[a];
  const int d0 = ((phi - pad) % s + s) % s;
  row.rows = d0 < size ? (size - 1 - d0) / s + 1 : 0;
  row.row_mul = 1;
  row.row_add = 0;
  row.out_mul = s;
  row.out_add = d0;
  int first = 0;
  while (first < step && (first * dil - phi) % s != 0) ++first;
  tap.first = first;
  tap.step = step;
  tap.count = first < step && first < taps ? (taps - 1 - first) / step + 1 : 0;
  tap.off_first = (d0 + pad - first * dil) / s;  // exact: the numerator is a multiple of s
  tap.off_step = -(step * dil) / s;              // exact: step * dil = lcm(s, dil)
}

// The stride-phase digits (phi_d, phi_h, phi_w) of phase = (phi_d * sh + phi_h) * sw + phi_w.
__device__ __forceinline__ void phase_digits(const ConvParams& p, index_t phase, int (&phi)[3]) {
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    phi[a] = (int)(phase % p.stride[a]);
    phase /= p.stride[a];
  }
}

// Which tile of which (group, phase) GEMM block b computes: (tile along M, tile along N,
// phase, group), fastest first.
struct GatherBlock {
  index_t tile_m, tile_n, phase, g;
  __device__ __forceinline__ GatherBlock(const ConvParams& p, index_t block) {
    tile_m = block % p.tiles_m;
    block /= p.tiles_m;
    tile_n = block % p.tiles_n;
    block /= p.tiles_n;
    phase = block % p.phases;
    g = block / p.phases;
  }
};

// Decodes GEMM row m (below N * rows[0] * rows[1] * rows[2]) into its batch and row indices.
__device__ __forceinline__ void decode_row(const RowAxis (&ax)[3], index_t m, index_t& n, int (&i)[3]) {
  const int pixels = ax[0].rows * ax[1].rows * ax[2].rows;  // below 2^31 (the planner checks)
  n = m / pixels;
  int rest = (int)(m - n * pixels);
  i[2] = rest % ax[2].rows;
  rest /= ax[2].rows;
  i[1] = rest % ax[1].rows;
  i[0] = rest / ax[1].rows;
}

// The strides a gathered GEMM reads: fprop A = x, B = w (reduction channel c, column k);
// dgrad A = dy, B = w (reduction channel k, column c).  Read from the parameter struct where
// needed rather than kept in registers.
template <bool DGRAD>
struct GatherStrides {
  const ConvParams& p;
  __device__ __forceinline__ index_t a_batch() const { return DGRAD ? p.y_stride[0] : p.x_stride[0]; }
  __device__ __forceinline__ index_t a_chan() const { return DGRAD ? p.y_stride[1] : p.x_stride[1]; }
  __device__ __forceinline__ index_t a_sp(int a) const { return DGRAD ? p.y_stride[2 + a] : p.x_stride[2 + a]; }
  __device__ __forceinline__ int a_extent(int a) const { return (int)(DGRAD ? p.out_size[a] : p.in_size[a]); }
  __device__ __forceinline__ index_t b_red() const { return DGRAD ? p.w_stride[0] : p.w_stride[1]; }
  __device__ __forceinline__ index_t b_col() const { return DGRAD ? p.w_stride[1] : p.w_stride[0]; }
  __device__ __forceinline__ int red_channels() const { return (int)(DGRAD ? p.Kg : p.Cg); }
  __device__ __forceinline__ int cols() const { return (int)(DGRAD ? p.Cg : p.Kg); }
};

// fprop and dgrad: A is the activation gathered row by row (K_CONTIGUOUS), B the weight
// (K_CONTIGUOUS for fprop, where its reduction channels are contiguous in KRSC; MN_CONTIGUOUS
// for dgrad, where its columns are).  What stays in registers through the reduction: per A
// slot the row's batch offset and coordinates; the tap walk (block-uniform).
template <bool DGRAD, class Shape>
struct GatherLoader {
  typedef typename Shape::elem_t T;
  static constexpr int VEC = Shape::VEC, BK = Shape::BK;
  static constexpr int B_LAYOUT = DGRAD ? MN_CONTIGUOUS : K_CONTIGUOUS;
  typedef VectorSlot<K_CONTIGUOUS, Shape::BM, Shape> SlotA;
  typedef VectorSlot<B_LAYOUT, Shape::BN, Shape> SlotB;

  const ConvParams& p;
  const T* __restrict__ a_src;  // at the group's first reduction channel
  const T* __restrict__ b_src;  // at the group's first output channel
  bool a_vec, b_vec;
  int n0;  // first GEMM column of the tile
  TapAxis ax[3];
  index_t a_row[Shape::A_VECS];    // the row's batch offset
  int a_coord[Shape::A_VECS][3];  // its coordinates before the tap (far out of range past the GEMM)
  // The current k-tile: tap counters, their A-coordinate offsets, B's tap offset, first channel.
  int tap[3];
  int off[3];
  index_t b_tap_off;
  int chan0;

  __device__ __forceinline__ GatherLoader(const ConvParams& params) : p(params) {}

  __device__ __forceinline__ void set_tap() {
    b_tap_off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      off[a] = ax[a].off_first + tap[a] * ax[a].off_step;
      b_tap_off += (index_t)(ax[a].first + tap[a] * ax[a].step) * p.w_stride[2 + a];
    }
  }

  // Sets up the block's tile: rows from m0 (of `rows` in this GEMM), columns from n0.
  __device__ __forceinline__ void init(const GatherBlock& blk, const TapAxis (&taps)[3], const RowAxis (&rows)[3],
                                       index_t m0, index_t total_rows, const T* a, const T* b) {
    const GatherStrides<DGRAD> st{p};
    a_src = a + blk.g * st.red_channels() * st.a_chan();
    b_src = b + blk.g * p.Kg * p.w_stride[0];
    a_vec = p.a_vec != 0 && aligned16(a);
    b_vec = p.b_vec != 0 && aligned16(b);
    n0 = (int)(blk.tile_n * Shape::BN);
#pragma unroll
    for (int d = 0; d < 3; ++d) ax[d] = taps[d];
#pragma unroll
    for (int i = 0; i < Shape::A_VECS; ++i) {
      const SlotA slot(threadIdx.x + i * Shape::THREADS);
      const index_t m = m0 + slot.row;
      const bool valid = m < total_rows;
      index_t n;
      int idx[3];
      decode_row(rows, valid ? m : 0, n, idx);
#pragma unroll
      for (int d = 0; d < 3; ++d) a_coord[i][d] = idx[d] * rows[d].row_mul + rows[d].row_add;
      if (!valid) a_coord[i][0] = -(1 << 30);  // no tap brings it back in range
      a_row[i] = n * st.a_batch();
    }
    tap[0] = tap[1] = tap[2] = 0;
    chan0 = 0;
    set_tap();
  }

  __device__ __forceinline__ int steps() const {
    const int chunks = (GatherStrides<DGRAD>{p}.red_channels() + BK - 1) / BK;
    return ax[0].count * ax[1].count * ax[2].count * chunks;
  }

  __device__ __forceinline__ void advance() {
    chan0 += BK;
    if (chan0 >= GatherStrides<DGRAD>{p}.red_channels()) {
      chan0 = 0;
      if (++tap[2] == ax[2].count) {
        tap[2] = 0;
        if (++tap[1] == ax[1].count) {
          tap[1] = 0;
          ++tap[0];
        }
      }
      set_tap();
    }
  }

  __device__ __forceinline__ void issue_a(T* As) const {
    const GatherStrides<DGRAD> st{p};
#pragma unroll
    for (int i = 0; i < Shape::A_VECS; ++i) {
      const SlotA slot(threadIdx.x + i * Shape::THREADS);
      const int z = a_coord[i][0] + off[0], y = a_coord[i][1] + off[1], x = a_coord[i][2] + off[2];
      const bool inside = (unsigned)z < (unsigned)st.a_extent(0) && (unsigned)y < (unsigned)st.a_extent(1) &&
                          (unsigned)x < (unsigned)st.a_extent(2);
      const index_t pixel = a_row[i] + z * st.a_sp(0) + y * st.a_sp(1) + x * st.a_sp(2);
      const int channel = chan0 + slot.red;
      if (a_vec) {
        // The channel count is a multiple of VEC: a vector is wholly inside the group or past it.
        const bool any = inside && channel < st.red_channels();
        cp_async<16>(As + slot.offset, any ? a_src + pixel + channel : a_src, any ? 16 : 0);
      } else {
        T v[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          v[j] = T(0.0f);
          if (inside && channel + j < st.red_channels()) v[j] = a_src[pixel + (index_t)(channel + j) * st.a_chan()];
        }
        store_vector(As + slot.offset, v);
      }
    }
  }

  __device__ __forceinline__ void issue_b(T* Bs) const {
    const GatherStrides<DGRAD> st{p};
#pragma unroll
    for (int i = 0; i < Shape::B_VECS; ++i) {
      const SlotB slot(threadIdx.x + i * Shape::THREADS);
      const int channel = chan0 + slot.red, col = n0 + slot.row;
      const index_t at = b_tap_off + (index_t)col * st.b_col() + (index_t)channel * st.b_red();
      if (B_LAYOUT == K_CONTIGUOUS) {
        // VEC reduction channels of one column (fprop: output channel col).
        const bool col_ok = col < st.cols();
        if (b_vec) {
          const bool any = col_ok && channel < st.red_channels();
          cp_async<16>(Bs + slot.offset, any ? b_src + at : b_src, any ? 16 : 0);
        } else {
          T v[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            v[j] = T(0.0f);
            if (col_ok && channel + j < st.red_channels()) v[j] = b_src[at + j * st.b_red()];
          }
          store_vector(Bs + slot.offset, v);
        }
      } else {
        // VEC columns of one reduction channel (dgrad: input channels col.., output channel `channel`).
        const bool red_ok = channel < st.red_channels();
        if (b_vec) {
          const bool any = red_ok && col < st.cols();
          cp_async<16>(Bs + slot.offset, any ? b_src + at : b_src, any ? 16 : 0);
        } else {
          T v[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            v[j] = T(0.0f);
            if (red_ok && col + j < st.cols()) v[j] = b_src[at + j * st.b_col()];
          }
          store_vector(Bs + slot.offset, v);
        }
      }
    }
  }

  __device__ __forceinline__ void issue(T* As, T* Bs) const {
    issue_a(As);
    issue_b(Bs);
  }
};

// A position in wgrad's reduction (n, z, p, q), stepped forward BK at a time.
struct Cursor {
  int n, z, p, q;

  __device__ __forceinline__ void set(index_t r, const ConvParams& prm) {
    const int Q = (int)prm.out_size[2], P = (int)prm.out_size[1], Z = (int)prm.out_size[0];
    q = (int)(r % Q);
    r /= Q;
    p = (int)(r % P);
    r /= P;
    z = (int)(r % Z);
    n = (int)(r / Z);
  }

  __device__ __forceinline__ void step(int by, const ConvParams& prm) {
    const int Q = (int)prm.out_size[2], P = (int)prm.out_size[1], Z = (int)prm.out_size[0];
    q += by;
    if (q < Q) return;
    int carry = q / Q;
    q -= carry * Q;
    p += carry;
    if (p < P) return;
    carry = p / P;
    p -= carry * P;
    z += carry;
    if (z < Z) return;
    carry = z / Z;
    z -= carry * Z;
    n += carry;
  }
};

// wgrad: A is dy (rows: the group's output channels k, MN_CONTIGUOUS as k is contiguous in
// channels-last dy), B is x gathered (columns j = tap * C/G + c, tap-major so that VEC
// consecutive columns are VEC consecutive channels of one tap; MN_CONTIGUOUS).  Rows of the
// reduction are (n, z, p, q) of the block's split-K slice: [red_begin, red_begin + len).
// What stays in registers: a cursor per reduction lane a thread copies (square tiles: A slot
// i and B slot i have the same lane, so they share it), and each B slot's first channel and tap.
template <class Shape>
struct WgradLoader {
  typedef typename Shape::elem_t T;
  static constexpr int VEC = Shape::VEC, BK = Shape::BK;
  typedef VectorSlot<MN_CONTIGUOUS, Shape::BM, Shape> SlotA;
  typedef VectorSlot<MN_CONTIGUOUS, Shape::BN, Shape> SlotB;
  static_assert(Shape::BM == Shape::BN && Shape::A_VECS == Shape::B_VECS, "wgrad tiles are square");

  const ConvParams& p;
  const T* __restrict__ dy;  // at the group's first output channel
  const T* __restrict__ x;   // at the group's first input channel
  bool a_vec, b_vec;
  int m0, n0;        // the tile's first row (k within the group) and column
  index_t pos, len;  // reduction indices done in this slice, and the slice's length
  Cursor at[Shape::A_VECS];  // reduction position of slot i's lane, for A and B alike
  int b_c0[Shape::B_VECS];
  int b_tap0[Shape::B_VECS];

  __device__ __forceinline__ WgradLoader(const ConvParams& params) : p(params) {}

  __device__ __forceinline__ index_t cols() const { return p.Cg * p.kernel_size[0] * p.kernel_size[1] * p.kernel_size[2]; }

  __device__ __forceinline__ void init(index_t tile_m, index_t tile_n, index_t g, index_t red_begin, index_t length,
                                       const T* dy_, const T* x_) {
    dy = dy_ + g * p.Kg * p.y_stride[1];
    x = x_ + g * p.Cg * p.x_stride[1];
    a_vec = p.a_vec != 0 && aligned16(dy_);
    b_vec = p.b_vec != 0 && aligned16(x_);
    m0 = (int)(tile_m * Shape::BM);
    n0 = (int)(tile_n * Shape::BN);
    pos = 0;
    len = length;
    const index_t red_total = p.N * p.out_size[0] * p.out_size[1] * p.out_size[2];
#pragma unroll
    for (int i = 0; i < Shape::A_VECS; ++i) {
      const index_t r = red_begin + SlotA(threadIdx.x + i * Shape::THREADS).red;
      at[i].set(r < red_total ? r : 0, p);
    }
    const index_t all = cols();
#pragma unroll
    for (int i = 0; i < Shape::B_VECS; ++i) {
      const SlotB slot(threadIdx.x + i * Shape::THREADS);
      const index_t j = n0 + slot.row < all ? n0 + slot.row : 0;
      b_tap0[i] = (int)(j / p.Cg);
      b_c0[i] = (int)(j % p.Cg);
    }
  }

  __device__ __forceinline__ int steps() const { return (int)((len + BK - 1) / BK); }

  __device__ __forceinline__ void advance() {
    pos += BK;
#pragma unroll
    for (int i = 0; i < Shape::A_VECS; ++i) at[i].step(BK, p);
  }

  __device__ __forceinline__ index_t dy_offset(const Cursor& c) const {
    return c.n * p.y_stride[0] + c.z * p.y_stride[2] + c.p * p.y_stride[3] + c.q * p.y_stride[4];
  }

  // x offset of the group's channel 0 at the input position tap `tap` reads for cursor c;
  // false when that position is padding.
  __device__ __forceinline__ bool x_offset(const Cursor& c, int tap, index_t& offset) const {
    const int S = (int)p.kernel_size[2], RS = (int)(p.kernel_size[1] * p.kernel_size[2]);
    const int t = tap / RS, r = tap % RS / S, s = tap % S;
    const int zi = c.z * (int)p.stride[0] - (int)p.pad[0] + t * (int)p.dilation[0];
    const int yi = c.p * (int)p.stride[1] - (int)p.pad[1] + r * (int)p.dilation[1];
    const int xi = c.q * (int)p.stride[2] - (int)p.pad[2] + s * (int)p.dilation[2];
    offset = c.n * p.x_stride[0] + zi * p.x_stride[2] + yi * p.x_stride[3] + xi * p.x_stride[4];
    return (unsigned)zi < (unsigned)p.in_size[0] && (unsigned)yi < (unsigned)p.in_size[1] &&
           (unsigned)xi < (unsigned)p.in_size[2];
  }

  __device__ __forceinline__ void issue(T* As, T* Bs) const {
#pragma unroll
    for (int i = 0; i < Shape::A_VECS; ++i) {
      const SlotA slot(threadIdx.x + i * Shape::THREADS);
      const bool red_ok = pos + slot.red < len;
      const int k0 = m0 + slot.row;
      const index_t offset = k0 * p.y_stride[1] + dy_offset(at[i]);
      if (a_vec) {
        // K/G is a multiple of VEC: the vector's rows are all in the group or all past it.
        const bool any = red_ok && k0 < p.Kg;
        cp_async<16>(As + slot.offset, any ? dy + offset : dy, any ? 16 : 0);
      } else {
        T v[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          v[j] = T(0.0f);
          if (red_ok && k0 + j < p.Kg) v[j] = dy[offset + j * p.y_stride[1]];
        }
        store_vector(As + slot.offset, v);
      }
    }
    const index_t all = cols();
#pragma unroll
    for (int i = 0; i < Shape::B_VECS; ++i) {
      const SlotB slot(threadIdx.x + i * Shape::THREADS);
      const Cursor& at_red = at[i];
      const bool red_ok = pos + slot.red < len;
      const int j0 = n0 + slot.row;
      if (b_vec) {
        // C/G is a multiple of VEC: the vector's columns are consecutive channels of one tap.
        index_t offset;
        const bool inside = x_offset(at_red, b_tap0[i], offset);
        const bool any = red_ok && j0 < all && inside;
        cp_async<16>(Bs + slot.offset, any ? x + offset + b_c0[i] : x, any ? 16 : 0);
      } else {
        T v[VEC];
        int c = b_c0[i], tap = b_tap0[i];
        index_t offset;
        bool inside = x_offset(at_red, tap, offset);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          v[j] = T(0.0f);
          if (red_ok && j0 + j < all && inside) v[j] = x[offset + (index_t)c * p.x_stride[1]];
          // The next column: the next channel, or the first channel of the next tap.
          if (++c == p.Cg) {
            c = 0;
            ++tap;
            inside = x_offset(at_red, tap, offset);
          }
        }
        store_vector(Bs + slot.offset, v);
      }
    }
  }
};

}  // namespace tc
}  // namespace convgrad
