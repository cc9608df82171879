// cuda_host_intrinsics.h: synchronisation, warp, atomic and memory intrinsics.
//
// Block barriers and warp collectives go through the Executor (cuda_host_runtime.h); the
// atomics are real atomic instructions, because blocks may run on several OS threads.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_host_fp16.h"
#include "cuda_host_runtime.h"

// ---------------------------------------------------------------------------------------
// Built-in variables.  Read-only views of the current fiber's values.

#define threadIdx (static_cast<const ::uint3&>(::cuda_host::detail::builtins.thread_idx))
#define blockIdx (static_cast<const ::uint3&>(::cuda_host::detail::builtins.block_idx))
#define blockDim (static_cast<const ::dim3&>(::cuda_host::detail::builtins.block_dim))
#define gridDim (static_cast<const ::dim3&>(::cuda_host::detail::builtins.grid_dim))
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// Block barriers.

inline void __syncthreads() { ::cuda_host::detail::current_executor().block_barrier(false); }

inline int __syncthreads_count(int predicate) {
  return int(::cuda_host::detail::current_executor().block_barrier(predicate != 0).true_count);
}

inline int __syncthreads_and(int predicate) {
  const auto r = ::cuda_host::detail::current_executor().block_barrier(predicate != 0);
  return r.true_count == r.arrived;
}

inline int __syncthreads_or(int predicate) {
  return ::cuda_host::detail::current_executor().block_barrier(predicate != 0).true_count != 0;
}

[[noreturn]] inline void __trap() { ::cuda_host::detail::current_executor().fail("__trap()"); }
[[noreturn]] inline void __brkpt() { ::cuda_host::detail::current_executor().fail("__brkpt()"); }

// ---------------------------------------------------------------------------------------
// Warp collectives.

namespace cuda_host {
namespace detail {

enum class ShuffleMode { idx, up, down, bfly };

// The source lane of a shuffle, by the rule of PTX shfl.sync with the clamp/segment operand
// that CUDA's __shfl*_sync(…, width) pass: lanes form segments of `width`; an index wraps
// within the segment, up/down that leave the segment and a butterfly that leaves it upward
// read the lane's own value.
inline unsigned shuffle_source(unsigned lane, ShuffleMode mode, unsigned operand, int width) {
  const unsigned segmask = (32u - unsigned(width)) & 31u;
  const unsigned min_lane = lane & segmask;
  const unsigned max_lane = mode == ShuffleMode::up ? min_lane : (min_lane | (31u & ~segmask));
  const unsigned b = operand & 31u;
  int j = int(lane);
  bool in_range = true;
  switch (mode) {
    case ShuffleMode::idx:
      j = int(min_lane | (b & ~segmask));
      in_range = unsigned(j) <= max_lane;
      break;
    case ShuffleMode::up:
      j = int(lane) - int(b);
      in_range = j >= int(max_lane);
      break;
    case ShuffleMode::down:
      j = int(lane + b);
      in_range = unsigned(j) <= max_lane;
      break;
    case ShuffleMode::bfly:
      j = int(lane ^ b);
      in_range = unsigned(j) <= max_lane;
      break;
  }
  return in_range ? unsigned(j) : lane;
}

// Each lane receives its source lane's deposit; a source outside the group (not in the mask,
// or beyond the block's last thread) has no defined value on the GPU, so the result is 0xFF
// bytes (NaN for floating point) to make a kernel that depends on it visibly wrong.
template <unsigned kSize>
void shuffle_compute(WarpState& w, unsigned group) {
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    if ((group & (1u << lane)) == 0) continue;
    const unsigned src = unsigned(w.lane[lane].arg);
    if (group & (1u << src))
      std::memcpy(w.lane[lane].out, w.lane[src].in, kSize);
    else
      std::memset(w.lane[lane].out, 0xff, kSize);
  }
}

template <class T>
inline T shuffle(unsigned mask, const T& value, ShuffleMode mode, int operand, int width,
                 const char* name) {
  static_assert(std::is_trivially_copyable<T>::value, "shuffled types must be trivially copyable");
  static_assert(sizeof(T) <= kSlotBytes, "shuffled type is too large");
  Executor& ex = current_executor();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    ex.fail("%s: width %d is not a power of 2 in [1, 32]", name, width);
  const unsigned lane = builtins.fiber->linear % kWarpSize;
  const unsigned src = shuffle_source(lane, mode, unsigned(operand), width);
  const unsigned char* out = ex.warp_collective(mask, &shuffle_compute<unsigned(sizeof(T))>,
                                                name, int(src), &value, unsigned(sizeof(T)));
  T result = value;
  std::memcpy(static_cast<void*>(&result), out, sizeof(T));
  return result;
}

inline unsigned predicate_bits(const WarpState& w, unsigned group) {
  unsigned bits = 0;
  for (unsigned lane = 0; lane < kWarpSize; ++lane)
    if ((group & (1u << lane)) && w.lane[lane].in[0]) bits |= 1u << lane;
  return bits;
}

inline void broadcast(WarpState& w, unsigned group, unsigned value) {
  for (unsigned lane = 0; lane < kWarpSize; ++lane)
    if (group & (1u << lane)) std::memcpy(w.lane[lane].out, &value, sizeof value);
}

inline void ballot_compute(WarpState& w, unsigned group) {
  broadcast(w, group, predicate_bits(w, group));
}
inline void any_compute(WarpState& w, unsigned group) {
  broadcast(w, group, predicate_bits(w, group) != 0);
}
inline void all_compute(WarpState& w, unsigned group) {
  broadcast(w, group, predicate_bits(w, group) == group);
}
inline void uniform_compute(WarpState& w, unsigned group) {
  const unsigned bits = predicate_bits(w, group);
  broadcast(w, group, bits == 0 || bits == group);
}
inline void syncwarp_compute(WarpState&, unsigned) {}

inline unsigned vote(unsigned mask, int predicate, CollectiveFn compute, const char* name) {
  const unsigned char p = predicate != 0;
  const unsigned char* out = current_executor().warp_collective(mask, compute, name, 0, &p, 1);
  unsigned result;
  std::memcpy(&result, out, sizeof result);
  return result;
}

// match: each lane learns which lanes of the group hold a value equal to its own.
template <unsigned kSize>
void match_any_compute(WarpState& w, unsigned group) {
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    if ((group & (1u << lane)) == 0) continue;
    unsigned same = 0;
    for (unsigned other = 0; other < kWarpSize; ++other)
      if ((group & (1u << other)) && std::memcmp(w.lane[lane].in, w.lane[other].in, kSize) == 0)
        same |= 1u << other;
    std::memcpy(w.lane[lane].out, &same, sizeof same);
  }
}

template <unsigned kSize>
void match_all_compute(WarpState& w, unsigned group) {
  const unsigned first = unsigned(__builtin_ctz(group));
  bool all = true;
  for (unsigned lane = 0; lane < kWarpSize; ++lane)
    if ((group & (1u << lane)) && std::memcmp(w.lane[first].in, w.lane[lane].in, kSize) != 0)
      all = false;
  broadcast(w, group, all ? group : 0u);
}

enum class ReduceOp { add, min, max, bit_and, bit_or, bit_xor };

template <class T, ReduceOp kOp>
void reduce_compute(WarpState& w, unsigned group) {
  bool first = true;
  T acc{};
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    if ((group & (1u << lane)) == 0) continue;
    T v;
    std::memcpy(&v, w.lane[lane].in, sizeof v);
    if (first) {
      acc = v;
      first = false;
      continue;
    }
    switch (kOp) {
      case ReduceOp::add: acc = T(acc + v); break;  // wraps, as the GPU's redux does
      case ReduceOp::min: acc = v < acc ? v : acc; break;
      case ReduceOp::max: acc = v > acc ? v : acc; break;
      case ReduceOp::bit_and: acc = T(acc & v); break;
      case ReduceOp::bit_or: acc = T(acc | v); break;
      case ReduceOp::bit_xor: acc = T(acc ^ v); break;
    }
  }
  for (unsigned lane = 0; lane < kWarpSize; ++lane)
    if (group & (1u << lane)) std::memcpy(w.lane[lane].out, &acc, sizeof acc);
}

template <class T, ReduceOp kOp>
inline T reduce(unsigned mask, T value, const char* name) {
  const unsigned char* out = current_executor().warp_collective(
      mask, &reduce_compute<T, kOp>, name, 0, &value, unsigned(sizeof value));
  T result;
  std::memcpy(&result, out, sizeof result);
  return result;
}

}  // namespace detail
}  // namespace cuda_host

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
  return ::cuda_host::detail::shuffle(mask, var, ::cuda_host::detail::ShuffleMode::idx, srcLane,
                                      width, "__shfl_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::cuda_host::detail::shuffle(mask, var, ::cuda_host::detail::ShuffleMode::up, int(delta),
                                      width, "__shfl_up_sync");
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::cuda_host::detail::shuffle(mask, var, ::cuda_host::detail::ShuffleMode::down,
                                      int(delta), width, "__shfl_down_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
  return ::cuda_host::detail::shuffle(mask, var, ::cuda_host::detail::ShuffleMode::bfly, laneMask,
                                      width, "__shfl_xor_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::cuda_host::detail::vote(mask, predicate, &::cuda_host::detail::ballot_compute,
                                   "__ballot_sync");
}
inline int __any_sync(unsigned mask, int predicate) {
  return int(::cuda_host::detail::vote(mask, predicate, &::cuda_host::detail::any_compute,
                                       "__any_sync"));
}
inline int __all_sync(unsigned mask, int predicate) {
  return int(::cuda_host::detail::vote(mask, predicate, &::cuda_host::detail::all_compute,
                                       "__all_sync"));
}
inline int __uni_sync(unsigned mask, int predicate) {
  return int(::cuda_host::detail::vote(mask, predicate, &::cuda_host::detail::uniform_compute,
                                       "__uni_sync"));
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuda_host::detail::current_executor().warp_collective(
      mask, &::cuda_host::detail::syncwarp_compute, "__syncwarp", 0, nullptr, 0);
}

// The lanes that reach __activemask() together; see Executor::active_mask.
inline unsigned __activemask() { return ::cuda_host::detail::current_executor().active_mask(); }

template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
  const unsigned char* out = ::cuda_host::detail::current_executor().warp_collective(
      mask, &::cuda_host::detail::match_any_compute<unsigned(sizeof(T))>, "__match_any_sync", 0,
      &value, unsigned(sizeof value));
  unsigned result;
  std::memcpy(&result, out, sizeof result);
  return result;
}

template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_all_sync takes 32- or 64-bit values");
  const unsigned char* out = ::cuda_host::detail::current_executor().warp_collective(
      mask, &::cuda_host::detail::match_all_compute<unsigned(sizeof(T))>, "__match_all_sync", 0,
      &value, unsigned(sizeof value));
  unsigned result;
  std::memcpy(&result, out, sizeof result);
  *pred = result != 0;
  return result;
}

#define CUDA_HOST_REDUCE(name, T, op)                                                        \
  inline T name(unsigned mask, T value) {                                                 \
    return ::cuda_host::detail::reduce<T, ::cuda_host::detail::ReduceOp::op>(mask, value, #name); \
  }
CUDA_HOST_REDUCE(__reduce_add_sync, unsigned, add)
CUDA_HOST_REDUCE(__reduce_add_sync, int, add)
CUDA_HOST_REDUCE(__reduce_min_sync, unsigned, min)
CUDA_HOST_REDUCE(__reduce_min_sync, int, min)
CUDA_HOST_REDUCE(__reduce_max_sync, unsigned, max)
CUDA_HOST_REDUCE(__reduce_max_sync, int, max)
CUDA_HOST_REDUCE(__reduce_and_sync, unsigned, bit_and)
CUDA_HOST_REDUCE(__reduce_or_sync, unsigned, bit_or)
CUDA_HOST_REDUCE(__reduce_xor_sync, unsigned, bit_xor)
#undef CUDA_HOST_REDUCE

// ---------------------------------------------------------------------------------------
// Memory ordering and cache-hinted loads/stores (hints mean nothing on the CPU).

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------
// Atomics.  Integer forms map onto __atomic builtins; floating-point forms are
// compare-and-swap loops on the bit pattern.

namespace cuda_host {
namespace detail {

template <class F, class Bits, class Op>
inline F atomic_update_float(F* address, Op op) {
  static_assert(sizeof(F) == sizeof(Bits), "bit pattern type must match");
  Bits* bits = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    F old;
    std::memcpy(&old, &expected, sizeof old);
    const F updated = op(old);
    Bits desired;
    std::memcpy(&desired, &updated, sizeof desired);
    if (__atomic_compare_exchange_n(bits, &expected, desired, false, __ATOMIC_SEQ_CST,
                                    __ATOMIC_RELAXED))
      return old;
  }
}

}  // namespace detail
}  // namespace cuda_host

#define CUDA_HOST_ATOMIC_INT(T)                                                              \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }    \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }    \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }  \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }    \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }      \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }    \
  inline T atomicCAS(T* p, T compare, T v) {                                              \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    return compare;                                                                       \
  }                                                                                       \
  inline T atomicMin(T* p, T v) {                                                         \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                         \
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,   \
                                                   __ATOMIC_RELAXED)) {                   \
    }                                                                                     \
    return old;                                                                           \
  }                                                                                       \
  inline T atomicMax(T* p, T v) {                                                         \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                         \
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,   \
                                                   __ATOMIC_RELAXED)) {                   \
    }                                                                                     \
    return old;                                                                           \
  }
CUDA_HOST_ATOMIC_INT(int)
CUDA_HOST_ATOMIC_INT(unsigned int)
CUDA_HOST_ATOMIC_INT(unsigned long long)
CUDA_HOST_ATOMIC_INT(long long)
#undef CUDA_HOST_ATOMIC_INT

inline unsigned short atomicCAS(unsigned short* p, unsigned short compare, unsigned short v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}

// atomicInc/atomicDec wrap at `limit` as CUDA defines them.
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0u : old + 1u, false,
                                      __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(p, &old, (old == 0 || old > limit) ? limit : old - 1u,
                                      false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}

inline float atomicAdd(float* p, float v) {
  return ::cuda_host::detail::atomic_update_float<float, uint32_t>(
      p, [v](float old) { return old + v; });
}
inline double atomicAdd(double* p, double v) {
  return ::cuda_host::detail::atomic_update_float<double, uint64_t>(
      p, [v](double old) { return old + v; });
}
inline __half atomicAdd(__half* p, __half v) {
  return ::cuda_host::detail::atomic_update_float<__half, uint16_t>(
      p, [v](__half old) { return old + v; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return ::cuda_host::detail::atomic_update_float<__nv_bfloat16, uint16_t>(
      p, [v](__nv_bfloat16 old) { return old + v; });
}
inline float atomicExch(float* p, float v) {
  return ::cuda_host::detail::atomic_update_float<float, uint32_t>(p, [v](float) { return v; });
}

// The scoped variants: every scope is the whole process on the CPU.
template <class T, class U>
inline T atomicAdd_block(T* p, U v) {
  return atomicAdd(p, T(v));
}
template <class T, class U>
inline T atomicAdd_system(T* p, U v) {
  return atomicAdd(p, T(v));
}
