// Fused RMSNorm and LayerNorm over the last dimension, forward and backward.
//
// A block of G threads (a power of two, at least one warp) owns one row at a time and walks
// rows blockIdx.x, blockIdx.x + gridDim.x, ... of a persistent grid that exactly fills the
// GPU. Each thread keeps kIters vectors of the row in registers, packed in the input type,
// so x (and dy) are read from memory once and every statistic is a register reduction.
// Memory latency is hidden without relying on occupancy: while a block reduces and writes
// one row, the loads of its next row are already in flight (up to kForwardIters /
// kBackwardIters vectors per thread; longer rows would run out of registers).
//
// Weight and bias come from L1 at each use (held in registers they would cost a quarter of
// the occupancy once the compiler hoists their conversion out of the row loop). The
// backward pass issues x and dy together, derives both of its row sums from one reduction
// (two for LayerNorm, whose variance is taken about the mean), and accumulates dweight and
// dbias for its columns in registers across its rows; each block writes one [hidden]
// float32 partial row, and column_sum folds those few hundred partial rows.
#include "dtypes.h"
#include "kernels.h"
#include "reduce.h"

namespace ds {
namespace {

constexpr int kMaxGroup = 512;          // threads per row, and per block
constexpr int kMaxIters = 8;            // 16-byte vectors per thread
constexpr int kScalarIters = 16;        // elements per thread on the unaligned path
// Preferred vectors per thread, and the most with which a kernel still prefetches the next
// row: the forward holds one tensor, the backward two plus its accumulators.
constexpr int kForwardIters = 4;
constexpr int kBackwardIters = 2;
constexpr int kScratchWarps = kMaxGroup / DS_WARP_SIZE;

constexpr std::int64_t max_hidden(bool vectorized) {
  // 16-byte vectors of float32 are the shortest: 4 elements.
  return static_cast<std::int64_t>(kMaxGroup) * (vectorized ? kMaxIters * 4 : kScalarIters);
}

// Threads per row and vectors per thread for a row of `vectors` vectors: the smallest
// power-of-two group that gives each thread at most `preferred_iters` vectors, then as
// many vectors per thread as the row needs at that group size.
struct RowLayout {
  int threads;
  int iters;
};

RowLayout row_layout(std::int64_t vectors, int preferred_iters) {
  int threads = DS_WARP_SIZE;
  while (threads < kMaxGroup && static_cast<std::int64_t>(threads) * preferred_iters < vectors) threads *= 2;
  int iters = 1;
  while (static_cast<std::int64_t>(threads) * iters < vectors) iters *= 2;
  return {threads, iters};
}

// The part of a row one thread holds: vector `it` is vector threadIdx.x + it * blockDim.x.
template <typename T, int VEC, int kIters>
struct RowSlice {
  Vec<T, VEC> v[kIters];

  __device__ __forceinline__ void load(const T* __restrict__ row, int vectors) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int vi = threadIdx.x + it * blockDim.x;
      if (vi < vectors) v[it] = load_vec_nc<VEC>(row + static_cast<std::int64_t>(vi) * VEC);
    }
  }
  __device__ __forceinline__ float at(int it, int k) const { return to_float(v[it].v[k]); }
};

__device__ __forceinline__ bool owns(int it, int vectors) {
  return static_cast<int>(threadIdx.x) + it * static_cast<int>(blockDim.x) < vectors;
}

// Sums N values over the block, the same total in every thread (all add the warps' sums in
// one order). Two scratch buffers alternate so that a warp already at its next reduction
// never overwrites values a slower warp has yet to read: one barrier per reduction.
template <int N>
__device__ __forceinline__ void row_sums(float (&v)[N], float (*scratch)[N], int& phase) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  const int warps = static_cast<int>(blockDim.x) / DS_WARP_SIZE;
  if (warps == 1) return;
  float (*buffer)[N] = scratch + phase * kScratchWarps;
  phase ^= 1;
  if (threadIdx.x % DS_WARP_SIZE == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) buffer[threadIdx.x / DS_WARP_SIZE][i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = 0.0f;
  for (int w = 0; w < warps; ++w) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += buffer[w][i];
  }
}

template <typename T, typename W, int VEC, int kIters, bool kRms>
__global__ void __launch_bounds__(kMaxGroup)
norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight,
                    const W* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean_out,
                    float* __restrict__ rstd_out, std::int64_t rows, std::int64_t hidden, float eps) {
  constexpr bool kPrefetch = kIters <= kForwardIters;
  __shared__ float scratch[2 * kScratchWarps][1];
  int phase = 0;
  const int vectors = static_cast<int>(hidden / VEC);
  const float inv_hidden = 1.0f / static_cast<float>(hidden);
  const bool has_bias = !kRms && bias != nullptr;
  RowSlice<T, VEC, kIters> cur, next;
  std::int64_t row = blockIdx.x;
  if constexpr (kPrefetch) {
    if (row < rows) cur.load(x + row * hidden, vectors);
  }
  for (; row < rows; row += gridDim.x) {
    if constexpr (kPrefetch) {
      const std::int64_t following = row + gridDim.x;
      if (following < rows) next.load(x + following * hidden, vectors);
    } else {
      cur.load(x + row * hidden, vectors);
    }
    float mu = 0.0f;
    if constexpr (!kRms) {
      float sum[1] = {0.0f};
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (owns(it, vectors)) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) sum[0] += cur.at(it, k);
        }
      }
      row_sums(sum, scratch, phase);
      mu = sum[0] * inv_hidden;
    }
    float squares[1] = {0.0f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (owns(it, vectors)) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = cur.at(it, k) - mu;
          squares[0] += d * d;
        }
      }
    }
    row_sums(squares, scratch, phase);
    const float rstd = rsqrtf(squares[0] * inv_hidden + eps);
    T* yr = y + row * hidden;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (owns(it, vectors)) {
        const std::int64_t offset = static_cast<std::int64_t>(threadIdx.x + it * blockDim.x) * VEC;
        float w[VEC], out[VEC];
        load_floats<VEC>(weight + offset, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = (cur.at(it, k) - mu) * rstd * w[k];
        if (has_bias) {
          float b[VEC];
          load_floats<VEC>(bias + offset, b);
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] += b[k];
        }
        store_floats<VEC>(yr + offset, out);
      }
    }
    if (threadIdx.x == 0) {
      if (mean_out != nullptr) mean_out[row] = mu;
      if (rstd_out != nullptr) rstd_out[row] = rstd;
    }
    if constexpr (kPrefetch) cur = next;
  }
}

// dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)), where the mean(w*dy) term is
// LayerNorm's only; dweight += dy * xhat and dbias += dy over the block's rows.
template <typename T, typename W, int VEC, int kIters, bool kRms>
__global__ void __launch_bounds__(kMaxGroup)
norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                     const W* __restrict__ weight, T* __restrict__ dx,
                     float* __restrict__ dweight_partial, float* __restrict__ dbias_partial,
                     std::int64_t rows, std::int64_t hidden, float eps) {
  constexpr bool kPrefetch = kIters <= kBackwardIters;
  __shared__ float scratch[2 * kScratchWarps][2];
  int phase = 0;
  const int vectors = static_cast<int>(hidden / VEC);
  const float inv_hidden = 1.0f / static_cast<float>(hidden);
  float dw[kIters][VEC], db[kIters][VEC];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[it][k] = db[it][k] = 0.0f;
  }

  RowSlice<T, VEC, kIters> xs, gs, x_next, g_next;
  std::int64_t row = blockIdx.x;
  if constexpr (kPrefetch) {
    if (row < rows) {
      xs.load(x + row * hidden, vectors);
      gs.load(dy + row * hidden, vectors);
    }
  }
  for (; row < rows; row += gridDim.x) {
    if constexpr (kPrefetch) {
      const std::int64_t following = row + gridDim.x;
      if (following < rows) {
        x_next.load(x + following * hidden, vectors);
        g_next.load(dy + following * hidden, vectors);
      }
    } else {
      xs.load(x + row * hidden, vectors);
      gs.load(dy + row * hidden, vectors);
    }
    RowSlice<W, VEC, kIters> w;  // an L1 hit: every block reads the same weight
    w.load(weight, vectors);
    float mu = 0.0f, mean_wg = 0.0f;
    if constexpr (!kRms) {
      float sums[2] = {0.0f, 0.0f};  // x, w*dy
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (owns(it, vectors)) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            sums[0] += xs.at(it, k);
            sums[1] += w.at(it, k) * gs.at(it, k);
          }
        }
      }
      row_sums(sums, scratch, phase);
      mu = sums[0] * inv_hidden;
      mean_wg = sums[1] * inv_hidden;
    }
    float sums[2] = {0.0f, 0.0f};  // (x - mu)^2, w*dy*(x - mu)
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (owns(it, vectors)) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = xs.at(it, k) - mu;
          sums[0] += d * d;
          sums[1] += w.at(it, k) * gs.at(it, k) * d;
        }
      }
    }
    row_sums(sums, scratch, phase);
    const float rstd = rsqrtf(sums[0] * inv_hidden + eps);
    const float mean_dot = sums[1] * rstd * inv_hidden;
    T* dxr = dx + row * hidden;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (owns(it, vectors)) {
        float out[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float g = gs.at(it, k);
          const float xhat = (xs.at(it, k) - mu) * rstd;
          out[k] = rstd * (w.at(it, k) * g - mean_wg - xhat * mean_dot);
          dw[it][k] += g * xhat;
          if (!kRms) db[it][k] += g;
        }
        store_floats<VEC>(dxr + static_cast<std::int64_t>(threadIdx.x + it * blockDim.x) * VEC, out);
      }
    }
    if constexpr (kPrefetch) {
      xs = x_next;
      gs = g_next;
    }
  }

  float* dw_row = dweight_partial + static_cast<std::int64_t>(blockIdx.x) * hidden;
  float* db_row =
      kRms || dbias_partial == nullptr ? nullptr : dbias_partial + static_cast<std::int64_t>(blockIdx.x) * hidden;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (owns(it, vectors)) {
      const std::int64_t offset = static_cast<std::int64_t>(threadIdx.x + it * blockDim.x) * VEC;
      store_floats<VEC>(dw_row + offset, dw[it]);
      if (db_row != nullptr) store_floats<VEC>(db_row + offset, db[it]);
    }
  }
}

// out[c] = sum of partial[r, c]: 32 columns x 32 row lanes per block, so each warp reads
// 128 contiguous bytes per row and every thread has only a few rows to add.
constexpr int kColumnLanes = 32;

template <typename O>
__global__ void __launch_bounds__(32 * kColumnLanes)
column_sum_kernel(const float* __restrict__ partial, O* __restrict__ out, std::int64_t rows,
                  std::int64_t columns) {
  __shared__ float tile[kColumnLanes][33];
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

// Launch shapes, shared by the launchers and norm_backward_partials so that the number of
// partial rows the caller allocates is the grid the backward kernel runs.
struct NormConfig {
  bool vectorized;
  RowLayout layout;
};

template <typename T>
NormConfig norm_config(std::int64_t hidden, bool vectorized, int preferred_iters) {
  if (vectorized) return {true, row_layout(hidden / kVec16<T>, preferred_iters)};
  RowLayout layout = row_layout(hidden, kScalarIters);
  layout.iters = kScalarIters;
  return {false, layout};
}

// Calls fn(Shape<VEC, kIters>{}) for the config: one switch from run-time layout to kernel
// template for the forward, the backward and the occupancy query.
template <int VEC, int kIters>
struct Shape {
  static constexpr int kVec = VEC;
  static constexpr int kItersValue = kIters;
};

template <typename T, typename Fn>
const char* with_shape(const NormConfig& config, Fn&& fn) {
  constexpr int V = kVec16<T>;
  if (!config.vectorized) return fn(Shape<1, kScalarIters>{});
  switch (config.layout.iters) {
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

template <typename Kernel>
const char* persistent_grid(Kernel kernel, int threads, std::int64_t rows, int* grid) {
  int resident = 0;
  if (resident_blocks(kernel, threads, 0, &resident) != DS_SUCCESS) DS_RETURN_LAUNCH_STATUS();
  *grid = static_cast<int>(rows < resident ? (rows > 0 ? rows : 1) : resident);
  return nullptr;
}

// Vector accesses need every row start aligned, hence hidden % VEC as well as the bases.
template <typename T>
bool can_vectorize(std::int64_t hidden, std::initializer_list<Ptr> ptrs) {
  if (hidden % kVec16<T> != 0) return false;
  for (Ptr p : ptrs) {
    if (p != 0 && !aligned16(p)) return false;
  }
  return true;
}

}  // namespace

std::int64_t norm_max_hidden(bool vectorized) { return max_hidden(vectorized); }

const char* norm_backward_partials(std::int64_t rows, std::int64_t hidden, bool rms, int x_dtype,
                                   int w_dtype, int* partials) {
  return with_types(x_dtype, w_dtype, [&](auto x_tag, auto w_tag) -> const char* {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    // The launcher makes every base 16-byte aligned, so sizes alone decide the path.
    const bool vec = hidden % kVec16<T> == 0 && hidden % kVec16<W> == 0;
    const NormConfig config = norm_config<T>(hidden, vec, kBackwardIters);
    return with_shape<T>(config, [&](auto shape) -> const char* {
      using S = decltype(shape);
      auto kernel = rms ? norm_backward_kernel<T, W, S::kVec, S::kItersValue, true>
                        : norm_backward_kernel<T, W, S::kVec, S::kItersValue, false>;
      return persistent_grid(kernel, config.layout.threads, rows, partials);
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
    const bool vec = can_vectorize<T>(hidden, {x, y}) && can_vectorize<W>(hidden, {weight, bias});
    if (hidden > max_hidden(vec)) return "norm_forward: hidden size above the kernel's limit";
    const NormConfig config = norm_config<T>(hidden, vec, kForwardIters);
    return with_shape<T>(config, [&](auto shape) -> const char* {
      using S = decltype(shape);
      auto kernel = rms ? norm_forward_kernel<T, W, S::kVec, S::kItersValue, true>
                        : norm_forward_kernel<T, W, S::kVec, S::kItersValue, false>;
      int grid = 0;
      if (const char* error = persistent_grid(kernel, config.layout.threads, rows, &grid)) return error;
      kernel<<<grid, config.layout.threads, 0, stream>>>(
          reinterpret_cast<const T*>(x), reinterpret_cast<const W*>(weight), reinterpret_cast<const W*>(bias),
          reinterpret_cast<T*>(y), reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd), rows, hidden,
          eps);
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
    const bool vec = can_vectorize<T>(hidden, {dy, x, dx}) && can_vectorize<W>(hidden, {weight}) &&
                     can_vectorize<float>(hidden, {dweight_partial, dbias_partial});
    if (hidden > max_hidden(vec)) return "norm_backward: hidden size above the kernel's limit";
    const NormConfig config = norm_config<T>(hidden, vec, kBackwardIters);
    return with_shape<T>(config, [&](auto shape) -> const char* {
      using S = decltype(shape);
      auto kernel = rms ? norm_backward_kernel<T, W, S::kVec, S::kItersValue, true>
                        : norm_backward_kernel<T, W, S::kVec, S::kItersValue, false>;
      kernel<<<num_partials, config.layout.threads, 0, stream>>>(
          reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x), reinterpret_cast<const W*>(weight),
          reinterpret_cast<T*>(dx), reinterpret_cast<float*>(dweight_partial),
          reinterpret_cast<float*>(dbias_partial), rows, hidden, eps);
      DS_RETURN_LAUNCH_STATUS();
    });
  });
}

const char* column_sum(Ptr partial, Ptr out, std::int64_t rows, std::int64_t columns,
                       int out_dtype, std::uintptr_t stream_handle) {
  if (columns == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  const dim3 block(32, kColumnLanes);
  const dim3 grid(static_cast<unsigned>((columns + 31) / 32));
  DS_DISPATCH_FLOAT(out_dtype, O,
    column_sum_kernel<O><<<grid, block, 0, stream>>>(reinterpret_cast<const float*>(partial),
                                                    reinterpret_cast<O*>(out), rows, columns));
  DS_RETURN_LAUNCH_STATUS();
}

}  // namespace ds
