// Fused RMSNorm and LayerNorm over the last dimension: the backward, and the column sums that
// fold its partial dweight/dbias rows (the forward is norms.cu; rows are spread over threads as
// norm_layout.h says, and held and reduced as norm_rows.h says).
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
#include <atomic>
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
using norm::norm_layout;
using norm::own_mean;
using norm::owns;
using norm::RowLayout;
using norm::RowMoments;
using norm::RowSlice;
using norm::RowSums;
using norm::with_shape;
using norm::with_types;
using norm::kStreamMinBlocks;
using norm::kStreamRowThreads;

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
