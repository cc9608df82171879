// cuda_host_wmma.h: nvcuda::wmma (the tensor-core warp matrix functions of mma.h), emulated.
//
// Kernels `#include <mma.h>`; under NVRTC that is CUDA's header, here it is the stand-in in
// this directory, which includes this file.  Every call is emulated by its documented
// meaning (load a tile, multiply-accumulate tiles, store a tile), never by a transcription
// of the hardware's register layout, and strictly: a call the CUDA programming guide
// forbids fails the launch with a message that names the thread and the rule.
//
// WHAT IS CHECKED
//
// * load_matrix_sync, store_matrix_sync and mma_sync are warp-collective: all 32 lanes of
//   the warp must arrive at the same function with the same fragment type, and, for loads
//   and stores, the same pointer, leading dimension and layout.  A lane that passes other
//   values fails the launch; a lane that never arrives (it returned, or waits at a barrier
//   or another intrinsic) is reported as a deadlock; a partial last warp cannot call them.
// * The pointer of a load or store is 256-bit (32-byte) aligned, and the leading dimension
//   ldm is a multiple of 16 bytes (8 halves, 4 floats).
// * mma_sync's satf flag is the same in every lane.
//
// FRAGMENTS
//
// * A fragment holds rows*cols/32 elements per lane (matrix_a: M x K, matrix_b: K x N,
//   accumulator: M x N).  Which lane holds which element is unspecified by CUDA; here it is
//   a deliberately scrambled bijection, different for matrix_a, matrix_b and accumulator
//   fragments, so a kernel that assumes a layout (reads x[i] as "row i", mixes fragments of
//   two kinds element by element) computes garbage here.  Element-wise operations that do
//   not depend on the layout (scaling, __float_to_tf32) are fine, as on the GPU.
// * fill_fragment is per lane (it is not a collective on the GPU either).
//
// ARITHMETIC
//
// * mma_sync computes D = A*B + C per element as the exact products summed in double and
//   rounded once to float.  16-bit products are exact in float too, so only the order and
//   precision of the sum may differ from the GPU's, within the fp32-accumulation tolerance.
// * TF32 (m16n16k8, precision::tf32): the hardware reads only the top 10 mantissa bits of
//   each operand.  The emulation truncates every A and B element to those bits before the
//   multiply, so a kernel that forgets to round its fragments with __float_to_tf32
//   (round to nearest, ties away from zero) gets truncated operands and results that differ
//   from a TF32 reference, as it would on the GPU.
// * satf = true: an infinite result becomes +-FLT_MAX, a NaN becomes +0.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda_host_fp16.h"
#include "cuda_host_runtime.h"

namespace nvcuda {
namespace wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
namespace precision {
struct tf32;
}  // namespace precision

enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest with ties away from zero; the
// low 13 bits of the result are zero.  NaN gives the canonical NaN.
inline float __float_to_tf32(float in) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, in);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __builtin_bit_cast(float, 0x7fffffffu);
  return __builtin_bit_cast(float, (bits + 0x1000u) & 0xffffe000u);
}

namespace emulation {

template <class T>
struct Storage {
  typedef T type;
};
template <>
struct Storage<precision::tf32> {
  typedef float type;
};

// Rows and columns of the tile a fragment holds, and the constants of its lane mapping.
template <class Use, int M, int N, int K>
struct TileOf;
template <int M, int N, int K>
struct TileOf<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
  static constexpr unsigned mul = 37, add = 11;
  static constexpr const char* name = "matrix_a";
};
template <int M, int N, int K>
struct TileOf<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
  static constexpr unsigned mul = 53, add = 5;
  static constexpr const char* name = "matrix_b";
};
template <int M, int N, int K>
struct TileOf<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
  static constexpr unsigned mul = 29, add = 3;
  static constexpr const char* name = "accumulator";
};

template <class T>
constexpr bool is_16bit() {
  return std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
}

// The shapes and types CUDA offers for floating-point WMMA on sm_80+ with float accumulators.
template <class Use, int M, int N, int K, class T>
constexpr bool supported() {
  const bool shape16 = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                       (M == 8 && N == 32 && K == 16);
  const bool shape_tf32 = M == 16 && N == 16 && K == 8;
  if (std::is_same<Use, accumulator>::value) return std::is_same<T, float>::value && (shape16 || shape_tf32);
  if (std::is_same<T, precision::tf32>::value) return shape_tf32;
  return is_16bit<T>() && shape16;
}

}  // namespace emulation

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  typedef emulation::TileOf<Use, M, N, K> Tile;
  static_assert(emulation::supported<Use, M, N, K, T>(),
                "the emulation offers m16n16k16, m32n8k16 and m8n32k16 for __half/__nv_bfloat16, "
                "m16n16k8 for precision::tf32, and float accumulators");
  static_assert(std::is_same<Use, accumulator>::value ? std::is_same<Layout, void>::value
                                                      : (std::is_same<Layout, row_major>::value ||
                                                         std::is_same<Layout, col_major>::value),
                "matrix_a and matrix_b fragments take row_major or col_major; accumulators take no layout");

 public:
  typedef T element_type;
  typedef typename emulation::Storage<T>::type storage_element_type;
  enum { num_elements = Tile::rows * Tile::cols / 32, num_storage_elements = num_elements };
  storage_element_type x[num_elements];
};

namespace emulation {

constexpr unsigned kFullWarp = 0xffffffffu;

// Row and column of element i of `lane`'s fragment: a bijection of the tile (rows*cols is a
// power of two and `mul` is odd) scrambled on purpose; see FRAGMENTS above.
template <class Tile>
inline void element_position(unsigned lane, int i, int& row, int& col) {
  constexpr unsigned count = unsigned(Tile::rows * Tile::cols);
  static_assert((count & (count - 1)) == 0, "tile sizes are powers of two");
  const unsigned linear = (unsigned(i) * 32u + lane) * Tile::mul + Tile::add;
  const unsigned index = linear & (count - 1);
  row = int(index / unsigned(Tile::cols));
  col = int(index % unsigned(Tile::cols));
}

template <class T>
inline double widen(T v) {
  return double(float(v));
}
inline double widen(float v) { return double(v); }

template <class T>
const char* type_name() {
  if (std::is_same<T, __half>::value) return "__half";
  if (std::is_same<T, __nv_bfloat16>::value) return "__nv_bfloat16";
  if (std::is_same<T, precision::tf32>::value) return "precision::tf32";
  return "float";
}

// What each lane deposits for a load or store: the arguments, and where its fragment is.
struct MemoryCall {
  const void* pointer;
  void* fragment;
  unsigned ldm;
  int layout;  // mem_row_major or mem_col_major
};

// Fails unless all 32 lanes arrived and agree on pointer, ldm and layout, and they follow the
// alignment rules.  Returns lane 0's call.
template <class Storage>
inline MemoryCall check_memory_call(cuda_host::detail::WarpState& w, unsigned group, const char* what) {
  cuda_host::detail::Executor& ex = cuda_host::detail::current_executor();
  if (group != kFullWarp)
    ex.fail("%s: warp-collective, but only lanes 0x%08x of the warp exist (a partial last warp)", what, group);
  MemoryCall first;
  std::memcpy(&first, w.lane[0].in, sizeof first);
  for (unsigned lane = 1; lane < 32; ++lane) {
    MemoryCall call;
    std::memcpy(&call, w.lane[lane].in, sizeof call);
    if (call.pointer != first.pointer || call.ldm != first.ldm || call.layout != first.layout)
      ex.fail("%s: lane %u passes pointer %p, ldm %u, layout %s but lane 0 passes %p, %u, %s; every lane "
              "of the warp must pass the same values",
              what, lane, call.pointer, call.ldm, call.layout == mem_row_major ? "row-major" : "col-major",
              first.pointer, first.ldm, first.layout == mem_row_major ? "row-major" : "col-major");
  }
  if (reinterpret_cast<uintptr_t>(first.pointer) % 32 != 0)
    ex.fail("%s: pointer %p is not 256-bit (32-byte) aligned", what, first.pointer);
  if ((size_t(first.ldm) * sizeof(Storage)) % 16 != 0)
    ex.fail("%s: leading dimension %u elements (%zu bytes) is not a multiple of 16 bytes", what, first.ldm,
            size_t(first.ldm) * sizeof(Storage));
  return first;
}

template <class Frag>
struct FragTraits;
template <class Use, int M, int N, int K, class T, class Layout>
struct FragTraits<fragment<Use, M, N, K, T, Layout>> {
  typedef TileOf<Use, M, N, K> Tile;
  typedef typename emulation::Storage<T>::type Storage;
  typedef T Element;
  static constexpr bool row_major_layout = std::is_same<Layout, row_major>::value;
};

// "wmma::load_matrix_sync(matrix_a 16x16 __half)" and the like, built once per fragment type.
enum Function { kLoad, kStore };
template <class Frag>
inline const char* call_name(Function function) {
  typedef FragTraits<Frag> F;
  static const std::string names[2] = {
      std::string("wmma::load_matrix_sync(") + F::Tile::name + " " + std::to_string(F::Tile::rows) + "x" +
          std::to_string(F::Tile::cols) + " " + type_name<typename F::Element>() + ")",
      std::string("wmma::store_matrix_sync(") + F::Tile::name + " " + std::to_string(F::Tile::rows) + "x" +
          std::to_string(F::Tile::cols) + " " + type_name<typename F::Element>() + ")"};
  return names[function].c_str();
}

template <class Frag, bool kAccumulator>
void load_compute(cuda_host::detail::WarpState& w, unsigned group) {
  typedef FragTraits<Frag> F;
  typedef typename F::Storage S;
  const MemoryCall call = check_memory_call<S>(w, group, call_name<Frag>(kLoad));
  const bool row_major_memory = kAccumulator ? call.layout == mem_row_major : F::row_major_layout;
  const S* base = static_cast<const S*>(call.pointer);
  for (unsigned lane = 0; lane < 32; ++lane) {
    MemoryCall mine;
    std::memcpy(&mine, w.lane[lane].in, sizeof mine);
    Frag& frag = *static_cast<Frag*>(mine.fragment);
    for (int i = 0; i < Frag::num_elements; ++i) {
      int row, col;
      element_position<typename F::Tile>(lane, i, row, col);
      frag.x[i] = base[row_major_memory ? size_t(row) * call.ldm + col : size_t(col) * call.ldm + row];
    }
  }
}

template <class Frag>
void store_compute(cuda_host::detail::WarpState& w, unsigned group) {
  typedef FragTraits<Frag> F;
  typedef typename F::Storage S;
  const MemoryCall call = check_memory_call<S>(w, group, call_name<Frag>(kStore));
  S* base = static_cast<S*>(const_cast<void*>(call.pointer));
  for (unsigned lane = 0; lane < 32; ++lane) {
    MemoryCall mine;
    std::memcpy(&mine, w.lane[lane].in, sizeof mine);
    const Frag& frag = *static_cast<const Frag*>(mine.fragment);
    for (int i = 0; i < Frag::num_elements; ++i) {
      int row, col;
      element_position<typename F::Tile>(lane, i, row, col);
      base[call.layout == mem_row_major ? size_t(row) * call.ldm + col : size_t(col) * call.ldm + row] = frag.x[i];
    }
  }
}

template <class Frag>
inline void memory_collective(Frag& frag, const void* pointer, unsigned ldm, int layout,
                              cuda_host::detail::CollectiveFn compute, const char* name) {
  MemoryCall call{pointer, &frag, ldm, layout};
  static_assert(sizeof call <= cuda_host::detail::kSlotBytes, "deposit fits a warp slot");
  cuda_host::detail::current_executor().warp_collective(kFullWarp, compute, name, 0, &call, sizeof call);
}

// What each lane deposits for mma_sync: where its four fragments are.
struct MmaCall {
  void* d;
  const void* a;
  const void* b;
  const void* c;
  int satf;
};

// The value the tensor core multiplies: TF32 operands lose their low 13 mantissa bits.
template <class Element, class S>
inline double operand(S v) {
  if (std::is_same<Element, precision::tf32>::value) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, float(v)) & 0xffffe000u;
    return double(__builtin_bit_cast(float, bits));
  }
  return widen(v);
}

template <class FD, class FA, class FB, class FC>
void mma_compute(cuda_host::detail::WarpState& w, unsigned group) {
  typedef FragTraits<FA> A;
  typedef FragTraits<FB> B;
  typedef FragTraits<FC> C;
  constexpr int M = A::Tile::rows, K = A::Tile::cols, N = B::Tile::cols;
  cuda_host::detail::Executor& ex = cuda_host::detail::current_executor();
  if (group != kFullWarp)
    ex.fail("wmma::mma_sync: warp-collective, but only lanes 0x%08x of the warp exist", group);
  double a[M][K], b[K][N], acc[M][N];
  MmaCall calls[32];
  for (unsigned lane = 0; lane < 32; ++lane) {
    std::memcpy(&calls[lane], w.lane[lane].in, sizeof calls[lane]);
    if (calls[lane].satf != calls[0].satf)
      ex.fail("wmma::mma_sync: lane %u passes satf=%d, lane 0 satf=%d", lane, calls[lane].satf, calls[0].satf);
    const FA& fa = *static_cast<const FA*>(calls[lane].a);
    const FB& fb = *static_cast<const FB*>(calls[lane].b);
    const FC& fc = *static_cast<const FC*>(calls[lane].c);
    for (int i = 0; i < FA::num_elements; ++i) {
      int r, c;
      element_position<typename A::Tile>(lane, i, r, c);
      a[r][c] = operand<typename A::Element>(fa.x[i]);
    }
    for (int i = 0; i < FB::num_elements; ++i) {
      int r, c;
      element_position<typename B::Tile>(lane, i, r, c);
      b[r][c] = operand<typename B::Element>(fb.x[i]);
    }
    for (int i = 0; i < FC::num_elements; ++i) {
      int r, c;
      element_position<typename C::Tile>(lane, i, r, c);
      acc[r][c] = widen(fc.x[i]);
    }
  }
  float d[M][N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      double sum = acc[i][j];
      for (int k = 0; k < K; ++k) sum += a[i][k] * b[k][j];
      float v = float(sum);
      if (calls[0].satf) {
        if (std::isnan(v)) v = 0.0f;
        else if (std::isinf(v)) v = v > 0 ? FLT_MAX : -FLT_MAX;
      }
      d[i][j] = v;
    }
  }
  // Written after every lane's C was read: D and C may be the same fragment.
  for (unsigned lane = 0; lane < 32; ++lane) {
    FD& fd = *static_cast<FD*>(calls[lane].d);
    for (int i = 0; i < FD::num_elements; ++i) {
      int r, c;
      element_position<typename FragTraits<FD>::Tile>(lane, i, r, c);
      fd.x[i] = d[r][c];
    }
  }
}

}  // namespace emulation

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& frag,
                          const typename fragment<Use, M, N, K, T, Layout>::storage_element_type& value) {
  for (int i = 0; i < fragment<Use, M, N, K, T, Layout>::num_elements; ++i) frag.x[i] = value;
}

// matrix_a / matrix_b: the layout is the fragment's.
template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& frag,
                             const typename fragment<Use, M, N, K, T, Layout>::storage_element_type* pointer,
                             unsigned ldm) {
  typedef fragment<Use, M, N, K, T, Layout> Frag;
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
  emulation::memory_collective(frag, pointer, ldm, std::is_same<Layout, row_major>::value ? mem_row_major : mem_col_major,
                               &emulation::load_compute<Frag, false>, emulation::call_name<Frag>(emulation::kLoad));
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& frag, const float* pointer, unsigned ldm,
                             layout_t layout) {
  typedef fragment<accumulator, M, N, K, float> Frag;
  emulation::memory_collective(frag, pointer, ldm, layout, &emulation::load_compute<Frag, true>,
                               emulation::call_name<Frag>(emulation::kLoad));
}

template <int M, int N, int K>
inline void store_matrix_sync(float* pointer, const fragment<accumulator, M, N, K, float>& frag, unsigned ldm,
                              layout_t layout) {
  typedef fragment<accumulator, M, N, K, float> Frag;
  emulation::memory_collective(const_cast<Frag&>(frag), pointer, ldm, layout, &emulation::store_compute<Frag>,
                               emulation::call_name<Frag>(emulation::kStore));
}

template <int M, int N, int K, class T, class LayoutA, class LayoutB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
                     const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c,
                     bool satf = false) {
  typedef fragment<accumulator, M, N, K, float> FD;
  typedef fragment<matrix_a, M, N, K, T, LayoutA> FA;
  typedef fragment<matrix_b, M, N, K, T, LayoutB> FB;
  emulation::MmaCall call{&d, &a, &b, &c, satf ? 1 : 0};
  static_assert(sizeof call <= cuda_host::detail::kSlotBytes, "deposit fits a warp slot");
  cuda_host::detail::current_executor().warp_collective(emulation::kFullWarp,
                                                        &emulation::mma_compute<FD, FA, FB, FD>,
                                                        "wmma::mma_sync", 0, &call, sizeof call);
}

}  // namespace wmma
}  // namespace nvcuda
