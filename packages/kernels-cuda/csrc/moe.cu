// Mixture-of-experts routing: top-k softmax gating with expert capacity, and moving token rows
// into per-expert buffers and back (ops topk_gating, moe_permute, moe_unpermute).
//
// Gating takes three launches and no host synchronisation:
//   1. one warp per token: softmax over the experts and top-k selection in registers; each
//      block (kMoeGatingTokensPerBlock tokens) then ranks its choices among earlier choices of
//      the same expert inside the block, and writes per-block counts and probability sums;
//   2. one block turns the per-block counts into each block's starting row per (choice, expert)
//      (an exclusive scan over blocks, choice-major) and sums the counts and probabilities;
//   3. an elementwise pass adds those offsets to the in-block ranks and applies the capacity.
// Row movement is written as gathers (every output row is written exactly once, empty buffer
// rows as zeros), so no output needs clearing first and no atomics touch the rows.
#include <climits>
#include <cmath>
#include <initializer_list>

#include "compat.h"
#include "dtypes.h"
#include "kernels.h"
#include "reduce.h"

namespace ds {
namespace {

constexpr int kGatingThreads = 256;
constexpr int kGatingWarps = kGatingThreads / DS_WARP_SIZE;
// Experts each lane holds: expert e lives in lane e % warp, slot e / warp.
constexpr int kExpertsPerLane = kMoeMaxExperts / DS_WARP_SIZE;
static_assert(kExpertsPerLane <= 32, "the taken-mask is one 32-bit word per lane");
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kRowThreads = 256;
constexpr std::int64_t kMaxGrid = 1 << 20;

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

__device__ __forceinline__ bool kept(std::int32_t expert, std::int32_t position, int experts, int capacity) {
  return expert >= 0 && expert < experts && position >= 0 && position < capacity;
}

// One vector of V elements from floats; V == 1 is the path for rows that are not 16-byte multiples.
template <int V, typename T>
__device__ __forceinline__ void store_vector(T* ptr, const float (&in)[V]) {
  if constexpr (V == 1) {
    *ptr = from_float<T>(in[0]);
  } else {
    store_floats<V>(ptr, in);
  }
}

// sources[e * capacity + p] = the choice (token * k + j) that takes that buffer row.
__global__ void slot_sources_kernel(const std::int32_t* __restrict__ expert_index,
                                    const std::int32_t* __restrict__ position, std::int64_t assignments,
                                    int experts, int capacity, std::int32_t* __restrict__ sources) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < assignments;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int32_t e = expert_index[i];
    const std::int32_t p = position[i];
    if (kept(e, p, experts, capacity)) sources[static_cast<std::int64_t>(e) * capacity + p] = static_cast<std::int32_t>(i);
  }
}

// out[slot] = scale[choice] * rows[choice / k] for the choice that took the slot, zero if none.
// Without a scale the row is copied bit for bit.
template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    gather_rows_kernel(const T* __restrict__ rows, const std::int32_t* __restrict__ sources,
                       const float* __restrict__ scale, int k, std::int64_t slots, std::int64_t hidden,
                       T* __restrict__ out) {
  for (std::int64_t slot = blockIdx.x; slot < slots; slot += gridDim.x) {
    const std::int32_t source = sources[slot];
    T* dst = out + slot * hidden;
    const T* src = rows + (source < 0 ? 0 : source / k) * hidden;
    const float factor = scale == nullptr || source < 0 ? 1.0f : scale[source];
    for (std::int64_t i = static_cast<std::int64_t>(threadIdx.x) * V; i < hidden; i += blockDim.x * V) {
      if (source >= 0 && scale == nullptr) {
        *reinterpret_cast<Vec<T, V>*>(dst + i) = *reinterpret_cast<const Vec<T, V>*>(src + i);
        continue;
      }
      float values[V];
      if (source >= 0) {
        load_floats<V>(src + i, values);
      }
#pragma unroll
      for (int v = 0; v < V; ++v) values[v] = source >= 0 ? values[v] * factor : 0.0f;
      store_vector<V>(dst + i, values);
    }
  }
}

// The buffer row of each of a token's choices (-1 when dropped) and its weight (0 when dropped).
__device__ __forceinline__ void token_slots(const std::int32_t* expert_index, const std::int32_t* position,
                                            const float* weight, std::int64_t token, int k, int experts,
                                            int capacity, std::int64_t (&slot)[kMoeMaxK], float (&w)[kMoeMaxK]) {
#pragma unroll
  for (int c = 0; c < kMoeMaxK; ++c) {
    slot[c] = -1;
    w[c] = 0.0f;
    if (c < k) {
      const std::int32_t e = expert_index[token * k + c];
      const std::int32_t p = position[token * k + c];
      if (kept(e, p, experts, capacity)) {
        slot[c] = static_cast<std::int64_t>(e) * capacity + p;
        w[c] = weight == nullptr ? 1.0f : weight[token * k + c];
      }
    }
  }
}

// out[t] = sum over kept choices of weight * buffer[slot], accumulated in float32.
template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    combine_rows_kernel(const T* __restrict__ buffer, const std::int32_t* __restrict__ expert_index,
                        const std::int32_t* __restrict__ position, const float* __restrict__ weight,
                        std::int64_t tokens, int k, int experts, int capacity, std::int64_t hidden,
                        T* __restrict__ out) {
  for (std::int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    std::int64_t slot[kMoeMaxK];
    float w[kMoeMaxK];
    token_slots(expert_index, position, weight, token, k, experts, capacity, slot, w);
    for (std::int64_t i = static_cast<std::int64_t>(threadIdx.x) * V; i < hidden; i += blockDim.x * V) {
      float acc[V];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = 0.0f;
#pragma unroll
      for (int c = 0; c < kMoeMaxK; ++c) {
        if (slot[c] < 0) continue;
        float values[V];
        load_floats<V>(buffer + slot[c] * hidden + i, values);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += w[c] * values[v];
      }
      store_vector<V>(out + token * hidden + i, acc);
    }
  }
}

// grad_gate[t, j] = <grad_out[t], buffer[slot(t, j)]>, zero for a dropped choice.
template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    gate_grad_kernel(const T* __restrict__ grad_out, const T* __restrict__ buffer,
                     const std::int32_t* __restrict__ expert_index, const std::int32_t* __restrict__ position,
                     std::int64_t tokens, int k, int experts, int capacity, std::int64_t hidden,
                     float* __restrict__ grad_gate) {
  __shared__ float scratch[32];
  for (std::int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    std::int64_t slot[kMoeMaxK];
    float unused[kMoeMaxK];
    token_slots(expert_index, position, nullptr, token, k, experts, capacity, slot, unused);
    float dot[kMoeMaxK];
#pragma unroll
    for (int c = 0; c < kMoeMaxK; ++c) dot[c] = 0.0f;
    for (std::int64_t i = static_cast<std::int64_t>(threadIdx.x) * V; i < hidden; i += blockDim.x * V) {
      float g[V];
      load_floats<V>(grad_out + token * hidden + i, g);
#pragma unroll
      for (int c = 0; c < kMoeMaxK; ++c) {
        if (slot[c] < 0) continue;
        float values[V];
        load_floats<V>(buffer + slot[c] * hidden + i, values);
#pragma unroll
        for (int v = 0; v < V; ++v) dot[c] += g[v] * values[v];
      }
    }
#pragma unroll
    for (int c = 0; c < kMoeMaxK; ++c) {
      if (c < k) {  // the same on every thread, so the barriers inside block_sum are safe
        const float total = block_sum(dot[c], scratch);
        if (threadIdx.x == 0) grad_gate[token * k + c] = total;
      }
    }
  }
}

int grid_for(std::int64_t work, int per_block) {
  const std::int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

// Threads for one row of `hidden` elements moved V at a time: whole warps, at most kRowThreads.
int row_threads(std::int64_t hidden, int vector) {
  const std::int64_t vectors = (hidden + vector - 1) / vector;
  const std::int64_t warps = (vectors + DS_WARP_SIZE - 1) / DS_WARP_SIZE;
  const std::int64_t threads = warps * DS_WARP_SIZE;
  return static_cast<int>(threads > kRowThreads ? kRowThreads : threads);
}

template <typename T>
bool vectorizable(std::int64_t hidden, std::initializer_list<Ptr> pointers) {
  if (hidden % kVec16<T> != 0) return false;
  for (Ptr p : pointers) {
    if (p != 0 && !aligned16(p)) return false;
  }
  return true;
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

const char* moe_slot_sources(Ptr expert_index, Ptr position, std::int64_t assignments, int experts, int capacity,
                             Ptr sources, std::uintptr_t stream) {
  if (assignments < 1) return nullptr;
  if (static_cast<std::int64_t>(experts) * capacity > INT_MAX || assignments > INT_MAX) {
    return "moe_slot_sources: experts * capacity and tokens * k must stay below 2**31";
  }
  slot_sources_kernel<<<grid_for(assignments, 256), 256, 0, as_stream(stream)>>>(
      reinterpret_cast<const std::int32_t*>(expert_index), reinterpret_cast<const std::int32_t*>(position),
      assignments, experts, capacity, reinterpret_cast<std::int32_t*>(sources));
  DS_RETURN_LAUNCH_STATUS();
}

const char* moe_gather_rows(Ptr rows, Ptr sources, Ptr scale, int k, std::int64_t slots, std::int64_t hidden,
                            Ptr out, int dtype, std::uintptr_t stream) {
  if (slots < 1 || hidden < 1) return nullptr;
  ds_stream_t s = as_stream(stream);
  const auto* source = reinterpret_cast<const std::int32_t*>(sources);
  const auto* factor = reinterpret_cast<const float*>(scale);
  const int grid = grid_for(slots, 1);
  DS_DISPATCH_FLOAT(dtype, T, {
    constexpr int kV = kVec16<T>;
    if (vectorizable<T>(hidden, {rows, out})) {
      gather_rows_kernel<T, kV><<<grid, row_threads(hidden, kV), 0, s>>>(
          reinterpret_cast<const T*>(rows), source, factor, k, slots, hidden, reinterpret_cast<T*>(out));
    } else {
      gather_rows_kernel<T, 1><<<grid, row_threads(hidden, 1), 0, s>>>(
          reinterpret_cast<const T*>(rows), source, factor, k, slots, hidden, reinterpret_cast<T*>(out));
    }
  });
  DS_RETURN_LAUNCH_STATUS();
}

const char* moe_combine_rows(Ptr buffer, Ptr expert_index, Ptr position, Ptr weight, std::int64_t tokens, int k,
                             int experts, int capacity, std::int64_t hidden, Ptr out, int dtype,
                             std::uintptr_t stream) {
  if (tokens < 1 || hidden < 1) return nullptr;
  if (k < 1 || k > kMoeMaxK) return "moe_combine_rows: k must be between 1 and 8";
  ds_stream_t s = as_stream(stream);
  const auto* index = reinterpret_cast<const std::int32_t*>(expert_index);
  const auto* rows = reinterpret_cast<const std::int32_t*>(position);
  const auto* w = reinterpret_cast<const float*>(weight);
  const int grid = grid_for(tokens, 1);
  DS_DISPATCH_FLOAT(dtype, T, {
    constexpr int kV = kVec16<T>;
    if (vectorizable<T>(hidden, {buffer, out})) {
      combine_rows_kernel<T, kV><<<grid, row_threads(hidden, kV), 0, s>>>(
          reinterpret_cast<const T*>(buffer), index, rows, w, tokens, k, experts, capacity, hidden,
          reinterpret_cast<T*>(out));
    } else {
      combine_rows_kernel<T, 1><<<grid, row_threads(hidden, 1), 0, s>>>(
          reinterpret_cast<const T*>(buffer), index, rows, w, tokens, k, experts, capacity, hidden,
          reinterpret_cast<T*>(out));
    }
  });
  DS_RETURN_LAUNCH_STATUS();
}

const char* moe_gate_grad(Ptr grad_out, Ptr buffer, Ptr expert_index, Ptr position, std::int64_t tokens, int k,
                          int experts, int capacity, std::int64_t hidden, Ptr grad_gate, int dtype,
                          std::uintptr_t stream) {
  if (tokens < 1) return nullptr;
  if (k < 1 || k > kMoeMaxK) return "moe_gate_grad: k must be between 1 and 8";
  ds_stream_t s = as_stream(stream);
  const auto* index = reinterpret_cast<const std::int32_t*>(expert_index);
  const auto* rows = reinterpret_cast<const std::int32_t*>(position);
  auto* out = reinterpret_cast<float*>(grad_gate);
  const int grid = grid_for(tokens, 1);
  DS_DISPATCH_FLOAT(dtype, T, {
    constexpr int kV = kVec16<T>;
    if (vectorizable<T>(hidden, {grad_out, buffer})) {
      gate_grad_kernel<T, kV><<<grid, row_threads(hidden, kV), 0, s>>>(
          reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(buffer), index, rows, tokens, k,
          experts, capacity, hidden, out);
    } else {
      gate_grad_kernel<T, 1><<<grid, row_threads(hidden, 1), 0, s>>>(
          reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(buffer), index, rows, tokens, k,
          experts, capacity, hidden, out);
    }
  });
  DS_RETURN_LAUNCH_STATUS();
}

}  // namespace ds
