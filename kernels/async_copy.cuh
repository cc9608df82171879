// async_copy.cuh: cp.async (sm_80+) behind small device functions.
//
// Each function has two bodies: inline PTX under NVRTC/nvcc, and the strict emulation of
// convgrad.cuda_host (cuda_host_ptx.h) on the CPU, which poisons the destination at issue,
// lands the data only at the wait that covers it, and checks every rule below.
//
// Rules (PTX ISA, cp.async): the copy is 4, 8 or 16 bytes; both addresses are aligned to its
// size; the source is global memory and the destination shared memory; .cg (L2 only, which
// suits streamed tiles) exists only for 16 bytes, .ca for every size.  `src_bytes` below the
// copy size reads only that many bytes and fills the rest with zeros; src_bytes == 0 reads
// nothing (the zero-fill form used for padding and for rows past the tensor: the source
// must still be a valid-looking aligned address, never dereferenced).
//
// Groups: copies issued since the last commit form one group; cp_async_wait<N>() returns
// when at most N of this thread's committed groups are still in flight.  A wait orders only
// the calling thread's copies: a __syncthreads() after it makes every thread's data visible
// to the block.
#pragma once

namespace convgrad {

// Copy BYTES bytes from global `src` to shared `dst`, reading the first src_bytes only.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(CUDA_HOST_EMULATION)
  cuda_host::ptx::cp_async(dst, src, BYTES, (unsigned)src_bytes,
                           BYTES == 16 ? cuda_host::ptx::CacheLevel::cg : cuda_host::ptx::CacheLevel::ca);
#else
  const unsigned shared = (unsigned)__cvta_generic_to_shared(dst);
  if (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(src), "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared), "l"(src), "n"(BYTES),
                 "r"(src_bytes)
                 : "memory");
  }
#endif
}

// Close the group of copies issued since the last commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() {
#if defined(CUDA_HOST_EMULATION)
  cuda_host::ptx::cp_async_commit_group();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(CUDA_HOST_EMULATION)
  cuda_host::ptx::cp_async_wait_group(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Commit and wait for every copy this thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(CUDA_HOST_EMULATION)
  cuda_host::ptx::cp_async_wait_all();
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace convgrad
