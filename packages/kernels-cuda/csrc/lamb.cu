// Multi-tensor fused LAMB with DeepSpeed FusedLamb's semantics, in two launches.
//
// LAMB scales each tensor's Adam-style update by a trust ratio ||w|| / ||update||, a
// reduction over the whole tensor, so the update cannot be applied in the pass that
// computes it. Launch 1 (one block per chunk of the Adam table) advances the moments and
// writes each chunk's sums of w^2 and update^2; the block that arrives last for a tensor
// (an atomic ticket per tensor, after a memory fence) adds that tensor's chunk sums in a
// fixed order and stores its trust ratio, so the result is deterministic and no third
// launch or host round trip is needed. Launch 2 recomputes the update from the stored
// moments and applies it, writing the 16-bit parameter copy in the same pass.
//
// Bytes per parameter (fp32 everything): launch 1 reads param, grad, both moments and
// writes the moments; launch 2 reads param and moments and writes param (and the copy).
#include "dtypes.h"
#include "kernels.h"
#include "multi_tensor.h"
#include "reduce.h"

namespace ds {
namespace {

constexpr int kLambThreads = 256;
constexpr int kLambVec = 4;

// Views of the float workspace (kernels.h): chunk sums, then ratios, then counters.
struct LambWorkspace {
  float* chunk_sums;     // [total_chunks][2]: sum of w^2, sum of update^2
  float* ratios;         // [num_tensors]
  unsigned* arrivals;    // [num_tensors], zero between calls

  __host__ __device__ LambWorkspace(float* base, std::int64_t num_tensors, std::int64_t total_chunks)
      : chunk_sums(base),
        ratios(base + 2 * total_chunks),
        arrivals(reinterpret_cast<unsigned*>(base + 2 * total_chunks + num_tensors)) {}
};

struct Chunk {
  std::int64_t tensor, begin, end;
  const std::int64_t* row;
};

__device__ __forceinline__ Chunk locate_chunk(const std::int64_t* table, std::int64_t num_tensors) {
  const std::int64_t chunk = blockIdx.x;
  const std::int64_t t = find_tensor(table, num_tensors, chunk);
  const std::int64_t* row = table + t * kAdamTableColumns;
  const std::int64_t begin = (chunk - row[6]) * kAdamChunk;
  return {t, begin, min(begin + kAdamChunk, row[5]), row};
}

__device__ __forceinline__ float lamb_update(float p, float m, float v, const LambHyper& h) {
  const float denom = h.eps_inside_sqrt ? sqrtf(v + h.eps) : sqrtf(v) + h.eps;
  return m / denom + h.weight_decay * p;
}

// Moments advance in place; returns the update and accumulates the two squared norms.
template <int N>
__device__ __forceinline__ void lamb_moments(const float (&p)[N], const float (&g)[N], float (&m)[N],
                                             float (&v)[N], const LambHyper& h, float& w2, float& u2) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    m[i] = h.beta1 * m[i] + h.one_minus_beta1 * g[i];
    v[i] = h.beta2 * v[i] + h.one_minus_beta2 * g[i] * g[i];
    const float u = lamb_update(p[i], m[i], v[i], h);
    w2 += p[i] * p[i];
    u2 += u * u;
  }
}

// FusedLamb's coefficient: 1 when either norm is zero, else the ratio clamped to max_coeff
// and then raised to min_coeff (so min_coeff wins if the two cross).
__device__ __forceinline__ float trust_ratio(float w2, float u2, const LambHyper& h) {
  const float w = sqrtf(w2), u = sqrtf(u2);
  if (w == 0.0f || u == 0.0f) return 1.0f;
  return fmaxf(fminf(__fdiv_rn(w, u), h.max_coeff), h.min_coeff);
}

// The last block of a tensor to finish adds its chunk sums (fixed order: deterministic).
__device__ void finish_tensor(const Chunk& c, const LambWorkspace& ws, const LambHyper& h, float* scratch) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();  // this block's chunk sums are visible before its ticket is
    const unsigned chunks = static_cast<unsigned>((c.row[5] + kAdamChunk - 1) / kAdamChunk);
    last = atomicAdd(ws.arrivals + c.tensor, 1u) == chunks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const std::int64_t first = c.row[6];
  const std::int64_t chunks = (c.row[5] + kAdamChunk - 1) / kAdamChunk;
  // volatile: the sums were written by other blocks, possibly on other multiprocessors.
  const volatile float* sums = ws.chunk_sums;
  float w2 = 0.0f, u2 = 0.0f;
  for (std::int64_t k = threadIdx.x; k < chunks; k += kLambThreads) {
    w2 += sums[2 * (first + k)];
    u2 += sums[2 * (first + k) + 1];
  }
  w2 = block_sum(w2, scratch);
  u2 = block_sum(u2, scratch);
  if (threadIdx.x == 0) {
    ws.ratios[c.tensor] = trust_ratio(w2, u2, h);
    ws.arrivals[c.tensor] = 0;  // ready for the next step
  }
}

template <typename P, typename G, bool kVectorized>
__global__ void __launch_bounds__(kLambThreads)
lamb_moments_kernel(const std::int64_t* __restrict__ table, std::int64_t num_tensors,
                    std::int64_t total_chunks, float* workspace, LambHyper hyper) {
  __shared__ float scratch[32];
  const Chunk c = locate_chunk(table, num_tensors);
  const P* __restrict__ param = reinterpret_cast<const P*>(c.row[0]);
  const G* __restrict__ grad = reinterpret_cast<const G*>(c.row[1]);
  float* __restrict__ exp_avg = reinterpret_cast<float*>(c.row[2]);
  float* __restrict__ exp_avg_sq = reinterpret_cast<float*>(c.row[3]);
  const LambWorkspace ws(workspace, num_tensors, total_chunks);

  constexpr int N = kVectorized ? kLambVec : 1;
  float w2 = 0.0f, u2 = 0.0f;
  for (std::int64_t i = c.begin + static_cast<std::int64_t>(threadIdx.x) * N; i < c.end;
       i += static_cast<std::int64_t>(kLambThreads) * N) {
    if (kVectorized && i + N <= c.end) {
      float p[N], g[N], m[N], v[N];
      load_floats<N>(param + i, p);
      load_floats<N>(grad + i, g);
      load_floats<N>(exp_avg + i, m);
      load_floats<N>(exp_avg_sq + i, v);
      lamb_moments<N>(p, g, m, v, hyper, w2, u2);
      store_floats<N>(exp_avg + i, m);
      store_floats<N>(exp_avg_sq + i, v);
    } else {
      for (std::int64_t j = i; j < min(i + N, c.end); ++j) {
        const float p[1] = {to_float(param[j])}, g[1] = {to_float(grad[j])};
        float m[1] = {exp_avg[j]}, v[1] = {exp_avg_sq[j]};
        lamb_moments<1>(p, g, m, v, hyper, w2, u2);
        exp_avg[j] = m[0];
        exp_avg_sq[j] = v[0];
      }
    }
  }
  w2 = block_sum(w2, scratch);
  u2 = block_sum(u2, scratch);
  if (threadIdx.x == 0) {
    ws.chunk_sums[2 * blockIdx.x] = w2;
    ws.chunk_sums[2 * blockIdx.x + 1] = u2;
  }
  finish_tensor(c, ws, hyper, scratch);
}

template <typename P, typename C, bool kVectorized>
__global__ void __launch_bounds__(kLambThreads)
lamb_apply_kernel(const std::int64_t* __restrict__ table, std::int64_t num_tensors,
                  std::int64_t total_chunks, const float* __restrict__ workspace, LambHyper hyper) {
  const Chunk c = locate_chunk(table, num_tensors);
  P* __restrict__ param = reinterpret_cast<P*>(c.row[0]);
  const float* __restrict__ exp_avg = reinterpret_cast<const float*>(c.row[2]);
  const float* __restrict__ exp_avg_sq = reinterpret_cast<const float*>(c.row[3]);
  C* __restrict__ copy = reinterpret_cast<C*>(c.row[4]);
  const float scale = hyper.step_size * workspace[2 * total_chunks + c.tensor];

  constexpr int N = kVectorized ? kLambVec : 1;
  for (std::int64_t i = c.begin + static_cast<std::int64_t>(threadIdx.x) * N; i < c.end;
       i += static_cast<std::int64_t>(kLambThreads) * N) {
    if (kVectorized && i + N <= c.end) {
      float p[N], m[N], v[N];
      load_floats<N>(param + i, p);
      load_floats<N>(exp_avg + i, m);
      load_floats<N>(exp_avg_sq + i, v);
#pragma unroll
      for (int k = 0; k < N; ++k) p[k] -= scale * lamb_update(p[k], m[k], v[k], hyper);
      store_floats<N>(param + i, p);
      if (copy != nullptr) store_floats<N>(copy + i, p);
    } else {
      for (std::int64_t j = i; j < min(i + N, c.end); ++j) {
        float p = to_float(param[j]);
        p -= scale * lamb_update(p, exp_avg[j], exp_avg_sq[j], hyper);
        param[j] = from_float<P>(p);
        if (copy != nullptr) copy[j] = from_float<C>(p);
      }
    }
  }
}

template <typename P, typename G>
void launch_moments(const std::int64_t* table, std::int64_t num_tensors, std::int64_t total_chunks,
                    float* workspace, bool vectorized, const LambHyper& hyper, ds_stream_t stream) {
  const dim3 grid(static_cast<unsigned>(total_chunks));
  if (vectorized) {
    lamb_moments_kernel<P, G, true><<<grid, kLambThreads, 0, stream>>>(table, num_tensors, total_chunks,
                                                                        workspace, hyper);
  } else {
    lamb_moments_kernel<P, G, false><<<grid, kLambThreads, 0, stream>>>(table, num_tensors, total_chunks,
                                                                         workspace, hyper);
  }
}

template <typename P, typename C>
void launch_apply(const std::int64_t* table, std::int64_t num_tensors, std::int64_t total_chunks,
                  const float* workspace, bool vectorized, const LambHyper& hyper, ds_stream_t stream) {
  const dim3 grid(static_cast<unsigned>(total_chunks));
  if (vectorized) {
    lamb_apply_kernel<P, C, true><<<grid, kLambThreads, 0, stream>>>(table, num_tensors, total_chunks,
                                                                      workspace, hyper);
  } else {
    lamb_apply_kernel<P, C, false><<<grid, kLambThreads, 0, stream>>>(table, num_tensors, total_chunks,
                                                                       workspace, hyper);
  }
}

}  // namespace

const char* lamb_step(Ptr tensor_table, Ptr workspace, std::int64_t num_tensors, std::int64_t total_chunks,
                      int param_dtype, int grad_dtype, int copy_dtype, bool vectorized,
                      const LambHyper& hyper, std::uintptr_t stream_handle) {
  if (num_tensors <= 0 || total_chunks <= 0) return nullptr;
  if (total_chunks > 0x7fffffff) return "lamb_step: too many chunks for one launch";
  const auto* table = reinterpret_cast<const std::int64_t*>(tensor_table);
  auto* ws = reinterpret_cast<float*>(workspace);
  const ds_stream_t stream = as_stream(stream_handle);
  if (copy_dtype < 0) copy_dtype = param_dtype;  // no copy: reuse P's kernel
  DS_DISPATCH_FLOAT(param_dtype, P,
    DS_DISPATCH_FLOAT(grad_dtype, G,
      launch_moments<P, G>(table, num_tensors, total_chunks, ws, vectorized, hyper, stream)));
  DS_DISPATCH_FLOAT(param_dtype, P,
    DS_DISPATCH_FLOAT(copy_dtype, C,
      launch_apply<P, C>(table, num_tensors, total_chunks, ws, vectorized, hyper, stream)));
  DS_RETURN_LAUNCH_STATUS();
}

}  // namespace ds
