// A thread's run of consecutive elements, loaded to or stored from float registers: 16-byte
// accesses where the run is whole and the caller says the pointers are aligned, element by
// element (bounded by numel) at a tensor's tail. Used by the block-wise quantizers.
#pragma once

#include "dtypes.h"

namespace ds {

template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* x, std::int64_t start, std::int64_t numel,
                                           bool vectorized, float (&v)[N]) {
  if (vectorized && start + N <= numel) {
    constexpr int V = kVec16<T>;
#pragma unroll
    for (int j = 0; j < N; j += V) {
      float part[V];
      load_floats<V>(x + start + j, part);
#pragma unroll
      for (int k = 0; k < V; ++k) v[j + k] = part[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = start + k < numel ? to_float(x[start + k]) : 0.0f;
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_chunk(T* y, std::int64_t start, std::int64_t numel,
                                            bool vectorized, const float (&v)[N]) {
  if (vectorized && start + N <= numel) {
    constexpr int V = kVec16<T>;
#pragma unroll
    for (int j = 0; j < N; j += V) {
      float part[V];
#pragma unroll
      for (int k = 0; k < V; ++k) part[k] = v[j + k];
      store_floats<V>(y + start + j, part);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (start + k < numel) y[start + k] = from_float<T>(v[k]);
    }
  }
}

}  // namespace ds
