// Fused RMSNorm and LayerNorm over the last dimension: the forward (the backward is
// norm_backward.cu, the launch geometry both share norm_layout.h).
//
// A row belongs to a group of `row_threads` threads (a power of two, at least one warp), and
// each thread holds kIters vectors of it in registers, packed in the input type: x (and dy)
// are read from memory once and every statistic is a register reduction. Short rows share a
// block, so that no block has fewer than kMinBlockThreads threads.
//
// Forward: one block per tile of rows, not a persistent grid. On an H100 (bf16, hidden 2048,
// 4096, 8192; 4 x 16-byte vectors a thread) it moves 98.7-99.8% of a device copy's bandwidth,
// against 89-94% for a persistent block per row that prefetched its next row: the hardware
// overlaps short-lived blocks better than a block overlaps its own rows.
//
// LayerNorm's statistics also take a single reduction: each thread finds the mean and squared
// deviations of its own elements (two passes over registers), and the threads' parts merge
// pairwise (Chan, Golub & LeVeque), correcting by differences of part means. Unlike
// E[x^2] - E[x]^2 this loses nothing to cancellation when the row mean is far from zero.
//
// Rows whose length is not a multiple of 16 bytes' worth of elements use 8-byte vectors when
// it is a multiple of 8 bytes, else single elements, with the same bytes per thread.
#include <cstdint>
#include <type_traits>

#include "dtypes.h"
#include "kernels.h"
#include "norm_layout.h"
#include "norm_rows.h"
#include "reduce.h"

namespace ds {
namespace {

using norm::kMaxRowThreads;
using norm::kMergeScratch;
using norm::max_hidden;
using norm::norm_layout;
using norm::own_mean;
using norm::owns;
using norm::RowLayout;
using norm::RowMoments;
using norm::RowSlice;
using norm::RowSums;
using norm::with_shape;
using norm::with_types;

template <typename T, typename W, int VEC, int kIters, bool kRms>
__global__ void __launch_bounds__(kMaxRowThreads)
norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
                    T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                    std::int64_t rows, std::int64_t hidden, float eps, int row_threads) {
  using Stats = std::conditional_t<kRms, RowSums<1>, RowMoments<false>>;
  __shared__ float scratch[kMergeScratch * Stats::kSize];
  int phase = 0;
  const int lane = threadIdx.x % row_threads;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / row_threads) +
                           threadIdx.x / row_threads;
  const bool valid = row < rows;
  const int vectors = static_cast<int>(hidden / VEC);
  RowSlice<T, VEC, kIters> xs;
  Stats s{};
  if (valid) {
    xs.load(x + row * hidden, lane, row_threads, vectors);
    if constexpr (kRms) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (owns(it, lane, row_threads, vectors)) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) s.v[0] += xs.at(it, k) * xs.at(it, k);
        }
      }
    } else {
      s.v[1] = own_mean(xs, lane, row_threads, vectors, s.v[0]);
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (owns(it, lane, row_threads, vectors)) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float d = xs.at(it, k) - s.v[1];
            s.v[2] += d * d;
          }
        }
      }
    }
  }
  s = group_merge(s, scratch, phase, row_threads);
  if (!valid) return;
  const float inv_hidden = 1.0f / static_cast<float>(hidden);
  const float mu = kRms ? 0.0f : s.v[1];
  const float rstd = rsqrtf((kRms ? s.v[0] : s.v[2]) * inv_hidden + eps);
  T* yr = y + row * hidden;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (owns(it, lane, row_threads, vectors)) {
      const std::int64_t offset = static_cast<std::int64_t>(lane + it * row_threads) * VEC;
      float w[VEC], out[VEC];
      load_floats<VEC>(weight + offset, w);  // an L1 hit: every row reads the same weight
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = (xs.at(it, k) - mu) * rstd * w[k];
      if (!kRms && bias != nullptr) {
        float b[VEC];
        load_floats<VEC>(bias + offset, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] += b[k];
      }
      store_floats<VEC>(yr + offset, out);
    }
  }
  if (lane == 0) {
    if (mean_out != nullptr) mean_out[row] = mu;
    if (rstd_out != nullptr) rstd_out[row] = rstd;
  }
}

}  // namespace

std::int64_t norm_max_hidden(bool vectorized) { return max_hidden(vectorized); }

const char* norm_forward(Ptr x, Ptr weight, Ptr bias, Ptr y, Ptr mean, Ptr rstd,
                         std::int64_t rows, std::int64_t hidden, float eps, bool rms,
                         int x_dtype, int w_dtype, std::uintptr_t stream_handle) {
  if (rows == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  return with_types(x_dtype, w_dtype, [&](auto x_tag, auto w_tag) -> const char* {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    const RowLayout layout = norm_layout<T, W>(hidden, {x, y}, {weight, bias}, {});
    const std::int64_t tiles = (rows + layout.rows_per_block - 1) / layout.rows_per_block;
    if (tiles > 0x7fffffff) return "norm_forward: more rows than one grid covers; split the call";
    return with_shape<T>(layout, [&](auto shape) -> const char* {
      using S = decltype(shape);
      auto kernel = rms ? norm_forward_kernel<T, W, S::kVec, S::kItersValue, true>
                        : norm_forward_kernel<T, W, S::kVec, S::kItersValue, false>;
      kernel<<<static_cast<unsigned>(tiles), layout.block_threads(), 0, stream>>>(
          reinterpret_cast<const T*>(x), reinterpret_cast<const W*>(weight), reinterpret_cast<const W*>(bias),
          reinterpret_cast<T*>(y), reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd), rows, hidden,
          eps, layout.row_threads);
      DS_RETURN_LAUNCH_STATUS();
    });
  });
}

}  // namespace ds
