// tensor_core_gemm.cu: the three passes of a convolution as implicit GEMMs on tensor cores
// (nvcuda::wmma), fed by a multi-stage cp.async pipeline.
//
// Formulas (DESIGN §1; g is the group, c < C/G, k < K/G, taps t, r, s):
//   fprop  y[n, gK+k, z, p, q]  = sum_{c,t,r,s} x[n, gC+c, z*sd-pd+t*dd, ...] * w[gK+k, c, t, r, s]  (+ bias[gK+k])
//   dgrad  dx[n, gC+c, d, h, w] = sum_{k,t,r,s} dy[n, gK+k, z, p, q] * w[gK+k, c, t, r, s]
//            over the taps with d = z*sd-pd+t*dd (likewise h, w) for an integer z in [0, Z)
//   wgrad  dw[gK+k, c, t, r, s] = sum_{n,z,p,q} dy[n, gK+k, z, p, q] * x[n, gC+c, z*sd-pd+t*dd, ...]
// Input positions outside the tensor read as zero.
//
// Precision: T = __half or __nv_bfloat16 (WMMA m16n16k16), or float with TF32 allowed
// (m16n16k8, every operand rounded to TF32 with __float_to_tf32, to nearest with ties away
// from zero); accumulation in float throughout; one rounding to T on store.
//
// Layouts: x (N, C, D, H, W), w (K, C/G, T, R, S), y (N, K, Z, P, Q) at any 64-bit element
// strides (ConvParams).  The fast path is channels-last (NDHWC activations, KTRSC weights)
// with channel counts that are multiples of VEC = 16 / sizeof(T): its tiles arrive as 16-byte
// cp.async copies.  Every other layout takes the general path of tensor_core_loaders.cuh on
// the same tiles and tensor cores.
//
// GEMM per group (DESIGN §1), one block per BM x BN tile:
//   fprop  M = N*Z*P*Q, N = K/G, reduction = taps x C/G   A = x gathered, B = w
//   dgrad  M = N*D*H*W of one stride phase, N = C/G, reduction = the phase's taps x K/G
//   wgrad  M = K/G, N = T*R*S*C/G (column j = tap*C/G + c), reduction = the block's split-K
//          slice of N*Z*P*Q
// dgrad runs one GEMM per stride phase (see implicit_gemm.cu), so no multiply is spent on
// taps the stride skips.
//
// Launch geometry: a 1-D grid, block b = (tile along M, tile along N, phase or 1, group)
// fastest first for fprop/dgrad, (tile along M, tile along N, group, split-K slice) for
// wgrad; blocks of TcShape::THREADS threads = (BM/WM) x (BN/WN) warps, warp w owning rows
// (w / (BN/WN)) * WM.. and columns (w % (BN/WN)) * WN.. of the tile; dynamic shared memory
// TcShape::SMEM_BYTES (the pipeline's stages, reused by the epilogue).
//
// Epilogue: the warps store their accumulators to a float tile in shared memory (row-major
// when the output is contiguous along GEMM N, p.out_nfast; else column-major), then every
// thread writes 4 consecutive elements along the output's contiguous direction, so a warp
// covers 128 consecutive outputs.  fprop adds the bias here.  wgrad stores to dw, or its
// slice's partial sums to workspace[slice][K][T*R*S*C/G] (tap-major columns, float) for
// tc_splitk_reduce to add in a fixed order, or adds them atomically (deterministic=False).
//
// Limits (checked by the planner): spatial extents below 2^30; D*H*W and Z*P*Q below 2^31;
// N below 2^31; fewer than 2^31 blocks; sm_80 or newer.  Tensor offsets are 64-bit.
#include "tensor_core_loaders.cuh"
#include "wmma_tile.cuh"

namespace convgrad {
namespace tc {

// fprop and dgrad: one tile of one (group, phase) GEMM.
template <bool DGRAD, class Shape>
__device__ __forceinline__ void gather_gemm(const ConvParams& p, const typename Shape::elem_t* __restrict__ a_src,
                                            const typename Shape::elem_t* __restrict__ b_src,
                                            const typename Shape::elem_t* __restrict__ bias,
                                            typename Shape::elem_t* __restrict__ out) {
  typedef typename Shape::elem_t T;
  constexpr int BM = Shape::BM, BN = Shape::BN;
  extern __shared__ __align__(128) unsigned char smem[];

  const GatherBlock blk(p, blockIdx.x);
  index_t rows = 0;
  int steps = 0;
  GatherLoader<DGRAD, Shape> loader(p);
  {
    int phi[3];
    phase_digits(p, blk.phase, phi);
    TapAxis taps[3];
    RowAxis row_axes[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) gather_axis<DGRAD>(p, a, phi[a], taps[a], row_axes[a]);
    rows = p.N * row_axes[0].rows * row_axes[1].rows * row_axes[2].rows;
    // A tile wholly past this phase's rows (phases differ in size): the whole block leaves
    // together, before any barrier.
    if (blk.tile_m * BM >= rows) return;
    loader.init(blk, taps, row_axes, blk.tile_m * BM, rows, a_src, b_src);
    steps = loader.steps();
  }

  WarpMma<Shape, K_CONTIGUOUS, GatherLoader<DGRAD, Shape>::B_LAYOUT> mma;
  mma.init(threadIdx.x / 32);
  tc_mainloop<Shape>(loader, steps, reinterpret_cast<T*>(smem), mma);

  float* staged = reinterpret_cast<float*>(smem);
  const bool n_fastest = p.out_nfast != 0;
  mma.stage_out(staged, n_fastest);
  // Every warp's accumulators are in the staging tile before any thread reads another's.
  __syncthreads();

  // The epilogue recomputes the row geometry (cheap, from the parameters) rather than keep
  // it in registers through the reduction.
  RowAxis ax[3];
  {
    int phi[3];
    phase_digits(p, blk.phase, phi);
    TapAxis unused;
#pragma unroll
    for (int a = 0; a < 3; ++a) gather_axis<DGRAD>(p, a, phi[a], unused, ax[a]);
  }
  const index_t m0 = blk.tile_m * BM, n0 = blk.tile_n * BN;
  const index_t cols = DGRAD ? p.Cg : p.Kg;
  const index_t* o_stride = DGRAD ? p.x_stride : p.y_stride;
  const index_t o_chan = o_stride[1];
  const index_t o_base = blk.g * cols * o_chan;
  const int tid = threadIdx.x;
  // The output offset of GEMM row m (m < rows).
  auto row_offset = [&](index_t m) {
    index_t n;
    int idx[3];
    decode_row(ax, m, n, idx);
    return o_base + n * o_stride[0] + (index_t)(idx[0] * ax[0].out_mul + ax[0].out_add) * o_stride[2] +
           (index_t)(idx[1] * ax[1].out_mul + ax[1].out_add) * o_stride[3] +
           (index_t)(idx[2] * ax[2].out_mul + ax[2].out_add) * o_stride[4];
  };
  auto finish = [&](float v, index_t col) {
    if (!DGRAD && p.has_bias) v += load_elem(bias, blk.g * p.Kg + col);
    return v;
  };
  if (n_fastest) {
    // Thread: 4 consecutive columns of one row per pass; consecutive threads, consecutive columns.
    constexpr int GROUPS = BN / 4;
#pragma unroll 1
    for (int e = tid; e < BM * GROUPS; e += Shape::THREADS) {
      const int r = e / GROUPS, c = (e % GROUPS) * 4;
      const index_t m = m0 + r;
      if (m >= rows) continue;
      const index_t base = row_offset(m);
      const float4 v = *reinterpret_cast<const float4*>(staged + r * Shape::LD_C_ROW + c);
      const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const index_t col = n0 + c + j;
        if (col < cols) store_elem(out, base + col * o_chan, finish(vals[j], col));
      }
    }
  } else {
    // Thread: 4 consecutive rows, the same for every pass (THREADS is a multiple of BM/4), of one column.
    constexpr int GROUPS = BM / 4;
    static_assert(Shape::THREADS % GROUPS == 0, "a thread keeps its rows across passes");
    const int r = (tid % GROUPS) * 4;
    index_t base[4];
    bool valid[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      valid[j] = m0 + r + j < rows;
      base[j] = valid[j] ? row_offset(m0 + r + j) : 0;
    }
#pragma unroll 1
    for (int c = tid / GROUPS; c < BN; c += Shape::THREADS / GROUPS) {
      const index_t col = n0 + c;
      if (col >= cols) break;
      const float4 v = *reinterpret_cast<const float4*>(staged + c * Shape::LD_C_COL + r);
      const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (valid[j]) store_elem(out, base[j] + col * o_chan, finish(vals[j], col));
      }
    }
  }
}

template <class Shape>
__device__ __forceinline__ void wgrad_gemm(const ConvParams& p, const typename Shape::elem_t* __restrict__ x,
                                           const typename Shape::elem_t* __restrict__ dy,
                                           typename Shape::elem_t* __restrict__ dw, float* __restrict__ workspace) {
  typedef typename Shape::elem_t T;
  constexpr int BM = Shape::BM, BN = Shape::BN;
  extern __shared__ __align__(128) unsigned char smem[];

  // Block: (tile along M, tile along N, group, split-K slice), fastest first.
  index_t block = blockIdx.x;
  const index_t tile_m = block % p.tiles_m;
  block /= p.tiles_m;
  const index_t tile_n = block % p.tiles_n;
  block /= p.tiles_n;
  const index_t g = block % p.G;
  const index_t slice = block / p.G;

  WgradLoader<Shape> loader(p);
  {
    const index_t red_total = p.N * p.out_size[0] * p.out_size[1] * p.out_size[2];
    const index_t red_begin = slice * p.split_len;
    const index_t red_end = red_begin + p.split_len < red_total ? red_begin + p.split_len : red_total;
    loader.init(tile_m, tile_n, g, red_begin, red_end > red_begin ? red_end - red_begin : 0, dy, x);
  }

  WarpMma<Shape, MN_CONTIGUOUS, MN_CONTIGUOUS> mma;
  mma.init(threadIdx.x / 32);
  tc_mainloop<Shape>(loader, loader.steps(), reinterpret_cast<T*>(smem), mma);

  float* staged = reinterpret_cast<float*>(smem);
  mma.stage_out(staged, true);
  // Every warp's accumulators are in the staging tile before any thread reads another's.
  __syncthreads();

  const index_t cols = loader.cols(), m0 = tile_m * BM, n0 = tile_n * BN;
  const int S = (int)p.kernel_size[2], RS = (int)(p.kernel_size[1] * p.kernel_size[2]);
  constexpr int GROUPS = BN / 4;
#pragma unroll 1
  for (int e = threadIdx.x; e < BM * GROUPS; e += Shape::THREADS) {
    const int r = e / GROUPS, c = (e % GROUPS) * 4;
    const index_t k = m0 + r;
    if (k >= p.Kg) continue;
    const index_t kg = g * p.Kg + k;
    const float4 v = *reinterpret_cast<const float4*>(staged + r * Shape::LD_C_ROW + c);
    const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t col = n0 + c + j;
      if (col >= cols) continue;
      if (p.epilogue == EPILOGUE_WORKSPACE) {
        workspace[slice * p.ws_slice_stride + kg * cols + col] = vals[j];
      } else if (p.epilogue == EPILOGUE_ATOMIC) {
        atomicAdd(workspace + kg * cols + col, vals[j]);
      } else {
        const int tap = (int)(col / p.Cg);
        const index_t ch = col % p.Cg;
        const index_t off = kg * p.w_stride[0] + ch * p.w_stride[1] + (tap / RS) * p.w_stride[2] +
                            (tap % RS / S) * p.w_stride[3] + (tap % S) * p.w_stride[4];
        store_elem(dw, off, vals[j]);
      }
    }
  }
}

}  // namespace tc

// x: (N, C, D, H, W), w: (K, C/G, T, R, S), bias: (K,) (read only when p.has_bias), y: (N, K, Z, P, Q).
template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES>
__global__ void __launch_bounds__(TcShape<T, BM, BN, BK, WM, WN, STAGES>::THREADS, 1)
    tc_fprop(const __grid_constant__ ConvParams p, const T* __restrict__ x, const T* __restrict__ w,
             const T* __restrict__ bias, T* __restrict__ y) {
  tc::gather_gemm<false, TcShape<T, BM, BN, BK, WM, WN, STAGES>>(p, x, w, bias, y);
}

// dy: (N, K, Z, P, Q), w: (K, C/G, T, R, S), dx: (N, C, D, H, W).
template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES>
__global__ void __launch_bounds__(TcShape<T, BM, BN, BK, WM, WN, STAGES>::THREADS, 1)
    tc_dgrad(const __grid_constant__ ConvParams p, const T* __restrict__ dy, const T* __restrict__ w,
             T* __restrict__ dx) {
  tc::gather_gemm<true, TcShape<T, BM, BN, BK, WM, WN, STAGES>>(p, dy, w, nullptr, dx);
}

// x: (N, C, D, H, W), dy: (N, K, Z, P, Q), dw: (K, C/G, T, R, S); workspace: (splits, K,
// T*R*S*C/G) floats for EPILOGUE_WORKSPACE, (K, T*R*S*C/G) for EPILOGUE_ATOMIC.
template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES>
__global__ void __launch_bounds__(TcShape<T, BM, BN, BK, WM, WN, STAGES>::THREADS, 1)
    tc_wgrad(const __grid_constant__ ConvParams p, const T* __restrict__ x, const T* __restrict__ dy,
             T* __restrict__ dw, float* __restrict__ workspace) {
  tc::wgrad_gemm<TcShape<T, BM, BN, BK, WM, WN, STAGES>>(p, x, dy, dw, workspace);
}

// The second half of split-K tc_wgrad: dw[k, c, t, r, s] = sum over slices i = 0, 1, ...
// (in that order) of workspace[i * ws_slice_stride + k * cols + tap * C/G + c], rounded once;
// cols = T*R*S*C/G.  One thread per element of dw in a grid-stride loop over p.total =
// K * cols, flat index e = k * cols + column (so reads are contiguous); any 1-D grid and
// block of 256 threads.  With EPILOGUE_ATOMIC upstream, splits == 1 and it only converts.
template <typename T>
__global__ void __launch_bounds__(256)
    tc_splitk_reduce(const __grid_constant__ ConvParams p, const float* __restrict__ workspace, T* __restrict__ dw) {
  const int S = (int)p.kernel_size[2], RS = (int)(p.kernel_size[1] * p.kernel_size[2]);
  const index_t cols = p.Cg * p.kernel_size[0] * RS;
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += step) {
    float sum = 0;
    for (index_t i = 0; i < p.splits; ++i) sum += workspace[i * p.ws_slice_stride + e];
    const index_t k = e / cols, col = e % cols;
    const int tap = (int)(col / p.Cg);
    const index_t c = col % p.Cg;
    store_elem(dw,
               k * p.w_stride[0] + c * p.w_stride[1] + (tap / RS) * p.w_stride[2] + (tap % RS / S) * p.w_stride[3] +
                   (tap % S) * p.w_stride[4],
               sum);
  }
}

}  // namespace convgrad
