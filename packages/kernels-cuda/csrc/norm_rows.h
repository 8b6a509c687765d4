// What the norm kernels (norms.cu, norm_backward.cu) hold and reduce per row: a thread's
// vectors of the row, and the row statistics its threads merge with group_merge (reduce.h).
#pragma once

#include "dtypes.h"

namespace ds {
namespace norm {

// The vectors a thread holds of one row: vector `lane + it * row_threads`.
template <typename T, int VEC, int kIters>
struct RowSlice {
  Vec<T, VEC> v[kIters];

  __device__ __forceinline__ void load(const T* __restrict__ row, int lane, int row_threads, int vectors) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int vi = lane + it * row_threads;
      if (vi < vectors) v[it] = load_vec_nc<VEC>(row + static_cast<std::int64_t>(vi) * VEC);
    }
  }
  __device__ __forceinline__ float at(int it, int k) const { return to_float(v[it].v[k]); }
};

// Sums of N per-row terms (RMSNorm's statistics).
template <int N>
struct RowSums {
  static constexpr int kSize = N;
  float v[N];

  __device__ __forceinline__ static RowSums merge(const RowSums& a, const RowSums& b) {
    RowSums out;
#pragma unroll
    for (int i = 0; i < N; ++i) out.v[i] = a.v[i] + b.v[i];
    return out;
  }
};

// LayerNorm's statistics of part of a row: element count, mean, and sum of squared deviations
// from that mean; for the backward pass also sum(w*dy) and sum(w*dy * (x - mean)). Merging
// two parts shifts each part's deviation sums by the difference of the part means.
template <bool kGrad>
struct RowMoments {
  static constexpr int kSize = kGrad ? 5 : 3;
  float v[kSize];  // count, mean, m2, [wg, wg_dev]

  __device__ __forceinline__ static RowMoments merge(const RowMoments& a, const RowMoments& b) {
    RowMoments out;
    const float count = a.v[0] + b.v[0];
    const float f = count > 0.0f ? b.v[0] / count : 0.0f;  // b's share of the elements
    const float delta = b.v[1] - a.v[1];
    out.v[0] = count;
    out.v[1] = a.v[1] + delta * f;
    out.v[2] = a.v[2] + b.v[2] + delta * delta * a.v[0] * f;
    if constexpr (kGrad) {
      out.v[3] = a.v[3] + b.v[3];
      out.v[4] = a.v[4] + b.v[4] + delta * (b.v[3] * (1.0f - f) - a.v[3] * f);
    }
    return out;
  }
};

__device__ __forceinline__ bool owns(int it, int lane, int row_threads, int vectors) {
  return lane + it * row_threads < vectors;
}

// The mean of this thread's elements of the row, and (in `count`) how many it holds.
template <typename T, int VEC, int kIters>
__device__ __forceinline__ float own_mean(const RowSlice<T, VEC, kIters>& s, int lane, int row_threads, int vectors,
                                          float& count) {
  float sum = 0.0f;
  count = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (owns(it, lane, row_threads, vectors)) {
      count += VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += s.at(it, k);
    }
  }
  return count > 0.0f ? sum / count : 0.0f;
}

}  // namespace norm
}  // namespace ds
