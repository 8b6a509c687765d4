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

}  // namespace ds
