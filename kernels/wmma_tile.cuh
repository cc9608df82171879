// wmma_tile.cuh: the block-level tensor-core GEMM core: tile shape, shared-memory layout,
// the cp.async pipeline and the warp-level WMMA multiply.
//
// A block computes a BM x BN tile of C = A * B (A: M x K, B: K x N) with its warps arranged
// (BM/WM) x (BN/WN); each warp owns a WM x WN sub-tile as (WM/16) x (WN/16) accumulator
// fragments of 16 x 16 floats, held in registers for the whole reduction.  The reduction
// proceeds BK at a time ("k-tiles").
//
// WMMA shapes: m16n16k16 for __half and __nv_bfloat16; m16n16k8 (precision::tf32) for float
// data, whose fragments are rounded with __float_to_tf32 after every load (the tensor core
// reads only the top 10 mantissa bits).  Kernels never depend on the element layout of a
// fragment; the rounding is element-wise.
//
// Shared memory, one stage per k-tile in flight (STAGES of them), A then B in each stage.
// An operand tile is stored in one of two layouts, chosen per pass so that its 16-byte
// global vectors (VEC = 16 / sizeof(T) consecutive elements along the tensor's contiguous
// channel axis) land contiguously:
//   K_CONTIGUOUS:  ROWS rows of BK reduction elements, row pitch BK + PAD
//                  (A: wmma row_major; B: wmma col_major);
//   MN_CONTIGUOUS: BK rows of ROWS elements, row pitch ROWS + PAD
//                  (A: wmma col_major; B: wmma row_major).
// PAD is 16 bytes.  It keeps every row and every fragment 16-byte and 32-byte aligned as
// load_matrix_sync requires (pointer 256-bit aligned, ldm a multiple of 16 bytes), and it
// shifts consecutive rows by 4 banks, so the 8 rows of 16 bytes a fragment load reads at
// once fall in different banks.  (A swizzled layout would do better but load_matrix_sync
// reads plain row- or column-major tiles.)  Each operand's stage slot holds the larger of
// the two layouts, ROWS * (BK + PAD) elements (ROWS >= BK).
//
// The pipeline (one __syncthreads per k-tile): STAGES - 1 k-tiles are issued before the
// loop; iteration kt waits for k-tile kt, synchronises, issues k-tile kt + STAGES - 1 into
// the stage k-tile kt - 1 used, and multiplies k-tile kt.  A commit follows every issue
// slot, empty or not, so that "wait until at most STAGES - 2 groups are in flight" always
// means "k-tile kt has landed".
#pragma once

#include <mma.h>

#include "async_copy.cuh"
#include "dtype_traits.cuh"

namespace convgrad {

enum TileLayout { K_CONTIGUOUS = 0, MN_CONTIGUOUS = 1 };

// A when the condition holds, else B (NVRTC has no <type_traits> without extra headers).
template <bool CONDITION, class A, class B>
struct Select {
  typedef A type;
};
template <class A, class B>
struct Select<false, A, B> {
  typedef B type;
};

// The WMMA shape and fragment element type for a tensor dtype.
template <typename T>
struct WmmaType;
template <>
struct WmmaType<__half> {
  typedef __half mma_t;
  static constexpr int K = 16;
  static constexpr bool tf32 = false;
};
template <>
struct WmmaType<__nv_bfloat16> {
  typedef __nv_bfloat16 mma_t;
  static constexpr int K = 16;
  static constexpr bool tf32 = false;
};
template <>
struct WmmaType<float> {
  typedef nvcuda::wmma::precision::tf32 mma_t;
  static constexpr int K = 8;
  static constexpr bool tf32 = true;
};

template <typename T, int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_>
struct TcShape {
  typedef T elem_t;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int FRAGS_M = WM / 16, FRAGS_N = WN / 16;
  static constexpr int MMA_K = WmmaType<T>::K;
  static constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte copy
  static constexpr int PAD = VEC;                   // 16 bytes per shared row
  static constexpr int LD_K = BK + PAD;             // pitch of a K_CONTIGUOUS tile
  static constexpr int LD_A_MN = BM + PAD;          // pitch of an MN_CONTIGUOUS A tile
  static constexpr int LD_B_MN = BN + PAD;
  static constexpr int STAGE_A = BM * LD_K;  // elements; covers both layouts since BM >= BK
  static constexpr int STAGE_B = BN * LD_K;
  static constexpr int STAGE = STAGE_A + STAGE_B;
  static constexpr int PIPE_BYTES = STAGES * STAGE * (int)sizeof(T);
  // The epilogue stages the block's accumulators (float) row- or column-major, 16-byte pitch.
  static constexpr int LD_C_ROW = BN + 4, LD_C_COL = BM + 4;
  static constexpr int EPI_BYTES = 4 * (BM * LD_C_ROW > BN * LD_C_COL ? BM * LD_C_ROW : BN * LD_C_COL);
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  // 16-byte vectors each thread copies per k-tile, for A and for B.
  static constexpr int A_VECS = BM * BK / VEC / THREADS;
  static constexpr int B_VECS = BN * BK / VEC / THREADS;

  static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0, "warp tiles of 16 x 16 fragments");
  static_assert(BK % MMA_K == 0 && BK % VEC == 0, "k-tiles of whole MMA steps and whole vectors");
  static_assert(BM >= BK && BN >= BK, "a stage slot of ROWS * (BK + PAD) covers both layouts");
  static_assert(BM % VEC == 0 && BN % VEC == 0, "whole vectors along M and N");
  static_assert((BM * BK / VEC) % THREADS == 0 && (BN * BK / VEC) % THREADS == 0 && A_VECS >= 1 && B_VECS >= 1,
                "every thread copies the same number of vectors");
  static_assert(THREADS <= 1024, "at most 1024 threads per block");
  static_assert((BM * LD_K * (int)sizeof(T)) % 32 == 0 && (STAGE * (int)sizeof(T)) % 32 == 0,
                "every operand slot starts 256-bit aligned");
};

// Where vector slot e (0 <= e < ROWS * BK / VEC) of an operand tile goes, and which part of
// the tile it holds: along the contiguous axis it covers VEC consecutive elements.
//   K_CONTIGUOUS:  row = e / (BK/VEC), first reduction index kv = (e % (BK/VEC)) * VEC;
//   MN_CONTIGUOUS: reduction index = e / (ROWS/VEC), first row = (e % (ROWS/VEC)) * VEC.
template <int LAYOUT, int ROWS, class Shape>
struct VectorSlot {
  static constexpr int BK = Shape::BK, VEC = Shape::VEC;
  int row;     // first row (M or N index within the tile)
  int red;     // first reduction index within the k-tile
  int offset;  // element offset in the operand's stage slot
  __device__ __forceinline__ explicit VectorSlot(int e) {
    if (LAYOUT == K_CONTIGUOUS) {
      row = e / (BK / VEC);
      red = (e % (BK / VEC)) * VEC;
      offset = row * Shape::LD_K + red;
    } else {
      red = e / (ROWS / VEC);
      row = (e % (ROWS / VEC)) * VEC;
      offset = red * (ROWS + Shape::PAD) + row;
    }
  }
};

// Writes 16 bytes of elements into a 16-byte aligned shared slot with one store.  The
// elements are packed bit by bit (no local array is reinterpreted, which could put it in
// local memory).
__device__ __forceinline__ unsigned pack_pair(__half lo, __half hi) {
  return (unsigned)__half_as_ushort(lo) | ((unsigned)__half_as_ushort(hi) << 16);
}
__device__ __forceinline__ unsigned pack_pair(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return (unsigned)__bfloat16_as_ushort(lo) | ((unsigned)__bfloat16_as_ushort(hi) << 16);
}
template <typename T>
__device__ __forceinline__ void store_vector(T* dst, const T (&v)[8]) {
  *reinterpret_cast<uint4*>(dst) =
      make_uint4(pack_pair(v[0], v[1]), pack_pair(v[2], v[3]), pack_pair(v[4], v[5]), pack_pair(v[6], v[7]));
}
__device__ __forceinline__ void store_vector(float* dst, const float (&v)[4]) {
  *reinterpret_cast<uint4*>(dst) =
      make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}

// The warp's accumulators and its multiply of one k-tile from a shared stage.
template <class Shape, int A_LAYOUT, int B_LAYOUT>
struct WarpMma {
  typedef typename Shape::elem_t T;
  typedef typename WmmaType<T>::mma_t M;
  typedef typename nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, Shape::MMA_K, float> Acc;
  typedef typename nvcuda::wmma::fragment<
      nvcuda::wmma::matrix_a, 16, 16, Shape::MMA_K, M,
      typename Select<A_LAYOUT == K_CONTIGUOUS, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type>
      FragA;
  typedef typename nvcuda::wmma::fragment<
      nvcuda::wmma::matrix_b, 16, 16, Shape::MMA_K, M,
      typename Select<B_LAYOUT == K_CONTIGUOUS, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type>
      FragB;

  Acc acc[Shape::FRAGS_M][Shape::FRAGS_N];
  int m0, n0;  // the warp's sub-tile within the block tile

  __device__ __forceinline__ void init(int warp) {
    m0 = (warp / Shape::WARPS_N) * Shape::WM;
    n0 = (warp % Shape::WARPS_N) * Shape::WN;
#pragma unroll
    for (int i = 0; i < Shape::FRAGS_M; ++i) {
#pragma unroll
      for (int j = 0; j < Shape::FRAGS_N; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
    }
  }

  // TF32 fragments hold plain floats after a load; the tensor core would ignore their low 13
  // mantissa bits (truncation), so they are rounded to nearest first.
  template <class Frag>
  static __device__ __forceinline__ void round_tf32(Frag& f) {
    if constexpr (WmmaType<T>::tf32) {
#pragma unroll
      for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
    }
  }

  // acc += A_tile * B_tile for the k-tile in `stage` (A slot, then B slot).
  __device__ __forceinline__ void multiply(const T* stage) {
    const T* As = stage;
    const T* Bs = stage + Shape::STAGE_A;
#pragma unroll
    for (int kk = 0; kk < Shape::BK; kk += Shape::MMA_K) {
      FragA a[Shape::FRAGS_M];
      FragB b[Shape::FRAGS_N];
#pragma unroll
      for (int i = 0; i < Shape::FRAGS_M; ++i) {
        const int r = m0 + i * 16;
        if (A_LAYOUT == K_CONTIGUOUS)
          nvcuda::wmma::load_matrix_sync(a[i], As + r * Shape::LD_K + kk, Shape::LD_K);
        else
          nvcuda::wmma::load_matrix_sync(a[i], As + kk * Shape::LD_A_MN + r, Shape::LD_A_MN);
        round_tf32(a[i]);
      }
#pragma unroll
      for (int j = 0; j < Shape::FRAGS_N; ++j) {
        const int c = n0 + j * 16;
        if (B_LAYOUT == K_CONTIGUOUS)
          nvcuda::wmma::load_matrix_sync(b[j], Bs + c * Shape::LD_K + kk, Shape::LD_K);
        else
          nvcuda::wmma::load_matrix_sync(b[j], Bs + kk * Shape::LD_B_MN + c, Shape::LD_B_MN);
        round_tf32(b[j]);
      }
#pragma unroll
      for (int i = 0; i < Shape::FRAGS_M; ++i) {
#pragma unroll
        for (int j = 0; j < Shape::FRAGS_N; ++j) nvcuda::wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }

  // The accumulators into the block's float staging tile: row-major (pitch BN + 4) when the
  // output is written N-fastest, else column-major (pitch BM + 4).
  __device__ __forceinline__ void stage_out(float* tile, bool n_fastest) const {
#pragma unroll
    for (int i = 0; i < Shape::FRAGS_M; ++i) {
#pragma unroll
      for (int j = 0; j < Shape::FRAGS_N; ++j) {
        const int r = m0 + i * 16, c = n0 + j * 16;
        if (n_fastest)
          nvcuda::wmma::store_matrix_sync(tile + r * Shape::LD_C_ROW + c, acc[i][j], Shape::LD_C_ROW,
                                          nvcuda::wmma::mem_row_major);
        else
          nvcuda::wmma::store_matrix_sync(tile + c * Shape::LD_C_COL + r, acc[i][j], Shape::LD_C_COL,
                                          nvcuda::wmma::mem_col_major);
      }
    }
  }
};

// The reduction: `steps` k-tiles through the STAGES-deep pipeline.  `Loader` provides
//   issue(As, Bs): start copying the current k-tile into a stage's A and B slots
//                  (cp.async on the fast path, plain loads and shared stores otherwise);
//   advance():     move to the next k-tile.
// `steps` is the same for every thread of the block, so every thread reaches every barrier.
template <class Shape, class Loader, class Mma>
__device__ __forceinline__ void tc_mainloop(Loader& loader, int steps, typename Shape::elem_t* smem, Mma& mma) {
  typedef typename Shape::elem_t T;
#pragma unroll
  for (int s = 0; s < Shape::STAGES - 1; ++s) {
    if (s < steps) {
      T* stage = smem + s * Shape::STAGE;
      loader.issue(stage, stage + Shape::STAGE_A);
      loader.advance();
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < steps; ++kt) {
    cp_async_wait<Shape::STAGES - 2>();
    // Every thread's copies of k-tile kt have now landed (each thread waited for its own),
    // and every warp has finished multiplying k-tile kt - 1, whose stage is refilled next.
    __syncthreads();
    const int next = kt + Shape::STAGES - 1;
    if (next < steps) {
      T* stage = smem + (next % Shape::STAGES) * Shape::STAGE;
      loader.issue(stage, stage + Shape::STAGE_A);
      loader.advance();
    }
    cp_async_commit();
    mma.multiply(smem + (kt % Shape::STAGES) * Shape::STAGE);
  }
  cp_async_wait_all();
  // Every warp has finished reading the stages before the epilogue reuses their memory.
  __syncthreads();
}

}  // namespace convgrad
