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
// The packed weight (PACKED_B tiles, written by weight_pack.cu): per group a dense row-major
// matrix of (taps * b_chunk, rounded up to BK) rows and b_ld columns, row tap*b_chunk + ch
// holding reduction channel ch of canonical tap (t*R + r)*S + s, zero where ch or the column
// is past the GEMM, so its loads need no bounds checks and are contiguous.
//
// GEMM per group (DESIGN §1):
//   fprop  M = N*Z*P*Q (output pixels), N = K/G, reduction = taps x C/G
//   dgrad  M = N*D*H*W of one stride phase, N = C/G, reduction = the phase's taps x K/G
//   wgrad  M = K/G, N = C/G*T*R*S (column j = c*T*R*S + tap, or tap*C/G + c for channels-last
//          staging; tap = (t*R + r)*S + s), reduction = N*Z*P*Q
// fprop and dgrad gather A from the activation.  Reduction order: one tap at a time, BK
// consecutive channels per step (channels rounded up to BK); or, when p.red_packed (C/G or
// K/G below BK; packed-weight tiles; dgrad only with unit strides), the (tap, channel)
// pairs flattened, tap-major, BK of them per step, so a step is not mostly padding (the
// C = 3 stem: 19 steps for its 147 pairs instead of 49).  wgrad's staging direction is a
// template argument (KFAST), chosen by the planner from x's layout.
//
// Strided dgrad (stride phases): input positions d with (d + pd) mod sd = phi receive
// exactly the taps t with t*dd = phi (mod sd), i.e. t = t0, t0 + step, ... with
// step = sd / gcd(sd, dd) (ConvParams::tap_step), and for such a tap z = i + (d0 + pd - t*dd)/sd
// where d = d0 + i*sd.  Each block computes one phase (phi_d, phi_h, phi_w), so every
// multiply it does is by a tap that contributes: none is spent on taps the stride skips.
//
// Launch geometry: a 1-D grid of tiles_m * tiles_n * phases * G * splits blocks (phases is 1
// but for dgrad) of (BM/TM)*(BN/TN) threads; block b is, fastest first, (tile along M, tile
// along N, phase, group, split-K slice).  Thread tid computes the TM x TN outputs of its
// register block (rows fragment_index<BM,TM>(tid / (BN/TN), i), columns
// fragment_index<BN,TN>(tid % (BN/TN), j) of the block's tile).  Dynamic shared memory:
// TileShape::SMEM_BYTES: the two stages (or the epilogue's pass, if larger), then the
// epilogue's row-offset table and a record per thread (GatherRecord; wgrad keeps its column
// table, block position and WgradRecords there).
//
// Staging (global -> registers -> shared), fprop and dgrad: a thread stages one row (pixel)
// of the A tile and BK / (THREADS/BM) of its reduction lanes: interleaved (consecutive
// threads on consecutive pixels: coalesced for NCHW) or, when p.a_blocked, consecutive
// lanes per thread (channels-last), loaded as vectors of 16 bytes when p.a_vec (the planner
// checks strides and channel count, the backend the pointer).  Packed B: each thread loads
// B_PER_THREAD consecutive columns of one reduction row in one vector; direct B (small
// tile): one column and interleaved lanes, read at the weight's strides.  Within a tap, a
// step only advances the offsets; the pixel bounds are recomputed when the tap changes.
//
// Epilogue, fprop and dgrad: the tile goes out through shared memory in (TM/4)*(TN/4)
// passes of EPI_ROWS x EPI_COLS, read back so that consecutive threads store consecutive
// addresses: pixel-fastest for NCHW-like outputs, channel-fastest when p.out_cfast.  Each
// output row's offset is computed once per block into a table.  With split-K
// (EPILOGUE_WORKSPACE) each slice stores its partial sums to workspace[slice] in the
// output's canonical contiguous order (N, C, spatial), and splitk_reduce.cu adds the slices
// in a fixed order (deterministic).  wgrad: (ConvParams::epilogue) store to dw; or the
// slice's partial sums to workspace[slice][K][C/G*T*R*S]; or atomicAdd into one zeroed
// workspace (deterministic=False); its columns already run along dw's contiguous axis.
//
// Limits (checked by the planner): spatial extents, padded extents and C/G*T*R*S below 2^30;
// N below 2^31; fewer than 2^31 blocks; reduction steps of one GEMM below 2^31; a wgrad
// slice (split_len, or N*Z*P*Q unsplit) below 2^31 (the planner splits longer ones).
// Tensor offsets, the GEMM's M and wgrad's whole reduction are 64-bit.
#include "dtype_traits.cuh"
#include "gemm_tile.cuh"

namespace convgrad {
namespace implicit_gemm {

// Division of 0 <= n < 2^31 by a divisor d >= 1 with a multiply and a shift; the planner
// computes, with l = ceil(log2 d), mul = floor(2^(31+l) / d) + 1 and shift = 31 + l, which
// satisfy 2^(31+l) < mul*d <= 2^(31+l) + 2^l and so make (n * mul) >> shift == n / d.
__device__ __forceinline__ int fast_divide(int n, index_t mul, index_t shift) {
  return (int)(((unsigned long long)n * (unsigned long long)mul) >> (int)shift);
}

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

// The strides a gathered GEMM reads and writes at: A is the activation it gathers (x for
// fprop, dy for dgrad), O the tensor it computes (y for fprop, dx for dgrad).
template <bool DGRAD>
struct GatherStrides {
  static __device__ __forceinline__ const index_t* a(const ConvParams& p) { return DGRAD ? p.y_stride : p.x_stride; }
  static __device__ __forceinline__ const index_t* o(const ConvParams& p) { return DGRAD ? p.x_stride : p.y_stride; }
  static __device__ __forceinline__ index_t red(const ConvParams& p) { return DGRAD ? p.Kg : p.Cg; }   // reduction channels
  static __device__ __forceinline__ index_t cols(const ConvParams& p) { return DGRAD ? p.Cg : p.Kg; }  // GEMM N
  // The weight's strides along B's reduction channel and column (direct B).
  static __device__ __forceinline__ index_t b_red(const ConvParams& p) { return DGRAD ? p.w_stride[0] : p.w_stride[1]; }
  static __device__ __forceinline__ index_t b_col(const ConvParams& p) { return DGRAD ? p.w_stride[1] : p.w_stride[0]; }
};

// What a thread of a gathered GEMM needs only when the tap changes, kept in shared memory
// (its own record) rather than in registers through the main loop.
struct GatherRecord {
  index_t a_pixel;  // A offset of the thread's pixel (n) at the group's first channel
  index_t b_group;  // offset of the group's B: its packed matrix, or the weight at its first channel
  int a_coord[3];   // the pixel's coordinates before the tap (far out of range past the GEMM)
  int phase;        // dgrad: the block's stride phase
  int n0;           // the tile's first column
  int u;            // aligned order: the current linear tap of the phase
};
static_assert(sizeof(GatherRecord) <= GATHER_RECORD_BYTES, "the record must fit its shared-memory slot");

// Stages the A (gathered activation) and B (weight) elements of one reduction step of a
// fprop or dgrad GEMM.  See the header: one A row per thread, packed or direct B.
//
// Register budget: the main loop carries two pointers it advances and four small values;
// what a tap change needs is in the thread's GatherRecord, and the axes' geometry, the
// thread's lanes and the flags are re-read from the parameters (a constant bank) or
// recomputed from threadIdx where used.
template <class Shape, bool DGRAD, bool PACKED_B>
struct GatherLoader {
  typedef typename Shape::elem_t T;
  typedef typename Shape::Acc Acc;
  typedef GatherStrides<DGRAD> S;
  static constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK, THREADS = Shape::THREADS;
  static constexpr int TPR = THREADS / BM;  // threads per A row
  static constexpr int EA = Shape::A_PER_THREAD, EB = Shape::B_PER_THREAD;
  static constexpr int VEC = VectorWidth<T, EA>::value;
  static constexpr int TPC = THREADS / BN;  // direct B: threads per column
  static_assert(THREADS % BM == 0 && EA * TPR == BK, "a thread stages lanes of one A row");
  static_assert(PACKED_B ? BN % EB == 0 : (THREADS % BN == 0 && EB * TPC == BK), "B staging must tile B");

  const ConvParams* p;
  const T* __restrict__ a_base;  // the activation (the kernel argument)
  const T* __restrict__ b_base;  // the packed weight or the weight (the kernel argument)
  GatherRecord* record;          // this thread's record
  // The current step: aligned order, first channel `pos` of the record's linear tap u;
  // packed order, first flattened (tap, channel) index `pos`.
  int pos;
  bool a_in;                     // aligned order: the pixel is inside at this tap
  bool b_col_ok;                 // direct B: this thread's column exists
  const T* a_ptr;                // aligned order: A at (pixel at this tap, channel pos + lane0)
  const T* b_ptr;                // this thread's first B element of the step
  Acc ra[EA], rb[EB];

  __device__ __forceinline__ int red() const { return (int)S::red(*p); }
  __device__ __forceinline__ bool blocked() const { return p->a_blocked != 0; }
  __device__ __forceinline__ bool packed() const { return PACKED_B && p->red_packed != 0; }
  // This thread's first A lane, and its B lane and column within the tile.
  __device__ __forceinline__ int lane0() const {
    return blocked() ? ((int)threadIdx.x % TPR) * EA : (int)threadIdx.x / BM;
  }
  __device__ __forceinline__ int b_lane() const { return PACKED_B ? (int)threadIdx.x / (BN / EB) : (int)threadIdx.x / BN; }
  __device__ __forceinline__ int b_col() const {
    return PACKED_B ? ((int)threadIdx.x % (BN / EB)) * EB : (int)threadIdx.x % BN;
  }
  __device__ __forceinline__ int n0() const { return record->n0; }

  // The axis's geometry, recomputed from the parameters where needed (only when the tap
  // changes) rather than held in registers through the main loop.
  __device__ __forceinline__ GatherAxis axis(int a) const {
    if (!DGRAD) return fprop_axis(*p, a);
    // phase = (phi_d * sh + phi_h) * sw + phi_w
    int rest = record->phase;
    if (a < 2) rest /= (int)p->stride[2];
    if (a < 1) rest /= (int)p->stride[1];
    return dgrad_axis(*p, a, rest % (int)p->stride[a]);
  }

  // Aligned order: everything that depends on the tap (rare: once per ceil(red / BK) steps).
  __device__ __forceinline__ void set_tap() {
    const index_t* as = S::a(*p);
    GatherAxis ax[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) ax[a] = axis(a);
    const int u = record->u;
    int tap[3];
    tap[2] = u % ax[2].tap_count;
    tap[1] = u / ax[2].tap_count % ax[1].tap_count;
    tap[0] = u / (ax[2].tap_count * ax[1].tap_count);
    int c[3], t[3];
    bool inside = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      c[a] = record->a_coord[a] + ax[a].off_first + tap[a] * ax[a].off_step;
      t[a] = ax[a].tap_first + tap[a] * ax[a].tap_step;
      inside = inside && (unsigned)c[a] < (unsigned)ax[a].extent;
    }
    a_in = inside;
    // Outside, the pointer is never read; it stays at the tensor so that no address wraps.
    a_ptr = a_base;
    if (inside) a_ptr += record->a_pixel + (index_t)(pos + lane0()) * as[1] + c[0] * as[2] + c[1] * as[3] + c[2] * as[4];
    if (PACKED_B) {
      const int canonical = (t[0] * (int)p->kernel_size[1] + t[1]) * (int)p->kernel_size[2] + t[2];
      b_ptr = b_base + record->b_group + ((index_t)canonical * p->b_chunk + pos + b_lane()) * p->b_ld + n0() + b_col();
    } else {
      b_ptr = b_base + record->b_group;
      if (b_col_ok) {
        b_ptr += (index_t)(n0() + b_col()) * S::b_col(*p) + (index_t)(pos + b_lane()) * S::b_red(*p) +
                 t[0] * p->w_stride[2] + t[1] * p->w_stride[3] + t[2] * p->w_stride[4];
      }
    }
  }

  // Position at reduction step `step` (the first step of a split-K slice).
  __device__ __forceinline__ void seek(int step) {
    if (packed()) {
      pos = step * BK;
      b_ptr = b_base + record->b_group + ((index_t)pos + b_lane()) * p->b_ld + n0() + b_col();
      return;
    }
    const int chunks = (red() + BK - 1) / BK;
    record->u = step / chunks;
    pos = (step - record->u * chunks) * BK;
    set_tap();
  }

  __device__ __forceinline__ void advance() {
    pos += BK;
    if (packed()) {
      b_ptr += (index_t)BK * p->b_ld;
      return;
    }
    if (pos < red()) {
      if (a_in) a_ptr += (index_t)BK * S::a(*p)[1];
      if (PACKED_B) {
        b_ptr += (index_t)BK * p->b_ld;
      } else if (b_col_ok) {
        b_ptr += (index_t)BK * S::b_red(*p);
      }
      return;
    }
    pos = 0;
    ++record->u;
    set_tap();
  }

  // Lanes STEP apart (interleaved: TPR; blocked: 1).
  template <int STEP>
  __device__ __forceinline__ void load_a_scalar() {
    const int rem = red() - pos - lane0();
    const index_t elem = (index_t)STEP * S::a(*p)[1];
#pragma unroll
    for (int i = 0; i < EA; ++i) {
      ra[i] = 0;
      if (a_in && i * STEP < rem) ra[i] = load_elem(a_ptr, i * elem);
    }
  }

  __device__ __forceinline__ void load_a_vector() {
    const int rem = red() - pos - lane0();
#pragma unroll
    for (int v = 0; v < EA / VEC; ++v) {
      if (a_in && v * VEC < rem) {
        load_vector<T, VEC>(a_ptr, v * VEC, ra + v * VEC);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) ra[v * VEC + j] = 0;
      }
    }
  }

  // Packed order (dgrad only with unit strides, one phase, so its taps are all the
  // kernel's): every lane decodes its own (tap, channel).
  __device__ __forceinline__ void load_a_packed() {
    const index_t* as = S::a(*p);
    const int step = blocked() ? 1 : TPR;
    const int S1 = (int)p->kernel_size[2], R1 = (int)p->kernel_size[1];
    const int total = (int)p->kernel_size[0] * R1 * S1 * red();
#pragma unroll
    for (int i = 0; i < EA; ++i) {
      ra[i] = 0;
      const int r = pos + lane0() + i * step;
      if (r >= total) continue;
      const int tap = fast_divide(r, p->div_mul[0], p->div_shift[0]);
      const int ch = r - tap * red();
      const int t0 = fast_divide(tap, p->div_mul[1], p->div_shift[1]);
      const int rest = tap - t0 * R1 * S1;
      const int t1 = fast_divide(rest, p->div_mul[2], p->div_shift[2]);
      const int t[3] = {t0, t1, rest - t1 * S1};
      int c[3];
      bool inside = true;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        // fprop_axis, and dgrad_axis of the one phase there is with unit strides.
        const int dil = (int)p->dilation[a];
        c[a] = record->a_coord[a] + (DGRAD ? (int)p->pad[a] - t[a] * dil : t[a] * dil);
        inside = inside && (unsigned)c[a] < (unsigned)(DGRAD ? p->out_size[a] : p->in_size[a]);
      }
      if (inside) ra[i] = load_elem(a_base, record->a_pixel + ch * as[1] + c[0] * as[2] + c[1] * as[3] + c[2] * as[4]);
    }
  }

  __device__ __forceinline__ void load() {
    if (packed()) {
      load_a_packed();
    } else if (p->a_vec) {
      load_a_vector();
    } else if (blocked()) {
      load_a_scalar<1>();
    } else {
      load_a_scalar<TPR>();
    }
    if (PACKED_B) {
      load_vector<T, EB>(b_ptr, 0, rb);  // zero-padded: always in range
    } else {
      const int rem = red() - pos - b_lane();
      const index_t elem = (index_t)TPC * S::b_red(*p);
#pragma unroll
      for (int i = 0; i < EB; ++i) {
        rb[i] = 0;
        if (b_col_ok && i * TPC < rem) rb[i] = load_elem(b_ptr, i * elem);
      }
    }
  }

  // A element i goes to As[(lane0 + i*STEP) * BM + row].
  template <int STEP>
  __device__ __forceinline__ void store_a(Acc* As, int at) const {
#pragma unroll
    for (int i = 0; i < EA; ++i) As[at + i * STEP * BM] = ra[i];
  }

  __device__ __forceinline__ void store(Acc* As, Acc* Bs) const {
    const int tid = threadIdx.x;
    if (blocked()) {
      store_a<1>(As, lane0() * BM + tid / TPR);
    } else {
      store_a<TPR>(As, lane0() * BM + tid % BM);
    }
    if (PACKED_B) {
      store_run<EB>(Bs + b_lane() * BN + b_col(), rb);
    } else {
#pragma unroll
      for (int i = 0; i < EB; ++i) Bs[(b_lane() + i * TPC) * BN + b_col()] = rb[i];
    }
  }
};

// The channel stride of the canonical contiguous (N, channels, spatial) order of a
// gathered GEMM's output: the split-K workspace's layout.
template <bool DGRAD>
__device__ __forceinline__ index_t dest_channel_stride(const ConvParams& p) {
  const index_t* size = DGRAD ? p.in_size : p.out_size;
  return size[0] * size[1] * size[2];
}

// The output-row offsets of a gathered GEMM tile: table[r] for row m0 + r of the tile, or
// -1 past the GEMM.  `strides` are the destination's along (N, channel, spatial...).
template <class Shape>
__device__ __forceinline__ void output_rows(const GatherAxis (&ax)[3], index_t rows, index_t m0, index_t base,
                                            const index_t (&strides)[5], index_t* table) {
  for (int r = threadIdx.x; r < Shape::BM; r += Shape::THREADS) {
    index_t m = m0 + r;
    index_t offset = -1;
    if (m < rows) {
      const int i2 = (int)(m % ax[2].rows);
      m /= ax[2].rows;
      const int i1 = (int)(m % ax[1].rows);
      m /= ax[1].rows;
      const int i0 = (int)(m % ax[0].rows);
      const index_t n = m / ax[0].rows;
      offset = base + n * strides[0] + (index_t)(i0 * ax[0].out_mul + ax[0].out_add) * strides[2] +
               (index_t)(i1 * ax[1].out_mul + ax[1].out_add) * strides[3] +
               (index_t)(i2 * ax[2].out_mul + ax[2].out_add) * strides[4];
    }
    table[r] = offset;
  }
}

// fprop and dgrad: one tile of one (group, phase, slice) GEMM.
template <bool DGRAD, bool PACKED_B, class Shape>
__device__ __forceinline__ void gather_gemm(const ConvParams& p, const typename Shape::elem_t* __restrict__ a_src,
                                            const typename Shape::elem_t* __restrict__ b_src,
                                            const typename Shape::elem_t* __restrict__ bias,
                                            typename Shape::elem_t* __restrict__ out,
                                            typename Shape::Acc* __restrict__ workspace) {
  typedef typename Shape::Acc Acc;
  typedef GatherStrides<DGRAD> S;
  typedef GatherLoader<Shape, DGRAD, PACKED_B> Loader;
  constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK, THREADS = Shape::THREADS;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int tx = tid % Shape::THREADS_N, ty = tid / Shape::THREADS_N;

  index_t block = blockIdx.x;
  const index_t tile_m = block % p.tiles_m;
  block /= p.tiles_m;
  const index_t tile_n = block % p.tiles_n;
  block /= p.tiles_n;
  const index_t phase = block % p.phases;
  block /= p.phases;
  const index_t g = block % p.G;
  const index_t slice = block / p.G;

  Loader ld;
  ld.p = &p;
  // This thread's record; only this thread reads it, so it needs no barrier.
  GatherRecord* record =
      reinterpret_cast<GatherRecord*>(smem + Shape::EPI_TABLE_AT + (BM + 1) * 8 + tid * GATHER_RECORD_BYTES);
  record->phase = (int)phase;
  record->n0 = (int)(tile_n * BN);
  ld.record = record;
  GatherAxis ax[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) ax[a] = ld.axis(a);
  const index_t rows = p.N * ax[0].rows * ax[1].rows * ax[2].rows;
  // A tile wholly past this phase's rows (phases differ in size): the whole block leaves
  // together, before any barrier.
  if (tile_m * BM >= rows) return;

  const index_t m0 = tile_m * BM, n0 = tile_n * BN;
  const index_t cols = S::cols(p);
  const index_t* as = S::a(p);
  const int red = (int)S::red(p);
  ld.a_base = a_src;
  ld.b_base = b_src;
  {
    const int row = ld.blocked() ? tid / Loader::TPR : tid % BM;
    index_t m = m0 + row;
    const bool valid = m < rows;
    if (!valid) m = 0;
    const int i2 = (int)(m % ax[2].rows);
    m /= ax[2].rows;
    const int i1 = (int)(m % ax[1].rows);
    m /= ax[1].rows;
    const int i0 = (int)(m % ax[0].rows);
    const index_t n = m / ax[0].rows;
    // A row past the GEMM gets a coordinate no tap brings back in range.
    record->a_coord[0] = valid ? i0 * ax[0].row_mul + ax[0].row_add : -(1 << 30);
    record->a_coord[1] = i1 * ax[1].row_mul + ax[1].row_add;
    record->a_coord[2] = i2 * ax[2].row_mul + ax[2].row_add;
    record->a_pixel = n * as[0] + g * red * as[1];
    if (PACKED_B) {
      // Rows per group: every tap's b_chunk rows, rounded up to whole steps.
      const index_t group_rows =
          (p.kernel_size[0] * p.kernel_size[1] * p.kernel_size[2] * p.b_chunk + BK - 1) / BK * BK;
      record->b_group = g * group_rows * p.b_ld;
    } else {
      // The group's first output channel: B's column for fprop, its reduction channel for dgrad.
      record->b_group = g * p.Kg * p.w_stride[0];
      ld.b_col_ok = n0 + ld.b_col() < cols;
    }
  }
  const int taps = ax[0].tap_count * ax[1].tap_count * ax[2].tap_count;
  const int steps = ld.packed() ? (taps * red + BK - 1) / BK : taps * ((red + BK - 1) / BK);
  // This slice's steps (a slice past a short phase's reduction has none, and stores zeros).
  const int first = (int)(slice * p.split_len);
  const int last = first + (int)p.split_len < steps ? first + (int)p.split_len : steps;
  const int my_steps = last > first ? last - first : 0;
  if (my_steps > 0) ld.seek(first);

  // The epilogue's destination, row by row, into shared memory now, so that nothing of the
  // block's position has to stay in registers through the main loop: the output at its
  // strides, or this slice of the workspace in the output's canonical contiguous order (N,
  // channels, spatial).  The entry after the rows is the bias offset of the group.
  const bool to_workspace = p.epilogue == EPILOGUE_WORKSPACE;
  const index_t* out_size = DGRAD ? p.in_size : p.out_size;
  index_t dest[5];
  if (to_workspace) {
    dest[4] = 1;
    dest[3] = out_size[2];
    dest[2] = out_size[1] * out_size[2];
    dest[1] = out_size[0] * dest[2];
    dest[0] = (DGRAD ? p.C : p.K) * dest[1];
  } else {
    const index_t* os = S::o(p);
#pragma unroll
    for (int a = 0; a < 5; ++a) dest[a] = os[a];
  }
  index_t* table = reinterpret_cast<index_t*>(smem + Shape::EPI_TABLE_AT);
  output_rows<Shape>(ax, rows, m0, (to_workspace ? slice * p.ws_slice_stride : 0) + g * cols * dest[1], dest, table);
  if (tid == 0) table[BM] = g * cols;
  // Written before the main loop's first barrier, or, with no steps, the epilogue's first.

  Acc acc[Shape::TM][Shape::TN];
  Acc* stage = reinterpret_cast<Acc*>(smem);
  gemm_mainloop<Shape>(ld, my_steps, stage, acc, ty, tx);

  Acc* pass = stage;
  const index_t n0_out = ld.n0();
  constexpr int ER = Shape::EPI_ROWS, EC = Shape::EPI_COLS;
  const bool cfast = p.out_cfast != 0;
  const index_t channel_stride = to_workspace ? dest_channel_stride<DGRAD>(p) : S::o(p)[1];
  const int row_stride = cfast ? EC + 1 : 1, col_stride = cfast ? 1 : ER + 1;
  const bool add_bias = !DGRAD && !to_workspace && p.has_bias;
#pragma unroll
  for (int gi = 0; gi < Shape::TM / 4; ++gi) {
#pragma unroll
    for (int gj = 0; gj < Shape::TN / 4; ++gj) {
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) pass[(ty * 4 + ii) * row_stride + (tx * 4 + jj) * col_stride] = acc[gi * 4 + ii][gj * 4 + jj];
      }
      // The pass (and, the first time, the row table) must be complete before any thread reads it back.
      __syncthreads();
      for (int e = tid; e < ER * EC; e += THREADS) {
        const int row = cfast ? e / EC : e % ER;
        const int col = cfast ? e % EC : e / ER;
        const index_t offset = table[gi * ER + row];
        const index_t c = n0_out + gj * EC + col;
        if (offset < 0 || c >= cols) continue;
        Acc v = pass[row * row_stride + col * col_stride];
        if (to_workspace) {
          workspace[offset + c * channel_stride] = v;
        } else {
          if (add_bias) v += load_elem(bias, table[BM] + c);
          store_elem(out, offset + c * channel_stride, v);
        }
      }
      // Every thread has read this pass before the next one overwrites it.
      __syncthreads();
    }
  }
}

// wgrad: stages A (dy: rows are output channels k, reduction is n,z,p,q) and B (x gathered:
// columns are (c, t, r, s)).  Two stagings, chosen per launch by instantiation (KFAST):
//   reduction-fastest (KFAST, NCHW): consecutive threads take consecutive reduction indices
//     (q is contiguous); a thread owns one reduction lane, tid % BK, and the EA rows / EB
//     columns tid / BK + i * (THREADS / BK);
//   channel-fastest (channels-last): consecutive threads take consecutive rows k and
//     columns; the columns are then ordered tap-major, j = tap*C/G + c, so that
//     neighbouring columns are neighbouring channels of x.  A thread owns row and column
//     tid % BM and the EA consecutive reduction lanes (tid / BM) * EA + i (BM == BN).
// A thread keeps the (n, z, p, q) of its first reduction lane, advanced BK per step with
// carries (its other lanes are found from it the same way); no array is indexed at run
// time.  What a column of the tile means in x (channel offset, tap offsets) is in a
// shared-memory table (WgradColumn) that every thread reads, rather than in per-element
// registers.

// Tile column j of a wgrad GEMM: x's offset of its channel (-1 past the GEMM) and its tap's
// spatial offsets t*dd, r*dh, s*dw.
struct WgradColumn {
  index_t channel;
  int tap[3];
  int unused;
};

// What a wgrad thread reads at every step but never changes, kept in shared memory rather
// than in registers through the main loop.
struct WgradRecord {
  index_t a_row;  // dy offset of this thread's first row (output channel)
  int rows_left;  // rows from this thread's first to the GEMM's last (<= 0: none)
  int unused;
};

template <class Shape, bool KFAST>
struct WgradLoader {
  typedef typename Shape::elem_t T;
  typedef typename Shape::Acc Acc;
  static constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK, THREADS = Shape::THREADS;
  static constexpr int EA = Shape::A_PER_THREAD, EB = Shape::B_PER_THREAD;
  static constexpr int ROW_STEP = THREADS / BK;   // KFAST: between a thread's rows (and columns)
  static constexpr int LANE_STEP = 1;  // otherwise: between a thread's lanes (consecutive)
  static_assert(BM == BN && EA == EB, "channel-fastest wgrad staging pairs A and B lanes");
  static_assert(THREADS % BM == 0, "channel-fastest wgrad staging keeps one row per thread");

  const ConvParams* p;
  const T* __restrict__ dy;
  const T* __restrict__ x;
  const WgradColumn* columns;  // the tile's column table
  const WgradRecord* record;   // this thread's record
  // The (n, z, p, q) of this thread's first reduction lane, lane0() of the step, which
  // exists while lane0() < left (the slice's reduction indices from this step on).  Other
  // lanes (channel-fastest staging) are LANE_STEP apart, found from it with carries.
  int n, z, pp, q;
  int left;
  Acc ra[EA], rb[EB];

  __device__ __forceinline__ int lane0() const { return KFAST ? (int)threadIdx.x % BK : (int)threadIdx.x / BM * EA; }

  // (n, z, p, q) advanced by `by` reduction indices.
  __device__ __forceinline__ void carry(int by, int& n_, int& z_, int& p_, int& q_) const {
    const int Q = (int)p->out_size[2], P = (int)p->out_size[1], Z = (int)p->out_size[0];
    q_ += by;
    while (q_ >= Q) {
      q_ -= Q;
      if (++p_ == P) {
        p_ = 0;
        if (++z_ == Z) {
          z_ = 0;
          ++n_;
        }
      }
    }
  }

  __device__ __forceinline__ void advance() {
    left -= BK;
    carry(BK, n, z, pp, q);
  }

  // Elements of one reduction lane at (n_, z_, p_, q_): KFAST, all of them (rows and columns
  // ROW_STEP apart); otherwise element `only` of the thread's one row and column.
  __device__ __forceinline__ void load_lane(int n_, int z_, int p_, int q_, int only) {
    const index_t* ys = p->y_stride;
    const index_t* xs = p->x_stride;
    const index_t dy_at = record->a_row + n_ * ys[0] + z_ * ys[2] + p_ * ys[3] + q_ * ys[4];
    const int z0 = z_ * (int)p->stride[0] - (int)p->pad[0];
    const int y0 = p_ * (int)p->stride[1] - (int)p->pad[1];
    const int x0 = q_ * (int)p->stride[2] - (int)p->pad[2];
    const index_t x_at = n_ * xs[0];
    constexpr int PER_LANE = KFAST ? EA : 1;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
      const int i = KFAST ? k : only;
      const int row = KFAST ? k * ROW_STEP : 0;
      if (row < record->rows_left) ra[i] = load_elem(dy, dy_at + row * ys[1]);
      const WgradColumn& col = columns[KFAST ? (int)threadIdx.x / BK + k * ROW_STEP : (int)threadIdx.x % BN];
      const int zi = z0 + col.tap[0], yi = y0 + col.tap[1], xi = x0 + col.tap[2];
      const bool inside = (unsigned)zi < (unsigned)p->in_size[0] && (unsigned)yi < (unsigned)p->in_size[1] &&
                          (unsigned)xi < (unsigned)p->in_size[2];
      if (col.channel >= 0 && inside) rb[i] = load_elem(x, col.channel + x_at + zi * xs[2] + yi * xs[3] + xi * xs[4]);
    }
  }

  __device__ __forceinline__ void load() {
#pragma unroll
    for (int i = 0; i < EA; ++i) {
      ra[i] = 0;
      rb[i] = 0;
    }
    if (KFAST) {
      if (lane0() < left) load_lane(n, z, pp, q, 0);
      return;
    }
    // One running copy of the lane's position, carried LANE_STEP further per element.
    int n_ = n, z_ = z, p_ = pp, q_ = q;
#pragma unroll
    for (int i = 0; i < EA; ++i) {
      if (lane0() + i * LANE_STEP >= left) break;
      if (i > 0) carry(LANE_STEP, n_, z_, p_, q_);
      load_lane(n_, z_, p_, q_, i);
    }
  }

  __device__ __forceinline__ void store(Acc* As, Acc* Bs) const {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < EA; ++i) {
      // KFAST: lane tid % BK, rows and columns tid / BK + i * ROW_STEP.
      // Otherwise: row and column tid % BM, lanes (tid / BM) * EA + i.
      const int at = KFAST ? (tid % BK) * BM + tid / BK + i * ROW_STEP : (tid / BM * EA + i) * BM + tid % BM;
      As[at] = ra[i];
      Bs[at] = rb[i];
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

template <class Shape, bool KFAST>
__device__ __forceinline__ void wgrad_gemm(const ConvParams& p, const typename Shape::elem_t* __restrict__ x,
                                           const typename Shape::elem_t* __restrict__ dy,
                                           typename Shape::elem_t* __restrict__ dw,
                                           typename Shape::Acc* __restrict__ workspace) {
  typedef typename Shape::Acc Acc;
  typedef WgradLoader<Shape, KFAST> Loader;
  constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK, THREADS = Shape::THREADS;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;

  // After the stages: the column table, the block's position (tile_m, tile_n, g, slice)
  // for the epilogue, and the threads' records, so that none of it occupies registers
  // through the main loop.
  static_assert(BN * sizeof(WgradColumn) + 4 * 8 + THREADS * sizeof(WgradRecord) <=
                    Shape::SMEM_BYTES - Shape::EPI_TABLE_AT, "the wgrad tables must fit after the stages");
  WgradColumn* columns = reinterpret_cast<WgradColumn*>(smem + Shape::EPI_TABLE_AT);
  index_t* where = reinterpret_cast<index_t*>(columns + BN);
  WgradRecord* record = reinterpret_cast<WgradRecord*>(where + 4) + tid;
  const int S = (int)p.kernel_size[2], RS = (int)(p.kernel_size[1] * p.kernel_size[2]);
  const int taps = (int)(p.kernel_size[0] * RS);
  const index_t cols = p.Cg * taps;
  const index_t red_total = p.N * p.out_size[0] * p.out_size[1] * p.out_size[2];

  Loader ld;
  ld.p = &p;
  ld.dy = dy;
  ld.x = x;
  ld.columns = columns;
  index_t red_begin, red_end;
  {
    index_t block = blockIdx.x;
    const index_t tile_m = block % p.tiles_m;
    block /= p.tiles_m;
    const index_t tile_n = block % p.tiles_n;
    block /= p.tiles_n;
    const index_t g = block % p.G;
    const index_t slice = block / p.G;
    if (tid == 0) {
      where[0] = tile_m;
      where[1] = tile_n;
      where[2] = g;
      where[3] = slice;
    }
    const index_t m0 = tile_m * BM, n0 = tile_n * BN;
    for (int jl = tid; jl < BN; jl += THREADS) {
      const index_t j = n0 + jl;
      WgradColumn column;
      index_t c;
      int tap;
      wgrad_column(j < cols ? j : 0, !KFAST, p.Cg, taps, c, tap);
      column.channel = j < cols ? (g * p.Cg + c) * p.x_stride[1] : -1;
      column.tap[0] = (tap / RS) * (int)p.dilation[0];
      column.tap[1] = (tap % RS / S) * (int)p.dilation[1];
      column.tap[2] = (tap % S) * (int)p.dilation[2];
      column.unused = 0;
      columns[jl] = column;
    }
    const int first_row = KFAST ? tid / BK : tid % BM;
    // Only this thread reads its record.
    record->rows_left = (int)(p.Kg - m0 - first_row);
    record->a_row = (g * p.Kg + m0 + first_row) * p.y_stride[1];
    ld.record = record;
    red_begin = slice * p.split_len;
    red_end = red_begin + p.split_len < red_total ? red_begin + p.split_len : red_total;
  }
  ld.left = (int)(red_end - red_begin);  // below 2^31: the planner splits longer reductions
  {
    // The first reduction lane, decoded once; afterwards advanced BK per step.
    index_t r = red_begin + ld.lane0();
    if (r >= red_total) r = 0;
    ld.q = (int)(r % p.out_size[2]);
    r /= p.out_size[2];
    ld.pp = (int)(r % p.out_size[1]);
    r /= p.out_size[1];
    ld.z = (int)(r % p.out_size[0]);
    ld.n = (int)(r / p.out_size[0]);
  }
  const index_t steps = red_end > red_begin ? (red_end - red_begin + BK - 1) / BK : 0;
  // The column table and the block's position must be complete before any thread reads them.
  __syncthreads();
  Acc acc[Shape::TM][Shape::TN];
  gemm_mainloop<Shape>(ld, (int)steps, reinterpret_cast<Acc*>(smem), acc, tid / Shape::THREADS_N,
                       tid % Shape::THREADS_N);

  const int tx = tid % Shape::THREADS_N, ty = tid / Shape::THREADS_N;
  const index_t m0 = where[0] * BM, n0 = where[1] * BN, g = where[2], slice = where[3];
#pragma unroll
  for (int i = 0; i < Shape::TM; ++i) {
    const index_t k = m0 + fragment_index<BM, Shape::TM>(ty, i);
    if (k >= p.Kg) continue;
    const index_t kg = g * p.Kg + k;
#pragma unroll
    for (int j = 0; j < Shape::TN; ++j) {
      const index_t col = n0 + fragment_index<BN, Shape::TN>(tx, j);
      if (col >= cols) continue;
      index_t c;
      int tap;
      wgrad_column(col, !KFAST, p.Cg, taps, c, tap);
      if (p.epilogue == EPILOGUE_WORKSPACE) {
        // The workspace is always in the canonical column order c*taps + tap.
        workspace[slice * p.ws_slice_stride + kg * cols + c * taps + tap] = acc[i][j];
      } else if (p.epilogue == EPILOGUE_ATOMIC) {
        atomicAdd(workspace + kg * cols + c * taps + tap, acc[i][j]);
      } else {
        const index_t off = kg * p.w_stride[0] + c * p.w_stride[1] + (tap / RS) * p.w_stride[2] +
                            (tap % RS / S) * p.w_stride[3] + (tap % S) * p.w_stride[4];
        store_elem(dw, off, acc[i][j]);
      }
    }
  }
}

}  // namespace implicit_gemm

// The parameter struct is __grid_constant__: the kernels take its address (the loaders keep
// a pointer to it), which would otherwise copy all of it to local memory.

// x: (N, C, D, H, W); b: w (K, C/G, T, R, S) or, PACKED_B, the packed weight; bias: (K,)
// (read only when p.has_bias); y: (N, K, Z, P, Q); workspace: (splits, N, K, Z, P, Q)
// accumulators for EPILOGUE_WORKSPACE.
template <typename T, int BM, int BN, int BK, int TM, int TN, bool PACKED_B>
__global__ void __launch_bounds__(TileShape<T, BM, BN, BK, TM, TN>::THREADS, TileShape<T, BM, BN, BK, TM, TN>::MIN_BLOCKS)
    fprop_gemm(__grid_constant__ const ConvParams p, const T* __restrict__ x, const T* __restrict__ b,
               const T* __restrict__ bias, T* __restrict__ y, acc_t<T>* __restrict__ workspace) {
  implicit_gemm::gather_gemm<false, PACKED_B, TileShape<T, BM, BN, BK, TM, TN>>(p, x, b, bias, y, workspace);
}

// dy: (N, K, Z, P, Q); b: w (K, C/G, T, R, S) or, PACKED_B, the packed weight; dx: (N, C, D, H, W);
// workspace: (splits, N, C, D, H, W) accumulators for EPILOGUE_WORKSPACE.
template <typename T, int BM, int BN, int BK, int TM, int TN, bool PACKED_B>
__global__ void __launch_bounds__(TileShape<T, BM, BN, BK, TM, TN>::THREADS, TileShape<T, BM, BN, BK, TM, TN>::MIN_BLOCKS)
    dgrad_gemm(__grid_constant__ const ConvParams p, const T* __restrict__ dy, const T* __restrict__ b,
               T* __restrict__ dx, acc_t<T>* __restrict__ workspace) {
  implicit_gemm::gather_gemm<true, PACKED_B, TileShape<T, BM, BN, BK, TM, TN>>(p, dy, b, nullptr, dx, workspace);
}

// x: (N, C, D, H, W), dy: (N, K, Z, P, Q), dw: (K, C/G, T, R, S);
// workspace: (splits, K, C/G*T*R*S) accumulators for EPILOGUE_WORKSPACE, (K, C/G*T*R*S) for EPILOGUE_ATOMIC.
// The channel-fastest staging (KFAST false) keeps the addresses of several reduction lanes
// at once; the report showed it spilling at 128 registers on sm_90, so it asks for one block
// per SM (the planner counts it so).
template <typename T, int BM, int BN, int BK, int TM, int TN, bool KFAST>
__global__ void __launch_bounds__(TileShape<T, BM, BN, BK, TM, TN>::THREADS,
                                  KFAST ? TileShape<T, BM, BN, BK, TM, TN>::MIN_BLOCKS : 1)
    wgrad_gemm(__grid_constant__ const ConvParams p, const T* __restrict__ x, const T* __restrict__ dy,
               T* __restrict__ dw, acc_t<T>* __restrict__ workspace) {
  implicit_gemm::wgrad_gemm<TileShape<T, BM, BN, BK, TM, TN>, KFAST>(p, x, dy, dw, workspace);
}

}  // namespace convgrad
