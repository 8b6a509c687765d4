// Multi-tensor fused Adam / AdamW: one launch updates every parameter tensor.
//
// Each block owns one chunk of kAdamChunk elements of one tensor, found by binary search in
// the tensor table's first_chunk column. Per element it reads param, grad, exp_avg and
// exp_avg_sq once and writes param, the two moments and, when asked, a 16-bit copy of the
// updated param in the same pass (the bf16/fp16 model weights next to an fp32 master), so
// the step moves the minimum number of bytes.
#include "dtypes.h"
#include "kernels.h"
#include "multi_tensor.h"

namespace ds {
namespace {

constexpr int kAdamThreads = 256;
constexpr int kAdamVec = 4;

template <int N>
__device__ __forceinline__ void adam_update(float (&p)[N], float (&g)[N], float (&m)[N],
                                            float (&v)[N], const AdamHyper& h) {
  const float step_size = h.lr / h.bias_correction1;
  const float bc2_sqrt = sqrtf(h.bias_correction2);
  const float decay = 1.0f - h.lr * h.weight_decay;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float grad = g[i] * h.grad_scale;
    if (h.decoupled) {
      p[i] *= decay;
    } else {
      grad += h.weight_decay * p[i];
    }
    m[i] = h.beta1 * m[i] + h.one_minus_beta1 * grad;
    v[i] = h.beta2 * v[i] + h.one_minus_beta2 * grad * grad;
    const float denom = sqrtf(v[i]) / bc2_sqrt + h.eps;
    p[i] -= step_size * (m[i] / denom);
  }
}

// kVectorized: every pointer of every tensor is aligned for kAdamVec-element accesses, so
// whole vectors are moved except in a tensor's final partial vector.
template <typename P, typename G, typename C, bool kVectorized>
__global__ void __launch_bounds__(kAdamThreads)
adam_kernel(const std::int64_t* __restrict__ table, std::int64_t num_tensors, AdamHyper hyper) {
  const std::int64_t chunk = blockIdx.x;
  const std::int64_t t = find_tensor(table, num_tensors, chunk);
  const std::int64_t* row = table + t * kAdamTableColumns;
  P* __restrict__ param = reinterpret_cast<P*>(row[0]);
  const G* __restrict__ grad = reinterpret_cast<const G*>(row[1]);
  float* __restrict__ exp_avg = reinterpret_cast<float*>(row[2]);
  float* __restrict__ exp_avg_sq = reinterpret_cast<float*>(row[3]);
  C* __restrict__ copy = reinterpret_cast<C*>(row[4]);
  const std::int64_t numel = row[5];
  const std::int64_t begin = (chunk - row[6]) * kAdamChunk;
  const std::int64_t end = min(begin + kAdamChunk, numel);

  constexpr int N = kVectorized ? kAdamVec : 1;
  for (std::int64_t i = begin + static_cast<std::int64_t>(threadIdx.x) * N; i < end;
       i += static_cast<std::int64_t>(kAdamThreads) * N) {
    float p[N], g[N], m[N], v[N];
    if (kVectorized && i + N <= end) {
      load_floats<N>(param + i, p);
      load_floats<N>(grad + i, g);
      load_floats<N>(exp_avg + i, m);
      load_floats<N>(exp_avg_sq + i, v);
      adam_update<N>(p, g, m, v, hyper);
      store_floats<N>(param + i, p);
      store_floats<N>(exp_avg + i, m);
      store_floats<N>(exp_avg_sq + i, v);
      if (copy != nullptr) store_floats<N>(copy + i, p);
    } else {
      for (std::int64_t j = i; j < min(i + N, end); ++j) {
        float p1[1] = {to_float(param[j])}, g1[1] = {to_float(grad[j])};
        float m1[1] = {exp_avg[j]}, v1[1] = {exp_avg_sq[j]};
        adam_update<1>(p1, g1, m1, v1, hyper);
        param[j] = from_float<P>(p1[0]);
        exp_avg[j] = m1[0];
        exp_avg_sq[j] = v1[0];
        if (copy != nullptr) copy[j] = from_float<C>(p1[0]);
      }
    }
  }
}

template <typename P, typename G, typename C>
void launch_adam(const std::int64_t* table, std::int64_t num_tensors, std::int64_t total_chunks,
                 bool vectorized, const AdamHyper& hyper, ds_stream_t stream) {
  const dim3 grid(static_cast<unsigned>(total_chunks));
  if (vectorized) {
    adam_kernel<P, G, C, true><<<grid, kAdamThreads, 0, stream>>>(table, num_tensors, hyper);
  } else {
    adam_kernel<P, G, C, false><<<grid, kAdamThreads, 0, stream>>>(table, num_tensors, hyper);
  }
}

}  // namespace

const char* adam_step(Ptr tensor_table, std::int64_t num_tensors, std::int64_t total_chunks,
                      int param_dtype, int grad_dtype, int copy_dtype, bool vectorized,
                      const AdamHyper& hyper, std::uintptr_t stream_handle) {
  if (num_tensors <= 0 || total_chunks <= 0) return nullptr;
  if (total_chunks > 0x7fffffff) return "adam_step: too many chunks for one launch";
  const auto* table = reinterpret_cast<const std::int64_t*>(tensor_table);
  const ds_stream_t stream = as_stream(stream_handle);
  // The copy type only matters when a copy is written; a missing copy reuses P's kernel.
  if (copy_dtype < 0) copy_dtype = param_dtype;
  DS_DISPATCH_FLOAT(param_dtype, P,
    DS_DISPATCH_FLOAT(grad_dtype, G,
      DS_DISPATCH_FLOAT(copy_dtype, C,
        launch_adam<P, G, C>(table, num_tensors, total_chunks, vectorized, hyper, stream))));
  DS_RETURN_LAUNCH_STATUS();
}

}  // namespace ds
