// Warp and block sums that work for 32-lane (NVIDIA) and 64-lane (AMD CDNA) warps.
#pragma once

#include "compat.h"

namespace ds {

template <int kWidth = DS_WARP_SIZE>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int mask = kWidth / 2; mask > 0; mask >>= 1) v += DS_SHFL_XOR(v, mask, kWidth);
  return v;
}

template <int kWidth = DS_WARP_SIZE>
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int mask = kWidth / 2; mask > 0; mask >>= 1) v = fmaxf(v, DS_SHFL_XOR(v, mask, kWidth));
  return v;
}

template <int kWidth = DS_WARP_SIZE>
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int mask = kWidth / 2; mask > 0; mask >>= 1) v = fminf(v, DS_SHFL_XOR(v, mask, kWidth));
  return v;
}

// Sum over the whole block, returned to every thread. `scratch` holds one float per warp
// (32 suffice for 1024 threads); the leading barrier makes back-to-back calls safe.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % DS_WARP_SIZE;
  const int warp = threadIdx.x / DS_WARP_SIZE;
  const int num_warps = (blockDim.x + DS_WARP_SIZE - 1) / DS_WARP_SIZE;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

// Merges a per-thread partial result over a group of `group_threads` consecutive threads (a
// multiple of the warp size; groups of one block all the same size), leaving the same result
// in each of them. Stats has `float v[kSize]` and `static Stats merge(const Stats& lo, const
// Stats& hi)`, which need not commute: in the warp butterfly the lower lane's part always
// goes first, so both partners compute bit-identical merges. Groups of several warps then
// exchange through `scratch` (2 * 32 * kSize floats, 32 warps a group at most) with one
// barrier; its two halves alternate (`phase`) so a warp already at its next merge never
// overwrites a value a slower warp has yet to read. Every thread of the block calls it.
template <typename Stats>
__device__ __forceinline__ Stats group_merge(Stats s, float* scratch, int& phase, int group_threads) {
  constexpr int N = Stats::kSize;
  const int lane = threadIdx.x % DS_WARP_SIZE;
#pragma unroll
  for (int mask = DS_WARP_SIZE / 2; mask > 0; mask >>= 1) {
    Stats other, lo, hi;
    const bool upper = (lane & mask) != 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      other.v[i] = DS_SHFL_XOR(s.v[i], mask, DS_WARP_SIZE);
      lo.v[i] = upper ? other.v[i] : s.v[i];
      hi.v[i] = upper ? s.v[i] : other.v[i];
    }
    s = Stats::merge(lo, hi);
  }
  const int warps = group_threads / DS_WARP_SIZE;
  if (warps <= 1) return s;
  float* buffer = scratch + phase * 32 * N;
  phase ^= 1;
  const int warp = threadIdx.x / DS_WARP_SIZE;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) buffer[warp * N + i] = s.v[i];
  }
  __syncthreads();
  const int first = warp - warp % warps;
#pragma unroll
  for (int i = 0; i < N; ++i) s.v[i] = buffer[first * N + i];
  for (int w = first + 1; w < first + warps; ++w) {
    Stats next;
#pragma unroll
    for (int i = 0; i < N; ++i) next.v[i] = buffer[w * N + i];
    s = Stats::merge(s, next);
  }
  return s;
}

}  // namespace ds
