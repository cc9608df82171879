// dtype_traits.cuh: how each tensor dtype is loaded, stored and accumulated.
//
//   dtype            accumulator   conversion on store
//   __half           float         round to nearest even (__float2half_rn)
//   __nv_bfloat16    float         round to nearest even (__float2bfloat16_rn)
//   float            float         none
//   double           double        none
//
// Kernels never do arithmetic on 16-bit values: they widen on load, accumulate in the
// accumulator type and round once on store.  Under NVRTC/nvcc the 16-bit types come from
// cuda_fp16.h / cuda_bf16.h; the host emulation (convgrad.cuda_host) defines them
// before it includes a kernel source.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "conv_params.cuh"

namespace convgrad {

template <typename T>
struct DTypeTraits;

template <>
struct DTypeTraits<float> {
  typedef float acc_t;
  static __device__ __forceinline__ float widen(float v) { return v; }
  static __device__ __forceinline__ float narrow(float v) { return v; }
};

template <>
struct DTypeTraits<double> {
  typedef double acc_t;
  static __device__ __forceinline__ double widen(double v) { return v; }
  static __device__ __forceinline__ double narrow(double v) { return v; }
};

template <>
struct DTypeTraits<__half> {
  typedef float acc_t;
  static __device__ __forceinline__ float widen(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half narrow(float v) { return __float2half_rn(v); }
};

template <>
struct DTypeTraits<__nv_bfloat16> {
  typedef float acc_t;
  static __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 narrow(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
using acc_t = typename DTypeTraits<T>::acc_t;

// The element at `offset` (elements, any sign) of `base`, widened to the accumulator type.
template <typename T>
__device__ __forceinline__ acc_t<T> load_elem(const T* base, index_t offset) {
  return DTypeTraits<T>::widen(base[offset]);
}

// Round `value` to T and store it at `offset` of `base`.
template <typename T>
__device__ __forceinline__ void store_elem(T* base, index_t offset, acc_t<T> value) {
  base[offset] = DTypeTraits<T>::narrow(value);
}

// The widest vector of T a fast-path load reads at once: 16 bytes, at most `limit` elements.
template <typename T, int limit>
struct VectorWidth {
  static constexpr int raw = 16 / (int)sizeof(T);
  static constexpr int value = raw < limit ? raw : limit;
};

template <int BYTES>
struct VectorWord;
template <>
struct VectorWord<16> {
  typedef uint4 type;
};
template <>
struct VectorWord<8> {
  typedef uint2 type;
};
template <>
struct VectorWord<4> {
  typedef unsigned int type;
};

// N consecutive elements at `offset` of `base`, widened into dst[0..N): one load, or one
// 16-byte load per 16 bytes when there are more.  The address must be aligned to
// min(N * sizeof(T), 16) bytes (the planner and backend guarantee it).
template <typename T, int N>
__device__ __forceinline__ void load_vector(const T* base, index_t offset, acc_t<T>* dst) {
  if constexpr (N * (int)sizeof(T) > 16) {
    constexpr int PER_WORD = 16 / (int)sizeof(T);
#pragma unroll
    for (int i = 0; i < N; i += PER_WORD) load_vector<T, PER_WORD>(base, offset + i, dst + i);
  } else {
    typedef typename VectorWord<N * (int)sizeof(T)>::type Word;
    const Word word = *reinterpret_cast<const Word*>(base + offset);
    const T* elems = reinterpret_cast<const T*>(&word);
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = DTypeTraits<T>::widen(elems[j]);
  }
}

// a * b + c; NVRTC and nvcc contract it to one fused multiply-add.
template <typename A>
__device__ __forceinline__ A multiply_add(A a, A b, A c) {
  return a * b + c;
}

}  // namespace convgrad
