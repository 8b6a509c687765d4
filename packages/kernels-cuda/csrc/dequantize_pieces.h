// The dequantizers of quantize.cu (int8/int4) and quantize_fp8.cu (fp8): codes plus one float32
// scale (and offset) per group of kGroup elements -> y = code * scale (+ offset).
//
// A thread's piece is 8 consecutive outputs, so each warp store of bf16/fp16 is one contiguous
// 512-byte run (32 lanes x 16 bytes) and each code load one contiguous 128-256-byte run; the
// earlier 16-output chunks left every 16-byte store covering half of each 32-byte sector it
// touched. A thread takes 8 pieces, 256 pieces apart, and issues all code and scale loads
// before any arithmetic; codes are read with ld.global.nc.L1::no_allocate.L2::256B and outputs
// written with st.global.cs (evict-first: nothing here reads them again). On an H100 (2^27
// elements, bf16 out, group 128, % of a device-to-device copy's bandwidth): int8 symmetric
// 96.6% (0.1398 ms) against 92.6% for 16-output chunks two per thread; int4 asymmetric 96.1%
// (0.1188 ms) against 87.4%. Four pieces a thread gave 95.7-96.5%, a resident grid walking the
// tensor 90-92%, 16-output pieces 65-83%. float32 outputs store a piece as two 16-byte halves.
//
// The launchers pass 16-byte aligned codes and outputs (dense() / torch.empty), so there is no
// unaligned path; the tensor's last partial piece (< 8 outputs) is written by one thread.
// HIP has neither cache hint: plain loads and stores.
#pragma once

#include <type_traits>

#include "dtypes.h"

namespace ds {
namespace pieces {

constexpr int kThreads = 256;
constexpr int kOut = 8;     // outputs per piece
constexpr int kUnroll = 8;  // pieces per thread

// W words (8 codes) of a piece: W = 1 (int4) or 2 (int8, fp8).
template <int W>
__device__ __forceinline__ void load_code_words(const std::uint8_t* p, std::uint32_t (&w)[W]) {
  static_assert(W == 1 || W == 2, "a piece's codes are one or two words");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (W == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
  } else {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
  }
#else
  if constexpr (W == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = *reinterpret_cast<const std::uint32_t*>(p);
  }
#endif
}

__device__ __forceinline__ void store_streaming(void* p, std::uint32_t a, std::uint32_t b, std::uint32_t c,
                                                std::uint32_t d) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
#else
  *reinterpret_cast<uint4*>(p) = make_uint4(a, b, c, d);
#endif
}

__device__ __forceinline__ std::uint32_t pack2(bf16, float lo, float hi) { return pack_bf16x2(lo, hi); }

__device__ __forceinline__ std::uint32_t pack2(__half, float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  std::uint32_t out;
  memcpy(&out, &h, sizeof(out));
  return out;
}

template <typename T>
__device__ __forceinline__ void store_piece(T* p, const float (&v)[kOut]) {
  if constexpr (sizeof(T) == 4) {
    store_streaming(p, __float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
    store_streaming(p + 4, __float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]),
                    __float_as_uint(v[7]));
  } else {
    store_streaming(p, pack2(T{}, v[0], v[1]), pack2(T{}, v[2], v[3]), pack2(T{}, v[4], v[5]),
                    pack2(T{}, v[6], v[7]));
  }
}

// Codec: kWords (code words per piece), kOffsets (whether groups have an offset),
// decode(words, floats) (a piece's 8 codes as exact floats, element order) and
// code(codes, e) (code e of the stream as a float, for the last partial piece).
template <typename T, typename Codec, int kGroup>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const std::uint8_t* __restrict__ codes, const float* __restrict__ scales,
                  const float* __restrict__ offsets, T* __restrict__ y, std::int64_t numel) {
  static_assert(kGroup % kOut == 0, "a piece lies in one group");
  constexpr int W = Codec::kWords;
  const std::int64_t full = numel / kOut;  // pieces with all 8 outputs
  if (full * kOut < numel && blockIdx.x == 0 && threadIdx.x == 0) {
    const std::int64_t group = full * kOut / kGroup;
    const float scale = scales[group];
    const float offset = Codec::kOffsets ? offsets[group] : 0.0f;
    for (std::int64_t e = full * kOut; e < numel; ++e) y[e] = from_float<T>(Codec::code(codes, e) * scale + offset);
  }
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * kUnroll * kThreads;
  for (std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kUnroll * kThreads + threadIdx.x; first < full;
       first += step) {
    std::uint32_t words[kUnroll][W];
    float scale[kUnroll], offset[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const std::int64_t p = first + j * kThreads;
      if (p < full) {
        load_code_words<W>(codes + p * (4 * W), words[j]);
        scale[j] = __ldg(scales + p * kOut / kGroup);
        offset[j] = Codec::kOffsets ? __ldg(offsets + p * kOut / kGroup) : 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const std::int64_t p = first + j * kThreads;
      if (p < full) {
        float v[kOut];
        Codec::decode(words[j], v);
#pragma unroll
        for (int k = 0; k < kOut; ++k) v[k] = Codec::kOffsets ? v[k] * scale[j] + offset[j] : v[k] * scale[j];
        store_piece(y + p * kOut, v);
      }
    }
  }
}

// One step per thread: a block per kUnroll * kThreads pieces (at least one, for a tensor of
// fewer than 8 elements); a grid capped at 2^31 - 1 blocks walks the rest.
inline unsigned grid_for(std::int64_t numel) {
  const std::int64_t per_block = static_cast<std::int64_t>(kThreads) * kUnroll * kOut;
  const std::int64_t blocks = (numel + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks > 0x7fffffff ? 0x7fffffff : (blocks > 0 ? blocks : 1));
}

// Calls fn(std::integral_constant<int, kGroup>{}) for a group size of 32, 64, 128 or 256.
template <typename Fn>
const char* with_group(int group_size, Fn&& fn) {
  switch (group_size) {
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    case 256: return fn(std::integral_constant<int, 256>{});
    default: return "group_size must be 32, 64, 128 or 256";
  }
}

inline const char* check_aligned(std::uintptr_t codes, std::uintptr_t y) {
  if (!aligned16(codes) || !aligned16(y)) {
    return "dequantize: codes and output must be 16-byte aligned (pass contiguous tensors from the ds launcher)";
  }
  return nullptr;
}

}  // namespace pieces
}  // namespace ds
