// Block-wise int8/int4 quantisation and dequantisation (symmetric and asymmetric).
//
// Every thread owns 16 consecutive elements, so a group of G elements is G/16 neighbouring
// lanes of one warp and its absmax or min/max is a few shuffles; x is read once, codes
// and the per-group scale/offset written once. Sixteen elements are two 16-byte accesses
// of a 16-bit input (both in flight at once), 16 bytes of int8 codes or 8 of packed int4.
#include "dtypes.h"
#include "kernels.h"
#include "reduce.h"

namespace ds {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;

struct QuantSpec {
  int bits;
  bool symmetric;
  __device__ float qmax() const {
    return symmetric ? static_cast<float>((1 << (bits - 1)) - 1) : static_cast<float>((1 << bits) - 1);
  }
};

template <typename T>
__device__ __forceinline__ void load_chunk(const T* x, std::int64_t start, std::int64_t numel,
                                      bool vectorized, float (&v)[kPerThread]) {
  if (vectorized && start + kPerThread <= numel) {
    constexpr int V = kVec16<T>;
#pragma unroll
    for (int j = 0; j < kPerThread; j += V) {
      float part[V];
      load_floats<V>(x + start + j, part);
#pragma unroll
      for (int k = 0; k < V; ++k) v[j + k] = part[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) v[k] = start + k < numel ? to_float(x[start + k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* y, std::int64_t start, std::int64_t numel,
                                       bool vectorized, const float (&v)[kPerThread]) {
  if (vectorized && start + kPerThread <= numel) {
    constexpr int V = kVec16<T>;
#pragma unroll
    for (int j = 0; j < kPerThread; j += V) {
      float part[V];
#pragma unroll
      for (int k = 0; k < V; ++k) part[k] = v[j + k];
      store_floats<V>(y + start + j, part);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      if (start + k < numel) y[start + k] = from_float<T>(v[k]);
    }
  }
}

// kLanes = group_size / kPerThread threads cooperate on one group.
template <typename T, int kLanes>
__global__ void __launch_bounds__(kThreads)
quantize_kernel(const T* __restrict__ x, std::uint8_t* __restrict__ codes,
                float* __restrict__ scales, float* __restrict__ offsets, std::int64_t numel,
                QuantSpec spec, bool vectorized) {
  const std::int64_t thread = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const std::int64_t start = thread * kPerThread;
  const std::int64_t group = thread / kLanes;
  float v[kPerThread];
  load_chunk(x, start, numel, vectorized, v);

  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    if (start + k < numel) {
      lo = fminf(lo, v[k]);
      hi = fmaxf(hi, v[k]);
    }
  }
  // Every lane takes part in the shuffles, also those past the end.
  lo = warp_min<kLanes>(lo);
  hi = warp_max<kLanes>(hi);
  if (start >= numel) return;

  const float qmax = spec.qmax();
  float scale, offset = 0.0f, qmin = 0.0f;
  if (spec.symmetric) {
    scale = fmaxf(fabsf(lo), fabsf(hi)) / qmax;
    qmin = -qmax;
  } else {
    scale = (hi - lo) / qmax;
    offset = lo;
  }
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  if (thread % kLanes == 0) {
    scales[group] = scale;
    if (!spec.symmetric) offsets[group] = offset;
  }
  int q[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {  // elements past the end pack as code 0
    q[k] = start + k < numel ? static_cast<int>(fminf(fmaxf(rintf((v[k] - offset) * inv), qmin), qmax)) : 0;
  }

  const bool full = vectorized && start + kPerThread <= numel;
  if (spec.bits == 8) {
    if (full) {
      Vec<std::uint8_t, kPerThread> packed;
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) packed.v[k] = static_cast<std::uint8_t>(q[k] & 0xff);
      *reinterpret_cast<Vec<std::uint8_t, kPerThread>*>(codes + start) = packed;
    } else {
      for (int k = 0; k < kPerThread && start + k < numel; ++k) codes[start + k] = static_cast<std::uint8_t>(q[k] & 0xff);
    }
  } else {
    Vec<std::uint8_t, kPerThread / 2> packed;
#pragma unroll
    for (int k = 0; k < kPerThread / 2; ++k) {
      packed.v[k] = static_cast<std::uint8_t>((q[2 * k] & 0xf) | ((q[2 * k + 1] & 0xf) << 4));
    }
    std::uint8_t* out = codes + start / 2;
    if (full) {
      *reinterpret_cast<Vec<std::uint8_t, kPerThread / 2>*>(out) = packed;
    } else {
      for (int k = 0; k < kPerThread / 2 && start + 2 * k < numel; ++k) out[k] = packed.v[k];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const std::uint8_t* __restrict__ codes, const float* __restrict__ scales,
                  const float* __restrict__ offsets, T* __restrict__ y, std::int64_t numel,
                  int group_size, QuantSpec spec, bool vectorized) {
  const std::int64_t thread = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const std::int64_t start = thread * kPerThread;
  if (start >= numel) return;
  const std::int64_t group = start / group_size;
  const float scale = scales[group];
  const float offset = spec.symmetric ? 0.0f : offsets[group];
  const bool full = vectorized && start + kPerThread <= numel;
  int q[kPerThread];
  if (spec.bits == 8) {
    Vec<std::uint8_t, kPerThread> packed;
    if (full) {
      packed = *reinterpret_cast<const Vec<std::uint8_t, kPerThread>*>(codes + start);
    } else {
      for (int k = 0; k < kPerThread; ++k) packed.v[k] = start + k < numel ? codes[start + k] : 0;
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      q[k] = spec.symmetric ? static_cast<int>(static_cast<std::int8_t>(packed.v[k])) : static_cast<int>(packed.v[k]);
    }
  } else {
    Vec<std::uint8_t, kPerThread / 2> packed;
    const std::uint8_t* in = codes + start / 2;
    if (full) {
      packed = *reinterpret_cast<const Vec<std::uint8_t, kPerThread / 2>*>(in);
    } else {
      for (int k = 0; k < kPerThread / 2; ++k) packed.v[k] = start + 2 * k < numel ? in[k] : 0;
    }
#pragma unroll
    for (int k = 0; k < kPerThread / 2; ++k) {
      const int low = packed.v[k] & 0xf, high = packed.v[k] >> 4;
      // Sign-extend 4-bit two's complement when symmetric.
      q[2 * k] = spec.symmetric ? (low ^ 8) - 8 : low;
      q[2 * k + 1] = spec.symmetric ? (high ^ 8) - 8 : high;
    }
  }
  float v[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) v[k] = static_cast<float>(q[k]) * scale + offset;
  store_chunk(y, start, numel, vectorized, v);
}

const char* check_spec(int group_size, int bits) {
  if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256) {
    return "group_size must be 32, 64, 128 or 256";
  }
  if (bits != 8 && bits != 4) return "bits must be 8 or 4";
  return nullptr;
}

unsigned blocks_for(std::int64_t numel) {
  const std::int64_t threads = (numel + kPerThread - 1) / kPerThread;
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

}  // namespace

const char* quantize_blockwise(Ptr x, Ptr codes, Ptr scales, Ptr offsets, std::int64_t numel,
                               int group_size, int bits, bool symmetric, int dtype,
                               std::uintptr_t stream_handle) {
  if (const char* error = check_spec(group_size, bits)) return error;
  if (numel == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  const QuantSpec spec{bits, symmetric};
  const bool vectorized = aligned16(x) && aligned16(codes);
  auto* cp = reinterpret_cast<std::uint8_t*>(codes);
  auto* sp = reinterpret_cast<float*>(scales);
  auto* op = reinterpret_cast<float*>(offsets);
  const unsigned blocks = blocks_for(numel);
  DS_DISPATCH_FLOAT(dtype, T,
    auto* xp = reinterpret_cast<const T*>(x);
    switch (group_size / kPerThread) {
      case 2: quantize_kernel<T, 2><<<blocks, kThreads, 0, stream>>>(xp, cp, sp, op, numel, spec, vectorized); break;
      case 4: quantize_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(xp, cp, sp, op, numel, spec, vectorized); break;
      case 8: quantize_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(xp, cp, sp, op, numel, spec, vectorized); break;
      default: quantize_kernel<T, 16><<<blocks, kThreads, 0, stream>>>(xp, cp, sp, op, numel, spec, vectorized); break;
    });
  DS_RETURN_LAUNCH_STATUS();
}

const char* dequantize_blockwise(Ptr codes, Ptr scales, Ptr offsets, Ptr y, std::int64_t numel,
                                 int group_size, int bits, bool symmetric, int dtype,
                                 std::uintptr_t stream_handle) {
  if (const char* error = check_spec(group_size, bits)) return error;
  if (numel == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  const QuantSpec spec{bits, symmetric};
  const bool vectorized = aligned16(y) && aligned16(codes);
  DS_DISPATCH_FLOAT(dtype, T,
    dequantize_kernel<T><<<blocks_for(numel), kThreads, 0, stream>>>(
        reinterpret_cast<const std::uint8_t*>(codes), reinterpret_cast<const float*>(scales),
        reinterpret_cast<const float*>(offsets), reinterpret_cast<T*>(y), numel, group_size, spec,
        vectorized));
  DS_RETURN_LAUNCH_STATUS();
}

}  // namespace ds
