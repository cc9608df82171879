// splitk_reduce.cu: the second half of split-K wgrad: add the slices' partial sums.
//
// Formula: dw[k, c, t, r, s] = sum over slices i = 0, 1, ..., splits-1 (in that order) of
//   workspace[i * ws_slice_stride + k * (C/G*T*R*S) + (c*T + t)*R*S + r*S + s]
// then rounded once to T.  The fixed order makes the result bit-identical run to run.
// With EPILOGUE_ATOMIC upstream, splits == 1 and this kernel only converts.
//
// Layouts: workspace (splits, K, C/G*T*R*S) accumulators, contiguous; dw (K, C/G, T, R, S)
// at arbitrary 64-bit element strides.
//
// Launch geometry: one thread per element of dw in a grid-stride loop over
// p.total = K*C/G*T*R*S elements, flat index e = k*(C/G*T*R*S) + column; any 1-D grid and
// block (256 threads).  No shared memory.
//
// Limits: C/G*T*R*S below 2^30 (the planner's bound); counts and offsets are 64-bit.
#include "dtype_traits.cuh"

namespace convgrad {

// workspace: (splits, K, C/G*T*R*S) accumulators, dw: (K, C/G, T, R, S).
template <typename T>
__global__ void __launch_bounds__(256)
    splitk_reduce(const ConvParams p, const acc_t<T>* __restrict__ workspace, T* __restrict__ dw) {
  typedef acc_t<T> Acc;
  const int S = (int)p.kernel_size[2], RS = (int)(p.kernel_size[1] * p.kernel_size[2]);
  const index_t taps = p.kernel_size[0] * RS;
  const index_t cols = p.Cg * taps;
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += step) {
    Acc sum = 0;
    for (index_t i = 0; i < p.splits; ++i) sum += workspace[i * p.ws_slice_stride + e];
    const index_t k = e / cols, col = e % cols;
    const index_t c = col / taps;
    const int tap = (int)(col % taps);
    store_elem(dw, k * p.w_stride[0] + c * p.w_stride[1] + (tap / RS) * p.w_stride[2] + (tap % RS / S) * p.w_stride[3] +
                       (tap % S) * p.w_stride[4],
               sum);
  }
}

}  // namespace convgrad
