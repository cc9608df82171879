// cuda_host.h: run CUDA C++ kernels on the CPU (convgrad.cuda_host).
//
// Force-included (`g++ -include cuda_host.h -x c++`) ahead of a kernel source, this header
// makes a .cu file written for NVRTC compile as C++17 and run under an emulation of the CUDA
// execution model.  It is a test harness: it is slow, and it is built to make kernel bugs
// show up deterministically.
//
// EXECUTION MODEL
//
// * A grid runs block by block.  Blocks are taken in linear order (x fastest), forward or
//   reversed, by one or more OS threads; an OS thread always runs a whole block.
// * The threads of a block are fibers on one OS thread.  A fiber runs without interruption
//   until it reaches __syncthreads(), a warp intrinsic, or its end; only then does another
//   fiber run.  Fibers are resumed from a FIFO queue that starts in thread order
//   (threadIdx.x fastest; reversed on request), so the interleaving is a function of the
//   kernel and the launch alone, identical on every run.
// * Warps are 32 consecutive linear thread ids; the last warp of a block may be partial.
//
// __syncthreads() AND SHARED MEMORY: WHAT TO EXPECT
//
// * __syncthreads() is a true barrier: a thread that reaches it waits until every thread of
//   the block that has not returned has reached one.  Between two barriers, each thread runs
//   its whole stretch of code before the next thread starts.  Hence a read of shared memory
//   written by a *later* thread of the same stretch reads the value from before the stretch,
//   every time: with a barrier missing, a thread reads what the previous stretch left (or the
//   poison below), never the new value.  A read of data written by an *earlier* thread does
//   see the new value, so a missing barrier is caught when some reader comes before its
//   writer in the schedule; running both thread orders (forward and reversed) catches it in
//   either direction.
// * Threads that have returned no longer count: the barrier releases when all remaining
//   threads have arrived, as on the GPU.  A block whose threads wait forever (some at a
//   barrier the others never reach, a warp intrinsic missing a lane) is reported as a
//   deadlock, with what each group waits on; the launch fails and raises in Python.
// * __syncthreads_count/_and/_or reduce the predicate over the threads that took part.
// * All __syncthreads() calls are the same barrier (barrier 0), whichever line they are on.
// * Dynamic shared memory (`extern __shared__ __align__(16) unsigned char smem[];`, any name,
//   any element type, any number of such declarations) is one buffer per OS thread, filled
//   with 0xFF bytes at the start of every block: a read of shared memory that no thread of
//   this block wrote gives NaN (float, double, half and bfloat16 alike) or all-ones integers.
//   Its base is 128-byte aligned.  Under AddressSanitizer, bytes past the launch's shared_mem
//   are poisoned, so an out-of-range shared-memory access is reported.
// * Static shared memory (`__shared__ float tile[32][33];`) is a thread_local static: private
//   to the block, since a block never leaves its OS thread, but NOT reset between blocks; a
//   block may see the previous block's values there.  Prefer dynamic shared memory.
// * Warp intrinsics (__shfl*_sync, __ballot_sync, __any/__all_sync, __syncwarp, __match_*,
//   __reduce_*_sync) are rendezvous of the lanes in the mask that exist in the block: every
//   such lane deposits its value, then each reads its result.  The calling lane must be in
//   the mask, and all lanes of a mask must pass the same mask to the same intrinsic; both are
//   checked.  A shuffle from a lane outside the mask (or past a partial warp's end) returns
//   0xFF bytes.  __activemask() waits until each lane of its warp has returned or stopped at
//   a barrier or warp intrinsic, and returns the lanes that stopped at __activemask(): so
//   `if (i >= n) return; unsigned m = __activemask();` yields the lanes below n, as on the GPU.
//
// OTHER DIFFERENCES FROM THE GPU
//
// * CUDA_HOST_EMULATION is defined to 1 and __CUDA_ARCH__ is not defined, so arch-specific
//   paths (`#if __CUDA_ARCH__ >= 800`) take their generic branch.  Inline PTX does not
//   compile: kernels wrap it in device functions with a host body (cuda_host_ptx.h, which
//   emulates cp.async with its copies deferred to the wait).  Tensor cores are reached
//   through nvcuda::wmma (`#include <mma.h>`), emulated strictly in cuda_host_wmma.h.
// * No floating-point contraction (-ffp-contract=off): a*b+c rounds twice unless the kernel
//   calls fmaf.  NVRTC contracts by default, so host and GPU differ in the last bits there;
//   both are deterministic.  The fast intrinsics (__expf, ...) are exact here.
// * Subnormal floats are kept.  CuPy compiles with -ftz=true, so on the GPU float32 subnormal
//   inputs and results of arithmetic flush to zero (kernel_source.nvrtc_options lists why).
// * __half/__nv_bfloat16 follow cuda_fp16.h/cuda_bf16.h (see cuda_host_fp16.h).
// * Each fiber has its own stack (64 KiB by default, 256 KiB under the sanitizer; guarded by
//   an unmapped page).  Large local arrays need a larger stack_kib in HostRunner.
// * assert() in a kernel aborts the process, as a failed host assert does; __trap() fails the
//   launch with an error instead.
// * Cooperative groups, dynamic parallelism, clusters, textures and surfaces are not
//   emulated.
#pragma once

#define CUDA_HOST_EMULATION 1

// Standard headers first, before any keyword macro below can collide with their contents
// (libstdc++ spells attributes such as __noinline__ that CUDA's macros would rewrite).
#include <algorithm>
#include <atomic>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include "cuda_host_types.h"
#include "cuda_host_runtime.h"
#include "cuda_host_fp16.h"
#include "cuda_host_intrinsics.h"
#include "cuda_host_math.h"
#include "cuda_host_ptx.h"
#include "cuda_host_launch.h"

// CUDA's function and variable qualifiers.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __maxnreg__(n)
// Block-private because a block never leaves its OS thread; see "Static shared memory" above.
// An `extern __shared__` array becomes an extern thread_local that the build aliases to the
// dynamic shared-memory buffer.
#define __shared__ thread_local
