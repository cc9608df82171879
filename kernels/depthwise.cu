// depthwise.cu: direct kernels for depthwise convolutions (groups == C), all three passes.
//
// With G == C every group has one input channel and M = K / C output channels (the
// channel multiplier); output channel k reads input channel k / M.  Formulas:
//   fprop  y[n, k, z, p, q]  = sum_{t,r,s} x[n, k/M, z*sd-pd+t*dd, p*sh-ph+r*dh, q*sw-pw+s*dw] * w[k, 0, t, r, s]  (+ bias[k])
//   dgrad  dx[n, c, d, h, w] = sum_{j<M} sum_{t,r,s} dy[n, c*M+j, z, p, q] * w[c*M+j, 0, t, r, s]
//            over the taps with z = (d + pd - t*dd) / sd an integer in [0, Z) (likewise p, q)
//   wgrad  dw[k, 0, t, r, s] = sum_{n,z,p,q} dy[n, k, z, p, q] * x[n, k/M, z*sd-pd+t*dd, ...]
// Input positions outside the tensor read as zero.
//
// Layouts: x (N, C, D, H, W), w (K, 1, T, R, S), y (N, K, Z, P, Q), arbitrary 64-bit
// element strides.
//
// Launch geometry:
//   depthwise_fprop / depthwise_dgrad: one thread per output element, a grid-stride loop
//     over the p.total = N*K*Z*P*Q (fprop) or N*C*D*H*W (dgrad) outputs in flat order,
//     channel fastest when p.channels_fastest (channels-last tensors, so neighbouring
//     threads touch neighbouring addresses), else the innermost spatial index fastest.
//     Any 1-D grid and block; 256 threads per block.  dgrad visits only the taps congruent
//     to the output position modulo the stride (tap_step apart), never the skipped ones.
//   depthwise_wgrad: one block per (output element, split-K slice): block b reduces
//     element b mod (K*T*R*S) (k, then t, r, s; s fastest) over reduction indices
//     [slice*split_len, (slice+1)*split_len) of the flattened (n, z, p, q), slice =
//     b / (K*T*R*S).  The block's threads stride through the slice, then a fixed-order
//     tree (warp shuffles, then one partial per warp in shared memory summed by thread 0)
//     combines them, so the result is deterministic.  blockDim.x: a multiple of 32 up to
//     256; dynamic shared memory: one accumulator per warp.  The epilogue (ConvParams::
//     epilogue) stores to dw, to workspace[slice][K*T*R*S], or atomically adds to it.
//
// Limits (checked by the planner): spatial extents below 2^30; fewer than 2^31 blocks.
#include "dtype_traits.cuh"

namespace convgrad {
namespace depthwise {

// Coordinates of a flat index over (N, channels, E0, E1, E2).
struct Coord {
  index_t n, ch;
  int sp[3];
};

template <typename I>
__device__ __forceinline__ Coord decode(I e, I channels, const index_t* extent, bool channels_fastest) {
  Coord o;
  const I e0 = (I)extent[0], e1 = (I)extent[1], e2 = (I)extent[2];
  if (channels_fastest) {
    o.ch = (index_t)(e % channels);
    e /= channels;
  }
  o.sp[2] = (int)(e % e2);
  e /= e2;
  o.sp[1] = (int)(e % e1);
  e /= e1;
  o.sp[0] = (int)(e % e0);
  e /= e0;
  if (channels_fastest) {
    o.n = (index_t)e;
  } else {
    o.ch = (index_t)(e % channels);
    o.n = (index_t)(e / channels);
  }
  return o;
}

// 32-bit division when every index fits, which is the common case.
__device__ __forceinline__ Coord decode_index(index_t e, index_t total, index_t channels, const index_t* extent,
                                              bool channels_fastest) {
  if (total <= 0x7fffffffLL) return decode<unsigned>((unsigned)e, (unsigned)channels, extent, channels_fastest);
  return decode<index_t>(e, channels, extent, channels_fastest);
}

// Sum of v over the block; the result is meaningful in thread 0 only.  `scratch` holds one
// value per warp.  The order of additions is fixed by the block size alone.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) scratch[warp] = v;
  // Every warp's partial must be in shared memory before thread 0 adds them up.
  __syncthreads();
  Acc total = 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < warps; ++i) total += scratch[i];
  }
  return total;
}

}  // namespace depthwise

// x: (N, C, D, H, W), w: (K, 1, T, R, S), bias: (K,) (read only when p.has_bias), y: (N, K, Z, P, Q).
template <typename T>
__global__ void __launch_bounds__(256)
    depthwise_fprop(const ConvParams p, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                    T* __restrict__ y) {
  typedef acc_t<T> Acc;
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += step) {
    const depthwise::Coord o = depthwise::decode_index(e, p.total, p.K, p.out_size, p.channels_fastest != 0);
    const index_t x_base = o.n * p.x_stride[0] + (o.ch / p.Kg) * p.x_stride[1];
    const index_t w_base = o.ch * p.w_stride[0];
    Acc sum = 0;
    for (int t = 0; t < (int)p.kernel_size[0]; ++t) {
      const int zi = o.sp[0] * (int)p.stride[0] - (int)p.pad[0] + t * (int)p.dilation[0];
      if ((unsigned)zi >= (unsigned)p.in_size[0]) continue;
      for (int r = 0; r < (int)p.kernel_size[1]; ++r) {
        const int yi = o.sp[1] * (int)p.stride[1] - (int)p.pad[1] + r * (int)p.dilation[1];
        if ((unsigned)yi >= (unsigned)p.in_size[1]) continue;
        const index_t x_row = x_base + zi * p.x_stride[2] + yi * p.x_stride[3];
        const index_t w_row = w_base + t * p.w_stride[2] + r * p.w_stride[3];
        for (int s = 0; s < (int)p.kernel_size[2]; ++s) {
          const int xi = o.sp[2] * (int)p.stride[2] - (int)p.pad[2] + s * (int)p.dilation[2];
          if ((unsigned)xi >= (unsigned)p.in_size[2]) continue;
          sum = multiply_add(load_elem(x, x_row + xi * p.x_stride[4]), load_elem(w, w_row + s * p.w_stride[4]), sum);
        }
      }
    }
    if (p.has_bias) sum += load_elem(bias, o.ch);
    store_elem(y, o.n * p.y_stride[0] + o.ch * p.y_stride[1] + o.sp[0] * p.y_stride[2] + o.sp[1] * p.y_stride[3] +
                      o.sp[2] * p.y_stride[4],
               sum);
  }
}

// dy: (N, K, Z, P, Q), w: (K, 1, T, R, S), dx: (N, C, D, H, W).
template <typename T>
__global__ void __launch_bounds__(256)
    depthwise_dgrad(const ConvParams p, const T* __restrict__ dy, const T* __restrict__ w, T* __restrict__ dx) {
  typedef acc_t<T> Acc;
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += step) {
    const depthwise::Coord o = depthwise::decode_index(e, p.total, p.C, p.in_size, p.channels_fastest != 0);
    // Per axis: the first tap whose position lands on the stride grid (taps tap_step apart
    // from it are the only others that do), or none.
    int first[3], base[3];
    bool any = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      base[a] = o.sp[a] + (int)p.pad[a];
      const int s = (int)p.stride[a], dil = (int)p.dilation[a], tap_step = (int)p.tap_step[a];
      int t = 0;
      while (t < tap_step && (base[a] - t * dil) % s != 0) ++t;
      first[a] = t;
      any = any && t < tap_step;
    }
    Acc sum = 0;
    if (any) {
      const int st0 = (int)p.stride[0], st1 = (int)p.stride[1], st2 = (int)p.stride[2];
      const int dl0 = (int)p.dilation[0], dl1 = (int)p.dilation[1], dl2 = (int)p.dilation[2];
      const int ts0 = (int)p.tap_step[0], ts1 = (int)p.tap_step[1], ts2 = (int)p.tap_step[2];
      for (int t = first[0]; t < (int)p.kernel_size[0]; t += ts0) {
        const int num_z = base[0] - t * dl0;
        if (num_z < 0) break;  // later taps reach further back still
        const int z = num_z / st0;
        if (z >= (int)p.out_size[0]) continue;
        for (int r = first[1]; r < (int)p.kernel_size[1]; r += ts1) {
          const int num_p = base[1] - r * dl1;
          if (num_p < 0) break;
          const int pp = num_p / st1;
          if (pp >= (int)p.out_size[1]) continue;
          for (int s = first[2]; s < (int)p.kernel_size[2]; s += ts2) {
            const int num_q = base[2] - s * dl2;
            if (num_q < 0) break;
            const int q = num_q / st2;
            if (q >= (int)p.out_size[2]) continue;
            const index_t y_pos = o.n * p.y_stride[0] + z * p.y_stride[2] + pp * p.y_stride[3] + q * p.y_stride[4];
            const index_t w_pos = t * p.w_stride[2] + r * p.w_stride[3] + s * p.w_stride[4];
            for (index_t j = 0; j < p.Kg; ++j) {
              const index_t k = o.ch * p.Kg + j;
              sum = multiply_add(load_elem(dy, y_pos + k * p.y_stride[1]), load_elem(w, w_pos + k * p.w_stride[0]), sum);
            }
          }
        }
      }
    }
    store_elem(dx, o.n * p.x_stride[0] + o.ch * p.x_stride[1] + o.sp[0] * p.x_stride[2] + o.sp[1] * p.x_stride[3] +
                       o.sp[2] * p.x_stride[4],
               sum);
  }
}

// x: (N, C, D, H, W), dy: (N, K, Z, P, Q), dw: (K, 1, T, R, S);
// workspace: (splits, K*T*R*S) accumulators for EPILOGUE_WORKSPACE, (K*T*R*S) for EPILOGUE_ATOMIC.
template <typename T>
__global__ void __launch_bounds__(256)
    depthwise_wgrad(const ConvParams p, const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dw,
                    acc_t<T>* __restrict__ workspace) {
  typedef acc_t<T> Acc;
  extern __shared__ __align__(16) unsigned char smem[];
  const int S = (int)p.kernel_size[2], RS = (int)(p.kernel_size[1] * p.kernel_size[2]);
  const index_t taps = p.kernel_size[0] * RS;
  const index_t outputs = p.K * taps;
  const index_t out = blockIdx.x % outputs, slice = blockIdx.x / outputs;
  const index_t k = out / taps;
  const int tap = (int)(out % taps);
  const int t = tap / RS, r = tap % RS / S, s = tap % S;
  const int Z = (int)p.out_size[0], P = (int)p.out_size[1], Q = (int)p.out_size[2];
  const index_t red_total = p.N * Z * P * Q;
  const index_t red_begin = slice * p.split_len;
  const index_t red_end = red_begin + p.split_len < red_total ? red_begin + p.split_len : red_total;

  const index_t y_base = k * p.y_stride[1];
  const index_t x_base = (k / p.Kg) * p.x_stride[1];
  const int zt = t * (int)p.dilation[0] - (int)p.pad[0];
  const int yt = r * (int)p.dilation[1] - (int)p.pad[1];
  const int xt = s * (int)p.dilation[2] - (int)p.pad[2];

  Acc sum = 0;
  index_t red = red_begin + threadIdx.x;
  if (red < red_end) {
    // This thread's (n, z, p, q); afterwards advanced by blockDim.x with carries.
    index_t rest = red;
    int q = (int)(rest % Q);
    rest /= Q;
    int pp = (int)(rest % P);
    rest /= P;
    int z = (int)(rest % Z);
    index_t n = rest / Z;
    const int step = blockDim.x;
    for (; red < red_end; red += step) {
      const int zi = z * (int)p.stride[0] + zt, yi = pp * (int)p.stride[1] + yt, xi = q * (int)p.stride[2] + xt;
      if ((unsigned)zi < (unsigned)p.in_size[0] && (unsigned)yi < (unsigned)p.in_size[1] &&
          (unsigned)xi < (unsigned)p.in_size[2]) {
        const Acc g = load_elem(dy, y_base + n * p.y_stride[0] + z * p.y_stride[2] + pp * p.y_stride[3] + q * p.y_stride[4]);
        const Acc v = load_elem(x, x_base + n * p.x_stride[0] + zi * p.x_stride[2] + yi * p.x_stride[3] + xi * p.x_stride[4]);
        sum = multiply_add(g, v, sum);
      }
      q += step;
      if (q >= Q) {
        int carry = q / Q;
        q -= carry * Q;
        pp += carry;
        if (pp >= P) {
          carry = pp / P;
          pp -= carry * P;
          z += carry;
          if (z >= Z) {
            carry = z / Z;
            z -= carry * Z;
            n += carry;
          }
        }
      }
    }
  }
  sum = depthwise::block_sum(sum, reinterpret_cast<Acc*>(smem));
  if (threadIdx.x != 0) return;
  if (p.epilogue == EPILOGUE_WORKSPACE) {
    workspace[slice * p.ws_slice_stride + out] = sum;
  } else if (p.epilogue == EPILOGUE_ATOMIC) {
    atomicAdd(workspace + out, sum);
  } else {
    store_elem(dw, k * p.w_stride[0] + t * p.w_stride[2] + r * p.w_stride[3] + s * p.w_stride[4], sum);
  }
}

}  // namespace convgrad
