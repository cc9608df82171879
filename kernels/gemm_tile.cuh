// gemm_tile.cuh: the block-level GEMM core shared by the implicit-GEMM kernels.
//
// A block computes a BM x BN tile of C = A · B, A: M x K, B: K x N, stepping through the
// reduction BK at a time.  Each step stages A (BK x BM, reduction-major) and B (BK x BN)
// in shared memory in the accumulator type; each thread then multiplies a TM x TN
// register block (outer products over the BK values of the step).
//
// Shared memory: two stages of BK * (BM + BN) accumulators (double buffering): while the
// block multiplies from one stage, each thread holds the next step's elements in
// registers (loaded from global memory before the multiply, so the loads are in flight
// during it) and writes them into the other stage afterwards.  One barrier per step.
// After the loop the same memory holds the epilogue's staging buffer (EPI_* below); a
// table of the tile's output-row offsets follows it.
//
// Register fragments: a thread's TM rows (and TN columns) are taken in groups of four
// consecutive indices, the groups spread evenly over the tile, so that the threads of a
// warp read consecutive 16-byte words of shared memory (no bank conflicts).
//
// Occupancy (read from the SASS by `convgrad check --compile-only --sass`): the 256-thread
// tiles ask ptxas for two blocks per SM (__launch_bounds__(256, 2): at most 128 registers),
// so that one block's barrier wait is covered by the other block's multiplies.  The
// alternative, a deeper shared-memory pipeline with one block per SM, would still stall all
// eight warps at every barrier; the report showed the 128-register budget met with no
// stack frame and no spill, so two blocks it is.
#pragma once

#include "dtype_traits.cuh"

namespace convgrad {

// Shared memory per thread for the gathered GEMMs' GatherRecord (implicit_gemm.cu).
constexpr int GATHER_RECORD_BYTES = 48;

template <typename T, int BM_, int BN_, int BK_, int TM_, int TN_>
struct TileShape {
  typedef T elem_t;
  typedef acc_t<T> Acc;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int THREADS_N = BN / TN;                 // threads along a tile row
  static constexpr int THREADS = (BM / TM) * (BN / TN);
  static constexpr int A_PER_THREAD = BM * BK / THREADS;    // A elements each thread stages per step
  static constexpr int B_PER_THREAD = BK * BN / THREADS;    // B elements each thread stages per step
  static constexpr int STAGE = BK * (BM + BN);              // accumulators per stage
  // Blocks per SM the kernels ask ptxas to fit (see the header comment).
  static constexpr int MIN_BLOCKS = THREADS >= 256 ? 2 : 1;
  // The epilogue stages the tile through shared memory in passes of EPI_ROWS x EPI_COLS: the
  // rows (and columns) one fragment group of every thread covers, contiguous in the tile.
  static constexpr int EPI_ROWS = (BM / TM) * 4, EPI_COLS = (BN / TN) * 4;
  static constexpr int EPI_PASS = EPI_ROWS * EPI_COLS + (EPI_ROWS > EPI_COLS ? EPI_ROWS : EPI_COLS);  // padded
  static constexpr int STAGES_BYTES = 2 * STAGE * (int)sizeof(Acc);
  static constexpr int EPI_PASS_BYTES = EPI_PASS * (int)sizeof(Acc);
  // After the stages (or the pass, if larger): the epilogue's table of BM output-row
  // offsets and one more entry, written before the main loop (see implicit_gemm.cu).
  static constexpr int EPI_TABLE_AT = ((STAGES_BYTES > EPI_PASS_BYTES ? STAGES_BYTES : EPI_PASS_BYTES) + 7) / 8 * 8;
  // Then one record per thread for the gathered GEMMs (GatherRecord).
  static constexpr int SMEM_BYTES = EPI_TABLE_AT + (BM + 1) * 8 + THREADS * GATHER_RECORD_BYTES;

  static_assert(BM % TM == 0 && BN % TN == 0, "the register block must divide the tile");
  static_assert(TM % 4 == 0 && TN % 4 == 0, "register blocks come in groups of four");
  static_assert((BM * BK) % THREADS == 0 && (BK * BN) % THREADS == 0, "every thread stages the same count");
  static_assert(THREADS % BK == 0, "reduction-fastest staging keeps one reduction index per thread");
  static_assert(THREADS <= 1024, "at most 1024 threads per block");
};

// Tile coordinate of value i (0 <= i < PER_THREAD) of the thread at `coord` along an
// axis of EXTENT: groups of four, the groups EXTENT / (PER_THREAD / 4) apart.
template <int EXTENT, int PER_THREAD>
__device__ __forceinline__ int fragment_index(int coord, int i) {
  return (i / 4) * (EXTENT / (PER_THREAD / 4)) + coord * 4 + (i % 4);
}

// Four consecutive accumulators from 16-byte-aligned shared memory, in 16-byte loads.
__device__ __forceinline__ void load_four(const float* src, float* dst) {
  const float4 v = *reinterpret_cast<const float4*>(src);
  dst[0] = v.x;
  dst[1] = v.y;
  dst[2] = v.z;
  dst[3] = v.w;
}

__device__ __forceinline__ void load_four(const double* src, double* dst) {
  const double2 lo = *reinterpret_cast<const double2*>(src);
  const double2 hi = *reinterpret_cast<const double2*>(src + 2);
  dst[0] = lo.x;
  dst[1] = lo.y;
  dst[2] = hi.x;
  dst[3] = hi.y;
}

// N consecutive accumulators to shared memory aligned to their total size (up to 16 bytes),
// in as few stores as the alignment allows.
template <int N>
__device__ __forceinline__ void store_run(float* dst, const float* src) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) *reinterpret_cast<float4*>(dst + i) = make_float4(src[i], src[i + 1], src[i + 2], src[i + 3]);
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) *reinterpret_cast<float2*>(dst + i) = make_float2(src[i], src[i + 1]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

template <int N>
__device__ __forceinline__ void store_run(double* dst, const double* src) {
  if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) *reinterpret_cast<double2*>(dst + i) = make_double2(src[i], src[i + 1]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// acc += As · Bs for one stage: As is BK x BM and Bs is BK x BN, reduction-major.  Both
// start 16-byte aligned and every group of four starts at a multiple of four, so the
// register fragments load as 16-byte words.
template <class Shape>
__device__ __forceinline__ void multiply_stage(const typename Shape::Acc* __restrict__ As,
                                               const typename Shape::Acc* __restrict__ Bs,
                                               typename Shape::Acc (&acc)[Shape::TM][Shape::TN], int ty, int tx) {
  typedef typename Shape::Acc Acc;
#pragma unroll
  for (int k = 0; k < Shape::BK; ++k) {
    Acc a[Shape::TM];
#pragma unroll
    for (int i = 0; i < Shape::TM; i += 4) load_four(As + k * Shape::BM + fragment_index<Shape::BM, Shape::TM>(ty, i), a + i);
    // B four columns at a time, so that only TM + 4 fragment registers are live at once.
#pragma unroll
    for (int j0 = 0; j0 < Shape::TN; j0 += 4) {
      Acc b[4];
      load_four(Bs + k * Shape::BN + fragment_index<Shape::BN, Shape::TN>(tx, j0), b);
#pragma unroll
      for (int i = 0; i < Shape::TM; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j0 + j] = multiply_add(a[i], b[j], acc[i][j0 + j]);
      }
    }
  }
}

// The double-buffered reduction loop.  `Loader` provides:
//   load():          read the current step's A and B elements into its registers
//   store(As, Bs):   write those registers into a shared-memory stage
//   advance():       move to the next step
// `steps` must be the same for every thread of the block (it is a per-block quantity), so
// every thread reaches every barrier.  On return every thread has passed a barrier after
// its last read of shared memory, so the caller may reuse it.
template <class Shape, class Loader>
__device__ __forceinline__ void gemm_mainloop(Loader& loader, int steps, typename Shape::Acc* smem,
                                              typename Shape::Acc (&acc)[Shape::TM][Shape::TN], int ty, int tx) {
#pragma unroll
  for (int i = 0; i < Shape::TM; ++i) {
#pragma unroll
    for (int j = 0; j < Shape::TN; ++j) acc[i][j] = 0;
  }
  if (steps <= 0) return;
  constexpr int B_AT = Shape::BK * Shape::BM;  // offset of B within a stage
  loader.load();
  loader.store(smem, smem + B_AT);
  // Stage 0 must be complete before any thread multiplies from it.
  __syncthreads();
  // The stage multiplied from is smem + (parity ? STAGE : 0); the other one is written.
  int parity = 0;
  for (int left = steps; left > 0; --left) {
    const bool more = left > 1;
    if (more) {
      loader.advance();
      loader.load();
    }
    typename Shape::Acc* current = smem + (parity ? Shape::STAGE : 0);
    multiply_stage<Shape>(current, current + B_AT, acc, ty, tx);
    typename Shape::Acc* other = smem + (parity ? 0 : Shape::STAGE);
    if (more) loader.store(other, other + B_AT);
    // Two hazards meet here: the stage just written must be complete before the next
    // multiply reads it, and every thread must have finished reading the current stage
    // before the next iteration overwrites it (or, after the last step, before the
    // epilogue reuses the memory).
    __syncthreads();
    parity ^= 1;
  }
}

}  // namespace convgrad
