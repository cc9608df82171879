// Planted kernels for tests/test_cuda_host_emulation.py: warp intrinsics.

// Thread t writes the results of a fixed list of warp intrinsics to out[t*kResults + k]; the
// test recomputes each from the CUDA documentation's semantics.  in[t] >= 0.
// Launch: one block of any size (a partial last warp included).
constexpr int kResults = 26;

__device__ void record(int* o, int& k, int v) { o[k++] = v; }

__global__ void warp_ops(const int* in, int* out) {
  const int t = threadIdx.x;
  const int lane = t % warpSize;
  const int v = in[t];
  int* o = out + t * kResults;
  int k = 0;
  for (int m = 1; m < 32; m <<= 1) record(o, k, __shfl_xor_sync(0xffffffffu, v, m));  // 5
  for (unsigned d = 1; d <= 5; d += 2) record(o, k, __shfl_up_sync(0xffffffffu, v, d));  // 3
  for (unsigned d = 1; d <= 5; d += 2) record(o, k, __shfl_down_sync(0xffffffffu, v, d));  // 3
  record(o, k, __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32));
  record(o, k, __shfl_sync(0xffffffffu, v, lane * 7 + 3, 16));
  record(o, k, __shfl_up_sync(0xffffffffu, v, 3, 8));
  record(o, k, __shfl_down_sync(0xffffffffu, v, 3, 8));
  record(o, k, __shfl_xor_sync(0xffffffffu, v, 5, 4));
  record(o, k, int(__ballot_sync(0xffffffffu, v % 3 == 0)));
  record(o, k, __any_sync(0xffffffffu, v == 7));
  record(o, k, __all_sync(0xffffffffu, v >= 0));
  record(o, k, __all_sync(0xffffffffu, v % 2 == 0));
  // Floating-point payloads travel bit-exactly.
  const float f = __shfl_xor_sync(0xffffffffu, float(v) + 0.25f, 1);
  record(o, k, f != f ? -2 : int(f * 4.0f));
  const double d = __shfl_down_sync(0xffffffffu, double(v) + 0.5, 1);
  record(o, k, d != d ? -2 : int(d * 2.0));
  // Two half-warp groups with their own masks, in flight at the same time.
  if (lane < 16)
    record(o, k, __shfl_xor_sync(0x0000ffffu, v, 8));
  else
    record(o, k, __shfl_xor_sync(0xffff0000u, v, 8));
  record(o, k, int(__reduce_add_sync(0xffffffffu, unsigned(v))));
  record(o, k, int(__match_any_sync(0xffffffffu, v % 4)));
  __syncwarp();
  record(o, k, int(__activemask()));
}

// Lanes at or past n return first; the rest reduce over the mask __activemask() gives them.
// Launch: one block; out has 2 ints per thread.
__global__ void activemask_after_return(const int* in, int* out, int n) {
  const int t = threadIdx.x;
  if (t >= n) return;
  const unsigned mask = __activemask();
  out[2 * t] = int(mask);
  out[2 * t + 1] = int(__reduce_add_sync(mask, unsigned(in[t])));
}

// The calling lane is missing from the mask: an error on the GPU (undefined), reported here.
__global__ void lane_not_in_mask(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, int(threadIdx.x), 0);
}

// Lanes of one mask disagree about the mask.
__global__ void mismatched_masks(int* out) {
  const unsigned mask = threadIdx.x == 5 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_sync(mask | 0x0000ffffu, int(threadIdx.x), 0);
}
