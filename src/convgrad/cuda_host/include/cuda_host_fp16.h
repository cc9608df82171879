// cuda_host_fp16.h: __half and __nv_bfloat16 as cuda_fp16.h / cuda_bf16.h define them.
//
// Both are 2-byte storage types.  Conversions round to nearest, ties to even, with
// subnormals, overflow to infinity and signed zeros handled exactly; a narrowing conversion
// is rounded once from the exact source value (a double is not rounded to float first).
// Results are bit-identical to numpy.float16 and ml_dtypes.bfloat16 for every non-NaN input.
// NaN: narrowing gives the canonical NaN 0x7fff, as the GPU and CUDA's own host code do
// (NumPy would keep the payload); widening to float keeps sign and payload.
//
// Arithmetic on two halves (operators and __hadd/__hmul/...) is computed in float and rounded
// once to the 2-byte format: float has more than twice the precision plus two bits, so the
// result equals the correctly rounded one, as the GPU's half instructions give.  __hfma rounds
// the exact a*b+c once (round-to-odd intermediate), as the GPU's fused operation does.
//
// Like the CUDA headers, the types convert implicitly from float/double/integers and to float,
// so `__half h = 1.5f; float f = h;` compiles, while `h * 2.0f` is ambiguous exactly as it is
// under NVRTC; kernels convert explicitly (__half2float) in mixed expressions.
#pragma once

#include <cmath>
#include <cstdint>

namespace cuda_host {
namespace fp {

// Rounds `value` to a binary format with kExpBits exponent bits and kMantBits fraction bits
// (IEEE layout, bias 2^(kExpBits-1)-1), ties to even; returns the format's bit pattern.
template <int kExpBits, int kMantBits>
inline uint16_t round_from_double(double value) {
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  constexpr uint32_t kInf = ((1u << kExpBits) - 1u) << kMantBits;
  const uint64_t bits = __builtin_bit_cast(uint64_t, value);
  const uint32_t sign = uint32_t(bits >> 63) << (kExpBits + kMantBits);
  const int biased = int((bits >> 52) & 0x7ff);
  const uint64_t fraction = bits & ((uint64_t(1) << 52) - 1);
  if (biased == 0x7ff) return uint16_t(fraction != 0 ? 0x7fffu : (sign | kInf));
  // Double subnormals lie far below half the smallest subnormal of either target format.
  if (biased == 0) return uint16_t(sign);
  const int e = biased - 1023;
  const uint64_t m = fraction | (uint64_t(1) << 52);  // value = m * 2^(e - 52)
  constexpr int kMinNormalExp = 1 - kBias;
  const bool normal = e >= kMinNormalExp;
  // Express the value in units of the target's last place, then round the integer quotient.
  const int ulp_exp = (normal ? e : kMinNormalExp) - kMantBits;
  const int shift = 52 + ulp_exp - e;
  if (shift >= 64) return uint16_t(sign);  // below half the smallest subnormal
  uint64_t q = m >> shift;
  const uint64_t rem = m & ((uint64_t(1) << shift) - 1);
  const uint64_t halfway = uint64_t(1) << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1))) ++q;
  uint32_t magnitude;
  if (normal) {
    // q in [2^M, 2^(M+1)]: adding it on top of the exponent field lets a carry out of the
    // fraction bump the exponent, which is exactly what rounding up to the next binade means.
    magnitude = (uint32_t(e + kBias) << kMantBits) + uint32_t(q - (uint64_t(1) << kMantBits));
    if (magnitude >= kInf) magnitude = kInf;
  } else {
    magnitude = uint32_t(q);  // q == 2^M encodes the smallest normal, as it should
  }
  return uint16_t(sign | magnitude);
}

inline uint16_t double_to_half_bits(double v) { return round_from_double<5, 10>(v); }
inline uint16_t float_to_half_bits(float v) { return round_from_double<5, 10>(double(v)); }
inline uint16_t double_to_bfloat16_bits(double v) { return round_from_double<8, 7>(v); }

inline uint16_t float_to_bfloat16_bits(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t fraction = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (fraction << 13);
  } else if (exponent == 0) {
    const float magnitude = float(fraction) * 0x1p-24f;  // exact: 10-bit integer times 2^-24
    bits = sign | __builtin_bit_cast(uint32_t, magnitude);
  } else {
    bits = sign | ((exponent + 112u) << 23) | (fraction << 13);
  }
  return __builtin_bit_cast(float, bits);
}

inline float bfloat16_bits_to_float(uint16_t b) {
  return __builtin_bit_cast(float, uint32_t(b) << 16);
}

// Truncation toward zero (the _rz conversions): drop the low bits, keep NaN canonical.
inline uint16_t float_to_bfloat16_bits_rz(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return uint16_t(u >> 16);
}

inline uint16_t float_to_half_bits_rz(float v) {
  const uint16_t nearest = float_to_half_bits(v);
  if ((nearest & 0x7fffu) > 0x7c00u) return nearest;
  // Rounding to nearest moved away from zero iff |result| > |v|; step back one unit then.
  // Overflow to infinity also steps back, to the largest finite half, as truncation does.
  if (std::isinf(v)) return nearest;
  const float back = half_bits_to_float(nearest);
  if (std::fabs(back) > std::fabs(v)) return uint16_t(nearest - 1);
  return nearest;
}

// Correctly rounded a*b+c in a 2-byte format whose products are exact in double: the sum is
// rounded to odd in double (TwoSum gives the exact error), and rounding an odd-rounded value
// with 53 >= 2*p+2 bits of precision to the short format gives the correctly rounded result.
inline double fma_round_to_odd(double a, double b, double c) {
  const double p = a * b;  // exact for two half or bfloat16 significands
  const double s = p + c;
  const double bp = s - p;
  const double err = (p - (s - bp)) + (c - bp);
  if (err != 0.0 && !std::isinf(s)) {
    uint64_t bits = __builtin_bit_cast(uint64_t, s);
    if ((bits & 1) == 0) bits += ((err > 0) == (s > 0)) ? 1 : uint64_t(-1);
    return __builtin_bit_cast(double, bits);
  }
  return s;
}

}  // namespace fp
}  // namespace cuda_host

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

// The two types share their shape; a macro keeps them identical without a template (the
// CUDA names must be plain classes, since kernels overload on them).
#define CUDA_HOST_SHORT_FLOAT(Type, Raw, from_float, from_double, to_float)                  \
  struct alignas(2) Type {                                                                \
    unsigned short __x;                                                                   \
    Type() = default;                                                                     \
    constexpr Type(const Raw& r) : __x(r.x) {}                                            \
    Type(float f) : __x(from_float(f)) {}                                                 \
    Type(double d) : __x(from_double(d)) {}                                               \
    Type(int i) : __x(from_double(double(i))) {}                                          \
    Type(unsigned int i) : __x(from_double(double(i))) {}                                 \
    Type(short i) : __x(from_double(double(i))) {}                                        \
    Type(unsigned short i) : __x(from_double(double(i))) {}                               \
    Type(long i) : __x(from_double(double(i))) {}                                         \
    Type(unsigned long i) : __x(from_double(double(i))) {}                                \
    Type(long long i) : __x(from_double(double(i))) {}                                    \
    Type(unsigned long long i) : __x(from_double(double(i))) {}                           \
    Type& operator=(const Raw& r) {                                                       \
      __x = r.x;                                                                          \
      return *this;                                                                       \
    }                                                                                     \
    operator Raw() const { return Raw{__x}; }                                             \
    operator float() const { return to_float(__x); }                                      \
  };                                                                                      \
  inline Type operator+(const Type& a, const Type& b) { return Type(float(a) + float(b)); } \
  inline Type operator-(const Type& a, const Type& b) { return Type(float(a) - float(b)); } \
  inline Type operator*(const Type& a, const Type& b) { return Type(float(a) * float(b)); } \
  inline Type operator/(const Type& a, const Type& b) { return Type(float(a) / float(b)); } \
  inline Type& operator+=(Type& a, const Type& b) { return a = a + b; }                   \
  inline Type& operator-=(Type& a, const Type& b) { return a = a - b; }                   \
  inline Type& operator*=(Type& a, const Type& b) { return a = a * b; }                   \
  inline Type& operator/=(Type& a, const Type& b) { return a = a / b; }                   \
  inline Type operator+(const Type& a) { return a; }                                      \
  inline Type operator-(const Type& a) { return Type(Raw{(unsigned short)(a.__x ^ 0x8000u)}); } \
  inline Type& operator++(Type& a) { return a = a + Type(1.0f); }                         \
  inline Type& operator--(Type& a) { return a = a - Type(1.0f); }                         \
  inline Type operator++(Type& a, int) {                                                  \
    Type old = a;                                                                         \
    ++a;                                                                                  \
    return old;                                                                           \
  }                                                                                       \
  inline Type operator--(Type& a, int) {                                                  \
    Type old = a;                                                                         \
    --a;                                                                                  \
    return old;                                                                           \
  }                                                                                       \
  inline bool operator==(const Type& a, const Type& b) { return float(a) == float(b); }   \
  inline bool operator!=(const Type& a, const Type& b) { return float(a) != float(b); }   \
  inline bool operator<(const Type& a, const Type& b) { return float(a) < float(b); }     \
  inline bool operator>(const Type& a, const Type& b) { return float(a) > float(b); }     \
  inline bool operator<=(const Type& a, const Type& b) { return float(a) <= float(b); }   \
  inline bool operator>=(const Type& a, const Type& b) { return float(a) >= float(b); }   \
  inline Type __hadd(Type a, Type b) { return a + b; }                                    \
  inline Type __hsub(Type a, Type b) { return a - b; }                                    \
  inline Type __hmul(Type a, Type b) { return a * b; }                                    \
  inline Type __hdiv(Type a, Type b) { return a / b; }                                    \
  inline Type __hneg(Type a) { return -a; }                                               \
  inline Type __habs(Type a) { return Type(Raw{(unsigned short)(a.__x & 0x7fffu)}); }     \
  inline Type __hfma(Type a, Type b, Type c) {                                            \
    return Type(::cuda_host::fp::fma_round_to_odd(double(float(a)), double(float(b)),     \
                                                  double(float(c))));                     \
  }                                                                                       \
  inline bool __hisnan(Type a) { return a != a; }                                        \
  inline int __hisinf(Type a) {                                                           \
    const float f = float(a);                                                             \
    return std::isinf(f) ? (f < 0 ? -1 : 1) : 0;                                          \
  }                                                                                       \
  inline Type __hmax(Type a, Type b) {                                                    \
    if (a != a) return (b != b) ? Type(Raw{0x7fffu}) : b;                                 \
    if (b != b) return a;                                                                 \
    return float(a) >= float(b) ? a : b;                                                  \
  }                                                                                       \
  inline Type __hmin(Type a, Type b) {                                                    \
    if (a != a) return (b != b) ? Type(Raw{0x7fffu}) : b;                                 \
    if (b != b) return a;                                                                 \
    return float(a) <= float(b) ? a : b;                                                  \
  }                                                                                       \
  inline bool __heq(Type a, Type b) { return a == b; }                                    \
  inline bool __hne(Type a, Type b) { return a != b && a == a && b == b; }                \
  inline bool __hlt(Type a, Type b) { return a < b; }                                     \
  inline bool __hle(Type a, Type b) { return a <= b; }                                    \
  inline bool __hgt(Type a, Type b) { return a > b; }                                     \
  inline bool __hge(Type a, Type b) { return a >= b; }

CUDA_HOST_SHORT_FLOAT(__half, __half_raw, ::cuda_host::fp::float_to_half_bits,
                      ::cuda_host::fp::double_to_half_bits, ::cuda_host::fp::half_bits_to_float)
CUDA_HOST_SHORT_FLOAT(__nv_bfloat16, __nv_bfloat16_raw, ::cuda_host::fp::float_to_bfloat16_bits,
                      ::cuda_host::fp::double_to_bfloat16_bits,
                      ::cuda_host::fp::bfloat16_bits_to_float)
#undef CUDA_HOST_SHORT_FLOAT

typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 2 bytes");
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "bf16 is 2 bytes");

// Conversions by name (cuda_fp16.h).
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half_rz(float f) {
  return __half(__half_raw{::cuda_host::fp::float_to_half_bits_rz(f)});
}
inline __half __double2half(double d) { return __half(d); }
inline float __half2float(__half h) { return float(h); }
inline __half __int2half_rn(int i) { return __half(i); }
inline __half __uint2half_rn(unsigned int i) { return __half(i); }
inline __half __short2half_rn(short i) { return __half(i); }
inline __half __ll2half_rn(long long i) { return __half(i); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return short(h.__x); }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half __short_as_half(short s) { return __half(__half_raw{(unsigned short)s}); }

// Conversions by name (cuda_bf16.h).
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {
  return __nv_bfloat16(__nv_bfloat16_raw{::cuda_host::fp::float_to_bfloat16_bits_rz(f)});
}
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __nv_bfloat16(i); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return short(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  return __nv_bfloat16(__nv_bfloat16_raw{u});
}
inline __nv_bfloat16 __short_as_bfloat16(short s) {
  return __nv_bfloat16(__nv_bfloat16_raw{(unsigned short)s});
}

// Pairs (__half2, __nv_bfloat162): lane x is the low half of the 32-bit word, as on the GPU.
struct alignas(4) __half2 {
  __half x, y;
  __half2() = default;
  constexpr __half2(const __half& a, const __half& b) : x(a), y(b) {}
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  constexpr __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) : x(a), y(b) {}
};
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float2half2_rn(float a) { return __half2(__half(a), __half(a)); }
inline __half2 __float22half2_rn(float2 v) { return __half2(__half(v.x), __half(v.y)); }
inline __half2 __halves2half2(__half lo, __half hi) { return __half2(lo, hi); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline float2 __half22float2(__half2 v) { return float2{float(v.x), float(v.y)}; }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }
inline float __low2float(__half2 v) { return float(v.x); }
inline float __high2float(__half2 v) { return float(v.y); }
inline __half2 __hadd2(__half2 a, __half2 b) { return __half2(a.x + b.x, a.y + b.y); }
inline __half2 __hsub2(__half2 a, __half2 b) { return __half2(a.x - b.x, a.y - b.y); }
inline __half2 __hmul2(__half2 a, __half2 b) { return __half2(a.x * b.x, a.y * b.y); }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __half2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}

inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) {
  return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(a));
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) {
  return __nv_bfloat162(__nv_bfloat16(v.x), __nv_bfloat16(v.y));
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return __nv_bfloat162(lo, hi);
}
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{float(v.x), float(v.y)}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline float __low2float(__nv_bfloat162 v) { return float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return float(v.y); }
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162(a.x + b.x, a.y + b.y);
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162(a.x - b.x, a.y - b.y);
}
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162(a.x * b.x, a.y * b.y);
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __nv_bfloat162(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
