// The launch geometry the norm kernels share (norms.cu: forward, norm_backward.cu: backward):
// how a row of a given length and alignment is spread over threads and vectors, and the one
// switch from that run-time layout to a kernel template instance.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "dtypes.h"
#include "kernels.h"

namespace ds {
namespace norm {


constexpr int kMaxRowThreads = 512;   // threads per row, and per block
constexpr int kMinBlockThreads = 128;
constexpr int kPreferredIters = 4;    // 16-byte vectors per thread per tensor, while rows allow
constexpr int kMaxIters = 8;          // 16-byte vectors per thread per tensor, at most
constexpr int kNarrowIters = 8;       // 8-byte vectors per thread (the same bytes as 4 x 16)
constexpr int kScalarIters = 16;      // elements per thread on the unaligned path
constexpr int kMergeScratch = 2 * 32;  // group_merge's scratch, in Stats
constexpr int kStreamRowThreads = 256;  // the streamed-rows backward's threads per row (stream_rows)
constexpr int kStreamMinBlocks = 2;     // its blocks per SM (__launch_bounds__): 128 registers

constexpr std::int64_t max_hidden(bool vectorized) {
  // 16-byte vectors of float32 are the shortest: 4 elements; the narrow path of float32
  // (2-element vectors) reaches as far as the scalar one.
  return static_cast<std::int64_t>(kMaxRowThreads) * (vectorized ? kMaxIters * 4 : kScalarIters);
}
static_assert(kNarrowIters * 2 >= kScalarIters, "the narrow path must cover the scalar path's rows");

// Vector width (elements), vectors per thread, threads per row and rows per block.
struct RowLayout {
  int vec;
  int iters;
  int row_threads;
  int rows_per_block;
  int block_threads() const { return row_threads * rows_per_block; }
};

// The smallest power-of-two group that gives each thread at most `preferred_iters` vectors,
// then as many vectors per thread as the row needs at that size; iters = 0 when the row does
// not fit `max_iters`.
inline RowLayout row_layout(std::int64_t hidden, int vec, int preferred_iters, int max_iters) {
  const std::int64_t vectors = hidden / vec;
  int threads = DS_WARP_SIZE;
  while (threads < kMaxRowThreads && static_cast<std::int64_t>(threads) * preferred_iters < vectors) threads *= 2;
  int iters = 1;
  while (static_cast<std::int64_t>(threads) * iters < vectors) iters *= 2;
  if (iters > max_iters) iters = 0;
  return {vec, iters, threads, threads < kMinBlockThreads ? kMinBlockThreads / threads : 1};
}

inline bool aligned(Ptr p, std::size_t bytes) { return p == 0 || p % (bytes < 16 ? bytes : 16) == 0; }

inline bool all_aligned(std::initializer_list<Ptr> ptrs, std::size_t bytes) {
  for (Ptr p : ptrs) {
    if (!aligned(p, bytes)) return false;
  }
  return true;
}

// The widest access every row start and base allows: 16 bytes of T, then 8, then single
// elements. The narrow paths take a fixed number of vectors per thread (the fallback needs no
// tuning for short rows, and each costs one kernel instance).
template <typename T, typename W>
RowLayout norm_layout(std::int64_t hidden, std::initializer_list<Ptr> t_ptrs, std::initializer_list<Ptr> w_ptrs,
                      std::initializer_list<Ptr> float_ptrs) {
  for (const int vec : {kVec16<T>, kVec16<T> / 2}) {
    if (hidden % vec != 0 || !all_aligned(t_ptrs, vec * sizeof(T)) || !all_aligned(w_ptrs, vec * sizeof(W)) ||
        !all_aligned(float_ptrs, vec * sizeof(float))) {
      continue;
    }
    if (vec == kVec16<T>) return row_layout(hidden, vec, kPreferredIters, kMaxIters);
    RowLayout layout = row_layout(hidden, vec, kNarrowIters, kNarrowIters);
    if (layout.iters != 0) layout.iters = kNarrowIters;
    return layout;
  }
  RowLayout layout = row_layout(hidden, 1, kScalarIters, kScalarIters);
  if (layout.iters != 0) layout.iters = kScalarIters;
  return layout;
}

// Calls fn(Shape<VEC, kIters>{}) for the layout: one switch from run-time layout to kernel
// template for the forward, the backward and the occupancy query.
template <int VEC, int kIters>
struct Shape {
  static constexpr int kVec = VEC;
  static constexpr int kItersValue = kIters;
};

template <typename T, typename Fn>
const char* with_shape(const RowLayout& layout, Fn&& fn) {
  constexpr int V = kVec16<T>;
  if (layout.iters == 0) return "norm: hidden size above the kernel's limit";
  if (layout.vec == 1) return fn(Shape<1, kScalarIters>{});
  if (layout.vec == V / 2) return fn(Shape<V / 2, kNarrowIters>{});
  switch (layout.iters) {
    case 1: return fn(Shape<V, 1>{});
    case 2: return fn(Shape<V, 2>{});
    case 4: return fn(Shape<V, 4>{});
    case 8:
      // Only float32 rows reach eight vectors per thread below max_hidden.
      if constexpr (V == 4) return fn(Shape<V, 8>{});
      [[fallthrough]];
    default: return "norm: hidden size above the kernel's limit";
  }
}

// The kernels take a weight (and bias) of the input's type or float32; the launcher
// converts any other weight dtype to float32 (exactly) before the call.
template <typename Fn>
const char* with_types(int x_dtype, int w_dtype, Fn&& fn) {
  DS_DISPATCH_FLOAT(x_dtype, T,
    if (w_dtype == x_dtype) return fn(T{}, T{});
    if (w_dtype == kFloat32) return fn(T{}, float{});
    return "norm: the weight dtype must be the input's or float32");
  return nullptr;
}

}  // namespace norm
}  // namespace ds
