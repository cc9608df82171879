// cuda_host_ptx.h: the one place for tensor-core and asynchronous-copy instructions.
//
// Kernels reach mma.sync, ldmatrix and cp.async through inline PTX, which g++ cannot compile.
// The convention is that a kernel header wraps each instruction it uses in a small device
// function with two bodies:
//
//     __device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4],
//                                                       const unsigned (&b)[2], const float (&c)[4]) {
//     #if defined(CUDA_HOST_EMULATION)
//       cuda_host::ptx::mma_m16n8k16_bf16(d, a, b, c);
//     #else
//       asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 ..." : ...);
//     #endif
//     }
//
// and the host bodies live in namespace cuda_host::ptx below.  How each is to be emulated:
//
// * mma.sync / ldmatrix are warp-collective: each lane holds a fragment of the operands and
//   receives a fragment of the result.  They map onto Executor::warp_collective (see
//   cuda_host_runtime.h): every lane deposits its fragment registers (up to kSlotBytes bytes;
//   for ldmatrix, the row address it supplies), and a `compute` function, run once when the
//   whole warp has arrived, gathers the fragments into matrices following the PTX fragment
//   layouts, multiplies in fp32, and scatters each lane's result fragment into its slot.
//   mma requires all 32 lanes (mask 0xffffffff).
// * cp.async (with cp.async.commit_group / cp.async.wait_group / wait_all) should be
//   emulated by deferring the copies: record (dst, src, bytes, src_bytes) per thread in the
//   current group, and perform the groups a wait releases.  Copying at issue time would hide
//   a kernel that reads shared memory before waiting; deferred, such a read sees the 0xFF
//   poison the block started with.  The per-thread queue belongs in Fiber.
//
// Nothing is defined yet: a kernel that calls one of these on the host fails to compile,
// which is the intended signal that its path needs the emulation written here first.
#pragma once

#include "cuda_host_runtime.h"

namespace cuda_host {
namespace ptx {}  // namespace ptx
}  // namespace cuda_host
