// Fused RMSNorm and LayerNorm over the last dimension, forward and backward.
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
// Backward: a persistent grid, because each block sums dweight (and dbias) for its columns in
// registers over all of its rows and writes one float32 partial row, which column_sum folds.
// 4 x 16-byte vectors a thread per tensor and one reduction per row reached 90-96% of copy
// (RMSNorm) and 92-93% (LayerNorm at hidden 2048 and 4096) on an H100. The kernels are held to
// 128 registers (__launch_bounds__ of 512 threads), which gives 16 resident warps per SM at
// every block size: uncapped, LayerNorm's backward took 165, which leaves room for only one
// 256-thread block (8 warps) per SM at hidden 8192, where it reached 76.5% of copy.
// LayerNorm rows of 4097-8192 16-bit elements instead keep dweight/dbias in shared memory and
// prefetch the next row (stream_rows: 87.2% of copy at hidden 8192, against 83.8%).
//
// LayerNorm's statistics also take a single reduction: each thread finds the mean and squared
// deviations of its own elements (two passes over registers), and the threads' parts merge
// pairwise (Chan, Golub & LeVeque), correcting by differences of part means. Unlike
// E[x^2] - E[x]^2 this loses nothing to cancellation when the row mean is far from zero.
//
// Rows whose length is not a multiple of 16 bytes' worth of elements use 8-byte vectors when
// it is a multiple of 8 bytes, else single elements, with the same bytes per thread.
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "dtypes.h"
#include "kernels.h"
#include "norm_rows.h"
#include "reduce.h"

namespace ds {
namespace {

using norm::own_mean;
using norm::owns;
using norm::RowMoments;
using norm::RowSlice;
using norm::RowSums;

constexpr int kMaxRowThreads = 512;   // threads per row, and per block
constexpr int kMinBlockThreads = 128;
constexpr int kPreferredIters = 4;    // 16-byte vectors per thread per tensor, while rows allow
constexpr int kMaxIters = 8;          // 16-byte vectors per thread per tensor, at most
constexpr int kNarrowIters = 8;       // 8-byte vectors per thread (the same bytes as 4 x 16)
constexpr int kScalarIters = 16;      // elements per thread on the unaligned path
constexpr int kMergeScratch = 2 * 32;  // group_merge's scratch, in Stats
constexpr int kStreamRowThreads = 256;  // the streamed-rows backward's threads per row (stream_rows)
constexpr int kStreamMinBlocks = 2;     // its blocks per SM (__launch_bounds__): 128 registers

constexpr std::int64_t max_hidden(bool vectorized) {
  // 16-byte vectors of float32 are the shortest: 4 elements; the narrow path of float32
  // (2-element vectors) reaches as far as the scalar one.
  return static_cast<std::int64_t>(kMaxRowThreads) * (vectorized ? kMaxIters * 4 : kScalarIters);
}
static_assert(kNarrowIters * 2 >= kScalarIters, "the narrow path must cover the scalar path's rows");

// Vector width (elements), vectors per thread, threads per row and rows per block.
struct RowLayout {
  int vec;
  int iters;
  int row_threads;
  int rows_per_block;
  int block_threads() const { return row_threads * rows_per_block; }
};

// The smallest power-of-two group that gives each thread at most `preferred_iters` vectors,
// then as many vectors per thread as the row needs at that size; iters = 0 when the row does
// not fit `max_iters`.
RowLayout row_layout(std::int64_t hidden, int vec, int preferred_iters, int max_iters) {
  const std::int64_t vectors = hidden / vec;
  int threads = DS_WARP_SIZE;
  while (threads < kMaxRowThreads && static_cast<std::int64_t>(threads) * preferred_iters < vectors) threads *= 2;
  int iters = 1;
  while (static_cast<std::int64_t>(threads) * iters < vectors) iters *= 2;
  if (iters > max_iters) iters = 0;
  return {vec, iters, threads, threads < kMinBlockThreads ? kMinBlockThreads / threads : 1};
}

bool aligned(Ptr p, std::size_t bytes) { return p == 0 || p % (bytes < 16 ? bytes : 16) == 0; }

bool all_aligned(std::initializer_list<Ptr> ptrs, std::size_t bytes) {
  for (Ptr p : ptrs) {
    if (!aligned(p, bytes)) return false;
  }
  return true;
}

// The widest access every row start and base allows: 16 bytes of T, then 8, then single
// elements. The narrow paths take a fixed number of vectors per thread (the fallback needs no
// tuning for short rows, and each costs one kernel instance).
template <typename T, typename W>
RowLayout norm_layout(std::int64_t hidden, std::initializer_list<Ptr> t_ptrs, std::initializer_list<Ptr> w_ptrs,
                      std::initializer_list<Ptr> float_ptrs) {
  for (const int vec : {kVec16<T>, kVec16<T> / 2}) {
    if (hidden % vec != 0 || !all_aligned(t_ptrs, vec * sizeof(T)) || !all_aligned(w_ptrs, vec * sizeof(W)) ||
        !all_aligned(float_ptrs, vec * sizeof(float))) {
      continue;
    }
    if (vec == kVec16<T>) return row_layout(hidden, vec, kPreferredIters, kMaxIters);
    RowLayout layout = row_layout(hidden, vec, kNarrowIters, kNarrowIters);
    if (layout.iters != 0) layout.iters = kNarrowIters;
    return layout;
  }
  RowLayout layout = row_layout(hidden, 1, kScalarIters, kScalarIters);
  if (layout.iters != 0) layout.iters = kScalarIters;
  return layout;
}

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

// dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)), where the mean(w*dy) term is
// LayerNorm's only; dweight += dy * xhat and dbias += dy over the block's rows. The weight is
// read (from L1) at each use rather than held, which keeps LayerNorm within 128 registers.
//
// kStreamRows (LayerNorm, 16-bit rows of 256 threads x 4 vectors, one row per block; see
// stream_rows): dweight/dbias accumulate in shared memory, each thread only its own columns
// (16-byte accesses, no barrier), and the registers that frees hold the next row's x and dy,
// loaded before this row's reduction so the barrier and the dx math overlap memory traffic.
// The body of both backward kernels below, which differ in their launch bounds only.
template <typename T, typename W, int VEC, int kIters, bool kRms, bool kStreamRows>
__device__ __forceinline__ void backward_rows(const T* __restrict__ dy, const T* __restrict__ x,
                                              const W* __restrict__ weight, T* __restrict__ dx,
                                              float* __restrict__ dweight_partial, float* __restrict__ dbias_partial,
                                              std::int64_t rows, std::int64_t hidden, float eps, int row_threads) {
  static_assert(!kStreamRows || (!kRms && VEC == 8), "streamed rows: LayerNorm on 16-bit rows");
  using Stats = std::conditional_t<kRms, RowSums<2>, RowMoments<true>>;
  __shared__ float scratch[kMergeScratch * Stats::kSize];
  extern __shared__ float4 dynamic_smem[];
  // rows_per_block > 1: one group's column sums at a time; kStreamRows: the accumulators,
  // [kIters][dweight 0-3, 4-7, dbias 0-3, 4-7][row_threads].
  float* fold = reinterpret_cast<float*>(dynamic_smem);
  float4* acc = dynamic_smem;
  int phase = 0;
  const int rows_per_block = kStreamRows ? 1 : static_cast<int>(blockDim.x) / row_threads;
  // Streamed rows: a block is one row group, so lane and group are known without row_threads.
  const int group = kStreamRows ? 0 : threadIdx.x / row_threads;
  const int lane = kStreamRows ? static_cast<int>(threadIdx.x) : threadIdx.x % row_threads;
  const int vectors = static_cast<int>(hidden / VEC);
  const float inv_hidden = 1.0f / static_cast<float>(hidden);
  constexpr int kRegIters = kStreamRows ? 1 : kIters;
  float dw[kRegIters][VEC], db[kRegIters][VEC];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if constexpr (kStreamRows) {
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[(it * 4 + q) * row_threads + lane] = make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) dw[it][k] = db[it][k] = 0.0f;
    }
  }
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * rows_per_block;
  RowSlice<T, VEC, kStreamRows ? kIters : 1> x_ahead, g_ahead, x_next, g_next;  // streamed rows only
  if (kStreamRows && blockIdx.x < rows) {
    x_ahead.load(x + blockIdx.x * hidden, lane, row_threads, vectors);
    g_ahead.load(dy + blockIdx.x * hidden, lane, row_threads, vectors);
  }
  for (std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * rows_per_block; first < rows; first += stride) {
    const std::int64_t row = first + group;
    const bool valid = row < rows;
    RowSlice<T, VEC, kIters> xs, gs;
    if constexpr (kStreamRows) {
      xs = x_ahead;
      gs = g_ahead;
      if (row + stride < rows) {
        x_next.load(x + (row + stride) * hidden, lane, row_threads, vectors);
        g_next.load(dy + (row + stride) * hidden, lane, row_threads, vectors);
      }
    } else if (valid) {
      xs.load(x + row * hidden, lane, row_threads, vectors);
      gs.load(dy + row * hidden, lane, row_threads, vectors);
    }
    Stats s{};
    if (valid) {
      float own_mu = 0.0f;
      if constexpr (!kRms) own_mu = s.v[1] = own_mean(xs, lane, row_threads, vectors, s.v[0]);
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (owns(it, lane, row_threads, vectors)) {
          float w[VEC];
          load_floats<VEC>(weight + static_cast<std::int64_t>(lane + it * row_threads) * VEC, w);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float d = xs.at(it, k) - own_mu;
            const float wg = w[k] * gs.at(it, k);
            if constexpr (kRms) {
              s.v[0] += d * d;
              s.v[1] += wg * d;
            } else {
              s.v[2] += d * d;
              s.v[3] += wg;
              s.v[4] += wg * d;
            }
          }
        }
      }
    }
    s = group_merge(s, scratch, phase, row_threads);
    if (!valid) continue;
    const float mu = kRms ? 0.0f : s.v[1];
    const float rstd = rsqrtf((kRms ? s.v[0] : s.v[2]) * inv_hidden + eps);
    const float mean_wg = kRms ? 0.0f : s.v[3] * inv_hidden;
    const float mean_dot = (kRms ? s.v[1] : s.v[4]) * rstd * inv_hidden;
    T* dxr = dx + row * hidden;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (owns(it, lane, row_threads, vectors)) {
        const std::int64_t offset = static_cast<std::int64_t>(lane + it * row_threads) * VEC;
        float w[VEC], out[VEC], g[VEC], gx[VEC];
        load_floats<VEC>(weight + offset, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          g[k] = gs.at(it, k);
          const float xhat = (xs.at(it, k) - mu) * rstd;
          out[k] = rstd * (w[k] * g[k] - mean_wg - xhat * mean_dot);
          gx[k] = g[k] * xhat;
          if constexpr (!kStreamRows) {
            dw[it][k] += gx[k];
            if constexpr (!kRms) db[it][k] += g[k];
          }
        }
        store_floats<VEC>(dxr + offset, out);
        if constexpr (kStreamRows) {
          float4* a = acc + it * 4 * row_threads + lane;
          float4 w0 = a[0], w1 = a[row_threads], b0 = a[2 * row_threads], b1 = a[3 * row_threads];
          w0.x += gx[0], w0.y += gx[1], w0.z += gx[2], w0.w += gx[3];
          w1.x += gx[4], w1.y += gx[5], w1.z += gx[6], w1.w += gx[7];
          b0.x += g[0], b0.y += g[1], b0.z += g[2], b0.w += g[3];
          b1.x += g[4], b1.y += g[5], b1.z += g[6], b1.w += g[7];
          a[0] = w0, a[row_threads] = w1, a[2 * row_threads] = b0, a[3 * row_threads] = b1;
        }
      }
    }
    if constexpr (kStreamRows) {
      x_ahead = x_next;
      g_ahead = g_next;
    }
  }

  if constexpr (!kStreamRows) {
    // Groups 1.. hand their column sums to group 0, one group at a time through `fold`.
    constexpr int kSlice = kIters * VEC;
    for (int g = 1; g < rows_per_block; ++g) {
      __syncthreads();
      if (group == g) {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            fold[lane * kSlice + it * VEC + k] = dw[it][k];
            if constexpr (!kRms) fold[(row_threads + lane) * kSlice + it * VEC + k] = db[it][k];
          }
        }
      }
      __syncthreads();
      if (group == 0) {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            dw[it][k] += fold[lane * kSlice + it * VEC + k];
            if constexpr (!kRms) db[it][k] += fold[(row_threads + lane) * kSlice + it * VEC + k];
          }
        }
      }
    }
  }
  if (group != 0) return;
  const std::int64_t base = static_cast<std::int64_t>(blockIdx.x) * hidden;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (owns(it, lane, row_threads, vectors)) {
      const std::int64_t offset = base + static_cast<std::int64_t>(lane + it * row_threads) * VEC;
      if constexpr (kStreamRows) {
        const float4* a = acc + it * 4 * row_threads + lane;
        const float4 w0 = a[0], w1 = a[row_threads], b0 = a[2 * row_threads], b1 = a[3 * row_threads];
        const float sw[VEC] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
        const float sb[VEC] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
        store_floats<VEC>(dweight_partial + offset, sw);
        if (dbias_partial != nullptr) store_floats<VEC>(dbias_partial + offset, sb);
      } else {
        store_floats<VEC>(dweight_partial + offset, dw[it]);
        if (!kRms && dbias_partial != nullptr) store_floats<VEC>(dbias_partial + offset, db[it]);
      }
    }
  }
}

template <typename T, typename W, int VEC, int kIters, bool kRms>
__global__ void __launch_bounds__(kMaxRowThreads)
norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                     T* __restrict__ dx, float* __restrict__ dweight_partial, float* __restrict__ dbias_partial,
                     std::int64_t rows, std::int64_t hidden, float eps, int row_threads) {
  backward_rows<T, W, VEC, kIters, kRms, false>(dy, x, weight, dx, dweight_partial, dbias_partial, rows, hidden, eps,
                                                row_threads);
}

// Streamed rows, bounded to their own block (256 threads, 2 blocks per SM: 128 registers, as
// the measured kernel), so the compiler knows each thread's lane (threadIdx.x) and row group
// (0). Under the 512-thread bound of the other instances, which left both to run time, ptxas
// spilled the block stride for bf16 weights and reloaded it on every row (4 bytes; 0.320 ms at
// hidden 8192 on an H100 against the measured kernel's 0.306). `row_threads` is ignored.
template <typename T, typename W, int VEC, int kIters>
__global__ void __launch_bounds__(kStreamRowThreads, kStreamMinBlocks)
norm_backward_streamed_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                              T* __restrict__ dx, float* __restrict__ dweight_partial,
                              float* __restrict__ dbias_partial, std::int64_t rows, std::int64_t hidden, float eps,
                              int /*row_threads*/) {
  backward_rows<T, W, VEC, kIters, false, true>(dy, x, weight, dx, dweight_partial, dbias_partial, rows, hidden, eps,
                                                kStreamRowThreads);
}

// Dynamic shared memory of the backward kernel: the fold buffer, when rows share a block.
template <bool kRms, int VEC, int kIters>
std::size_t fold_bytes(const RowLayout& layout) {
  if (layout.rows_per_block == 1) return 0;
  return static_cast<std::size_t>(kRms ? 1 : 2) * layout.row_threads * kIters * VEC * sizeof(float);
}

// out[c] = sum of partial[r, c]: 32 columns x 32 row lanes per block, so each warp reads
// 128 contiguous bytes per row and every thread has only a few rows to add.
constexpr int kColumnLanes = 32;

// Grid row y sums partial_y into out_y: LayerNorm's dweight and dbias in one launch (0.0057 ms
// against 0.0077 ms for two at hidden 8192 over 264 partial rows on an H100).
template <typename O>
__global__ void __launch_bounds__(32 * kColumnLanes)
column_sum_kernel(const float* __restrict__ partial0, O* __restrict__ out0, const float* __restrict__ partial1,
                  O* __restrict__ out1, std::int64_t rows, std::int64_t columns) {
  __shared__ float tile[kColumnLanes][33];
  const float* __restrict__ partial = blockIdx.y == 0 ? partial0 : partial1;
  O* __restrict__ out = blockIdx.y == 0 ? out0 : out1;
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (col < columns) {
#pragma unroll 4
    for (std::int64_t r = threadIdx.y; r < rows; r += kColumnLanes) acc += __ldg(partial + r * columns + col);
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < columns) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kColumnLanes; ++i) total += tile[i][threadIdx.x];
    out[col] = from_float<O>(total);
  }
}

// column_sum of one or two (partial, out) pairs of one output dtype.
const char* launch_column_sums(Ptr partial0, Ptr out0, Ptr partial1, Ptr out1, unsigned pairs, std::int64_t rows,
                               std::int64_t columns, int out_dtype, ds_stream_t stream) {
  const dim3 block(32, kColumnLanes);
  const dim3 grid(static_cast<unsigned>((columns + 31) / 32), pairs);
  DS_DISPATCH_FLOAT(out_dtype, O,
    column_sum_kernel<O><<<grid, block, 0, stream>>>(
        reinterpret_cast<const float*>(partial0), reinterpret_cast<O*>(out0),
        reinterpret_cast<const float*>(partial1), reinterpret_cast<O*>(out1), rows, columns));
  DS_RETURN_LAUNCH_STATUS();
}

// Calls fn(Shape<VEC, kIters>{}) for the layout: one switch from run-time layout to kernel
// template for the forward, the backward and the occupancy query.
template <int VEC, int kIters>
struct Shape {
  static constexpr int kVec = VEC;
  static constexpr int kItersValue = kIters;
};

template <typename T, typename Fn>
const char* with_shape(const RowLayout& layout, Fn&& fn) {
  constexpr int V = kVec16<T>;
  if (layout.iters == 0) return "norm: hidden size above the kernel's limit";
  if (layout.vec == 1) return fn(Shape<1, kScalarIters>{});
  if (layout.vec == V / 2) return fn(Shape<V / 2, kNarrowIters>{});
  switch (layout.iters) {
    case 1: return fn(Shape<V, 1>{});
    case 2: return fn(Shape<V, 2>{});
    case 4: return fn(Shape<V, 4>{});
    case 8:
      // Only float32 rows reach eight vectors per thread below max_hidden.
      if constexpr (V == 4) return fn(Shape<V, 8>{});
      [[fallthrough]];
    default: return "norm: hidden size above the kernel's limit";
  }
}

// The kernels take a weight (and bias) of the input's type or float32; the launcher
// converts any other weight dtype to float32 (exactly) before the call.
template <typename Fn>
const char* with_types(int x_dtype, int w_dtype, Fn&& fn) {
  DS_DISPATCH_FLOAT(x_dtype, T,
    if (w_dtype == x_dtype) return fn(T{}, T{});
    if (w_dtype == kFloat32) return fn(T{}, float{});
    return "norm: the weight dtype must be the input's or float32");
  return nullptr;
}

// Whether LayerNorm's backward takes the streamed-rows kernel (kStreamRows): 16-bit rows in
// 16-byte vectors at 256 threads x 4 vectors, one row per block, i.e. hidden 4097-8192. At
// hidden 8192 (bf16, 16384 rows, column sums included) on an H100 it moved 87.2% of a copy's
// bandwidth (0.3063 ms) against 83.8% (0.3189 ms) for register accumulators without prefetch;
// 512 threads x 2 vectors with shared-memory accumulators reached only 61-67%. Shorter rows
// keep the register design (86-88% at hidden 2048 and 4096), as does RMSNorm (89-91%). HIP
// keeps it too: the 64 KB of accumulators would fill a CDNA compute unit's whole LDS.
template <typename T, int VEC, int kIters>
#if defined(DS_KERNELS_HIP)
constexpr bool kStreamRowsShape = false;
#else
constexpr bool kStreamRowsShape = sizeof(T) == 2 && VEC == 8 && kIters == 4;
#endif

bool stream_rows(bool rms, const RowLayout& layout) {
  return !rms && layout.row_threads == kStreamRowThreads && layout.rows_per_block == 1;
}

// Sets a kernel's dynamic shared memory limit on the current device once (devices 0-63;
// any other on every call): the limit belongs to the kernel as loaded on a device, and both
// norm_backward_partials and norm_backward ask for it on every backward. `configured` holds
// one bit per device and belongs to the caller's kernel instance.
template <typename Kernel>
ds_error_t allow_dynamic_smem(Kernel kernel, std::size_t bytes, std::atomic<std::uint64_t>& configured) {
  int device = 0;
  ds_error_t status = DS_GET_DEVICE(&device);
  if (status != DS_SUCCESS) return status;
  const std::uint64_t bit = device >= 0 && device < 64 ? std::uint64_t{1} << device : 0;
  if ((configured.load(std::memory_order_relaxed) & bit) != 0) return DS_SUCCESS;
  status = DS_FUNC_SET_MAX_DYNAMIC_SMEM(kernel, static_cast<int>(bytes));
  if (status == DS_SUCCESS) configured.fetch_or(bit, std::memory_order_relaxed);
  return status;
}

// The backward kernel for a layout and its dynamic shared memory: the fold buffer when rows
// share a block, the accumulators of streamed rows.
template <typename T, typename W, int VEC, int kIters>
struct BackwardLaunch {
  decltype(&norm_backward_kernel<T, W, VEC, kIters, true>) kernel;
  std::size_t smem;
};

template <typename T, typename W, int VEC, int kIters>
BackwardLaunch<T, W, VEC, kIters> backward_launch(bool rms, const RowLayout& layout, ds_error_t* status) {
  *status = DS_SUCCESS;
  if constexpr (kStreamRowsShape<T, VEC, kIters>) {
    if (stream_rows(rms, layout)) {
      const std::size_t smem = static_cast<std::size_t>(layout.row_threads) * kIters * 4 * sizeof(float4);
      auto kernel = norm_backward_streamed_kernel<T, W, VEC, kIters>;
      static std::atomic<std::uint64_t> configured{0};
      *status = allow_dynamic_smem(kernel, smem, configured);
      return {kernel, smem};
    }
  }
  if (rms) return {norm_backward_kernel<T, W, VEC, kIters, true>, fold_bytes<true, VEC, kIters>(layout)};
  return {norm_backward_kernel<T, W, VEC, kIters, false>, fold_bytes<false, VEC, kIters>(layout)};
}

// Blocks of the persistent backward grid: as many as are resident at once, at most one per
// tile of rows.
template <typename T, typename W, int VEC, int kIters>
const char* backward_grid(bool rms, const RowLayout& layout, std::int64_t rows, int* grid) {
  ds_error_t status = DS_SUCCESS;
  const auto launch = backward_launch<T, W, VEC, kIters>(rms, layout, &status);
  int resident = 0;
  if (status != DS_SUCCESS ||
      resident_blocks(launch.kernel, layout.block_threads(), launch.smem, &resident) != DS_SUCCESS) {
    DS_RETURN_LAUNCH_STATUS();
  }
  const std::int64_t tiles = (rows + layout.rows_per_block - 1) / layout.rows_per_block;
  *grid = static_cast<int>(tiles < resident ? (tiles > 0 ? tiles : 1) : resident);
  return nullptr;
}

}  // namespace

std::int64_t norm_max_hidden(bool vectorized) { return max_hidden(vectorized); }

const char* norm_backward_partials(std::int64_t rows, std::int64_t hidden, bool rms, int x_dtype,
                                   int w_dtype, int* partials) {
  return with_types(x_dtype, w_dtype, [&](auto x_tag, auto w_tag) -> const char* {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    // The launcher makes every base 16-byte aligned, so sizes alone decide the layout.
    const RowLayout layout = norm_layout<T, W>(hidden, {}, {}, {});
    return with_shape<T>(layout, [&](auto shape) -> const char* {
      using S = decltype(shape);
      return backward_grid<T, W, S::kVec, S::kItersValue>(rms, layout, rows, partials);
    });
  });
}

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

const char* norm_backward(Ptr dy, Ptr x, Ptr weight, Ptr dx, Ptr dweight_partial,
                          Ptr dbias_partial, std::int64_t rows, std::int64_t hidden, float eps,
                          bool rms, int num_partials, int x_dtype, int w_dtype,
                          std::uintptr_t stream_handle) {
  if (num_partials <= 0) return "norm_backward: num_partials must be positive";
  const ds_stream_t stream = as_stream(stream_handle);
  return with_types(x_dtype, w_dtype, [&](auto x_tag, auto w_tag) -> const char* {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    const RowLayout layout =
        norm_layout<T, W>(hidden, {dy, x, dx}, {weight}, {dweight_partial, dbias_partial});
    return with_shape<T>(layout, [&](auto shape) -> const char* {
      using S = decltype(shape);
      ds_error_t status = DS_SUCCESS;
      const auto launch = backward_launch<T, W, S::kVec, S::kItersValue>(rms, layout, &status);
      if (status != DS_SUCCESS) DS_RETURN_LAUNCH_STATUS();
      launch.kernel<<<num_partials, layout.block_threads(), launch.smem, stream>>>(
          reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x), reinterpret_cast<const W*>(weight),
          reinterpret_cast<T*>(dx), reinterpret_cast<float*>(dweight_partial),
          reinterpret_cast<float*>(dbias_partial), rows, hidden, eps, layout.row_threads);
      DS_RETURN_LAUNCH_STATUS();
    });
  });
}

const char* column_sum(Ptr partial, Ptr out, std::int64_t rows, std::int64_t columns,
                       int out_dtype, std::uintptr_t stream_handle) {
  if (columns == 0) return nullptr;
  return launch_column_sums(partial, out, 0, 0, 1, rows, columns, out_dtype, as_stream(stream_handle));
}

const char* column_sum2(Ptr partial0, Ptr out0, int out0_dtype, Ptr partial1, Ptr out1, int out1_dtype,
                        std::int64_t rows, std::int64_t columns, std::uintptr_t stream_handle) {
  if (columns == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  if (out0_dtype == out1_dtype) return launch_column_sums(partial0, out0, partial1, out1, 2, rows, columns, out0_dtype, stream);
  if (const char* error = launch_column_sums(partial0, out0, 0, 0, 1, rows, columns, out0_dtype, stream)) return error;
  return launch_column_sums(partial1, out1, 0, 0, 1, rows, columns, out1_dtype, stream);
}

}  // namespace ds
