// cuda_host_math.h: CUDA's device math functions and bit/conversion intrinsics.
//
// The standard single/double functions (sqrtf, expf, fmaf, ...) come from <math.h> in the
// global namespace, as kernels call them.  The "fast" intrinsics (__expf, __fdividef, ...)
// are computed exactly here: the GPU's approximations differ in the last bits, so host and
// GPU results agree only to a tolerance where a kernel uses them.  Conversions to integers
// saturate and map NaN to 0, as the GPU's cvt instructions do (in C++ that would be UB).
#pragma once

#include <climits>
#include <cstdint>
#include <limits>
#include <math.h>
#include <stdlib.h>

// min/max: the overload set of CUDA's math_functions.hpp, so the same calls are ambiguous
// (or not) on the host as under NVRTC.
#define CUDA_HOST_MINMAX(A, B, R)                                                            \
  inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? a : b; }        \
  inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? a : b; }
CUDA_HOST_MINMAX(int, int, int)
CUDA_HOST_MINMAX(unsigned int, unsigned int, unsigned int)
CUDA_HOST_MINMAX(int, unsigned int, unsigned int)
CUDA_HOST_MINMAX(unsigned int, int, unsigned int)
CUDA_HOST_MINMAX(long, long, long)
CUDA_HOST_MINMAX(unsigned long, unsigned long, unsigned long)
CUDA_HOST_MINMAX(long, unsigned long, unsigned long)
CUDA_HOST_MINMAX(unsigned long, long, unsigned long)
CUDA_HOST_MINMAX(long long, long long, long long)
CUDA_HOST_MINMAX(unsigned long long, unsigned long long, unsigned long long)
CUDA_HOST_MINMAX(long long, unsigned long long, unsigned long long)
CUDA_HOST_MINMAX(unsigned long long, long long, unsigned long long)
#undef CUDA_HOST_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(double(a), b); }
inline double max(float a, double b) { return fmax(double(a), b); }
inline double min(double a, float b) { return fmin(a, double(b)); }
inline double max(double a, float b) { return fmax(a, double(b)); }

// Floating-point intrinsics.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline double rcbrt(double x) { return 1.0 / cbrt(x); }
inline float fdividef(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}

// Reinterpretation.
inline int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
inline unsigned __float_as_uint(float x) { return __builtin_bit_cast(unsigned, x); }
inline float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
inline float __uint_as_float(unsigned x) { return __builtin_bit_cast(float, x); }
inline long long __double_as_longlong(double x) { return __builtin_bit_cast(long long, x); }
inline double __longlong_as_double(long long x) { return __builtin_bit_cast(double, x); }
inline int __double2hiint(double x) { return int(__builtin_bit_cast(uint64_t, x) >> 32); }
inline int __double2loint(double x) { return int(uint32_t(__builtin_bit_cast(uint64_t, x))); }
inline double __hiloint2double(int hi, int lo) {
  return __builtin_bit_cast(double, (uint64_t(uint32_t(hi)) << 32) | uint32_t(lo));
}

// Saturating conversions to integers.
namespace cuda_host {
namespace detail {
template <class I, class F>
inline I saturate(F rounded) {
  if (rounded != rounded) return I(0);
  if (rounded <= F(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  // max() of a 32/64-bit type is not exactly representable: compare against 2^bits instead.
  if (rounded >= F(2) * F(std::numeric_limits<I>::max() / 2 + 1)) return std::numeric_limits<I>::max();
  return I(rounded);
}
}  // namespace detail
}  // namespace cuda_host

#define CUDA_HOST_F2I(name, F, I, round)                                                     \
  inline I name(F x) { return ::cuda_host::detail::saturate<I, F>(round(x)); }
CUDA_HOST_F2I(__float2int_rn, float, int, nearbyintf)
CUDA_HOST_F2I(__float2int_rz, float, int, truncf)
CUDA_HOST_F2I(__float2int_rd, float, int, floorf)
CUDA_HOST_F2I(__float2int_ru, float, int, ceilf)
CUDA_HOST_F2I(__float2uint_rn, float, unsigned, nearbyintf)
CUDA_HOST_F2I(__float2uint_rz, float, unsigned, truncf)
CUDA_HOST_F2I(__float2uint_rd, float, unsigned, floorf)
CUDA_HOST_F2I(__float2uint_ru, float, unsigned, ceilf)
CUDA_HOST_F2I(__float2ll_rn, float, long long, nearbyintf)
CUDA_HOST_F2I(__float2ll_rz, float, long long, truncf)
CUDA_HOST_F2I(__float2ull_rn, float, unsigned long long, nearbyintf)
CUDA_HOST_F2I(__float2ull_rz, float, unsigned long long, truncf)
CUDA_HOST_F2I(__double2int_rn, double, int, nearbyint)
CUDA_HOST_F2I(__double2int_rz, double, int, trunc)
CUDA_HOST_F2I(__double2int_rd, double, int, floor)
CUDA_HOST_F2I(__double2int_ru, double, int, ceil)
CUDA_HOST_F2I(__double2uint_rn, double, unsigned, nearbyint)
CUDA_HOST_F2I(__double2uint_rz, double, unsigned, trunc)
CUDA_HOST_F2I(__double2ll_rn, double, long long, nearbyint)
CUDA_HOST_F2I(__double2ll_rz, double, long long, trunc)
#undef CUDA_HOST_F2I

inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __ll2float_rn(long long x) { return float(x); }
inline float __ull2float_rn(unsigned long long x) { return float(x); }
inline double __int2double_rn(int x) { return double(x); }
inline double __uint2double_rn(unsigned x) { return double(x); }
inline double __ll2double_rn(long long x) { return double(x); }
inline float __double2float_rn(double x) { return float(x); }

// Bit manipulation.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(unsigned(x))) << 32) | __brev(unsigned(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((bytes >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (uint64_t(hi) << 32) | lo;
  return unsigned((v << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (uint64_t(hi) << 32) | lo;
  return unsigned((v << (shift < 32 ? shift : 32)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (uint64_t(hi) << 32) | lo;
  return unsigned(v >> (shift & 31));
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (uint64_t(hi) << 32) | lo;
  return unsigned(v >> (shift < 32 ? shift : 32));
}

// Integer arithmetic.
inline int __mulhi(int a, int b) { return int((int64_t(a) * int64_t(b)) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline long long __mul64hi(long long a, long long b) {
  return (long long)((__int128(a) * __int128(b)) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)((unsigned __int128)a * b >> 64);
}
inline int __mul24(int a, int b) {
  // Sign-extend the low 24 bits of each operand, keep the low 32 bits of the product.
  const int64_t a24 = int64_t(uint32_t(a) << 8) >> 8;
  const int64_t b24 = int64_t(uint32_t(b) << 8) >> 8;
  return int(uint32_t(uint64_t(a24 * b24)));
}
inline unsigned __umul24(unsigned a, unsigned b) {
  return unsigned(uint64_t(a & 0xffffffu) * (b & 0xffffffu));
}
inline int __hadd(int a, int b) { return int((int64_t(a) + b) >> 1); }
inline int __rhadd(int a, int b) { return int((int64_t(a) + b + 1) >> 1); }
inline unsigned __uhadd(unsigned a, unsigned b) { return unsigned((uint64_t(a) + b) >> 1); }
inline unsigned __urhadd(unsigned a, unsigned b) { return unsigned((uint64_t(a) + b + 1) >> 1); }
inline unsigned __sad(int a, int b, unsigned c) {
  return c + unsigned(a > b ? int64_t(a) - b : int64_t(b) - a);
}
inline unsigned __usad(unsigned a, unsigned b, unsigned c) { return c + (a > b ? a - b : b - a); }
