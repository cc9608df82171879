// splitk_reduce.cu: the second half of split-K: add the slices' partial sums.
//
// Formula: out[i0, i1, i2, i3, i4] = sum over slices s = 0, 1, ..., splits-1 (in that order) of
//   workspace[s * ws_slice_stride + e]  (+ bias[i1] when p.has_bias)
// with e the canonical contiguous index of (i0, ..., i4) over p.out_shape, then rounded once
// to T.  The fixed order makes the result bit-identical run to run.  With EPILOGUE_ATOMIC
// upstream, splits == 1 and this kernel only converts.  The output is dw (K, C/G, T, R, S)
// for wgrad, y (N, K, Z, P, Q) for a split fprop (with its bias) and dx (N, C, D, H, W) for
// a split dgrad.
//
// Layouts: workspace (splits, prod(out_shape)) accumulators, contiguous; out at arbitrary
// 64-bit element strides p.out_stride; bias (out_shape[1],) contiguous.
//
// Launch geometry: one thread per output element in a grid-stride loop over
// p.total = prod(out_shape) elements in canonical order (last axis fastest); any 1-D grid
// and block (256 threads).  No shared memory.
//
// Limits: none beyond 64-bit element counts and offsets.
#include "dtype_traits.cuh"

namespace convgrad {

// workspace: (splits, prod(out_shape)) accumulators, bias: (out_shape[1],), out: out_shape at out_stride.
template <typename T>
__global__ void __launch_bounds__(256)
    splitk_reduce(__grid_constant__ const ConvParams p, const acc_t<T>* __restrict__ workspace,
                  const T* __restrict__ bias, T* __restrict__ out) {
  typedef acc_t<T> Acc;
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += step) {
    Acc sum = 0;
    for (index_t s = 0; s < p.splits; ++s) sum += workspace[s * p.ws_slice_stride + e];
    index_t rest = e, offset = 0, channel = 0;
#pragma unroll
    for (int a = 4; a >= 0; --a) {
      const index_t i = rest % p.out_shape[a];
      rest /= p.out_shape[a];
      offset += i * p.out_stride[a];
      if (a == 1) channel = i;
    }
    if (p.has_bias) sum += load_elem(bias, channel);
    store_elem(out, offset, sum);
  }
}

}  // namespace convgrad
