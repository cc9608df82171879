// bias.cu: add a per-channel bias to an activation tensor in place (the input gradient
// of conv_transpose with bias; fprop fuses its bias into its own epilogue instead).
//
// Formula: x[n, c, d, h, w] = round(x[n, c, d, h, w] + bias[c]), computed in the
// accumulator type and rounded once to T.
//
// Layouts: x (N, C, D, H, W) at arbitrary 64-bit element strides (ConvParams::x_stride,
// extents N, C, in_size); bias (C,) contiguous.
//
// Launch geometry: one thread per element of x in a grid-stride loop over p.total =
// N*C*D*H*W elements in flat order, channel fastest when p.channels_fastest, else the
// innermost spatial index fastest; any 1-D grid and block (256 threads).  No shared memory.
//
// Limits: none beyond 64-bit element counts and offsets.
#include "dtype_traits.cuh"

namespace convgrad {

// bias: (C,), x: (N, C, D, H, W), updated in place.
template <typename T>
__global__ void __launch_bounds__(256) add_bias(const ConvParams p, const T* __restrict__ bias, T* __restrict__ x) {
  const index_t step = (index_t)gridDim.x * blockDim.x;
  const index_t D = p.in_size[0], H = p.in_size[1], W = p.in_size[2];
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += step) {
    index_t rest = e, c = 0;
    if (p.channels_fastest) {
      c = rest % p.C;
      rest /= p.C;
    }
    const index_t w = rest % W;
    rest /= W;
    const index_t h = rest % H;
    rest /= H;
    const index_t d = rest % D;
    rest /= D;
    if (!p.channels_fastest) {
      c = rest % p.C;
      rest /= p.C;
    }
    const index_t off = rest * p.x_stride[0] + c * p.x_stride[1] + d * p.x_stride[2] + h * p.x_stride[3] + w * p.x_stride[4];
    store_elem(x, off, load_elem(x, off) + load_elem(bias, c));
  }
}

}  // namespace convgrad
