// Planted kernels for the WMMA and cp.async emulation (tests/test_cuda_host_tensor_cores.py).
//
// Each kernel is small and says what it exercises; the BUG/mode parameters plant exactly one
// mistake of the kind the emulation must turn into a failure.
#include <mma.h>

#include "async_copy.cuh"

using namespace nvcuda;

template <class T>
struct MmaK {
  static constexpr int value = 16;
};
template <>
struct MmaK<wmma::precision::tf32> {
  static constexpr int value = 8;
};

// d (16 x 16, float, row- or column-major with ldd) += a (16 x k_total) * b (k_total x 16), one
// warp.  a and b are in global memory in the fragments' layouts (LA, LB) with lda / ldb.
// ROUND rounds TF32 operands with __float_to_tf32 after loading; false is the planted
// "forgotten conversion".
template <typename T, typename LA, typename LB, bool ROUND>
__global__ void wmma_gemm(const typename wmma::fragment<wmma::matrix_a, 16, 16, MmaK<T>::value, T, LA>::storage_element_type* a,
                          const typename wmma::fragment<wmma::matrix_b, 16, 16, MmaK<T>::value, T, LB>::storage_element_type* b,
                          float* d, int k_total, unsigned lda, unsigned ldb, unsigned ldd, int d_col_major) {
  constexpr int MK = MmaK<T>::value;
  constexpr bool a_row = std::is_same<LA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LB, wmma::row_major>::value;
  const wmma::layout_t d_layout = d_col_major ? wmma::mem_col_major : wmma::mem_row_major;
  wmma::fragment<wmma::accumulator, 16, 16, MK, float> acc;
  wmma::load_matrix_sync(acc, d, ldd, d_layout);
  for (int k0 = 0; k0 < k_total; k0 += MK) {
    wmma::fragment<wmma::matrix_a, 16, 16, MK, T, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, MK, T, LB> fb;
    wmma::load_matrix_sync(fa, a + (a_row ? k0 : k0 * lda), lda);
    wmma::load_matrix_sync(fb, b + (b_row ? k0 * ldb : k0), ldb);
    if (ROUND) {
      for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
      for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(d, acc, ldd, d_layout);
}

// Divergent and partial warps; every mode is a bug the emulation must report:
//   0: each half-warp passes its own pointer;
//   1: only lanes below 16 load (the others return);
//   2: lanes below 16 load a matrix_a fragment, the others a matrix_b fragment;
//   3: every lane of a partial warp (launch it with 48 threads) loads.
__global__ void wmma_divergent(const __half* a, float* d, int mode) {
  const int lane = threadIdx.x % 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  if (mode == 0) {
    wmma::load_matrix_sync(fa, a + (lane / 16) * 256, 16);
  } else if (mode == 1) {
    if (lane >= 16) return;
    wmma::load_matrix_sync(fa, a, 16);
  } else if (mode == 2) {
    if (lane < 16)
      wmma::load_matrix_sync(fa, a, 16);
    else
      wmma::load_matrix_sync(fb, a, 16);
  } else {
    wmma::load_matrix_sync(fa, a, 16);
  }
  d[threadIdx.x] = float(fa.x[0]);
}

// Sums, for each thread t of one block, the element n-1-t of every tile of x (tiles x n
// floats, n = 4 * blockDim.x), where the element was copied into shared memory by another
// thread through a STAGES-deep cp.async pipeline (each thread copies 16 bytes per tile).
// BUG 1: the wait is skipped in steady-state iterations (kt >= STAGES).
// BUG 2: the __syncthreads() after the wait is missing.
template <int STAGES, int BUG>
__global__ void pipelined_mirror_sum(const float* x, float* out, int tiles) {
  extern __shared__ __align__(16) float stage[];
  const int n = 4 * (int)blockDim.x, t = threadIdx.x;
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < tiles) convgrad::cp_async<16>(stage + s * n + 4 * t, x + s * n + 4 * t, 16);
    convgrad::cp_async_commit();
  }
  float acc = 0;
  for (int kt = 0; kt < tiles; ++kt) {
    if (BUG != 1 || kt < STAGES) convgrad::cp_async_wait<STAGES - 2>();
    // Every thread's copies of tile kt have landed, and every thread has finished reading
    // the stage the next issue overwrites.
    if (BUG != 2) __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < tiles) convgrad::cp_async<16>(stage + (next % STAGES) * n + 4 * t, x + (long long)next * n + 4 * t, 16);
    convgrad::cp_async_commit();
    acc += stage[(kt % STAGES) * n + (n - 1 - t)];
  }
  out[t] = acc;
}

// Reads its own destination right after issuing and again after the wait, every iteration:
// seen_before[kt*threads + t] and seen_after[...] receive what the thread saw.
__global__ void read_before_wait(const float* x, float* seen_before, float* seen_after, int tiles) {
  extern __shared__ __align__(16) float buffer[];
  const int t = threadIdx.x, threads = blockDim.x;
  for (int kt = 0; kt < tiles; ++kt) {
    convgrad::cp_async<4>(buffer + t, x + kt * threads + t, 4);
    convgrad::cp_async_commit();
    seen_before[kt * threads + t] = buffer[t];
    convgrad::cp_async_wait<0>();
    seen_after[kt * threads + t] = buffer[t];
  }
}

// One cp.async per thread with the given operands (offsets in bytes), then wait_all and copy
// the first 64 bytes of shared memory to out.  Modes:
//   0: .ca (or .cg when cg != 0) of `size` bytes from src + src_off to shared + dst_off;
//   1: the destination is global memory (out), not shared memory.
__global__ void cp_async_rules(const unsigned char* src, unsigned char* out, int size, int src_size, int src_off,
                               int dst_off, int cg, int mode) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  if (threadIdx.x == 0) {
    for (int i = 0; i < 64; ++i) shared_bytes[i] = 0xAB;
    unsigned char* dst = mode == 1 ? out : shared_bytes + dst_off;
    cuda_host::ptx::cp_async(dst, src + src_off, (unsigned)size, (unsigned)src_size,
                             cg ? cuda_host::ptx::CacheLevel::cg : cuda_host::ptx::CacheLevel::ca);
    convgrad::cp_async_wait_all();
    for (int i = 0; i < 64; ++i) out[i] = shared_bytes[i];
  }
}

// __float_to_tf32 of each element (round to nearest, ties away from zero).
__global__ void to_tf32(const float* x, float* out, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = wmma::__float_to_tf32(x[i]);
}
