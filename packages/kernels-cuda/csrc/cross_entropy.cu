// Cross-entropy loss and its logits gradient in one kernel, the gradient written over the
// logits, so a 128k-vocabulary loss needs no second tokens x vocabulary buffer.
//
// One block per row. Pass 1 streams the row once, keeping per thread an online softmax
// state (running max, sum of exp(x - max)) and the plain sum of the logits (for label
// smoothing); the block merges the states into the row's log-sum-exp. Pass 2 streams the
// row again and overwrites each logit with scale * (softmax - (1 - s) onehot - s / V).
// A 128k bf16 row is 256 KB, too big for shared memory, so pass 2 re-reads it (largely
// from L2). Rows start wherever the caller's stride puts them: each row is split into a
// scalar head up to the first 16-byte boundary, 16-byte vectors, and a scalar tail, so odd
// vocabularies (50257) still move almost all their bytes with vector accesses.
#include <cmath>
#include <type_traits>

#include "dtypes.h"
#include "kernels.h"

namespace ds {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMinThreads = 128;
constexpr int kMaxWarps = kMaxThreads / 32;  // 32-lane warps are the narrowest (HIP's are 64)
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float exp_(float v) { return exp2f(v * kLog2e); }

// Online softmax state of a set of logits: max, sum of exp(x - max), and the plain sum.
struct SoftmaxStats {
  float max;
  float sum_exp;
  float sum;
};

__device__ __forceinline__ SoftmaxStats merge(const SoftmaxStats& a, const SoftmaxStats& b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.0f, a.sum + b.sum};  // both empty or all -inf: nothing to rescale
  return {m, a.sum_exp * exp_(a.max - m) + b.sum_exp * exp_(b.max - m), a.sum + b.sum};
}

// Folds N logits into the state with one rescale of the running sum.
template <int N>
__device__ __forceinline__ void absorb(SoftmaxStats& s, const float (&x)[N]) {
  float m = s.max;
  float plain = 0.0f;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    m = fmaxf(m, x[k]);
    plain += x[k];
  }
  s.sum += plain;
  if (m == -INFINITY) return;
  float acc = s.sum_exp * exp_(s.max - m);
#pragma unroll
  for (int k = 0; k < N; ++k) acc += exp_(x[k] - m);
  s.max = m;
  s.sum_exp = acc;
}

__device__ __forceinline__ SoftmaxStats warp_merge(SoftmaxStats s) {
#pragma unroll
  for (int mask = DS_WARP_SIZE / 2; mask > 0; mask >>= 1) {
    const SoftmaxStats other{DS_SHFL_XOR(s.max, mask, DS_WARP_SIZE), DS_SHFL_XOR(s.sum_exp, mask, DS_WARP_SIZE),
                             DS_SHFL_XOR(s.sum, mask, DS_WARP_SIZE)};
    s = merge(s, other);
  }
  return s;
}

// The whole block's state, returned to every thread. The leading barrier keeps a fast warp
// of the next row from overwriting `scratch` while a slow one still reads this row's.
__device__ __forceinline__ SoftmaxStats block_merge(SoftmaxStats s, SoftmaxStats* scratch) {
  const int lane = threadIdx.x % DS_WARP_SIZE;
  const int warp = threadIdx.x / DS_WARP_SIZE;
  const int num_warps = (blockDim.x + DS_WARP_SIZE - 1) / DS_WARP_SIZE;
  s = warp_merge(s);
  __syncthreads();
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  s = lane < num_warps ? scratch[lane] : SoftmaxStats{-INFINITY, 0.0f, 0.0f};
  return warp_merge(s);
}

// Calls fn(width, j) for the row's groups of elements [j, j + width): scalar head up to the
// first 16-byte boundary, VEC-wide aligned vectors, scalar tail. `width` is an
// integral_constant, so each call site compiles to fixed-size loads.
template <typename T, int VEC, typename Fn>
__device__ __forceinline__ void for_each_group(const T* row, std::int64_t vocab, Fn&& fn) {
  const auto address = reinterpret_cast<std::uintptr_t>(row);
  std::int64_t head = static_cast<std::int64_t>(((16 - address % 16) % 16) / sizeof(T));
  if (head > vocab) head = vocab;
  const std::int64_t vectors = (vocab - head) / VEC;
  const std::int64_t body_end = head + vectors * VEC;
  for (std::int64_t j = threadIdx.x; j < head; j += blockDim.x) fn(std::integral_constant<int, 1>{}, j);
  for (std::int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    fn(std::integral_constant<int, VEC>{}, head + v * VEC);
  }
  for (std::int64_t j = body_end + threadIdx.x; j < vocab; j += blockDim.x) fn(std::integral_constant<int, 1>{}, j);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_kernel(T* logits, std::int64_t row_stride, const std::int64_t* __restrict__ target,
                     float* __restrict__ loss, float* __restrict__ lse, std::int64_t rows, std::int64_t vocab,
                     std::int64_t ignore_index, float smoothing, float grad_scale) {
  __shared__ SoftmaxStats scratch[kMaxWarps];
  const float smooth_share = smoothing / static_cast<float>(vocab);
  const float confidence = 1.0f - smoothing;
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* row = logits + r * row_stride;
    const std::int64_t t = target[r];
    const bool ignored = t == ignore_index;
    const bool in_range = t >= 0 && t < vocab;
    // Read before block_merge's barriers, hence before any thread overwrites the row.
    const float x_target = (!ignored && in_range) ? to_float(row[t]) : 0.0f;

    SoftmaxStats stats{-INFINITY, 0.0f, 0.0f};
    for_each_group<T, VEC>(row, vocab, [&](auto width, std::int64_t j) {
      constexpr int N = decltype(width)::value;
      float x[N];
      load_floats<N>(row + j, x);
      absorb(stats, x);
    });
    stats = block_merge(stats, scratch);
    const float row_lse = stats.max + logf(stats.sum_exp);

    if (threadIdx.x == 0) {
      float row_loss = 0.0f;
      if (!ignored) {
        row_loss = in_range ? row_lse - confidence * x_target : NAN;
        if (smoothing > 0.0f) row_loss -= smooth_share * stats.sum;  // at 0, an all -inf sum would give NaN
      }
      loss[r] = row_loss;
      lse[r] = row_lse;
    }

    const float scale = ignored ? 0.0f : (in_range ? grad_scale : NAN);
    for_each_group<T, VEC>(row, vocab, [&](auto width, std::int64_t j) {
      constexpr int N = decltype(width)::value;
      float x[N];
      if (ignored) {
#pragma unroll
        for (int k = 0; k < N; ++k) x[k] = 0.0f;
      } else {
        load_floats<N>(row + j, x);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          float g = exp_(x[k] - row_lse) - smooth_share;
          if (j + k == t) g -= confidence;
          x[k] = g * scale;
        }
      }
      store_floats<N>(row + j, x);
    });
  }
}

// Enough threads that each streams about four vectors per pass, within [kMinThreads, kMaxThreads].
int threads_for(std::int64_t vocab, int vec) {
  const std::int64_t wanted = (vocab + 4 * vec - 1) / (4 * vec);
  const std::int64_t rounded = (wanted + DS_WARP_SIZE - 1) / DS_WARP_SIZE * DS_WARP_SIZE;
  return static_cast<int>(rounded < kMinThreads ? kMinThreads : (rounded > kMaxThreads ? kMaxThreads : rounded));
}

}  // namespace

const char* cross_entropy_fwd_bwd(Ptr logits, std::int64_t row_stride, Ptr target, Ptr loss, Ptr lse,
                                  std::int64_t rows, std::int64_t vocab, std::int64_t ignore_index,
                                  float label_smoothing, float grad_scale, int dtype, std::uintptr_t stream) {
  if (rows <= 0) return nullptr;
  if (vocab <= 0) return "vocab must be positive";
  const unsigned blocks = static_cast<unsigned>(rows < 0x7fffffff ? rows : 0x7fffffff);
  DS_DISPATCH_FLOAT(dtype, T, {
    constexpr int kVec = kVec16<T>;
    cross_entropy_kernel<T, kVec><<<blocks, threads_for(vocab, kVec), 0, as_stream(stream)>>>(
        reinterpret_cast<T*>(logits), row_stride, reinterpret_cast<const std::int64_t*>(target),
        reinterpret_cast<float*>(loss), reinterpret_cast<float*>(lse), rows, vocab, ignore_index,
        label_smoothing, grad_scale);
  });
  DS_RETURN_LAUNCH_STATUS();
}

}  // namespace ds
