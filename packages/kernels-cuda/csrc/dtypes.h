// Element types, their float conversions and 16-byte vector access, for CUDA and HIP alike.
//
// Python passes a dtype as a small integer code (DType below, mirrored in
// ds/kernels/cuda/_native.py); DS_DISPATCH_FLOAT turns a code into a C++ type. bfloat16
// is kept as raw bits with our own round-to-nearest-even conversion: it is exact, costs a
// few integer instructions in kernels that wait on memory anyway, and avoids the vendors'
// incompatible bfloat16 headers.
#pragma once

#include <cstring>

#include "compat.h"

namespace ds {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct bf16 {
  std::uint16_t bits;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16 v) {
  return __uint_as_float(static_cast<std::uint32_t>(v.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float v) {
  std::uint32_t u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    return bf16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<std::uint16_t>(u >> 16)};
}

// N consecutive elements moved with one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[N]) {
  const Vec<T, N> packed = *reinterpret_cast<const Vec<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(packed.v[i]);
}

// W 32-bit words stored with the widest vector accesses their count allows. A plain store
// of a Vec, a union or even a uint4 is only a struct copy to nvcc, which splits it into
// per-element stores and merges them back only where it can prove the addresses adjacent:
// with a row * hidden + column address it could not (four 32-bit stores for a 16-byte
// vector, in both backward kernels of activations.cu; SwiGLU backward ran at 64% of copy
// bandwidth on an H100 instead of 98%). One st.global.v4/v2 instruction cannot be split;
// the memory clobber keeps it in order with the kernel's other accesses. (__stwb would
// also hold, but compiles to a strong store, STG.E.128.STRONG.SM, not the plain one.)
template <int W>
__device__ __forceinline__ void store_words(void* ptr, const std::uint32_t (&w)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int i = 0; i < W / 4; ++i) {
      uint4* dst = reinterpret_cast<uint4*>(ptr) + i;
#if defined(__CUDA_ARCH__)
      asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[4 * i]), "r"(w[4 * i + 1]),
                   "r"(w[4 * i + 2]), "r"(w[4 * i + 3])
                   : "memory");
#else
      *dst = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
#endif
    }
  } else if constexpr (W % 2 == 0) {
#pragma unroll
    for (int i = 0; i < W / 2; ++i) {
      uint2* dst = reinterpret_cast<uint2*>(ptr) + i;
#if defined(__CUDA_ARCH__)
      asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(dst), "r"(w[2 * i]), "r"(w[2 * i + 1]) : "memory");
#else
      *dst = make_uint2(w[2 * i], w[2 * i + 1]);
#endif
    }
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) reinterpret_cast<std::uint32_t*>(ptr)[i] = w[i];
  }
}

// A Vec stored whole (see store_words); ptr aligned as the Vec is.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& vec) {
  constexpr int kBytes = static_cast<int>(sizeof(Vec<T, N>));
  if constexpr (kBytes % 4 == 0) {
    std::uint32_t words[kBytes / 4];
    memcpy(words, &vec, kBytes);
    store_words(ptr, words);
  } else {
    *reinterpret_cast<Vec<T, N>*>(ptr) = vec;
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* ptr, const float (&in)[N]) {
  Vec<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.v[i] = from_float<T>(in[i]);
  store_vec(ptr, packed);
}

// bfloat16 loads widen pairwise: a bfloat16 is the high half of a float, so each 32-bit
// word gives two floats with one shift and one mask (the generic path spends a byte
// permute and a multiply on the high half).
template <int N>
__device__ __forceinline__ void load_floats(const bf16* ptr, float (&out)[N]) {
  if constexpr (N % 2 == 0) {
    union {
      Vec<bf16, N> vec;
      std::uint32_t words[N / 2];
    } packed;
    packed.vec = *reinterpret_cast<const Vec<bf16, N>*>(ptr);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      out[2 * i] = __uint_as_float(packed.words[i] << 16);
      out[2 * i + 1] = __uint_as_float(packed.words[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(ptr[i]);
  }
}

// Two floats to two bfloat16 (round to nearest even) in one instruction where the hardware
// has it (sm_80 and newer); the same bits as from_float<bf16> except a NaN's payload.
__device__ __forceinline__ std::uint32_t pack_bf16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  std::uint32_t out;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
  return out;
#else
  return static_cast<std::uint32_t>(from_float<bf16>(lo).bits) |
         (static_cast<std::uint32_t>(from_float<bf16>(hi).bits) << 16);
#endif
}

// bfloat16 stores convert pairwise: memory-bound kernels spend most of their instructions on
// conversions, and the integer rounding above costs about seven per element.
template <int N>
__device__ __forceinline__ void store_floats(bf16* ptr, const float (&in)[N]) {
  if constexpr (N % 2 == 0) {
    std::uint32_t words[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) words[i] = pack_bf16x2(in[2 * i], in[2 * i + 1]);
    store_words(ptr, words);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) ptr[i] = from_float<bf16>(in[i]);
  }
}

// N elements through the read-only data path (ld.global.nc), in 16-byte pieces when the
// vector is a multiple of 16 bytes. Only for data no thread of the same kernel writes.
template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec_nc(const T* ptr) {
  constexpr int kBytes = static_cast<int>(sizeof(Vec<T, N>));
  if constexpr (kBytes % 16 == 0) {
    union {
      Vec<T, N> vec;
      uint4 raw[kBytes / 16];
    } out;
    const uint4* src = reinterpret_cast<const uint4*>(ptr);
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) out.raw[i] = __ldg(src + i);
    return out.vec;
  } else {
    return *reinterpret_cast<const Vec<T, N>*>(ptr);
  }
}

// Elements per 16-byte access: the widest load a thread can issue.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(std::uintptr_t ptr) { return ptr % 16 == 0; }

}  // namespace ds

// Runs the statement with T bound to the C++ type of a float dtype code; unknown codes
// return an error message from the enclosing launcher.
#define DS_DISPATCH_FLOAT(code, T, ...)                  \
  switch (code) {                                        \
    case ::ds::kFloat32: {                               \
      using T = float;                                   \
      __VA_ARGS__;                                       \
      break;                                             \
    }                                                    \
    case ::ds::kFloat16: {                               \
      using T = __half;                                  \
      __VA_ARGS__;                                       \
      break;                                             \
    }                                                    \
    case ::ds::kBFloat16: {                              \
      using T = ::ds::bf16;                              \
      __VA_ARGS__;                                       \
      break;                                             \
    }                                                    \
    default:                                             \
      return "unsupported dtype code (expected float32, float16 or bfloat16)"; \
  }
