// Mixture-of-experts routing, part one: top-k softmax gating with expert capacity (op
// topk_gating). Moving token rows into per-expert buffers and back is moe_rows.cu.
//
// Gating takes three launches and no host synchronisation:
//   1. one warp per token: softmax over the experts and top-k selection in registers; each
//      block (kMoeGatingTokensPerBlock tokens) then ranks its choices among earlier choices of
//      the same expert inside the block, and writes per-block counts and probability sums;
//   2. one block turns the per-block counts into each block's starting row per (choice, expert)
//      (an exclusive scan over blocks, choice-major) and sums the counts and probabilities;
//   3. an elementwise pass adds those offsets to the in-block ranks and applies the capacity.
#include <climits>
#include <cmath>

#include "compat.h"
#include "dtypes.h"
#include "kernels.h"
#include "moe_launch.h"
#include "reduce.h"

namespace ds {
namespace {

using moe::grid_for;

constexpr int kGatingThreads = 256;
constexpr int kGatingWarps = kGatingThreads / DS_WARP_SIZE;
// Experts each lane holds: expert e lives in lane e % warp, slot e / warp.
constexpr int kExpertsPerLane = kMoeMaxExperts / DS_WARP_SIZE;
static_assert(kExpertsPerLane <= 32, "the taken-mask is one 32-bit word per lane");
constexpr float kLog2e = 1.4426950408889634f;

// The ranking order of top-k: larger logit first, equal logits by lower expert index.
__device__ __forceinline__ bool ranks_before(float value, int index, float other_value, int other_index) {
  return value > other_value || (value == other_value && index < other_index);
}

template <typename T>
__global__ void __launch_bounds__(kGatingThreads)
    topk_gating_kernel(const T* __restrict__ logits, std::int64_t tokens, int experts, int k, bool normalize,
                       std::int32_t* __restrict__ expert_index, float* __restrict__ gate_weight,
                       std::int32_t* __restrict__ block_rank, std::int32_t* __restrict__ block_counts,
                       float* __restrict__ prob_partial) {
  __shared__ std::int32_t s_choice[kMoeGatingTokensPerBlock * kMoeMaxK];
  __shared__ std::int32_t s_count[kMoeMaxK * kMoeMaxExperts];
  __shared__ float s_prob[kGatingWarps * kMoeMaxExperts];

  const int lane = threadIdx.x % DS_WARP_SIZE;
  const int warp = threadIdx.x / DS_WARP_SIZE;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kMoeGatingTokensPerBlock;
  const int chunk = static_cast<int>(tokens - first < kMoeGatingTokensPerBlock ? tokens - first
                                                                              : kMoeGatingTokensPerBlock);
  for (int i = threadIdx.x; i < k * experts; i += blockDim.x) s_count[i] = 0;

  float prob_sum[kExpertsPerLane];
#pragma unroll
  for (int j = 0; j < kExpertsPerLane; ++j) prob_sum[j] = 0.0f;

  for (int local = warp; local < chunk; local += kGatingWarps) {
    const T* row = logits + (first + local) * experts;
    float score[kExpertsPerLane];  // the logit, with NaN ranked last
    float prob[kExpertsPerLane];
    unsigned taken = 0;  // bit j: expert j * warp + lane is chosen already or does not exist
    float row_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kExpertsPerLane; ++j) {
      const int e = j * DS_WARP_SIZE + lane;
      prob[j] = e < experts ? to_float(row[e]) : -INFINITY;
      score[j] = isnan(prob[j]) ? -INFINITY : prob[j];
      row_max = fmaxf(row_max, prob[j]);
      if (e >= experts) taken |= 1u << j;
    }
    row_max = warp_max(row_max);
    float denominator = 0.0f;
#pragma unroll
    for (int j = 0; j < kExpertsPerLane; ++j) {
      prob[j] = j * DS_WARP_SIZE + lane < experts ? exp2f((prob[j] - row_max) * kLog2e) : 0.0f;
      denominator += prob[j];
    }
    const float inverse = 1.0f / warp_sum(denominator);
#pragma unroll
    for (int j = 0; j < kExpertsPerLane; ++j) {
      prob[j] *= inverse;
      prob_sum[j] += prob[j];
    }

    // Lane c keeps choice c, so the choices need no per-thread array.
    int my_choice = 0;
    float my_prob = 0.0f;
    float chosen_total = 0.0f;
    for (int c = 0; c < k; ++c) {
      float best = -INFINITY;
      int best_index = INT_MAX;
      float best_prob = 0.0f;
#pragma unroll
      for (int j = 0; j < kExpertsPerLane; ++j) {
        const int e = j * DS_WARP_SIZE + lane;
        if (!((taken >> j) & 1u) && ranks_before(score[j], e, best, best_index)) {
          best = score[j];
          best_index = e;
          best_prob = prob[j];
        }
      }
#pragma unroll
      for (int mask = DS_WARP_SIZE / 2; mask > 0; mask >>= 1) {
        const float other = DS_SHFL_XOR(best, mask, DS_WARP_SIZE);
        const int other_index = DS_SHFL_XOR(best_index, mask, DS_WARP_SIZE);
        const float other_prob = DS_SHFL_XOR(best_prob, mask, DS_WARP_SIZE);
        if (ranks_before(other, other_index, best, best_index)) {
          best = other;
          best_index = other_index;
          best_prob = other_prob;
        }
      }
      if (best_index % DS_WARP_SIZE == lane) taken |= 1u << (best_index / DS_WARP_SIZE);
      if (lane == c) {
        my_choice = best_index;
        my_prob = best_prob;
      }
      chosen_total += best_prob;
    }
    if (lane < k) {
      const std::int64_t out = (first + local) * k + lane;
      expert_index[out] = my_choice;
      gate_weight[out] = normalize ? my_prob / chosen_total : my_prob;
      s_choice[local * k + lane] = my_choice;
    }
  }
#pragma unroll
  for (int j = 0; j < kExpertsPerLane; ++j) {
    const int e = j * DS_WARP_SIZE + lane;
    if (e < experts) s_prob[warp * kMoeMaxExperts + e] = prob_sum[j];
  }
  __syncthreads();

  // Rank of each choice among the block's earlier tokens with the same choice slot and expert.
  for (int i = threadIdx.x; i < k * chunk; i += blockDim.x) {
    const int c = i / chunk;
    const int t = i % chunk;
    const int e = s_choice[t * k + c];
    int rank = 0;
    for (int u = 0; u < t; ++u) rank += s_choice[u * k + c] == e;
    block_rank[(first + t) * k + c] = rank;
    atomicAdd(&s_count[c * experts + e], 1);
  }
  __syncthreads();
  std::int32_t* counts = block_counts + static_cast<std::int64_t>(blockIdx.x) * k * experts;
  for (int i = threadIdx.x; i < k * experts; i += blockDim.x) counts[i] = s_count[i];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    float sum = 0.0f;  // a fixed order, so repeated runs agree bit for bit
    for (int w = 0; w < kGatingWarps; ++w) sum += s_prob[w * kMoeMaxExperts + e];
    prob_partial[static_cast<std::int64_t>(blockIdx.x) * experts + e] = sum;
  }
}

// Loads this many per-block values before using any, so one thread's serial walk over the
// blocks waits on memory once per batch rather than once per block.
constexpr int kScanBatch = 16;

// Replaces each block's counts with the row its first choice of each (choice, expert) takes.
// Thread p walks the blocks for pair p = choice * experts + expert; the expert sums run on
// the highest-numbered threads, which have no pair when k * experts is small.
__global__ void __launch_bounds__(1024)
    gating_offsets_kernel(std::int32_t* __restrict__ block_counts, const float* __restrict__ prob_partial,
                          int blocks, int k, int experts, std::int64_t tokens, std::int32_t* __restrict__ expert_counts,
                          float* __restrict__ mean_prob) {
  __shared__ std::int32_t s_total[kMoeMaxK * kMoeMaxExperts];
  const int pairs = k * experts;
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    std::int32_t total = 0;
    for (int b0 = 0; b0 < blocks; b0 += kScanBatch) {
      std::int32_t count[kScanBatch];
#pragma unroll
      for (int i = 0; i < kScanBatch; ++i) {
        count[i] = b0 + i < blocks ? block_counts[static_cast<std::int64_t>(b0 + i) * pairs + p] : 0;
      }
#pragma unroll
      for (int i = 0; i < kScanBatch; ++i) total += count[i];
    }
    s_total[p] = total;
  }
  for (int e = blockDim.x - 1 - threadIdx.x; e < experts; e += blockDim.x) {
    float sum = 0.0f;  // a fixed order, so repeated runs agree bit for bit
    for (int b0 = 0; b0 < blocks; b0 += kScanBatch) {
      float partial[kScanBatch];
#pragma unroll
      for (int i = 0; i < kScanBatch; ++i) {
        partial[i] = b0 + i < blocks ? prob_partial[static_cast<std::int64_t>(b0 + i) * experts + e] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kScanBatch; ++i) sum += partial[i];
    }
    mean_prob[e] = sum / static_cast<float>(tokens);
  }
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int c = p / experts;
    const int e = p % experts;
    std::int32_t running = 0;  // every earlier choice slot is served first
    for (int earlier = 0; earlier < c; ++earlier) running += s_total[earlier * experts + e];
    for (int b0 = 0; b0 < blocks; b0 += kScanBatch) {
      std::int32_t count[kScanBatch];
#pragma unroll
      for (int i = 0; i < kScanBatch; ++i) {
        count[i] = b0 + i < blocks ? block_counts[static_cast<std::int64_t>(b0 + i) * pairs + p] : 0;
      }
#pragma unroll
      for (int i = 0; i < kScanBatch; ++i) {
        if (b0 + i < blocks) block_counts[static_cast<std::int64_t>(b0 + i) * pairs + p] = running;
        running += count[i];
      }
    }
  }
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    std::int32_t count = 0;
    for (int c = 0; c < k; ++c) count += s_total[c * experts + e];
    expert_counts[e] = count;
  }
}

// position = block offset + in-block rank, or -1 at or beyond capacity (in place over the rank).
__global__ void gating_positions_kernel(const std::int32_t* __restrict__ expert_index,
                                        const std::int32_t* __restrict__ offsets, std::int64_t assignments, int k,
                                        int experts, int capacity, std::int32_t* __restrict__ position) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < assignments;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t block = i / k / kMoeGatingTokensPerBlock;
    const int c = static_cast<int>(i % k);
    const std::int32_t row = position[i] + offsets[(block * k + c) * experts + expert_index[i]];
    position[i] = row < capacity ? row : -1;
  }
}

}  // namespace

const char* moe_topk_gating(Ptr logits, std::int64_t tokens, int experts, int k, int capacity, bool normalize,
                            int dtype, Ptr expert_index, Ptr gate_weight, Ptr position, Ptr expert_counts,
                            Ptr mean_prob, Ptr block_counts, Ptr prob_partial, std::uintptr_t stream) {
  if (tokens < 1 || experts < 1 || experts > kMoeMaxExperts || k < 1 || k > kMoeMaxK || k > experts ||
      capacity < 1) {
    return "moe_topk_gating: needs tokens >= 1, 1 <= experts <= 256, 1 <= k <= min(8, experts), capacity >= 1";
  }
  const std::int64_t blocks = (tokens + kMoeGatingTokensPerBlock - 1) / kMoeGatingTokensPerBlock;
  if (blocks > INT_MAX || tokens * k > INT_MAX) return "moe_topk_gating: tokens * k must stay below 2**31";
  ds_stream_t s = as_stream(stream);
  auto* index = reinterpret_cast<std::int32_t*>(expert_index);
  auto* rows = reinterpret_cast<std::int32_t*>(position);
  auto* counts = reinterpret_cast<std::int32_t*>(block_counts);
  auto* partial = reinterpret_cast<float*>(prob_partial);
  DS_DISPATCH_FLOAT(dtype, T,
                    topk_gating_kernel<T><<<static_cast<int>(blocks), kGatingThreads, 0, s>>>(
                        reinterpret_cast<const T*>(logits), tokens, experts, k, normalize, index,
                        reinterpret_cast<float*>(gate_weight), rows, counts, partial));
  gating_offsets_kernel<<<1, 1024, 0, s>>>(counts, partial, static_cast<int>(blocks), k, experts, tokens,
                                           reinterpret_cast<std::int32_t*>(expert_counts),
                                           reinterpret_cast<float*>(mean_prob));
  gating_positions_kernel<<<grid_for(tokens * k, 256), 256, 0, s>>>(index, counts, tokens * k, k, experts,
                                                                     capacity, rows);
  DS_RETURN_LAUNCH_STATUS();
}

}  // namespace ds
