// conv_params.cuh: the one parameter struct every convgrad kernel takes by value.
//
// Every field is a 64-bit signed integer, so the struct has no padding and its layout is
// the same under nvcc, NVRTC and the host compilers; convgrad.backends.cupy_backend
// mirrors it field by field as a NumPy structured dtype (PARAM_FIELDS), and
// tests/test_conv_params_layout.py compares the two with offsetof/sizeof.
//
// Letters follow DESIGN §1.  Logical tensors (element strides, any sign, any order):
//   x: (N, C, D, H, W)      input, or the input gradient
//   w: (K, C/G, T, R, S)    weight, or the weight gradient
//   y: (N, K, Z, P, Q)      output, or the output gradient
// 1-D and 2-D problems arrive with leading spatial extents of 1.
#pragma once

namespace convgrad {

typedef long long index_t;

struct ConvParams {
  // The problem.
  index_t N, C, K, G;
  index_t Cg, Kg;            // channels per group: C / G and K / G
  index_t in_size[3];        // D, H, W
  index_t kernel_size[3];    // T, R, S
  index_t out_size[3];       // Z, P, Q
  index_t stride[3];
  index_t dilation[3];
  index_t pad[3];            // padding before each spatial axis (after-padding is implied)
  index_t tap_step[3];       // stride / gcd(stride, dilation): distance between taps of one dgrad phase
  index_t x_stride[5];       // element strides of x along N, C, D, H, W
  index_t w_stride[5];       // element strides of w along K, C/G, T, R, S
  index_t y_stride[5];       // element strides of y along N, K, Z, P, Q

  // The launch plan (set by the planner for the kernel being launched).
  index_t tiles_m;           // GEMM tiles along M
  index_t tiles_n;           // GEMM tiles along N
  index_t phases;            // dgrad stride phases (stride_d * stride_h * stride_w); 1 otherwise
  index_t splits;            // split-K slices of the reduction
  index_t split_len;         // per slice: reduction steps (fprop, dgrad) or reduction elements (wgrad, depthwise)
  index_t ws_slice_stride;   // elements between two slices of the split-K workspace
  index_t epilogue;          // EPILOGUE_STORE, EPILOGUE_WORKSPACE or EPILOGUE_ATOMIC
  index_t has_bias;          // fprop (and its split-K reduction): add bias[k] to every output of channel k
  index_t a_blocked;         // fprop/dgrad: a thread's A lanes are consecutive channels (channels-last), not interleaved
  index_t a_vec;             // fprop/dgrad: A loaded as vectors of contiguous channels (the fast path)
  index_t out_cfast;         // fprop/dgrad epilogue: store channel-fastest (channels-last output), else pixel-fastest
  index_t red_packed;        // fprop/dgrad: the reduction runs over (tap, channel) pairs flattened (small C/G)
  index_t b_ld;              // packed weight: elements between two rows
  index_t b_chunk;           // packed weight: rows per tap (C/G rounded up to BK; exactly C/G when red_packed)
  index_t div_mul[3];        // red_packed: n / d == (n * div_mul) >> div_shift for 0 <= n < 2^31, with d the
  index_t div_shift[3];      //   reduction channels, the taps along axes 1 and 2, and the taps along axis 2
  index_t channels_fastest;  // elementwise kernels: channel is the fastest-varying output index
  index_t total;             // elementwise kernels: number of outputs
  index_t b_vec;             // GEMM B tile loaded as vectors of contiguous channels (tensor-core fast path)
  index_t out_nfast;         // tensor-core epilogue: the output is contiguous along GEMM N (channels-last)
  index_t out_shape[5];      // split-K reduction: logical shape of the output (N, C, D, H, W or K, C/G, T, R, S)
  index_t out_stride[5];     // split-K reduction: its element strides
};

// How a kernel writes its result.
enum : int {
  EPILOGUE_STORE = 0,      // convert to the tensor's dtype and store at its strides
  EPILOGUE_WORKSPACE = 1,  // store the partial sum of this split-K slice to the workspace
  EPILOGUE_ATOMIC = 2,     // atomically add the partial sum to a zeroed workspace (not deterministic)
};

}  // namespace convgrad
