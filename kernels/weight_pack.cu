// weight_pack.cu: the weight of a fprop or dgrad GEMM, packed once per call into the dense
// matrix the PACKED_B implicit-GEMM tiles read (implicit_gemm.cu).
//
// Formula, per group g, row = tap*b_chunk + ch (tap = (t*R + r)*S + s canonical), column col:
//   fprop  packed[g][row][col] = w[g*K/G + col, ch, t, r, s]    (ch < C/G, col < K/G)
//   dgrad  packed[g][row][col] = w[g*K/G + ch, col, t, r, s]    (ch < K/G, col < C/G)
// and 0 where ch, col or the tap is past the GEMM (the padding rows and columns), so the
// GEMM's B loads need no bounds checks.  The GEMM's B is then contiguous along its columns
// whatever the weight's layout: a KCRS weight read directly would give a warp one 32-byte
// sector per element (stride T*R*S or C/G*T*R*S between neighbours).
//
// Layouts: w (K, C/G, T, R, S) at arbitrary 64-bit element strides; packed: (G, rows, b_ld)
// contiguous, rows = taps*b_chunk rounded up to a multiple of BK (p.total = G*rows*b_ld).
//
// Launch geometry: one thread per element of `packed` in a grid-stride loop over p.total,
// column fastest (coalesced writes); any 1-D grid and block (256 threads).  No shared memory.
//
// Limits: none beyond the planner's (C/G*T*R*S below 2^30); offsets are 64-bit.
#include "dtype_traits.cuh"

namespace convgrad {

// w: (K, C/G, T, R, S), packed: (G, rows, b_ld).
template <typename T, bool DGRAD>
__global__ void __launch_bounds__(256)
    pack_weight(__grid_constant__ const ConvParams p, const T* __restrict__ w, T* __restrict__ packed) {
  const index_t taps = p.kernel_size[0] * p.kernel_size[1] * p.kernel_size[2];
  const index_t rows = p.total / (p.G * p.b_ld);
  const index_t red = DGRAD ? p.Kg : p.Cg, cols = DGRAD ? p.Cg : p.Kg;
  const int S = (int)p.kernel_size[2], RS = (int)(p.kernel_size[1] * p.kernel_size[2]);
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += step) {
    const index_t col = e % p.b_ld;
    const index_t row = e / p.b_ld % rows;
    const index_t g = e / (p.b_ld * rows);
    const index_t tap = row / p.b_chunk, ch = row % p.b_chunk;
    T value = DTypeTraits<T>::narrow(0);
    if (tap < taps && ch < red && col < cols) {
      const index_t k = g * p.Kg + (DGRAD ? ch : col), c = DGRAD ? col : ch;
      const int t = (int)tap;
      value = w[k * p.w_stride[0] + c * p.w_stride[1] + (t / RS) * p.w_stride[2] + (t % RS / S) * p.w_stride[3] +
                (t % S) * p.w_stride[4]];
    }
    packed[e] = value;
  }
}

}  // namespace convgrad
