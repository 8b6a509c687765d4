// Fused RMSNorm and LayerNorm over the last dimension, forward and backward.
//
// A block owns a row and keeps it in registers (kFloatsPerThread floats per thread), so x
// is read from memory once, the statistics come from block sums, and the output is written
// once. The backward pass recomputes mean/rstd from x (a block sum costs no memory
// traffic), re-reads dy from cache for its second pass, and accumulates dweight/dbias per
// block in shared memory (laid out [element k of a vector][vector], so a warp's accesses hit
// distinct banks) over a persistent loop of rows; column_sum folds those partials. Keeping
// the accumulators out of registers lets twice as many threads stay resident.
#include "dtypes.h"
#include "kernels.h"
#include "reduce.h"

namespace ds {
namespace {

constexpr int kNormMaxThreads = 512;
// Row elements a thread keeps in registers: 32 with 16-byte accesses; the scalar path
// (odd hidden sizes) keeps 16, since its per-element addressing costs registers too.
template <int VEC>
constexpr int kFloatsPerThread = VEC == 1 ? 16 : 32;

constexpr std::int64_t max_hidden(bool vectorized) {
  return static_cast<std::int64_t>(kNormMaxThreads) * (vectorized ? kFloatsPerThread<4> : kFloatsPerThread<1>);
}

int norm_threads(std::int64_t hidden, int vec) {
  const std::int64_t vectors = hidden / vec;
  const std::int64_t capacity = (vec == 1 ? kFloatsPerThread<1> : kFloatsPerThread<4>) / vec;
  // About four vectors per thread: enough loads in flight per thread, and blocks small
  // enough that many rows are in flight per multiprocessor.
  const std::int64_t per_thread = capacity < 4 ? capacity : 4;
  std::int64_t threads = (vectors + per_thread - 1) / per_thread;
  threads = ((threads + DS_WARP_SIZE - 1) / DS_WARP_SIZE) * DS_WARP_SIZE;
  if (threads < DS_WARP_SIZE) threads = DS_WARP_SIZE;
  if (threads > kNormMaxThreads) threads = kNormMaxThreads;
  return static_cast<int>(threads);
}

template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* base, int vec_index, float (&out)[VEC]) {
  load_floats<VEC>(base + static_cast<std::int64_t>(vec_index) * VEC, out);
}

template <typename T, typename W, int VEC, bool kRms>
__global__ void __launch_bounds__(kNormMaxThreads)
norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight,
                    const W* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean_out,
                    float* __restrict__ rstd_out, std::int64_t hidden, float eps) {
  constexpr int kIters = kFloatsPerThread<VEC> / VEC;
  __shared__ float scratch[32];
  const std::int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;
  const int vectors = static_cast<int>(hidden / VEC);

  float v[kIters][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int vi = threadIdx.x + it * blockDim.x;
    if (vi < vectors) {
      load_vec<VEC>(xr, vi, v[it]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += v[it][k];
    }
  }
  const float inv_hidden = 1.0f / static_cast<float>(hidden);
  const float mu = kRms ? 0.0f : block_sum(sum, scratch) * inv_hidden;
  float squares = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int vi = threadIdx.x + it * blockDim.x;
    if (vi < vectors) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = v[it][k] - mu;
        squares += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(squares, scratch) * inv_hidden + eps);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int vi = threadIdx.x + it * blockDim.x;
    if (vi < vectors) {
      float w[VEC], out[VEC];
      load_vec<VEC>(weight, vi, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = (v[it][k] - mu) * rstd * w[k];
      if (!kRms && bias != nullptr) {
        float b[VEC];
        load_vec<VEC>(bias, vi, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] += b[k];
      }
      store_floats<VEC>(yr + static_cast<std::int64_t>(vi) * VEC, out);
    }
  }
  if (threadIdx.x == 0) {
    if (mean_out != nullptr) mean_out[row] = mu;
    if (rstd_out != nullptr) rstd_out[row] = rstd;
  }
}

template <typename T, typename W, int VEC, bool kRms>
__global__ void __launch_bounds__(kNormMaxThreads)
norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                     const W* __restrict__ weight, T* __restrict__ dx,
                     float* __restrict__ dweight_partial, float* __restrict__ dbias_partial,
                     std::int64_t rows, std::int64_t hidden, float eps) {
  constexpr int kIters = kFloatsPerThread<VEC> / VEC;
  __shared__ float scratch[32];
  extern __shared__ float accumulators[];  // dweight[VEC][vectors], then dbias (LayerNorm)
  const int vectors = static_cast<int>(hidden / VEC);
  const float inv_hidden = 1.0f / static_cast<float>(hidden);
  float* dw = accumulators;
  float* db = accumulators + hidden;
  // Each thread only ever touches the slots of its own vectors: no barrier needed.
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int vi = threadIdx.x + it * blockDim.x;
    if (vi < vectors) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        dw[k * vectors + vi] = 0.0f;
        if (!kRms) db[k * vectors + vi] = 0.0f;
      }
    }
  }

  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    float xhat[kIters][VEC];
    float sum = 0.0f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int vi = threadIdx.x + it * blockDim.x;
      if (vi < vectors) {
        load_vec<VEC>(xr, vi, xhat[it]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += xhat[it][k];
      }
    }
    const float mu = kRms ? 0.0f : block_sum(sum, scratch) * inv_hidden;
    float squares = 0.0f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int vi = threadIdx.x + it * blockDim.x;
      if (vi < vectors) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xhat[it][k] -= mu;
          squares += xhat[it][k] * xhat[it][k];
        }
      }
    }
    const float rstd = rsqrtf(block_sum(squares, scratch) * inv_hidden + eps);
    // First pass over dy: the two row sums of the gradient formula.
    float dot = 0.0f, gsum = 0.0f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int vi = threadIdx.x + it * blockDim.x;
      if (vi < vectors) {
        float g[VEC], w[VEC];
        load_vec<VEC>(dyr, vi, g);
        load_vec<VEC>(weight, vi, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xhat[it][k] *= rstd;
          const float wg = w[k] * g[k];
          dot += wg * xhat[it][k];
          gsum += wg;
          dw[k * vectors + vi] += g[k] * xhat[it][k];
          if (!kRms) db[k * vectors + vi] += g[k];
        }
      }
    }
    const float mean_dot = block_sum(dot, scratch) * inv_hidden;
    const float mean_g = kRms ? 0.0f : block_sum(gsum, scratch) * inv_hidden;
    // Second pass: dy again (a cache hit), write dx.
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int vi = threadIdx.x + it * blockDim.x;
      if (vi < vectors) {
        float g[VEC], w[VEC], out[VEC];
        load_vec<VEC>(dyr, vi, g);
        load_vec<VEC>(weight, vi, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out[k] = rstd * (w[k] * g[k] - mean_g - xhat[it][k] * mean_dot);
        }
        store_floats<VEC>(dx + row * hidden + static_cast<std::int64_t>(vi) * VEC, out);
      }
    }
  }

  float* dw_row = dweight_partial + static_cast<std::int64_t>(blockIdx.x) * hidden;
  float* db_row = dbias_partial == nullptr ? nullptr
                                           : dbias_partial + static_cast<std::int64_t>(blockIdx.x) * hidden;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int vi = threadIdx.x + it * blockDim.x;
    if (vi < vectors) {
      float out[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = dw[k * vectors + vi];
      store_floats<VEC>(dw_row + static_cast<std::int64_t>(vi) * VEC, out);
      if (!kRms && db_row != nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = db[k * vectors + vi];
        store_floats<VEC>(db_row + static_cast<std::int64_t>(vi) * VEC, out);
      }
    }
  }
}

// 32 columns x 8 row lanes per block; the 8 lanes' sums meet in shared memory.
template <typename O>
__global__ void __launch_bounds__(256)
column_sum_kernel(const float* __restrict__ partial, O* __restrict__ out, std::int64_t rows,
                  std::int64_t columns) {
  __shared__ float tile[8][33];
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (col < columns) {
    for (std::int64_t r = threadIdx.y; r < rows; r += 8) acc += partial[r * columns + col];
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < columns) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) total += tile[i][threadIdx.x];
    out[col] = from_float<O>(total);
  }
}

template <typename T, typename W, bool kRms>
const char* launch_forward(const T* x, const W* w, const W* b, T* y, float* mean, float* rstd,
                           std::int64_t rows, std::int64_t hidden, float eps, bool vectorized,
                           ds_stream_t stream) {
  if (vectorized) {
    constexpr int V = kVec16<T>;
    norm_forward_kernel<T, W, V, kRms><<<static_cast<unsigned>(rows), norm_threads(hidden, V), 0, stream>>>(
        x, w, b, y, mean, rstd, hidden, eps);
  } else {
    norm_forward_kernel<T, W, 1, kRms><<<static_cast<unsigned>(rows), norm_threads(hidden, 1), 0, stream>>>(
        x, w, b, y, mean, rstd, hidden, eps);
  }
  DS_RETURN_LAUNCH_STATUS();
}

std::size_t backward_smem(std::int64_t hidden, bool rms) {
  return static_cast<std::size_t>(hidden) * sizeof(float) * (rms ? 1 : 2);
}

template <typename T, typename W, int VEC, bool kRms>
auto backward_kernel() {
  return norm_backward_kernel<T, W, VEC, kRms>;
}

// Raises the kernel's dynamic shared-memory limit when the accumulators need more than the
// default 48 KiB, then reports how many blocks fit on a multiprocessor.
template <typename Kernel>
ds_error_t prepare_backward(Kernel kernel, int threads, std::size_t smem, int* blocks_per_sm) {
  ds_error_t status = DS_FUNC_SET_MAX_DYNAMIC_SMEM(kernel, static_cast<int>(smem));
  if (status != DS_SUCCESS) return status;
  return DS_OCCUPANCY_BLOCKS_PER_SM(blocks_per_sm, kernel, threads, smem);
}

template <typename T, typename W, bool kRms>
const char* launch_backward(const T* dy, const T* x, const W* w, T* dx, float* dw, float* db,
                            std::int64_t rows, std::int64_t hidden, float eps, int partials,
                            bool vectorized, ds_stream_t stream) {
  const std::size_t smem = backward_smem(hidden, kRms);
  int blocks_per_sm = 0;
  if (vectorized) {
    constexpr int V = kVec16<T>;
    auto kernel = backward_kernel<T, W, V, kRms>();
    const int threads = norm_threads(hidden, V);
    if (prepare_backward(kernel, threads, smem, &blocks_per_sm) != DS_SUCCESS) DS_RETURN_LAUNCH_STATUS();
    kernel<<<partials, threads, smem, stream>>>(dy, x, w, dx, dw, db, rows, hidden, eps);
  } else {
    auto kernel = backward_kernel<T, W, 1, kRms>();
    const int threads = norm_threads(hidden, 1);
    if (prepare_backward(kernel, threads, smem, &blocks_per_sm) != DS_SUCCESS) DS_RETURN_LAUNCH_STATUS();
    kernel<<<partials, threads, smem, stream>>>(dy, x, w, dx, dw, db, rows, hidden, eps);
  }
  DS_RETURN_LAUNCH_STATUS();
}

template <typename T, typename W, bool kRms>
const char* backward_occupancy(std::int64_t hidden, bool vectorized, int* blocks_per_sm) {
  const std::size_t smem = backward_smem(hidden, kRms);
  ds_error_t status;
  if (vectorized) {
    constexpr int V = kVec16<T>;
    status = prepare_backward(backward_kernel<T, W, V, kRms>(), norm_threads(hidden, V), smem, blocks_per_sm);
  } else {
    status = prepare_backward(backward_kernel<T, W, 1, kRms>(), norm_threads(hidden, 1), smem, blocks_per_sm);
  }
  return status == DS_SUCCESS ? nullptr : DS_ERROR_STRING(status);
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
  int blocks_per_sm = 0, device = 0, multiprocessors = 0;
  const char* error = nullptr;
  DS_DISPATCH_FLOAT(x_dtype, T,
    DS_DISPATCH_FLOAT(w_dtype, W,
      // The launcher makes every base 16-byte aligned, so sizes alone decide the path.
      const bool vec = hidden % kVec16<T> == 0 && hidden % kVec16<W> == 0 && hidden % kVec16<float> == 0;
      error = rms ? backward_occupancy<T, W, true>(hidden, vec, &blocks_per_sm)
                  : backward_occupancy<T, W, false>(hidden, vec, &blocks_per_sm)));
  if (error != nullptr) return error;
  if (DS_GET_DEVICE(&device) != DS_SUCCESS ||
      DS_DEVICE_MULTIPROCESSORS(&multiprocessors, device) != DS_SUCCESS) {
    DS_RETURN_LAUNCH_STATUS();
  }
  const std::int64_t resident = static_cast<std::int64_t>(blocks_per_sm > 0 ? blocks_per_sm : 1) * multiprocessors;
  *partials = static_cast<int>(rows < resident ? (rows > 0 ? rows : 1) : resident);
  return nullptr;
}

const char* norm_forward(Ptr x, Ptr weight, Ptr bias, Ptr y, Ptr mean, Ptr rstd,
                         std::int64_t rows, std::int64_t hidden, float eps, bool rms,
                         int x_dtype, int w_dtype, std::uintptr_t stream_handle) {
  if (rows == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  DS_DISPATCH_FLOAT(x_dtype, T,
    DS_DISPATCH_FLOAT(w_dtype, W,
      const bool vec = can_vectorize<T>(hidden, {x, y}) && can_vectorize<W>(hidden, {weight, bias});
      if (hidden > max_hidden(vec)) return "norm_forward: hidden size above the kernel's limit";
      auto* xp = reinterpret_cast<const T*>(x);
      auto* wp = reinterpret_cast<const W*>(weight);
      auto* bp = reinterpret_cast<const W*>(bias);
      auto* yp = reinterpret_cast<T*>(y);
      auto* mp = reinterpret_cast<float*>(mean);
      auto* rp = reinterpret_cast<float*>(rstd);
      return rms ? launch_forward<T, W, true>(xp, wp, bp, yp, mp, rp, rows, hidden, eps, vec, stream)
                 : launch_forward<T, W, false>(xp, wp, bp, yp, mp, rp, rows, hidden, eps, vec, stream)));
  return nullptr;
}

const char* norm_backward(Ptr dy, Ptr x, Ptr weight, Ptr dx, Ptr dweight_partial,
                          Ptr dbias_partial, std::int64_t rows, std::int64_t hidden, float eps,
                          bool rms, int num_partials, int x_dtype, int w_dtype,
                          std::uintptr_t stream_handle) {
  if (num_partials <= 0) return "norm_backward: num_partials must be positive";
  const ds_stream_t stream = as_stream(stream_handle);
  DS_DISPATCH_FLOAT(x_dtype, T,
    DS_DISPATCH_FLOAT(w_dtype, W,
      const bool vec = can_vectorize<T>(hidden, {dy, x, dx}) && can_vectorize<W>(hidden, {weight}) &&
                       can_vectorize<float>(hidden, {dweight_partial, dbias_partial});
      if (hidden > max_hidden(vec)) return "norm_backward: hidden size above the kernel's limit";
      auto* dyp = reinterpret_cast<const T*>(dy);
      auto* xp = reinterpret_cast<const T*>(x);
      auto* wp = reinterpret_cast<const W*>(weight);
      auto* dxp = reinterpret_cast<T*>(dx);
      auto* dwp = reinterpret_cast<float*>(dweight_partial);
      auto* dbp = reinterpret_cast<float*>(dbias_partial);
      return rms ? launch_backward<T, W, true>(dyp, xp, wp, dxp, dwp, dbp, rows, hidden, eps, num_partials, vec, stream)
                 : launch_backward<T, W, false>(dyp, xp, wp, dxp, dwp, dbp, rows, hidden, eps, num_partials, vec, stream)));
  return nullptr;
}

const char* column_sum(Ptr partial, Ptr out, std::int64_t rows, std::int64_t columns,
                       int out_dtype, std::uintptr_t stream_handle) {
  if (columns == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((columns + 31) / 32));
  DS_DISPATCH_FLOAT(out_dtype, O,
    column_sum_kernel<O><<<grid, block, 0, stream>>>(reinterpret_cast<const float*>(partial),
                                                    reinterpret_cast<O*>(out), rows, columns));
  DS_RETURN_LAUNCH_STATUS();
}

}  // namespace ds
