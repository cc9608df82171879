// cuda_host_ptx.h: asynchronous copies (cp.async) for the host emulation.
//
// Kernels reach cp.async through inline PTX, which g++ cannot compile.  The convention is
// that a kernel header wraps each instruction in a small device function with two bodies
// (kernels/async_copy.cuh does this):
//
//     __device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
//     #if defined(CUDA_HOST_EMULATION)
//       cuda_host::ptx::cp_async(smem, gmem, 16, src_bytes, cuda_host::ptx::CacheLevel::cg);
//     #else
//       asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: ...);
//     #endif
//     }
//
// Tensor cores are reached through nvcuda::wmma (mma.h), emulated in cuda_host_wmma.h.
// mma.sync and ldmatrix are deliberately not emulated: their fragment layouts would have to
// be transcribed from the PTX tables, and a misreading would pass every CPU test.
//
// HOW cp.async IS EMULATED, AND WHAT IT CATCHES
//
// * Issue (cp_async) checks the instruction's rules and fails the launch, naming the thread,
//   when one is broken: the copy size is 4, 8 or 16 bytes; the source size is at most the
//   copy size; .cg only with 16 bytes; both addresses aligned to the copy size; the
//   destination inside the launch's dynamic shared memory (static __shared__ arrays are not
//   accepted as destinations here).
// * Issue reads the source bytes (src_bytes of them; none for the zero-fill form with
//   src_bytes == 0, whose source is never dereferenced) and writes 0xFF bytes, a NaN in every
//   floating-point format, over the destination.  The data lands only when this thread's
//   wait covers the copy's group.  So a read of the destination before the wait sees NaN on
//   every use of a buffer, not only the first one, and a pipeline that forgets a wait in its
//   steady state fails as surely as one that forgets it in the prologue.
// * commit_group closes the thread's open group; wait_group(n) lands every copy of all but
//   the n most recently committed groups (copies not yet committed stay pending, as on the
//   GPU); wait_all commits and lands everything.
// * A wait lands only the calling thread's copies, so another thread's data becomes visible
//   only when that thread has run its own wait.  A kernel that reads a stage after its own
//   wait but without the __syncthreads() that orders it after every thread's wait sees the
//   other threads' poison whenever it is scheduled first; the two thread orders of
//   HostRunner cover both directions.
// * Copies still pending when a block ends are dropped.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_host_runtime.h"

namespace cuda_host {
namespace ptx {

// The cache operator of cp.async: .ca (L1 and L2, any size) or .cg (L2 only, 16 bytes).
enum class CacheLevel { ca, cg };

inline void cp_async(void* dst, const void* src, unsigned cp_size, unsigned src_size, CacheLevel level) {
  detail::Executor& ex = detail::current_executor();
  const char* op = level == CacheLevel::cg ? "cp.async.cg" : "cp.async.ca";
  if (cp_size != 4 && cp_size != 8 && cp_size != 16)
    ex.fail("%s: copy size %u bytes; it must be 4, 8 or 16", op, cp_size);
  if (level == CacheLevel::cg && cp_size != 16)
    ex.fail("%s: copy size %u bytes; .cg copies exactly 16 bytes (use .ca for 4 and 8)", op, cp_size);
  if (src_size > cp_size)
    ex.fail("%s: source size %u exceeds the copy size %u", op, src_size, cp_size);
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (d % cp_size != 0)
    ex.fail("%s: shared destination %p is not aligned to the copy size %u", op, dst, cp_size);
  if (s % cp_size != 0)
    ex.fail("%s: global source %p is not aligned to the copy size %u", op, src, cp_size);
  const uintptr_t smem = reinterpret_cast<uintptr_t>(cuda_host_dynamic_shared_memory);
  const size_t smem_bytes = ex.shared_mem_bytes();
  if (d < smem || d + cp_size > smem + smem_bytes)
    ex.fail("%s: destination %p is outside the launch's %zu bytes of dynamic shared memory", op, dst,
            smem_bytes);
  detail::Fiber& f = *detail::builtins.fiber;
  detail::PendingCopy copy;
  copy.dst = static_cast<unsigned char*>(dst);
  copy.group = f.committed_copy_groups;
  copy.bytes = cp_size;
  std::memset(copy.data, 0, sizeof copy.data);
  if (src_size != 0) std::memcpy(copy.data, src, src_size);
  std::memset(dst, 0xff, cp_size);
  f.pending_copies.push_back(copy);
}

inline void cp_async_commit_group() {
  detail::current_executor();
  ++detail::builtins.fiber->committed_copy_groups;
}

// Lands, in issue order, this thread's copies of groups below `limit`.
inline void land_copies_before(uint64_t limit) {
  detail::Fiber& f = *detail::builtins.fiber;
  size_t kept = 0;
  for (size_t i = 0; i < f.pending_copies.size(); ++i) {
    const detail::PendingCopy& copy = f.pending_copies[i];
    if (copy.group < limit)
      std::memcpy(copy.dst, copy.data, copy.bytes);
    else
      f.pending_copies[kept++] = copy;
  }
  f.pending_copies.resize(kept);
}

inline void cp_async_wait_group(unsigned n) {
  detail::current_executor();
  const uint64_t committed = detail::builtins.fiber->committed_copy_groups;
  if (committed > n) land_copies_before(committed - n);
}

inline void cp_async_wait_all() {
  detail::current_executor();
  detail::Fiber& f = *detail::builtins.fiber;
  ++f.committed_copy_groups;
  land_copies_before(f.committed_copy_groups);
}

}  // namespace ptx
}  // namespace cuda_host
