// Mixture-of-experts routing, part two: moving token rows into per-expert buffers and back
// (ops moe_permute, moe_unpermute, and the gate weights' gradient); the gating that decides
// the rows is moe.cu.
//
// Row movement is written as gathers (every output row is written exactly once, empty buffer
// rows as zeros), so no output needs clearing first and no atomics touch the rows.
#include <cstdint>
#include <initializer_list>

#include "compat.h"
#include "dtypes.h"
#include "kernels.h"
#include "moe_launch.h"
#include "reduce.h"

namespace ds {
namespace {

using moe::grid_for;

constexpr int kRowThreads = 256;

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
