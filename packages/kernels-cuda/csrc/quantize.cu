// Block-wise int8/int4 quantisation and dequantisation (symmetric and asymmetric).
//
// A chunk is 16 consecutive elements, so a group of G elements is G/16 neighbouring lanes
// of one warp and its absmax (or min and max) is a few shuffles; x is read once, codes and
// the per-group scale/offset written once. Threads walk chunks in a grid that fills the GPU
// once and take kChunks chunks per step, all loads issued before any arithmetic, so each
// thread keeps 64 bytes or more of loads in flight (a 16-bit input: four 16-byte accesses).
//
// Scales and reciprocals are rounded divisions even under --use_fast_math, and codes come
// from one round-to-nearest-even conversion: the output matches the torch reference in
// opdefs.py bit for bit.
#include <type_traits>

#include "chunk_io.h"
#include "dtypes.h"
#include "kernels.h"
#include "reduce.h"

namespace ds {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;  // elements per chunk
constexpr int kChunks = 2;      // chunks per thread per step

// Largest code: 127 or 7 symmetric (codes in [-qmax, qmax]), 255 or 15 asymmetric.
__device__ __forceinline__ int qmax_of(int bits, bool symmetric) {
  return symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
}

// Quantises chunk `chunk` (values in v; zeros past numel) and stores its codes; the first
// lane of each group stores the group's scale (and offset). Every lane of the warp must call
// it: the group statistics are shuffles.
template <bool kSymmetric, int kLanes>
__device__ __forceinline__ void quantize_chunk(const float (&v)[kPerThread], std::int64_t chunk, std::int64_t numel,
                                               bool vectorized, int bits, std::uint8_t* __restrict__ codes,
                                               float* __restrict__ scales, float* __restrict__ offsets) {
  const std::int64_t start = chunk * kPerThread;
  const bool whole = start + kPerThread <= numel;
  const int qmax = qmax_of(bits, kSymmetric);
  float scale, offset = 0.0f;
  if constexpr (kSymmetric) {
    float amax = 0.0f;  // the zeros past the end leave an absmax alone
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) amax = fmaxf(amax, fabsf(v[k]));
    scale = __fdiv_rn(warp_max<kLanes>(amax), static_cast<float>(qmax));
  } else {
    float lo = INFINITY, hi = -INFINITY;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      if (whole || start + k < numel) {
        lo = fminf(lo, v[k]);
        hi = fmaxf(hi, v[k]);
      }
    }
    lo = warp_min<kLanes>(lo);
    hi = warp_max<kLanes>(hi);
    scale = __fdiv_rn(hi - lo, static_cast<float>(qmax));
    offset = lo;
  }
  if (start >= numel) return;
  if (chunk % kLanes == 0) {
    scales[chunk / kLanes] = scale;
    if (!kSymmetric) offsets[chunk / kLanes] = offset;
  }
  const float inv = scale > 0.0f ? __frcp_rn(scale) : 0.0f;
  const int qmin = kSymmetric ? -qmax : 0;
  int q[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {  // elements past the end pack as code 0
    const int code = __float2int_rn((v[k] - offset) * inv);
    q[k] = whole || start + k < numel ? max(qmin, min(qmax, code)) : 0;
  }

  if (bits == 8) {
    Vec<std::uint8_t, kPerThread> packed;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) packed.v[k] = static_cast<std::uint8_t>(q[k] & 0xff);
    if (vectorized && whole) {
      *reinterpret_cast<Vec<std::uint8_t, kPerThread>*>(codes + start) = packed;
    } else {
      for (int k = 0; k < kPerThread && start + k < numel; ++k) codes[start + k] = packed.v[k];
    }
  } else {
    Vec<std::uint8_t, kPerThread / 2> packed;
#pragma unroll
    for (int k = 0; k < kPerThread / 2; ++k) {
      packed.v[k] = static_cast<std::uint8_t>((q[2 * k] & 0xf) | ((q[2 * k + 1] & 0xf) << 4));
    }
    std::uint8_t* out = codes + start / 2;
    if (vectorized && whole) {
      *reinterpret_cast<Vec<std::uint8_t, kPerThread / 2>*>(out) = packed;
    } else {
      for (int k = 0; k < kPerThread / 2 && start + 2 * k < numel; ++k) out[k] = packed.v[k];
    }
  }
}

// kLanes = group_size / kPerThread threads cooperate on one group. The loop bound is
// rounded up to whole warps, so every lane of a warp runs every step (the shuffles need
// them all); lanes past the end load zeros and store nothing.
template <typename T, bool kSymmetric, int kLanes>
__global__ void __launch_bounds__(kThreads)
quantize_kernel(const T* __restrict__ x, std::uint8_t* __restrict__ codes, float* __restrict__ scales,
                float* __restrict__ offsets, std::int64_t numel, int bits, bool vectorized) {
  const std::int64_t chunks = (numel + kPerThread - 1) / kPerThread;
  const std::int64_t bound = (chunks + DS_WARP_SIZE - 1) / DS_WARP_SIZE * DS_WARP_SIZE;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; first < bound;
       first += kChunks * stride) {
    float v[kChunks][kPerThread];
#pragma unroll
    for (int j = 0; j < kChunks; ++j) load_chunk(x, (first + j * stride) * kPerThread, numel, vectorized, v[j]);
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      quantize_chunk<kSymmetric, kLanes>(v[j], first + j * stride, numel, vectorized, bits, codes, scales, offsets);
    }
  }
}

// The codes of one chunk as 32-bit words: four of int8 codes, two of packed int4.
template <int kBits>
__device__ __forceinline__ void load_codes(const std::uint8_t* __restrict__ codes, std::int64_t start,
                                           std::int64_t numel, bool vectorized, std::uint32_t (&words)[4]) {
  constexpr int kBytes = kPerThread * kBits / 8;
  const std::uint8_t* in = codes + start * kBits / 8;
  if (vectorized && start + kPerThread <= numel) {
    if constexpr (kBits == 8) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(in));
      words[0] = raw.x, words[1] = raw.y, words[2] = raw.z, words[3] = raw.w;
    } else {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(in));
      words[0] = raw.x, words[1] = raw.y, words[2] = words[3] = 0;
    }
  } else {
    const std::int64_t available = ((numel - start) * kBits + 7) / 8;
#pragma unroll
    for (int w = 0; w < 4; ++w) words[w] = 0;
#pragma unroll
    for (int b = 0; b < kBytes; ++b) {  // unrolled, so words stays in registers
      if (b < available) words[b / 4] |= static_cast<std::uint32_t>(in[b]) << (8 * (b % 4));
    }
  }
}

template <int kBits, bool kSymmetric>
__device__ __forceinline__ int code_at(const std::uint32_t (&words)[4], int k) {
  if constexpr (kBits == 8) {
    const int byte = static_cast<int>((words[k / 4] >> (8 * (k % 4))) & 0xffu);
    return kSymmetric ? static_cast<int>(static_cast<std::int8_t>(byte)) : byte;
  } else {
    const int nibble = static_cast<int>((words[k / 8] >> (4 * (k % 8))) & 0xfu);
    return kSymmetric ? (nibble ^ 8) - 8 : nibble;  // 4-bit two's complement
  }
}

template <typename T, int kBits, bool kSymmetric, int kLanes>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const std::uint8_t* __restrict__ codes, const float* __restrict__ scales,
                  const float* __restrict__ offsets, T* __restrict__ y, std::int64_t numel, bool vectorized) {
  const std::int64_t chunks = (numel + kPerThread - 1) / kPerThread;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; first < chunks;
       first += kChunks * stride) {
    std::uint32_t words[kChunks][4];
    float scale[kChunks], offset[kChunks];
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const std::int64_t chunk = first + j * stride;
      if (chunk < chunks) {
        load_codes<kBits>(codes, chunk * kPerThread, numel, vectorized, words[j]);
        scale[j] = __ldg(scales + chunk / kLanes);
        offset[j] = kSymmetric ? 0.0f : __ldg(offsets + chunk / kLanes);
      }
    }
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const std::int64_t chunk = first + j * stride;
      if (chunk < chunks) {
        float v[kPerThread];
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          v[k] = static_cast<float>(code_at<kBits, kSymmetric>(words[j], k)) * scale[j] + offset[j];
        }
        store_chunk(y, chunk * kPerThread, numel, vectorized, v);
      }
    }
  }
}

const char* check_spec(int group_size, int bits) {
  if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256) {
    return "group_size must be 32, 64, 128 or 256";
  }
  if (bits != 8 && bits != 4) return "bits must be 8 or 4";
  return nullptr;
}

// Enough blocks for the whole tensor in one step each, at most as many as the GPU holds.
template <typename Kernel>
const char* launch_grid(Kernel kernel, std::int64_t numel, unsigned* grid) {
  int resident = 0;
  if (resident_blocks(kernel, kThreads, 0, &resident) != DS_SUCCESS) DS_RETURN_LAUNCH_STATUS();
  const std::int64_t per_block = static_cast<std::int64_t>(kThreads) * kChunks * kPerThread;
  const std::int64_t needed = (numel + per_block - 1) / per_block;
  *grid = static_cast<unsigned>(needed < resident ? needed : resident);
  return nullptr;
}

// Calls fn(std::integral_constant<int, kLanes>{}) for a valid group size.
template <typename Fn>
const char* with_lanes(int group_size, Fn&& fn) {
  switch (group_size / kPerThread) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    default: return fn(std::integral_constant<int, 16>{});
  }
}

}  // namespace

const char* quantize_blockwise(Ptr x, Ptr codes, Ptr scales, Ptr offsets, std::int64_t numel,
                               int group_size, int bits, bool symmetric, int dtype,
                               std::uintptr_t stream_handle) {
  if (const char* error = check_spec(group_size, bits)) return error;
  if (numel == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  const bool vectorized = aligned16(x) && aligned16(codes);
  auto* cp = reinterpret_cast<std::uint8_t*>(codes);
  auto* sp = reinterpret_cast<float*>(scales);
  auto* op = reinterpret_cast<float*>(offsets);
  DS_DISPATCH_FLOAT(dtype, T,
    return with_lanes(group_size, [&](auto lanes) -> const char* {
      auto kernel = symmetric ? quantize_kernel<T, true, decltype(lanes)::value>
                              : quantize_kernel<T, false, decltype(lanes)::value>;
      unsigned grid = 0;
      if (const char* error = launch_grid(kernel, numel, &grid)) return error;
      kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const T*>(x), cp, sp, op, numel, bits, vectorized);
      DS_RETURN_LAUNCH_STATUS();
    }));
  return nullptr;
}

const char* dequantize_blockwise(Ptr codes, Ptr scales, Ptr offsets, Ptr y, std::int64_t numel,
                                 int group_size, int bits, bool symmetric, int dtype,
                                 std::uintptr_t stream_handle) {
  if (const char* error = check_spec(group_size, bits)) return error;
  if (numel == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  const bool vectorized = aligned16(y) && aligned16(codes);
  auto* cp = reinterpret_cast<const std::uint8_t*>(codes);
  auto* sp = reinterpret_cast<const float*>(scales);
  auto* op = reinterpret_cast<const float*>(offsets);
  DS_DISPATCH_FLOAT(dtype, T,
    return with_lanes(group_size, [&](auto lanes) -> const char* {
      constexpr int L = decltype(lanes)::value;
      auto kernel = bits == 8 ? (symmetric ? dequantize_kernel<T, 8, true, L> : dequantize_kernel<T, 8, false, L>)
                              : (symmetric ? dequantize_kernel<T, 4, true, L> : dequantize_kernel<T, 4, false, L>);
      unsigned grid = 0;
      if (const char* error = launch_grid(kernel, numel, &grid)) return error;
      kernel<<<grid, kThreads, 0, stream>>>(cp, sp, op, reinterpret_cast<T*>(y), numel, vectorized);
      DS_RETURN_LAUNCH_STATUS();
    }));
  return nullptr;
}

}  // namespace ds
