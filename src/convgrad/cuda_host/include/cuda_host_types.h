// cuda_host_types.h: CUDA's built-in vector types (vector_types.h) for the host emulation.
//
// Sizes and alignments follow CUDA's vector_types.h, so a kernel that loads a float4 through
// a reinterpret_cast sees the same layout on the CPU as on the GPU.  The 3-component types
// have natural alignment; the 2- and 4-component types are aligned to their size, capped at
// 16 bytes (as CUDA 12 does for longlong4 and double4).
#pragma once

#include <cstddef>

#define CUDA_HOST_MIN_ALIGN(n) ((n) < 16 ? (n) : 16)

#define CUDA_HOST_VECTOR_TYPES(name, T)                                                      \
  struct name##1 {                                                                        \
    T x;                                                                                  \
  };                                                                                      \
  struct alignas(CUDA_HOST_MIN_ALIGN(2 * sizeof(T))) name##2 {                            \
    T x, y;                                                                               \
  };                                                                                      \
  struct name##3 {                                                                        \
    T x, y, z;                                                                            \
  };                                                                                      \
  struct alignas(CUDA_HOST_MIN_ALIGN(4 * sizeof(T))) name##4 {                            \
    T x, y, z, w;                                                                         \
  };                                                                                      \
  inline constexpr name##1 make_##name##1(T x) { return name##1{x}; }                     \
  inline constexpr name##2 make_##name##2(T x, T y) { return name##2{x, y}; }             \
  inline constexpr name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }     \
  inline constexpr name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }

CUDA_HOST_VECTOR_TYPES(char, signed char)
CUDA_HOST_VECTOR_TYPES(uchar, unsigned char)
CUDA_HOST_VECTOR_TYPES(short, short)
CUDA_HOST_VECTOR_TYPES(ushort, unsigned short)
CUDA_HOST_VECTOR_TYPES(int, int)
CUDA_HOST_VECTOR_TYPES(uint, unsigned int)
CUDA_HOST_VECTOR_TYPES(long, long)
CUDA_HOST_VECTOR_TYPES(ulong, unsigned long)
CUDA_HOST_VECTOR_TYPES(longlong, long long)
CUDA_HOST_VECTOR_TYPES(ulonglong, unsigned long long)
CUDA_HOST_VECTOR_TYPES(float, float)
CUDA_HOST_VECTOR_TYPES(double, double)

#undef CUDA_HOST_VECTOR_TYPES
#undef CUDA_HOST_MIN_ALIGN

static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 layout");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 layout");
static_assert(sizeof(double2) == 16 && alignof(double2) == 16, "double2 layout");
static_assert(sizeof(uint3) == 12, "uint3 layout");

// dim3 as in CUDA: unspecified components default to 1; converts to and from uint3.
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
